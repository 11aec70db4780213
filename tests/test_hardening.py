"""
Hardening, round 2 (issue 14): what a real daemon does with requests that
are legal on the wire but must never hurt an image or another client.

- A chunked PUT never writes outside its Content-Range (item 3).
- A session pointing at a FIFO (or anything but a regular file or a block
  device) is refused without ever blocking a pool thread (item 7).
- Heavy legitimate requests (a checksum of a huge sparse image, the
  extents of a fragmented file) do not stall other clients (item 6).

Every test talks to a real daemon over real sockets (tests.conftest).
"""

import os
import socket
import tempfile
import time
import uuid

import pytest

from tests.hardening_helpers import (
    KiB, MiB, alive, connect, control_request, digest, loop_device, read_range,
    read_response, request, response_or_none, send_quietly, sparse_file)

PATTERN = b"\xa5"


def image_of(path, size):
    """A file of `size` bytes of PATTERN: any change shows."""
    with open(path, "wb") as f:
        f.write(PATTERN * size)
    return str(path)


def chunked_put(sock, sid, pieces, content_range=None, query=""):
    """
    Send a PUT with Transfer-Encoding: chunked, one chunk per piece, and
    read the answer (None if the daemon closed without one).
    """
    head = (f"PUT /images/{sid}{query} HTTP/1.1\r\nHost: localhost\r\n"
            f"Transfer-Encoding: chunked\r\n")
    if content_range:
        head += f"Content-Range: {content_range}\r\n"
    data = head.encode() + b"\r\n"
    for piece in pieces:
        data += b"%x\r\n" % len(piece) + piece + b"\r\n"
    data += b"0\r\n\r\n"
    # The daemon may answer and close before reading all of it.
    send_quietly(sock, data)
    return response_or_none(sock, "PUT")


# Item 3: a chunked PUT never writes outside its Content-Range.

# (pieces of the body, as sizes): one chunk past the range, chunks ending
# exactly at the range end then more, a chunk straddling the range end,
# many small chunks.
OVERFLOWS = {
    "one-chunk": [8192],
    "at-boundary": [4096, 4096],
    "straddling": [4000, 4192],
    "small-chunks": [512] * 16,
}


@pytest.mark.parametrize("kind", ["tcp", "tls", "unix"])
@pytest.mark.parametrize("pieces", OVERFLOWS.values(), ids=OVERFLOWS.keys())
def test_chunked_put_longer_than_its_range_writes_nothing_outside(
        daemon, tmp_path, kind, pieces):
    size = 64 * KiB
    path = image_of(tmp_path / "disk.raw", size)
    sid = daemon.add_session(path)
    offset = 8192
    body = [os.urandom(n) for n in pieces]
    with connect(daemon, kind) as sock:
        r = chunked_put(sock, sid, body, f"bytes {offset}-{offset + 4095}/*")
    assert r is None or r.status == 400, r
    if r is not None:
        assert "Content-Range" in r.text
    # Before and after the declared range: untouched.
    assert read_range(path, 0, offset) == PATTERN * offset
    after = offset + 4096
    assert read_range(path, after, size - after) == PATTERN * (size - after)
    assert os.path.getsize(path) == size


def test_chunked_put_overflow_across_buffers(make_daemon, tmp_path):
    # A range that spans several transfer buffers and ends inside one: the
    # read that crosses the end must be caught before it is written, even
    # when the body arrives in chunks larger than the buffer.
    buffer_size = 64 * KiB
    d = make_daemon({"images": {"buffer_size_bytes": buffer_size,
                                "buffer_budget_bytes": 4 * 1024**2}})
    size = 1024 * KiB
    path = image_of(tmp_path / "disk.raw", size)
    sid = d.add_session(path)
    declared = 3 * buffer_size + 1000
    body = os.urandom(declared + 200 * KiB)
    pieces = [body[i:i + 100 * KiB] for i in range(0, len(body), 100 * KiB)]
    with connect(d, "tcp") as sock:
        r = chunked_put(sock, sid, pieces, f"bytes 0-{declared - 1}/*")
    assert r is None or r.status == 400, r
    assert read_range(path, declared, size - declared) == PATTERN * (size - declared)
    # What was written is a start of the body, in place.
    written = read_range(path, 0, declared)
    k = next((i for i in range(declared) if written[i] != body[i]), declared)
    assert written[k:] == PATTERN * (declared - k)


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_chunked_put_shorter_than_its_range_is_an_error(daemon, tmp_path, kind):
    size = 64 * KiB
    path = image_of(tmp_path / "disk.raw", size)
    sid = daemon.add_session(path)
    data = os.urandom(4096)
    with connect(daemon, kind) as sock:
        r = chunked_put(sock, sid, [data], "bytes 0-8191/*")
    assert r.status == 400, r
    assert "ended early" in r.text
    # What it had went where it said; nothing else changed.
    assert read_range(path, 0, 4096) in (data, PATTERN * 4096)
    assert read_range(path, 4096, size - 4096) == PATTERN * (size - 4096)


def test_chunked_put_declared_past_the_image_writes_nothing(daemon, tmp_path):
    size = 64 * KiB
    path = image_of(tmp_path / "disk.raw", size)
    sid = daemon.add_session(path)
    before = digest(path)
    with connect(daemon, "tcp") as sock:
        r = chunked_put(sock, sid, [os.urandom(8192)],
                        f"bytes {size - 4096}-{size + 4095}/*")
    assert r is None or r.status == 416, r
    assert digest(path) == before


