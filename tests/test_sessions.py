import gevent
import pytest

from imaged import errors
from imaged import sessions


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def spec(sid="s1", **kw):
    body = {"url": "file:///var/tmp/disk.raw", "size": 1000,
            "ops": ["read"], "timeout": 60}
    body.update(kw)
    return sessions.parse_spec(sid, body)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(clock):
    return sessions.Registry(remove_timeout_s=1.0, clock=clock)


def test_parse_spec_defaults():
    s = spec()
    assert s["uuid"] == "s1"
    assert s["sparse"] is False
    assert s["inactivity_timeout"] is None
    assert s["transfer_id"] is None


@pytest.mark.parametrize("body, field", [
    ({"size": 1, "ops": ["read"], "timeout": 1}, "url"),
    ({"url": "http://x/y", "size": 1, "ops": ["read"], "timeout": 1}, "url"),
    ({"url": "file://relative", "size": 1, "ops": ["read"], "timeout": 1}, "url"),
    ({"url": "file:///a", "ops": ["read"], "timeout": 1}, "size"),
    ({"url": "file:///a", "size": -1, "ops": ["read"], "timeout": 1}, "size"),
    ({"url": "file:///a", "size": "1", "ops": ["read"], "timeout": 1}, "size"),
    ({"url": "file:///a", "size": 1, "ops": ["delete"], "timeout": 1}, "ops"),
    ({"url": "file:///a", "size": 1, "ops": [], "timeout": 1}, "ops"),
    ({"url": "file:///a", "size": 1, "ops": "read", "timeout": 1}, "ops"),
    ({"url": "file:///a", "size": 1, "ops": ["read"]}, "timeout"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": True}, "timeout"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1, "sparse": 1}, "sparse"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1, "uuid": "other"}, "uuid"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1, "color": 1}, "color"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1,
      "inactivity_timeout": 0}, "inactivity_timeout"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1,
      "transfer_id": "t1\nforged log line"}, "transfer_id"),
    ({"url": "file:///a%2e%2e/b", "size": 1, "ops": ["read"], "timeout": 1}, "url"),
    ({"url": "file://localhost/a", "size": 1, "ops": ["read"], "timeout": 1}, "url"),
    ([1, 2], "object"),
])
def test_parse_spec_names_the_bad_field(body, field):
    with pytest.raises(errors.BadRequest) as e:
        sessions.parse_spec("s1", body)
    assert field in str(e.value)


@pytest.mark.parametrize("sid", ["", "a/b", "a b", "x" * 129, "\u00e9", "a\0b", ".", ".."])
def test_bad_ids(sid):
    with pytest.raises(errors.BadRequest):
        sessions.check_id(sid)


def test_short_id_hides_the_secret():
    sid = "0123456789abcdef"
    assert sessions.short_id(sid) == "01234567..."


def test_add_is_idempotent_and_conflicts(registry, clock):
    a = registry.add(spec())
    clock.now += 30
    # Same content, another timeout: a renewal.
    b = registry.add(spec(timeout=100))
    assert a is b
    assert a.expires == clock.now + 100
    with pytest.raises(errors.Conflict):
        registry.add(spec(size=2000))


def test_write_implies_read(registry):
    s = registry.add(spec(ops=["write"]))
    assert s.may("read") and s.may("write")
    r = registry.add(spec("s2"))
    assert r.may("read") and not r.may("write")
    with pytest.raises(errors.Forbidden):
        registry.authorize("s2", "write")


def test_authorize_unknown_is_forbidden(registry):
    with pytest.raises(errors.Forbidden):
        registry.authorize("nope", "read")
    with pytest.raises(errors.NotFound):
        registry.get("nope")


def test_extend_and_expire(registry, clock):
    registry.add(spec(timeout=10))
    clock.now += 5
    registry.extend("s1", 10)
    clock.now += 9
    assert registry.reap() == 0
    registry.authorize("s1", "read")
    clock.now += 2
    with pytest.raises(errors.Forbidden, match="expired"):
        registry.authorize("s1", "read")
    assert registry.reap() == 1
    with pytest.raises(errors.NotFound):
        registry.get("s1")


