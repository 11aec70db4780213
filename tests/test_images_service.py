"""
imaged.images.Images, the service under the images API, driven the way a
handler drives it but without HTTP: real sessions and real files, a plain
reader for bodies, and a fake connection (the two hooks a transport gives).
"""

import io
import json
import os
import uuid

import pytest

from imaged import config
from imaged import errors
from imaged import images
from imaged import sessions

KiB = 1024
MiB = 1024**2


class FakeConnection:
    """What a transport hands the service: a cancel hook and an idle timeout."""

    def __init__(self):
        self.canceled = 0
        self.idle_timeouts = []

    def cancel(self):
        self.canceled += 1

    def set_idle_timeout(self, timeout_s):
        self.idle_timeouts.append(timeout_s)


class Reader:
    """A request body: bytes handed out through readinto() in small pieces."""

    def __init__(self, data, piece=7 * KiB):
        self._f = io.BytesIO(data)
        self._piece = piece

    def readinto(self, view):
        return self._f.readinto(view[:self._piece])


@pytest.fixture
def registry():
    return sessions.Registry(remove_timeout_s=1.0)


@pytest.fixture
def service(registry):
    cfg = config.validate({
        "listeners": [{"name": "t", "kind": "tcp", "host": "127.0.0.1", "port": 0,
                       "apps": ["images"]}],
        "images": {"buffer_size_bytes": 64 * KiB, "buffer_budget_bytes": 2 * MiB,
                   "max_connections_per_session": 2, "inactivity_timeout_s": 60},
    })
    return images.Images(registry, cfg, unix_socket="/run/test.sock")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    data = os.urandom(MiB)
    path.write_bytes(data)
    return str(path), data


def add(registry, path, ops=("read", "write"), **extra):
    sid = str(uuid.uuid4())
    spec = {"url": f"file://{path}", "size": os.path.getsize(path),
            "ops": list(ops), "timeout": 300}
    spec.update(extra)
    registry.add(sessions.parse_spec(sid, spec))
    return sid


def client_of(service):
    conn = FakeConnection()
    return service.client(conn.cancel, conn.set_idle_timeout), conn


def test_read_streams_the_range_and_ends_the_operation(service, registry, image):
    path, data = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "read", client)
    chunks = service.read(session, 1000, 300 * KiB, client)
    assert session.active
    got = b"".join(bytes(c) for c in chunks)
    chunks.close()
    assert got == data[1000:1000 + 300 * KiB]
    assert not session.active
    assert session.transferred() == 300 * KiB
    # The buffers went back to the budget when the operation ended.
    assert service.buffer_pool.in_use_bytes == 0


def test_a_read_leases_what_its_range_needs(registry, image):
    # A short range leaves the rest of the budget to other transfers (and
    # to the NBD read-ahead): one buffer if the range fits in it; sizes
    # stay powers of two, so the chunks after the first start aligned for
    # O_DIRECT.
    cfg = config.validate({
        "listeners": [{"name": "t", "kind": "tcp", "host": "127.0.0.1", "port": 0,
                       "apps": ["images"]}],
        "images": {"buffer_size_bytes": 8 * MiB, "buffer_budget_bytes": 16 * MiB},
    })
    service = images.Images(registry, cfg, unix_socket="/run/test.sock")
    path, data = image
    sid = add(registry, path)
    for length, leased in [(1000, MiB), (MiB - 10, MiB)]:
        client, _ = client_of(service)
        session = service.session(sid, "read", client)
        chunks = service.read(session, 10, length, client)
        assert service.buffer_pool.in_use_bytes == leased
        assert b"".join(bytes(c) for c in chunks) == data[10:10 + length]
        chunks.close()
    client, _ = client_of(service)
    assert [len(b) for b in client.buffers(need_bytes=3 * MiB + 1)] == [4 * MiB]
    client.release_buffers()
    assert [len(b) for b in client.buffers(need_bytes=8 * MiB)] == [8 * MiB]
    client.release_buffers()
    # Two transfers hold the whole budget: a third gets what is left,
    # two buffers if one is too small for its range.
    others = [service.buffer_pool.get(8 * MiB, 1), service.buffer_pool.get(8 * MiB, 1)]
    mapped = service.buffer_pool.allocations
    assert [len(b) for b in client.buffers(need_bytes=2 * MiB)] == [MiB, MiB]
    # Decided before mapping: no buffer is mapped only to be given back.
    assert service.buffer_pool.allocations == mapped + 2
    client.release_buffers()
    for bufs in others:
        service.buffer_pool.put(bufs)
    assert [len(b) for b in client.buffers(need_bytes=100 * MiB)] == [8 * MiB] * 2
    client.release_buffers()
    assert [len(b) for b in client.buffers()] == [8 * MiB] * 2
    client.release_buffers()
    assert service.buffer_pool.in_use_bytes == 0


