"""
The client library in-process against a real daemon: sparse round trips
over each transport, feature fallbacks, verification and refusals.
"""

import logging
import os
import re
import time
import uuid

import pytest

from imaged import blkhash
from imaged import client
from tests.client.common import (MiB, RecordingProgress, allocated, assert_sparse,
                                 corrupt, data_bytes, fill_random, make_sparse_image,
                                 same_content)

SIZE = 32 * MiB


def url_for(server, transport, sid):
    """URL and options reaching `server` over `transport`."""
    if transport == "unix":
        # An https URL on this host: the client switches to the socket.
        return server.tls_url + sid, {"cafile": server.cert}
    if transport == "https":
        return server.tls_url + sid, {"cafile": server.cert, "use_unix_socket": False}
    return server.tcp_url + sid, {"use_unix_socket": False}


@pytest.mark.parametrize("transport", ["unix", "https", "http"])
@pytest.mark.parametrize("connections", [1, 4])
def test_round_trip(server, tmp_path, transport, connections):
    src = str(tmp_path / "src.raw")
    regions = make_sparse_image(src, SIZE, regions=12, seed=connections)
    # The image starts as garbage: holes of the source must be zeroed.
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, SIZE)
    sid = server.add_session(dst, sparse=True)
    url, opts = url_for(server, transport, sid)

    up = client.upload(src, url, connections=connections, buffer_size=MiB, **opts)
    assert up.transport == transport
    assert up.connections == connections
    assert up.size == SIZE
    assert up.data_bytes + up.zero_bytes == SIZE
    assert up.data_bytes <= data_bytes(regions)
    assert same_content(src, dst)
    # Zeroing a sparse session punched holes on the server.
    assert_sparse(dst, regions)

    out = str(tmp_path / "out.raw")
    down = client.download(url, out, connections=connections, buffer_size=MiB, **opts)
    assert down.transport == transport
    assert down.size == SIZE
    assert down.data_bytes <= data_bytes(regions)
    assert os.path.getsize(out) == SIZE
    assert same_content(src, out)
    assert_sparse(out, regions)


def test_round_trip_verified_odd_size(server, tmp_path):
    size = 10 * MiB + 12345
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, size, regions=5, seed=7)
    # The last byte is data, and not block aligned.
    with open(src, "r+b") as f:
        f.seek(size - 3)
        f.write(b"end")
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(size)
    sid = server.add_session(dst)
    url = server.tls_url + sid

    up = client.upload(src, url, cafile=server.cert, verify=True)
    expected = blkhash.checksum_file(src)
    assert up.checksum == expected
    assert same_content(src, dst)

    out = str(tmp_path / "out.raw")
    down = client.download(url, out, cafile=server.cert, verify=True)
    assert down.checksum == expected
    assert same_content(src, out)
    assert client.checksum(url, cafile=server.cert) == expected
    assert client.verify(out, url, cafile=server.cert) == expected


def test_empty_image(server, tmp_path):
    src = str(tmp_path / "empty.raw")
    open(src, "wb").close()
    dst = str(tmp_path / "dst.raw")
    open(dst, "wb").close()
    sid = server.add_session(dst)
    url = server.tls_url + sid
    assert client.upload(src, url, cafile=server.cert, verify=True).size == 0
    out = str(tmp_path / "out.raw")
    with open(out, "wb") as f:
        f.write(b"old content")
    assert client.download(url, out, cafile=server.cert, verify=True).size == 0
    assert os.path.getsize(out) == 0


def test_detect_zeroes(server, tmp_path):
    # A fully allocated source whose middle is zeroes: with detection, the
    # zeroes are neither sent nor written.
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        f.write(os.urandom(MiB))
        f.write(bytes(6 * MiB))
        f.write(os.urandom(MiB))
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, 8 * MiB)
    sid = server.add_session(dst, sparse=True)
    url = server.tls_url + sid

    up = client.upload(src, url, cafile=server.cert, buffer_size=MiB, detect_zeroes=True)
    assert up.data_bytes == 2 * MiB
    assert up.zero_bytes == 6 * MiB
    assert same_content(src, dst)

    out = str(tmp_path / "out.raw")
    down = client.download(url, out, cafile=server.cert, buffer_size=MiB,
                           detect_zeroes=True)
    assert same_content(src, out)
    assert down.data_bytes == 2 * MiB
    assert allocated(out) <= 2 * MiB + 64 * 1024


