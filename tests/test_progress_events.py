"""
GET /progress/{id} with Accept: text/event-stream (SPEC §10): server-sent
events from a real daemon during a real transfer, until the session ends.
"""

import json
import os
import socket
import time

import pytest

KiB = 1024
MiB = 1024**2


def event_stream(daemon, sid, timeout=20):
    """Yields each event's JSON object; ends when the server ends the stream."""
    c = daemon.control()
    r = c.get(f"http+unix://imaged/progress/{sid}", stream=True, timeout=timeout,
              headers={"Accept": "text/event-stream"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    for line in r.iter_lines(chunk_size=1):
        if line.startswith(b"data: "):
            yield json.loads(line[len(b"data: "):])
        else:
            assert line == b"", line


@pytest.fixture
def fast(make_daemon):
    return make_daemon({"progress": {"event_interval_s": 0.1},
                        "images": {"buffer_size_bytes": 64 * KiB}})


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\0" * (4 * MiB))
    return str(path)


def test_events_follow_a_transfer_until_the_session_ends(fast, image):
    sid = fast.add_session(image, transfer_id="t-sse")
    stream = event_stream(fast, sid)
    first = next(stream)
    assert first["transfer_id"] == "t-sse" and first["transferred"] == 0
    assert first["active"] is False and type(first["expires"]) is int

    # An upload sending half its body, then waiting.
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(fast.local_path)
    sock.sendall(f"PUT /images/{sid} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {4 * MiB}\r\n\r\n".encode() + os.urandom(2 * MiB))
    seen = []
    start = time.monotonic()
    for event in stream:
        seen.append(event)
        ops = event["operations"]
        if ops and ops[0]["kind"] == "write" and ops[0]["done"] >= MiB:
            break
        assert time.monotonic() - start < 10, seen[-1]
    assert seen[-1]["active"] is True

    # The rest of the body: the upload ends, the events say so.
    sock.sendall(os.urandom(2 * MiB))
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    for event in stream:
        if not event["active"]:
            break
    assert event["transferred"] == 4 * MiB and event["operations"] == []

    # Removing the session ends the stream after a last event.
    start = time.monotonic()
    assert fast.control().delete(fast.control_url + sid).status_code == 204
    rest = list(stream)
    assert rest and rest[-1]["canceled"] is True
    assert time.monotonic() - start < 5
    sock.close()


def test_default_interval_is_one_second(daemon, image):
    sid = daemon.add_session(image)
    stream = event_stream(daemon, sid)
    next(stream)
    start = time.monotonic()
    next(stream)
    next(stream)
    elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 3.5, elapsed


def test_expiry_ends_the_stream(fast, image):
    sid = fast.add_session(image, timeout=1)
    events = list(event_stream(fast, sid))
    assert events[-1]["canceled"] is True


def test_streams_hold_no_pool_thread_nor_buffer(make_daemon, image):
    # One pool thread and buffers for one transfer: if open event streams
    # held either, the transfer below could not run.
    d = make_daemon({"progress": {"event_interval_s": 0.05},
                     "threads": {"pool_size": 1, "per_session": 1},
                     "images": {"buffer_size_bytes": 1 * MiB,
                                "buffer_budget_bytes": 2 * MiB}})
    sid = d.add_session(image)
    streams = [event_stream(d, sid) for _ in range(20)]
    for s in streams:
        next(s)
    data = os.urandom(4 * MiB)
    h = d.https()
    assert h.put(d.tls_url + sid, data=data, timeout=20).status_code == 200
    assert h.get(d.tls_url + sid, timeout=20).content == data
    for s in streams:
        next(s)     # still streaming


def test_unknown_session_and_plain_json(daemon, image):
    c = daemon.control()
    r = c.get("http+unix://imaged/progress/nope", headers={"Accept": "text/event-stream"})
    assert r.status_code == 404
    sid = daemon.add_session(image)
    r = c.get(f"http+unix://imaged/progress/{sid}", headers={"Accept": "application/json"})
    assert r.headers["Content-Type"] == "application/json"
    assert r.json()["size"] == 4 * MiB


@pytest.mark.parametrize("accept, wanted", [
    ("text/event-stream", True),
    ("application/json, Text/Event-Stream;q=0.9", True),
    (None, False), ("", False), ("*/*", False), ("text/event-streams", False),
])
def test_wants_events(accept, wanted):
    from imaged.apps import progress
    assert progress.wants_events(accept) is wanted