def test_write_from_a_plain_reader(service, registry, image):
    path, data = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "write", client)
    new = os.urandom(200 * KiB + 5)
    service.write(session, 4096 + 1, len(new), Reader(new), client, flush=True)
    with open(path, "rb") as f:
        assert f.read() == data[:4097] + new + data[4097 + len(new):]


def test_write_stream_stops_at_the_declared_end(service, registry, image):
    path, data = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "write", client)
    with pytest.raises(errors.Error):
        service.write_stream(session, 0, Reader(b"x" * 8192), client,
                             flush=True, end=4096)
    with open(path, "rb") as f:
        assert f.read()[4096:] == data[4096:]


def test_short_body_is_an_error(service, registry, image):
    path, _ = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "write", client)
    with pytest.raises(errors.BadRequest, match="ended early"):
        service.write(session, 0, 100 * KiB, Reader(b"x" * KiB), client, flush=True)
    assert not session.active


def test_canceling_the_session_cancels_the_connection(service, registry, image):
    path, _ = image
    sid = add(registry, path)
    client, conn = client_of(service)
    session = service.session(sid, "read", client)
    chunks = service.read(session, 0, MiB, client)
    next(chunks)
    session.cancel()
    assert conn.canceled == 1
    with pytest.raises(errors.Canceled):
        for _ in chunks:
            pass
    chunks.close()
    assert not session.active


def list_extents(service, session, client, **kw):
    """The extents answer of the service (a stream of JSON), parsed."""
    chunks = service.extents(session, client, **kw)
    try:
        return json.loads(b"".join(chunks))
    finally:
        chunks.close()


def test_extents_are_streamed_and_end_the_operation(service, registry, image):
    path, data = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "read", client)
    chunks = service.extents(session, client)
    assert session.active
    got = json.loads(b"".join(chunks))
    chunks.close()
    assert not session.active
    assert got[0]["start"] == 0
    assert sum(e["length"] for e in got) == len(data)


def test_the_backend_stays_open_between_requests(service, registry, image):
    path, _ = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "read", client)
    assert list_extents(service, session, client)[0]["start"] == 0
    backend = client.backend(session, "r")
    assert backend is not None
    list_extents(service, session, client)
    assert client.backend(session, "r") is backend
    # A removed session does not keep its image open.
    registry.remove(sid)
    assert client.backend(session, "r") is None


def test_connections_are_counted_and_limited(service, registry, image):
    path, _ = image
    sid = add(registry, path, inactivity_timeout=5)
    clients = [client_of(service) for _ in range(3)]
    session = service.session(sid, "read", clients[0][0])
    service.session(sid, "read", clients[1][0])
    assert session.connections == 2
    assert clients[0][1].idle_timeouts == [5]
    with pytest.raises(errors.ServiceUnavailable):
        service.session(sid, "read", clients[2][0])
    clients[0][0].close()
    assert session.connections == 1
    service.session(sid, "read", clients[2][0])


def test_options_of_a_read_only_session(service, registry, image):
    path, _ = image
    sid = add(registry, path, ops=["read"])
    client, _ = client_of(service)
    allow, result = service.options(sid, client)
    assert allow == ["OPTIONS", "GET"]
    assert result == {"features": ["checksum", "extents"], "max_readers": 8,
                      "max_writers": 0, "unix_socket": "/run/test.sock"}


def test_options_server_wide(service):
    client, _ = client_of(service)
    allow, result = service.options("*", client)
    assert "PUT" in allow
    assert result == {"features": ["checksum", "extents", "flush", "zero"],
                      "unix_socket": "/run/test.sock"}


def test_dirty_extents_of_a_raw_file_are_not_found(service, registry, image):
    path, _ = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "read", client)
    with pytest.raises(errors.NotFound, match="dirty"):
        service.extents(session, client, context="dirty")


def test_checksum_matches_the_local_block_hash(service, registry, image):
    from imaged import blkhash
    path, data = image
    sid = add(registry, path)
    client, _ = client_of(service)
    session = service.session(sid, "read", client)
    result = service.checksum(session, client, "sha256", 256 * KiB)
    h = blkhash.Hash(256 * KiB, "sha256")
    for start in range(0, len(data), 256 * KiB):
        h.update(data[start:start + 256 * KiB])
    assert result["checksum"] == h.hexdigest()
