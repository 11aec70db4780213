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
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1,
      "inactivity_timeout": -1}, "inactivity_timeout"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1,
      "inactivity_timeout": 2_147_484}, "inactivity_timeout"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1,
      "inactivity_timeout": 60.5}, "inactivity_timeout"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1, "dirty": "yes"}, "dirty"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1, "dirty": None}, "dirty"),
    ({"url": "file:///a", "size": 1, "ops": ["read"], "timeout": 1, "filename": 7}, "filename"),
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


# Engine tickets (SPEC §2): what the oVirt engine sends must be accepted.

def test_engine_fields_are_kept():
    s = spec(dirty=True, filename="disk.qcow2", transfer_id="t-1",
             inactivity_timeout=120, sparse=True)
    assert s["dirty"] is True
    assert s["filename"] == "disk.qcow2"
    assert s["inactivity_timeout"] == 120


def test_engine_defaults_mean_not_set():
    # The engine's Java ImageTicket sends inactivity_timeout 0 when unset
    # and may send a null transfer_id; a filename only for browser uploads.
    s = spec(inactivity_timeout=0, transfer_id=None, filename=None)
    assert s["inactivity_timeout"] is None
    assert s["transfer_id"] is None
    assert s["filename"] is None
    assert s["dirty"] is False


def test_largest_inactivity_timeout_a_socket_takes():
    assert spec(inactivity_timeout=2_147_483)["inactivity_timeout"] == 2_147_483


def test_unknown_fields_are_ignored_and_logged_once(caplog):
    caplog.set_level("INFO", logger="sessions")
    key = "future_field_" + str(id(caplog))
    a = spec(**{key: {"x": 1}})
    b = spec(**{key: 2})
    assert key not in a and a == b
    lines = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(lines) == 1, lines
    assert caplog.records[0].levelname == "INFO"


def test_unknown_field_logging_is_bounded(caplog):
    caplog.set_level("INFO", logger="sessions")
    for i in range(500):
        spec(**{f"flood{i}": 1})
    assert len(sessions._logged_unknown) <= sessions._MAX_LOGGED_UNKNOWN


def test_unknown_field_name_cannot_forge_a_log_line(caplog):
    caplog.set_level("INFO", logger="sessions")
    spec(**{"x\nERROR forged": 1, "y" * 10000: 1})
    for r in caplog.records:
        assert "\n" not in r.getMessage()
        assert len(r.getMessage()) < 200


@pytest.mark.parametrize("name", [
    "", " lead", "trail ", ".", "..", 'a"b', "a/b", "a\\b", "a\rb", "a\nb",
    "a\0b", "a\x7fb", "a\x85b", "a\u2028b", "a\u202eb", "\ud800", "x" * 256,
])
def test_hostile_filenames_are_refused(name):
    with pytest.raises(errors.BadRequest, match="filename"):
        spec(filename=name)


@pytest.mark.parametrize("name", [
    "disk.raw", "my disk (1).qcow2", "x" * 255, "Fedora 35 – été.img", "日本.iso",
    "a;b=c.img", "100%.raw",
])
def test_good_filenames(name):
    assert spec(filename=name)["filename"] == name


@pytest.mark.parametrize("name, header", [
    (None, "attachment"),
    ("disk.raw", 'attachment; filename="disk.raw"'),
    ("a;b=c 100%.img", 'attachment; filename="a;b=c 100%.img"'),
    ("été.img", "attachment; filename=\"ete.img\"; filename*=UTF-8''%C3%A9t%C3%A9.img"),
    ("日本.iso", "attachment; filename=\"__.iso\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.iso"),
])
def test_content_disposition(name, header):
    from imaged.apps import images as images_app
    assert images_app.content_disposition(name) == header
    header.encode("latin-1")    # WSGI headers must be latin-1


def test_info_reports_integers_and_engine_fields(registry, clock):
    clock.now += 0.7
    s = registry.add(spec(dirty=True, filename="d.raw"))
    clock.now += 3.9
    info = s.info()
    assert info["expires"] == 1060 and type(info["expires"]) is int
    assert info["idle_time"] == 3 and type(info["idle_time"]) is int
    assert info["dirty"] is True and info["filename"] == "d.raw"
    assert "filename" not in registry.add(spec("s2")).info()