def test_single_flush_at_end(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, SIZE, regions=6)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    name = f"t-{uuid.uuid4()}"
    sid = server.add_session(dst, transfer_id=name)
    client.upload(src, server.tls_url + sid, cafile=server.cert, connections=4,
                  buffer_size=MiB)
    lines = [line for line in server.log().splitlines() if f"session {name}:" in line]
    writes = [line for line in lines if "WRITE" in line]
    zeroes = [line for line in lines if "ZERO" in line]
    assert writes and zeroes
    assert all("flush=False" in line for line in writes + zeroes)
    assert sum(1 for line in lines if line.endswith(": FLUSH")) == 1


class CorruptWhenVerifying(client.Progress):
    """Corrupts the server's image when the verify phase starts."""

    def __init__(self, path, offset):
        self.path = path
        self.offset = offset
        self.phases = []

    def start(self, phase, total):
        self.phases.append(phase)
        if phase == "verify":
            corrupt(self.path, self.offset)


def test_upload_verify_mismatch(server, tmp_path):
    src = str(tmp_path / "src.raw")
    regions = make_sparse_image(src, SIZE, regions=4)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    sid = server.add_session(dst)
    hook = CorruptWhenVerifying(dst, regions[2][0])
    with pytest.raises(client.VerifyError) as e:
        client.upload(src, server.tls_url + sid, cafile=server.cert, verify=True,
                      progress=hook)
    assert hook.phases == ["upload", "verify"]
    assert e.value.exit_code == 6
    assert e.value.local == blkhash.checksum_file(src)
    assert e.value.remote == blkhash.checksum_file(dst)
    assert "checksum mismatch" in str(e.value)


def test_download_verify_mismatch(server, tmp_path):
    img = str(tmp_path / "img.raw")
    regions = make_sparse_image(img, SIZE, regions=4)
    sid = server.add_session(img, ops=["read"])
    out = str(tmp_path / "out.raw")
    hook = CorruptWhenVerifying(img, regions[1][0])
    with pytest.raises(client.VerifyError):
        client.download(server.tls_url + sid, out, cafile=server.cert, verify=True,
                        progress=hook)


def test_upload_read_only_session(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 4 * MiB, regions=2)
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, 4 * MiB)
    before = blkhash.checksum_file(dst)
    sid = server.add_session(dst, ops=["read"])
    with pytest.raises(client.ForbiddenError, match="read-only"):
        client.upload(src, server.tls_url + sid, cafile=server.cert)
    assert blkhash.checksum_file(dst) == before
    # Reading is allowed.
    info = client.info(server.tls_url + sid, cafile=server.cert)
    assert info["writable"] is False
    assert info["max_writers"] == 0


def test_upload_larger_than_image(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 4 * MiB, regions=2)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(4 * MiB)
    sid = server.add_session(dst, size=3 * MiB)
    with pytest.raises(client.OutOfRangeError, match="larger than the image"):
        client.upload(src, server.tls_url + sid, cafile=server.cert)


def test_upload_smaller_than_image(server, tmp_path):
    # The rest of the image is left alone; verify pads the file with zeroes.
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 4 * MiB, regions=2)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(8 * MiB)
    sid = server.add_session(dst)
    up = client.upload(src, server.tls_url + sid, cafile=server.cert, verify=True)
    assert up.size == 4 * MiB
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read(4 * MiB)


def test_unknown_session(server, tmp_path):
    with pytest.raises(client.ForbiddenError) as e:
        client.info(server.tls_url + "no-such-session", cafile=server.cert)
    assert e.value.status == 403
    assert e.value.exit_code == 3
    assert "no-such-session" not in str(e.value)


def test_server_range_error(server, tmp_path):
    # The server's 416 becomes OutOfRangeError.
    from imaged.client import http
    from imaged.client import images
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, MiB, regions=1)
    sid = server.add_session(img)
    image = images.ImageClient(http.Connection(server.tcp_url + sid))
    try:
        with pytest.raises(client.OutOfRangeError) as e:
            image.read_into(MiB - 10, memoryview(bytearray(20)))
        assert e.value.status == 416
    finally:
        image.close()


