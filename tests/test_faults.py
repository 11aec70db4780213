"""
Faults against a real daemon: clients that vanish or stall, a full disk, a
dying disk, sessions removed under running transfers, SIGTERM mid-transfer.

Every test checks the same three things: the failing transfer ends as a
failure (never a success for data that was not written), the daemon stays up
and keeps serving everyone else, and the image holds nothing it should not.

File system faults need root: a 2 MiB tmpfs for ENOSPC, ext4 on a loop
device shut down with EXT4_IOC_SHUTDOWN for EIO (every I/O on it fails as
on a dead disk), and a device-mapper `error` target where the kernel has
device-mapper. They skip, saying why, where that is not possible.
"""

import http.client
import os
import random
import signal
import socket
import ssl
import threading
import time

import pytest

from tests.hardening_helpers import (
    KiB, MiB, WAIT_S, alive, connect, control_connect, control_request, digest,
    dm_error_device, drain_until_closed, ext4_on_loop, progress, read_range,
    request, response_or_none, send_quietly, session_info, shut_down_fs, sparse_file,
    start_put, tmpfs, wait_for)

BIG = 256 * MiB


def idle(daemon, sid):
    """True once no operation runs on the session."""
    p = progress(daemon, sid)
    return not p["active"] and not p["operations"]


def no_connections(daemon, sid):
    info = session_info(daemon, sid)
    return info is not None and info["connections"] == 0


def is_zero_range(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(left, 4 * MiB))
            if not block:
                return True
            if block.count(0) != len(block):
                return False
            left -= len(block)
    return True


def put_ok(daemon, sid, offset, data, kind="tcp"):
    r = request(daemon, "PUT", f"/images/{sid}", body=data, kind=kind, headers=[
        ("Content-Range", f"bytes {offset}-{offset + len(data) - 1}/*")])
    return r is not None and r.status == 200


def get_range(daemon, sid, offset, length, kind="tcp"):
    return request(daemon, "GET", f"/images/{sid}", kind=kind, headers=[
        ("Range", f"bytes={offset}-{offset + length - 1}")])


class Bystander:
    """
    Another client doing verified writes and reads on its own session while
    a fault happens elsewhere: every one of its requests must succeed.
    """

    def __init__(self, daemon, path, sid):
        self.daemon = daemon
        self.path = path
        self.sid = sid
        self.size = os.path.getsize(path)
        self.done = 0
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(WAIT_S)

    def _run(self):
        rnd = random.Random(7)
        while not self._stop.is_set():
            offset = rnd.randrange(0, self.size - 256 * KiB, 4096)
            data = rnd.randbytes(256 * KiB)
            try:
                if not put_ok(self.daemon, self.sid, offset, data):
                    self.failures.append(f"PUT at {offset} failed")
                    continue
                r = get_range(self.daemon, self.sid, offset, len(data))
                if r is None or r.status != 206 or r.body != data:
                    self.failures.append(f"GET at {offset}: {r!r}")
                    continue
                self.done += 1
            except Exception as e:  # Recorded, the test fails on it.
                self.failures.append(f"{type(e).__name__}: {e}")

    def check(self, at_least=1):
        assert self.failures == []
        assert self.done >= at_least


# Clients that go away mid-transfer.

@pytest.mark.parametrize("kind,close", [("tcp", "fin"), ("tcp", "rst"), ("tls", "fin")])
def test_client_disconnects_mid_put(daemon, tmp_path, kind, close):
    size = 64 * MiB
    path = sparse_file(tmp_path / "disk.raw", size)
    sid = daemon.add_session(path)
    announced = size
    sent = 20 * MiB + 12345
    data = os.urandom(sent)

    sock = connect(daemon, kind)
    start_put(sock, f"/images/{sid}", announced)
    sock.sendall(data)
    # The daemon writes in chunks (8 MiB by default): wait until it reported
    # some, then vanish with most of the body missing.
    wait_for(lambda: progress(daemon, sid)["transferred"] >= 8 * MiB,
             message="the first chunks written")
    if close == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()

    wait_for(lambda: idle(daemon, sid), message="the write to end")
    info = wait_for(lambda: (lambda i: i if i["connections"] == 0 else None)(
        session_info(daemon, sid)), message="the connection released")
    # Only bytes that are on disk are counted, and never the missing part.
    transferred = info["transferred"]
    assert 0 < transferred < sent
    assert read_range(path, 0, transferred) == data[:transferred]
    # Nothing was written past what the client sent; the size is untouched.
    assert is_zero_range(path, sent, size - sent)
    assert os.path.getsize(path) == size
    assert info["active"] is False and info["canceled"] is False

    # The session is still usable.
    new = os.urandom(MiB)
    assert put_ok(daemon, sid, 0, new, kind=kind)
    r = get_range(daemon, sid, 0, MiB, kind=kind)
    assert r.status == 206 and r.body == new
    assert alive(daemon)