def test_chunked_put_filling_its_range_exactly(daemon, tmp_path):
    size = 64 * KiB
    path = image_of(tmp_path / "disk.raw", size)
    sid = daemon.add_session(path)
    data = os.urandom(10000)
    pieces = [data[:4096], data[4096:4097], data[4097:]]
    with connect(daemon, "tcp") as sock:
        r = chunked_put(sock, sid, pieces, "bytes 100-10099/*")
        assert r.status == 200, r
        # The connection stays usable.
        sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n"
                     f"Range: bytes=100-10099\r\n\r\n".encode())
        r = read_response(sock)
    assert r.status == 206
    assert r.body == data
    assert read_range(path, 0, 100) == PATTERN * 100
    assert read_range(path, 10100, size - 10100) == PATTERN * (size - 10100)


def test_chunked_put_without_range_stops_at_the_image_end(daemon, tmp_path):
    size = 16 * KiB
    path = sparse_file(tmp_path / "disk.raw", size)
    sid = daemon.add_session(path)
    with connect(daemon, "tcp") as sock:
        r = chunked_put(sock, sid, [b"x" * 8192] * 3, query="?flush=n")
    assert r is None or r.status == 416, r
    assert os.path.getsize(path) == size


# Item 7: a session on anything but a regular file or a block device.

def add_session_status(daemon, path):
    """Add a session for `path` over the control socket: (status, text)."""
    r = control_request(daemon, "PUT", f"/sessions/{uuid.uuid4()}", {
        "url": f"file://{path}", "size": 4096, "ops": ["read", "write"],
        "timeout": 60})
    return r.status, r.text


@pytest.fixture
def special_files(tmp_path):
    """Paths that are neither regular files nor block devices."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "dir"
    directory.mkdir()
    sock_path = tempfile.mktemp(prefix="imaged-sock-", dir="/tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    link = tmp_path / "fifo-link"
    os.symlink(fifo, link)
    yield {"fifo": str(fifo), "directory": str(directory),
           "char-device": "/dev/null", "socket": sock_path,
           "symlink-to-fifo": str(link)}
    listener.close()
    os.unlink(sock_path)


@pytest.mark.parametrize("what", ["fifo", "directory", "char-device", "socket",
                                  "symlink-to-fifo"])
def test_session_on_a_special_file_is_refused_at_add(daemon, special_files, what):
    start = time.monotonic()
    status, text = add_session_status(daemon, special_files[what])
    assert status == 400, text
    assert "url" in text and "not a regular file or block device" in text
    assert time.monotonic() - start < 5


def test_session_on_a_missing_path_is_still_accepted(daemon, tmp_path):
    # The host agent may add the session before the volume is ready.
    status, text = add_session_status(daemon, tmp_path / "later.raw")
    assert status == 200, text


def test_fifo_appearing_after_add_never_blocks(daemon, tmp_path):
    # Accepted while the path does not exist, then a FIFO takes its place:
    # every request answers at once with an error, DELETE is immediate and
    # no pool thread is left waiting for a writer.
    path = tmp_path / "disk.raw"
    sid = daemon.add_session(str(path), size=64 * KiB)
    os.mkfifo(path)
    requests_ = [
        ("GET", f"/images/{sid}", [], b""),
        ("GET", f"/images/{sid}", [("Range", "bytes=0-4095")], b""),
        ("GET", f"/images/{sid}/extents", [], b""),
        ("GET", f"/images/{sid}/checksum", [], b""),
        ("PUT", f"/images/{sid}", [], b"x" * 4096),
        ("PATCH", f"/images/{sid}", [("Content-Type", "application/json")],
         b'{"op": "zero", "size": 4096}'),
    ]
    # More requests than the pool has threads (32): a blocking open would
    # take them all.
    for i in range(40):
        method, target, headers, body = requests_[i % len(requests_)]
        start = time.monotonic()
        r = request(daemon, method, target, headers=headers, body=body)
        assert r is not None and r.status == 400, (method, target, r)
        assert "Not a regular file or block device" in r.text
        assert time.monotonic() - start < 5, (method, target)
    start = time.monotonic()
    r = control_request(daemon, "DELETE", f"/sessions/{sid}")
    assert r.status == 204, r
    assert time.monotonic() - start < 5
    # Everyone else is served.
    other = sparse_file(tmp_path / "other.raw", 64 * KiB, [(0, b"other")])
    other_sid = daemon.add_session(other)
    r = request(daemon, "GET", f"/images/{other_sid}", [("Range", "bytes=0-4")])
    assert r.status == 206 and r.body == b"other"
    assert alive(daemon)


def test_block_device_through_a_symlink_is_accepted(daemon, tmp_path):
    # How Vdsm lays out block volumes: IMAGE/VOLUME -> /dev/dm-N.
    backing = sparse_file(tmp_path / "backing.raw", MiB, [(0, b"block data")])
    with loop_device(backing) as dev:
        link = tmp_path / "volume"
        os.symlink(dev, link)
        sid = daemon.add_session(str(link), size=MiB)
        r = request(daemon, "GET", f"/images/{sid}", [("Range", "bytes=0-9")])
        assert r.status == 206 and r.body == b"block data"
        assert control_request(daemon, "DELETE", f"/sessions/{sid}").status == 204