def test_tls_verification(server, tmp_path):
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, MiB, regions=1)
    sid = server.add_session(img)
    with pytest.raises(client.ClientError, match="certificate verification failed"):
        client.info(server.tls_url + sid)
    assert client.info(server.tls_url + sid, insecure=True,
                       use_unix_socket=False)["transport"] == "https"


def test_connection_refused(tmp_path):
    from tests.conftest import free_port
    with pytest.raises(client.ConnectionLostError, match="cannot connect") as e:
        client.info(f"https://127.0.0.1:{free_port()}/images/x")
    assert e.value.exit_code == 5


def test_connections_limited_by_server(make_daemon, tmp_path, caplog):
    d = make_daemon({"images": {"max_writers": 2, "max_readers": 3}})
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, SIZE, regions=8)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    sid = d.add_session(dst)
    url = d.tls_url + sid
    # Default: min(4, what the server allows).
    assert client.upload(src, url, cafile=d.cert, buffer_size=MiB).connections == 2
    with caplog.at_level(logging.WARNING, logger="imaged.client"):
        up = client.upload(src, url, cafile=d.cert, buffer_size=MiB, connections=8)
    assert up.connections == 2
    assert "at most 2 writers per session: using 2" in caplog.text
    out = str(tmp_path / "out.raw")
    assert client.download(url, out, cafile=d.cert, buffer_size=MiB).connections == 3
    assert same_content(src, out)


def test_old_server(old_server, tmp_path, caplog):
    # No OPTIONS: one connection, no extents, no zero or flush requests.
    with open(old_server.path, "wb") as f:
        f.write(os.urandom(4 * MiB))
    src = str(tmp_path / "src.raw")
    regions = make_sparse_image(src, 4 * MiB, regions=3, seed=3)
    with caplog.at_level(logging.WARNING, logger="imaged.client"):
        up = client.upload(src, old_server.url, connections=4, buffer_size=MiB)
    assert "does not answer OPTIONS" in caplog.text
    assert up.connections == 1
    assert same_content(src, old_server.path)
    methods = {m for m, _ in old_server.requests}
    assert methods == {"OPTIONS", "GET", "PUT"}
    # PUT without ?flush=n: that server flushes each request itself.
    assert all("?" not in p for m, p in old_server.requests if m == "PUT")

    old_server.requests.clear()
    out = str(tmp_path / "out.raw")
    down = client.download(old_server.url, out, buffer_size=MiB, detect_zeroes=True)
    assert same_content(src, out)
    # Zero detection works per buffer: only the buffers with data are
    # allocated (the first MiB has none).
    assert allocated(out) <= 3 * MiB
    with open(out, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) >= MiB
    assert {m for m, _ in old_server.requests} == {"OPTIONS", "GET"}
    assert not any("extents" in p for _, p in old_server.requests)
    assert down.data_bytes + down.zero_bytes == 4 * MiB


@pytest.mark.parametrize("transport", ["https", "unix"])
def test_reconnect_after_idle_close(server, tmp_path, transport, caplog):
    # The server drops connections idle for a second; the next request
    # goes out again on a new connection.
    from imaged.client import http
    from imaged.client import images
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, MiB, regions=1)
    sid = server.add_session(img, inactivity_timeout=1)
    unix = server.local_path if transport == "unix" else None
    image = images.ImageClient(http.Connection(server.tls_url + sid, cafile=server.cert,
                                               unix_socket=unix))
    try:
        assert image.size() == MiB
        time.sleep(1.5)
        with caplog.at_level(logging.DEBUG, logger="imaged.client"):
            assert image.options().has("zero")
        assert "closed while idle, reconnecting" in caplog.text
        assert image.size() == MiB
    finally:
        image.close()


def test_session_id_not_shown(old_server):
    secret = "0123456789abcdef-secret"
    url = old_server.url.replace("/old", "/" + secret)
    with pytest.raises(client.ForbiddenError) as e:
        client.info(url)
    assert secret not in str(e.value)
    assert "No such ticket ***" in str(e.value)


def test_delete_session_during_download(server, tmp_path):
    img = str(tmp_path / "img.raw")
    fill_random(img, SIZE)
    sid = server.add_session(img)

    class DeleteSession(client.Progress):
        done = 0

        def update(self, count):
            self.done += count
            if self.done >= 2 * MiB and not getattr(self, "deleted", False):
                self.deleted = True
                server.control().delete(server.control_url + sid)

    out = str(tmp_path / "out.raw")
    with pytest.raises((client.ForbiddenError, client.ConnectionLostError)) as e:
        client.download(server.tls_url + sid, out, cafile=server.cert,
                        buffer_size=MiB, progress=DeleteSession())
    assert e.value.exit_code in (3, 5)
    assert not re.search(sid, str(e.value))