@pytest.mark.parametrize("kind,close", [("tcp", "fin"), ("tcp", "rst"), ("tls", "fin")])
def test_client_disconnects_mid_get(daemon, tmp_path, kind, close):
    head = os.urandom(MiB)
    path = sparse_file(tmp_path / "disk.raw", BIG, [(0, head)])
    sid = daemon.add_session(path, ops=["read"])
    before = digest(path)

    sock = connect(daemon, kind)
    sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = b""
    while len(got) < 2 * MiB:
        chunk = sock.recv(256 * KiB)
        assert chunk
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    body = got.split(b"\r\n\r\n", 1)[1]
    assert head.startswith(body[:MiB]) or body.startswith(head)
    if close == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()

    wait_for(lambda: idle(daemon, sid), message="the read to end")
    info = wait_for(lambda: (lambda i: i if i["connections"] == 0 else None)(
        session_info(daemon, sid)), message="the connection released")
    # Only what was sent is counted: far from the whole image.
    assert info["transferred"] < BIG // 2
    assert digest(path) == before
    r = get_range(daemon, sid, 0, MiB, kind=kind)
    assert r.status == 206 and r.body == head
    assert alive(daemon)
    assert "internal error" not in daemon.log()


# Clients that stall.

@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_client_that_stops_reading_is_dropped(daemon, tmp_path, kind):
    path = sparse_file(tmp_path / "disk.raw", BIG)
    sid = daemon.add_session(path, ops=["read"], inactivity_timeout=2)
    sock = connect(daemon, kind, rcvbuf=64 * KiB)
    sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    wait_for(lambda: progress(daemon, sid)["active"], message="the read to start")
    # The client reads nothing from now on: the daemon blocks sending, and
    # gives up after the session's inactivity timeout.
    start = time.monotonic()
    wait_for(lambda: idle(daemon, sid), timeout=20, interval=0.1,
             message="the stalled reader dropped")
    took = time.monotonic() - start
    print(f"FIGURE stalled reader ({kind}) dropped {took:.2f} s after it stopped "
          f"reading (inactivity_timeout 2 s)")
    assert 1.5 <= took < 8, took
    got = drain_until_closed(sock)
    sock.close()
    assert got < BIG
    wait_for(lambda: no_connections(daemon, sid), message="the connection released")
    assert session_info(daemon, sid)["transferred"] < BIG
    assert alive(daemon)


def test_slow_but_steady_reader_is_not_dropped(daemon, tmp_path):
    # 2 MiB/s, never pausing more than a few ms, with a 1 s inactivity
    # timeout: an 8 MiB chunk takes 4 s to send (2 s once the socket buffers
    # of loopback took their share).
    path = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    sid = daemon.add_session(path, ops=["read"], inactivity_timeout=1)
    want = 16 * MiB
    rate = 2 * MiB
    sock = connect(daemon, "tcp", rcvbuf=64 * KiB)
    sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n"
                 f"Range: bytes=0-{want - 1}\r\n\r\n".encode())
    got = 0
    start = time.monotonic()
    try:
        while got < want:
            data = sock.recv(64 * KiB)
            if not data:
                break
            got += len(data)
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    except OSError:
        pass
    finally:
        sock.close()
    # Headers and the whole range arrived.
    assert got > want