def test_remove_cancels_and_waits_for_operations(registry):
    s = registry.add(spec())
    op = sessions.Operation("read", 0, 100)
    aborted = []
    op.on_cancel = lambda: aborted.append(True)
    s.add_operation(op)
    assert s.info()["active"] is True

    def worker():
        # A transfer loop: checks for cancellation between chunks.
        while True:
            try:
                op.check()
            except errors.Canceled:
                op.progress(0)
                s.remove_operation(op)
                return "canceled"
            gevent.sleep(0.01)

    g = gevent.spawn(worker)
    registry.remove("s1")
    assert g.get(timeout=5) == "canceled"
    assert aborted == [True]
    with pytest.raises(errors.NotFound):
        registry.get("s1")
    # Idempotent.
    registry.remove("s1")


def test_remove_conflict_when_operations_do_not_stop(registry):
    s = registry.add(spec())
    op = sessions.Operation("write", 0, 100)
    s.add_operation(op)
    registry.remove_timeout_s = 0.05
    with pytest.raises(errors.Conflict):
        registry.remove("s1")
    # Still there, canceled, until the operation ends.
    assert registry.get("s1").canceled
    with pytest.raises(errors.Forbidden):
        registry.authorize("s1", "read")
    s.remove_operation(op)
    gevent.sleep(0)
    with pytest.raises(errors.NotFound):
        registry.get("s1")


def test_remove_all(registry):
    registry.add(spec("a"))
    registry.add(spec("b"))
    registry.remove_all()
    assert len(registry) == 0


def test_transferred_counts_ranges_once(registry):
    s = registry.add(spec(size=1000))
    for offset in (0, 50):
        op = sessions.Operation("read", offset, 100)
        s.add_operation(op)
        op.progress(100)
        s.remove_operation(op)
    ongoing = sessions.Operation("write", 500, 200)
    s.add_operation(ongoing)
    ongoing.progress(50)
    assert s.transferred() == 150 + 50
    # Checksums and flushes move no image data to or from a client.
    ck = sessions.Operation("checksum", 0, 1000)
    s.add_operation(ck)
    ck.progress(1000)
    s.remove_operation(ck)
    assert s.transferred() == 200


def test_info_fields(registry, clock):
    registry.add(spec(transfer_id="t-1", inactivity_timeout=30))
    info = registry.get("s1").info()
    for key in ("uuid", "url", "size", "ops", "timeout", "sparse", "expires",
                "active", "transferred", "connections", "idle_time", "canceled",
                "transfer_id", "inactivity_timeout"):
        assert key in info
    assert info["expires"] == clock.now + 60


def test_name_prefers_transfer_id(registry):
    assert registry.add(spec("secret-session-id", transfer_id="t-9")).name == "t-9"
    assert registry.add(spec("another-secret-id")).name == "another-..."


def test_reaper_greenlet_removes_expired(clock):
    registry = sessions.Registry(clock=clock)
    registry.add(spec(timeout=1))
    reaper = sessions.Reaper(registry, 0.01)
    reaper.start()
    try:
        clock.now += 2
        with gevent.Timeout(5):
            while len(registry):
                gevent.sleep(0.01)
    finally:
        reaper.stop()


def test_throughput_over_the_last_seconds(registry, clock):
    s = registry.add(spec(size=10**9))
    op = sessions.Operation("write", 0, 10**9)
    s.add_operation(op)
    assert s.throughput() == 0.0
    for _ in range(20):
        op.progress(100_000)
        clock.now += 0.5
    # 100 kB every half second.
    assert s.throughput(window_s=5.0) == pytest.approx(200_000, rel=0.15)
    clock.now += 10
    assert s.throughput(window_s=5.0) < 20_000