def test_abstract_unix_socket(make_daemon, tmp_path):
    # A unix socket reported as "\0name" is an abstract socket.
    name = f"\0/imaged-test-{uuid.uuid4()}"
    d = make_daemon({"listeners": {"local": {"path": name}}})

    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 8 * MiB, regions=3)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(8 * MiB)
    sid = d.add_session(dst)
    info = client.info(d.tls_url + sid, cafile=d.cert)
    assert info["unix_socket"] == name
    assert info["transport"] == "unix"
    up = client.upload(src, d.tls_url + sid, cafile=d.cert, verify=True)
    assert up.transport == "unix"
    assert same_content(src, dst)


def test_unusable_unix_socket_falls_back(server, tmp_path, monkeypatch):
    # The server reports a socket this host cannot reach (another network
    # namespace, a tunnel): the client keeps using the URL.
    from imaged.client import images
    real = images.ImageClient.options

    def options(self):
        opts = real(self)
        return opts._replace(unix_socket="/nonexistent/images.sock")

    monkeypatch.setattr(images.ImageClient, "options", options)
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 4 * MiB, regions=2)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(4 * MiB)
    sid = server.add_session(dst)
    up = client.upload(src, server.tls_url + sid, cafile=server.cert)
    assert up.transport == "https"
    assert same_content(src, dst)


def write_requests(server, name):
    """(offset, length) of the WRITE requests the server logged for a session."""
    pattern = re.compile(rf"session {re.escape(name)}: WRITE offset=(\d+) length=(\d+)")
    return [(int(m[1]), int(m[2])) for m in pattern.finditer(server.log())]


@pytest.mark.parametrize("connections, detect_zeroes, requests", [
    # One connection: the whole 24 MiB in one request, sent a buffer at a time.
    (1, False, [24 * MiB]),
    # Each connection gets its share of the image.
    (4, False, [6 * MiB] * 4),
    # Zero detection looks at every buffer before it is sent.
    (1, True, [MiB] * 24),
])
def test_upload_request_sizes(server, tmp_path, connections, detect_zeroes, requests):
    src = str(tmp_path / "src.raw")
    fill_random(src, 24 * MiB, seed=7)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(24 * MiB)
    name = f"t-{uuid.uuid4()}"
    sid = server.add_session(dst, transfer_id=name)
    progress = RecordingProgress()
    up = client.upload(src, server.tls_url + sid, cafile=server.cert,
                       connections=connections, buffer_size=MiB,
                       detect_zeroes=detect_zeroes, progress=progress)
    assert up.data_bytes == 24 * MiB
    assert same_content(src, dst)
    assert sorted(length for _, length in write_requests(server, name)) == requests
    assert progress.done == 24 * MiB
    # Progress moves while a request is sent, a buffer at a time.
    assert len(progress.updates) >= 24


def test_streamed_body_failures_close_the_connection(server, tmp_path):
    # A body source that fails, or ends before the announced length, cuts
    # the request short: a ClientError, and the next request goes out on a
    # new connection. What was written before the failure is not reported
    # as done.
    from imaged.client import errors
    from imaged.client import http
    from imaged.client import images
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(4 * MiB)
    sid = server.add_session(dst)
    image = images.ImageClient(http.Connection(server.tls_url + sid, cafile=server.cert))
    piece = memoryview(os.urandom(MiB))

    def failing():
        yield piece
        raise errors.ClientError("local file went away")

    def short():
        yield piece

    try:
        with pytest.raises(errors.ClientError, match="local file went away"):
            image.write_stream(0, 2 * MiB, failing, flush=False)
        assert image.conn._conn.sock is None
        with pytest.raises(errors.ClientError, match="1048576 bytes, announced 2097152"):
            image.write_stream(0, 2 * MiB, short, flush=False)
        assert image.conn._conn.sock is None
        # The connection is usable again, and a whole stream is written.
        image.write_stream(0, 2 * MiB, lambda: iter([piece, piece]), flush=True)
    finally:
        image.close()
    with open(dst, "rb") as f:
        assert f.read(2 * MiB) == bytes(piece) * 2