@pytest.mark.parametrize("kind", ["tcp", "tls", "unix"])
def test_client_that_stops_sending_is_dropped(daemon, tmp_path, kind):
    size = 64 * MiB
    path = sparse_file(tmp_path / "disk.raw", size)
    sid = daemon.add_session(path, inactivity_timeout=2)
    sock = connect(daemon, kind)
    start_put(sock, f"/images/{sid}", size)
    sock.sendall(os.urandom(3 * MiB))
    wait_for(lambda: progress(daemon, sid)["active"], message="the write to start")
    start = time.monotonic()
    wait_for(lambda: idle(daemon, sid), timeout=20, interval=0.1,
             message="the stalled writer dropped")
    took = time.monotonic() - start
    print(f"FIGURE stalled writer ({kind}) dropped {took:.2f} s after it stopped "
          f"sending (inactivity_timeout 2 s)")
    assert took < 8
    r = response_or_none(sock)
    sock.close()
    assert r is None or r.status != 200
    # Nothing of the partial chunk was written or counted.
    assert session_info(daemon, sid)["transferred"] == 0
    assert is_zero_range(path, 0, size)
    assert alive(daemon)


def test_slow_header_clients_are_dropped_and_others_served(make_daemon, tmp_path):
    d = make_daemon({"server": {"header_timeout_s": 1.0}})
    path = sparse_file(tmp_path / "disk.raw", 4 * MiB, [(0, b"hello")])
    sid = d.add_session(path)
    slow = [connect(d, "tcp" if i % 2 else "tls") for i in range(20)]
    for s in slow:
        s.sendall(b"GET /images/x HTTP/1.1\r\n")
    open_ = set(range(len(slow)))
    closed_after = {}
    latencies = []
    start = time.monotonic()
    # Drip a header byte into every slow client every 0.2 s (faster than any
    # idle timeout) while a normal client makes requests.
    while open_ and time.monotonic() - start < 10:
        for i in list(open_):
            try:
                slow[i].sendall(b"X")
                slow[i].setblocking(False)
                try:
                    if slow[i].recv(4096) == b"":
                        raise ConnectionError
                except (BlockingIOError, ssl.SSLWantReadError):
                    pass
                finally:
                    slow[i].setblocking(True)
            except OSError:
                open_.discard(i)
                closed_after[i] = time.monotonic() - start
        t = time.monotonic()
        r = get_range(d, sid, 0, 5)
        latencies.append(time.monotonic() - t)
        assert r.status == 206 and r.body == b"hello"
        time.sleep(0.2)
    for s in slow:
        s.close()
    assert not open_, f"{len(open_)} slow clients still connected"
    print(f"FIGURE 20 slow-header clients dropped after {min(closed_after.values()):.2f}-"
          f"{max(closed_after.values()):.2f} s (header_timeout 1 s); normal requests "
          f"meanwhile: {len(latencies)}, max latency {max(latencies) * 1000:.1f} ms")
    assert max(closed_after.values()) < 5
    assert max(latencies) < 1.0, latencies
    assert alive(d)


# Sessions removed under stalled transfers.

def stalled_reader(daemon, sid):
    sock = connect(daemon, "tcp", rcvbuf=64 * KiB)
    sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def stalled_writer(daemon, sid):
    sock = connect(daemon, "tcp")
    start_put(sock, f"/images/{sid}", BIG)
    sock.sendall(os.urandom(MiB))
    return sock


@pytest.mark.parametrize("removal", ["delete", "expire"])
@pytest.mark.parametrize("stall", ["reader", "writer"])
def test_removal_aborts_stalled_transfer(daemon, tmp_path, removal, stall):
    path = sparse_file(tmp_path / "disk.raw", BIG)
    timeout = 2 if removal == "expire" else 300
    sid = daemon.add_session(path, timeout=timeout)
    sock = (stalled_reader if stall == "reader" else stalled_writer)(daemon, sid)
    wait_for(lambda: progress(daemon, sid)["active"], message="the transfer to start")
    start = time.monotonic()
    if removal == "delete":
        r = control_request(daemon, "DELETE", f"/sessions/{sid}")
        assert r.status == 204
        assert time.monotonic() - start < 5
    wait_for(lambda: session_info(daemon, sid) is None, message="the session gone")
    took = time.monotonic() - start
    print(f"FIGURE {removal} with a stalled {stall}: session gone and transfer "
          f"aborted {took:.2f} s after " + ("DELETE" if removal == "delete" else
                                             "the transfer started (timeout 2 s)"))
    # Not the 60 s inactivity timeout: removal tears the connection down.
    assert took < 6
    if stall == "reader":
        assert drain_until_closed(sock) < BIG
    else:
        send_quietly(sock, os.urandom(MiB))
        r = response_or_none(sock)
        assert r is None or r.status != 200
        assert is_zero_range(path, 0, BIG)
    sock.close()
    r = request(daemon, "GET", f"/images/{sid}", headers=[("Range", "bytes=0-0")])
    assert r.status == 403
    assert alive(daemon)


# SIGTERM.

# Large uploads are read in pool threads (over TLS, decrypted there): both
# transports must end when the daemon stops, and the client learn at once.
@pytest.mark.parametrize("kind", ["tls", "unix"])
def test_sigterm_mid_transfer(daemon, tmp_path, kind):
    size = BIG
    wpath = sparse_file(tmp_path / "write.raw", size)
    rpath = sparse_file(tmp_path / "read.raw", size, [(0, os.urandom(MiB))])
    wsid = daemon.add_session(wpath)
    rsid = daemon.add_session(rpath, ops=["read"])

    writer = connect(daemon, kind)
    start_put(writer, f"/images/{wsid}", size)
    sent = 24 * MiB
    data = os.urandom(sent)
    writer.sendall(data)
    reader = stalled_reader(daemon, rsid)
    wait_for(lambda: progress(daemon, wsid)["transferred"] >= 8 * MiB,
             message="the upload running")
    wait_for(lambda: progress(daemon, rsid)["active"], message="the download running")

    start = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    # The uploader keeps sending: it must not get a success.
    send_quietly(writer, os.urandom(8 * MiB))
    r = response_or_none(writer)
    writer.close()
    assert r is None or r.status != 200
    assert drain_until_closed(reader) < size
    reader.close()
    assert daemon.proc.wait(20) == 0
    took = time.monotonic() - start
    print(f"FIGURE SIGTERM with a running upload ({kind}) and download: exit status 0 "
          f"after {took:.2f} s")
    # Within the stop timeout (5 s) and some.
    assert took < 10
    # What is on disk is what the client sent, nothing beyond it.
    assert is_zero_range(wpath, sent, size - sent)
    log = daemon.log()
    assert "received SIGTERM" in log and "imaged stopped" in log


def test_sigterm_with_idle_keepalive_connections_is_prompt(make_daemon):
    d = make_daemon({"server": {"stop_timeout_s": 1}})
    idle = []
    for kind in ("tcp", "tls", "unix"):
        sock = connect(d, kind)
        sock.sendall(b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        idle.append(sock)
    sock = control_connect(d)
    sock.sendall(b"GET /progress HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    idle.append(sock)
    start = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    try:
        assert d.proc.wait(30) == 0
        took = time.monotonic() - start
    finally:
        for sock in idle:
            sock.close()
    print(f"FIGURE SIGTERM with 4 idle keep-alive connections: exit after {took:.2f} s "
          f"(stop_timeout 1 s)")
    # Nothing runs: no reason to wait for the grace period at all.
    assert took < 1


# A full disk.

@pytest.fixture
def small_fs(tmp_path):
    with tmpfs(str(tmp_path / "small"), size="2m") as path:
        yield path


def test_disk_full(small_fs, daemon, tmp_path):
    # A 16 MiB sparse image on a 2 MiB file system.
    full = sparse_file(os.path.join(small_fs, "full.raw"), 16 * MiB)
    sid = daemon.add_session(full)
    other = sparse_file(tmp_path / "other.raw", 32 * MiB)
    other_sid = daemon.add_session(other)

    with Bystander(daemon, other, other_sid) as bystander:
        for offset in (0, 8 * MiB):
            r = request(daemon, "PUT", f"/images/{sid}", body=os.urandom(8 * MiB),
                        headers=[("Content-Range", f"bytes {offset}-{offset + 8 * MiB - 1}/*")])
            assert r is not None
            assert r.status in (500, 507), r
            assert "No space left" in r.text, r.text
        wait_for(lambda: bystander.done >= 3, message="the other session served")
    bystander.check()
    print(f"FIGURE ENOSPC: 2 failed 8 MiB PUTs answered {r.status} "
          f"{r.text.strip()!r}; other session meanwhile: {bystander.done} verified "
          f"256 KiB PUT+GET, 0 failures")

    info = session_info(daemon, sid)
    # The failed writes claim nothing beyond what the file system holds.
    assert info["transferred"] <= 2 * MiB
    assert info["active"] is False
    assert os.path.getsize(full) == 16 * MiB
    # The session still reads.
    r = get_range(daemon, sid, 0, 4096)
    assert r.status == 206 and len(r.body) == 4096
    assert alive(daemon)


def test_disk_full_zero_reports_the_reason(small_fs, daemon):
    # A non-sparse session keeps zeroes allocated: on tmpfs (no ZERO_RANGE)
    # zeroes are written, and the file system fills up.
    full = sparse_file(os.path.join(small_fs, "full.raw"), 16 * MiB)
    sid = daemon.add_session(full)
    r = request(daemon, "PATCH", f"/images/{sid}",
                body=b'{"op": "zero", "offset": 0, "size": 16777216, "flush": true}')
    assert r.status in (500, 507), r
    assert "No space left" in r.text, r.text
    assert alive(daemon)


# A dying disk.

@pytest.fixture
def ext4(tmp_path):
    d = tmp_path / "ext4"
    d.mkdir()
    with ext4_on_loop(d) as mnt:
        yield mnt


def test_io_errors(ext4, daemon, tmp_path):
    path = os.path.join(ext4, "disk.raw")
    data = os.urandom(8 * MiB)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    sid = daemon.add_session(path)
    other = sparse_file(tmp_path / "other.raw", 32 * MiB)
    other_sid = daemon.add_session(other)
    r = get_range(daemon, sid, 0, MiB)
    assert r.status == 206 and r.body == data[:MiB]

    # The disk dies: every read, write and flush on it fails with EIO.
    shut_down_fs(ext4)
    with Bystander(daemon, other, other_sid) as bystander:
        r = get_range(daemon, sid, MiB, MiB)
        assert r.status == 500, r
        assert "Input/output error" in r.text, r.text
        r = request(daemon, "GET", f"/images/{sid}")
        assert r.status == 500 and "Input/output error" in r.text, r
        assert not put_ok(daemon, sid, 0, os.urandom(MiB))
        r = request(daemon, "PUT", f"/images/{sid}", body=os.urandom(MiB))
        assert r.status == 500 and "Input/output error" in r.text, r
        r = request(daemon, "PATCH", f"/images/{sid}", body=b'{"op": "flush"}')
        assert r.status == 500 and "Input/output error" in r.text, r
        wait_for(lambda: bystander.done >= 3, message="the other session served")
    bystander.check()
    print(f"FIGURE EIO: GET/PUT/flush answered 500 {r.text.strip()!r}; other "
          f"session meanwhile: {bystander.done} verified PUT+GET, 0 failures")
    info = session_info(daemon, sid)
    assert info["active"] is False and info["transferred"] == MiB
    assert alive(daemon)


def test_io_error_mid_put(ext4, daemon):
    offset = 0
    path = sparse_file(os.path.join(ext4, "disk.raw"), 48 * MiB)
    sid = daemon.add_session(path)
    length = 40 * MiB
    sock = connect(daemon, "tcp")
    start_put(sock, f"/images/{sid}", length,
              [("Content-Range", f"bytes {offset}-{offset + length - 1}/*")])
    sock.sendall(os.urandom(20 * MiB))
    wait_for(lambda: progress(daemon, sid)["transferred"] >= 8 * MiB,
             message="the upload running")
    shut_down_fs(ext4)
    send_quietly(sock, os.urandom(length - 20 * MiB))
    r = response_or_none(sock)
    sock.close()
    assert r is not None and r.status == 500, r
    assert "Input/output error" in r.text, r.text
    info = session_info(daemon, sid)
    # Only chunks written before the failure count (20 MiB were received).
    assert info["transferred"] <= 20 * MiB
    assert info["active"] is False
    assert alive(daemon)


def daemon_has_open(daemon, path):
    fd_dir = f"/proc/{daemon.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == path:
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("offset,length", [
    (0, 4096),
    (100, 1000),
], ids=["aligned", "unaligned"])
def test_io_error_on_open_image(ext4, daemon, offset, length):
    # The image is open (the PUT waits for its body) when the disk dies.
    path = sparse_file(os.path.join(ext4, "disk.raw"), 8 * MiB)
    sid = daemon.add_session(path)
    sock = connect(daemon, "tcp")
    start_put(sock, f"/images/{sid}", length,
              [("Content-Range", f"bytes {offset}-{offset + length - 1}/*")])
    wait_for(lambda: daemon_has_open(daemon, path), message="the image open")
    shut_down_fs(ext4)
    sock.sendall(os.urandom(length))
    r = response_or_none(sock)
    sock.close()
    assert r is not None and r.status == 500, r
    assert "Input/output error" in r.text, r.text
    assert session_info(daemon, sid)["transferred"] == 0
    assert alive(daemon)


def test_io_error_mid_get(ext4, daemon):
    path = os.path.join(ext4, "disk.raw")
    size = 40 * MiB
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        os.fsync(f.fileno())
    sid = daemon.add_session(path, ops=["read"])
    sock = connect(daemon, "tcp", rcvbuf=64 * KiB)
    sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = sock.recv(64 * KiB)
    assert got.startswith(b"HTTP/1.1 200")
    wait_for(lambda: progress(daemon, sid)["active"], message="the download running")
    shut_down_fs(ext4)
    got += sock.recv(64 * KiB)
    total = len(got) + drain_until_closed(sock)
    sock.close()
    # The headers promised 40 MiB; the connection ends short of it, so the
    # client cannot mistake the truncated body for the image.
    assert total < size
    wait_for(lambda: idle(daemon, sid), message="the read to end")
    assert alive(daemon)


def test_io_errors_on_a_block_device(daemon, tmp_path):
    # The first 4 MiB of the device work, the next 4 MiB fail with EIO.
    name = f"imaged-test-{os.getpid()}"
    with dm_error_device(tmp_path, name) as dev:
        sid = daemon.add_session(dev, size=8 * MiB)
        other = sparse_file(tmp_path / "other.raw", 32 * MiB)
        other_sid = daemon.add_session(other)
        with Bystander(daemon, other, other_sid) as bystander:
            r = get_range(daemon, sid, 0, MiB)
            assert r.status == 206 and len(r.body) == MiB
            r = get_range(daemon, sid, 5 * MiB, MiB)
            assert r.status == 500, r
            assert "Input/output error" in r.text, r.text
            r = request(daemon, "PUT", f"/images/{sid}", body=os.urandom(MiB),
                        headers=[("Content-Range", f"bytes {6 * MiB}-{7 * MiB - 1}/*")])
            assert r.status == 500 and "Input/output error" in r.text, r
            # The good part still works.
            data = os.urandom(MiB)
            assert put_ok(daemon, sid, 0, data)
            assert get_range(daemon, sid, 0, MiB).body == data
            wait_for(lambda: bystander.done >= 3, message="the other session served")
        bystander.check()
        assert alive(daemon)
        daemon.stop()


def test_storage_errors_are_logged(small_fs, daemon):
    full = sparse_file(os.path.join(small_fs, "full.raw"), 16 * MiB)
    sid = daemon.add_session(full, transfer_id="enospc-transfer")
    r = request(daemon, "PUT", f"/images/{sid}", body=os.urandom(4 * MiB))
    assert r.status in (500, 507)
    lines = [line for line in daemon.log().splitlines()
             if "No space left" in line and ("ERROR" in line or "WARNING" in line)]
    assert lines, "no log line for the failed write"


def test_idle_connection_keeps_the_image_open_until_the_session_goes(daemon, tmp_path):
    # A keep-alive connection keeps the image open between requests, so a
    # client reading extent after extent pays one open. Removing the
    # session must close it before DELETE answers: the host agent may
    # deactivate the volume right after.
    path = sparse_file(str(tmp_path / "kept.raw"), 1 * MiB, [(0, b"x" * 4096)])

    def get_head(con, sid):
        con.request("GET", f"/images/{sid}", headers={"Range": "bytes=0-4095"})
        r = con.getresponse()
        assert r.status == 206 and r.read() == b"x" * 4096

    sid = daemon.add_session(path)
    con = http.client.HTTPConnection("127.0.0.1", daemon.tcp_port, timeout=WAIT_S)
    try:
        for _ in range(3):
            get_head(con, sid)
        assert daemon_has_open(daemon, path)
        with daemon.control() as c:
            assert c.delete(daemon.control_url + sid).status_code == 204
        assert not daemon_has_open(daemon, path)
        # The same for expiry.
        sid = daemon.add_session(path, timeout=1)
        get_head(con, sid)
        assert daemon_has_open(daemon, path)
        wait_for(lambda: not daemon_has_open(daemon, path), timeout=10,
                 message="the image closed after expiry")
    finally:
        con.close()
