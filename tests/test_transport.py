"""
imaged.transport against a real daemon on every kind of listener: message
framing that cannot smuggle a request, deadlines for slow clients, the one
rule on closing, and what it logs. Plus the header deadline's bookkeeping,
on a socket pair.
"""

import os
import socket
import ssl
import time

import gevent
import gevent.socket
import pytest

from imaged import config
from imaged import transport
from tests.hardening_helpers import (
    KiB, MiB, connect, digest, read_response, response_or_none,
    sparse_file)

KINDS = ["tls", "tcp", "unix"]

# How long past a documented bound a slow machine may take to act.
SLACK_S = 3.0


@pytest.fixture
def image(tmp_path):
    return sparse_file(tmp_path / "disk.raw", MiB, [(0, b"ORIGINAL")])


def smuggling_request(sid, framing_headers):
    """
    An OPTIONS whose body "abc" is framed by `framing_headers`, followed by
    a complete PUT that would write SMUGGLED at offset 0 if a server took
    "abc" as the whole body.
    """
    hidden = (f"PUT /images/{sid} HTTP/1.1\r\nHost: x\r\n"
              "Content-Length: 8\r\n\r\nSMUGGLED").encode()
    head = "OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n"
    for name, value in framing_headers:
        head += f"{name}: {value}\r\n"
    return head.encode() + b"\r\n" + b"abc" + hidden


SMUGGLING_FRAMINGS = {
    "two-lengths": [("Content-Length", "3"), ("Content-Length", str(3 + 60))],
    "plus-sign": [("Content-Length", "+3")],
    "underscore": [("Content-Length", "0_3")],
    "xchunked": [("Transfer-Encoding", "xchunked"), ("Content-Length", "3")],
    "chunked-identity": [("Transfer-Encoding", "chunked, identity"),
                         ("Content-Length", "3")],
    "gzip-chunked": [("Transfer-Encoding", "gzip, chunked"), ("Content-Length", "3")],
    "length-space": [("Content-Length ", "3")],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(SMUGGLING_FRAMINGS))
def test_no_request_smuggling(daemon, image, kind, name):
    sid = daemon.add_session(image)
    before = digest(image)
    with connect(daemon, kind) as sock:
        sock.sendall(smuggling_request(sid, SMUGGLING_FRAMINGS[name]))
        [first, second] = read_responses(sock, 2)
        assert first is not None and first[0] in (400, 501), first
        assert first[1].get("connection") == "close"
        # The connection is closed: the hidden request never runs.
        assert second is None
    assert digest(image) == before


@pytest.mark.parametrize("kind", KINDS)
def test_transfer_encoding_with_content_length_closes(daemon, image, kind):
    sid = daemon.add_session(image)
    with connect(daemon, kind) as sock:
        sock.sendall(
            b"PUT /images/" + sid.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
            b"4\r\nEVIL\r\n0\r\n\r\n"
            b"GET /images/" + sid.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Range: bytes=0-7\r\n\r\n")
        [(status, headers), second] = read_responses(sock, 2)
        assert status == 400
        assert headers["connection"] == "close"
        assert second is None
    assert open(image, "rb").read(8) == b"ORIGINAL"


def test_valid_framings_keep_the_connection(daemon, image):
    sid = daemon.add_session(image)
    with connect(daemon, "tcp") as sock:
        sock.sendall(
            b"PUT /images/" + sid.encode() + b"?flush=n HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nDATA"
            b"PUT /images/" + sid.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Range: bytes 4-7/*\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nMORE\r\n0\r\n\r\n")
        [(first, _), (second, _)] = read_responses(sock, 2)
    assert first == second == 200
    assert open(image, "rb").read(8) == b"DATAMORE"


def read_responses(sock, count):
    """
    Read up to `count` pipelined responses (bodies by Content-Length) from
    one buffered stream; (status, headers) each, None once the peer closed.
    """
    f = sock.makefile("rb")
    result = []
    try:
        for _ in range(count):
            line = f.readline()
            if not line:
                result.append(None)
                continue
            headers = {}
            while True:
                h = f.readline()
                if h in (b"\r\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            f.read(int(headers.get("content-length", 0)))
            result.append((int(line.split()[1]), headers))
    finally:
        f.close()
    return result


def client_hello():
    """The bytes of a real TLS ClientHello."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def closed_within(sock, timeout_s, drip=b"", interval_s=0.25):
    """
    Send `drip` a byte every `interval_s` (then nothing) and return the
    seconds until the peer closed the connection; fails after `timeout_s`.
    """
    start = time.monotonic()
    sock.settimeout(interval_s)
    pos = 0
    while time.monotonic() - start < timeout_s:
        if pos < len(drip):
            try:
                sock.send(drip[pos:pos + 1])
            except OSError:
                return time.monotonic() - start
            pos += 1
        try:
            data = sock.recv(64 * KiB)
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - start
        if not data:
            return time.monotonic() - start
    raise AssertionError(f"connection still open after {timeout_s} s")


SLOW = {"server": {"header_timeout_s": 1}, "images": {"inactivity_timeout_s": 2}}


def test_slow_tls_handshake_is_dropped(make_daemon):
    d = make_daemon(SLOW)
    hello = client_hello()
    with socket.create_connection(("127.0.0.1", d.tls_port)) as sock:
        # Each byte would restart a per-read timeout; the handshake has one
        # deadline for the whole of it.
        elapsed = closed_within(sock, 1 + SLACK_S, drip=hello)
    assert elapsed < 1 + SLACK_S
    assert "TLS handshake too slow" in d.log()


@pytest.mark.parametrize("kind", KINDS)
def test_slow_request_head_is_dropped(make_daemon, kind):
    d = make_daemon(SLOW)
    with connect(d, kind) as sock:
        head = b"GET /images/x HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 40
        elapsed = closed_within(sock, 1 + SLACK_S, drip=head)
    assert elapsed < 1 + SLACK_S


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("request_line", [
    "OPTIONS /images/* HTTP/1.1", "POST /no-such-resource HTTP/1.1"])
def test_slow_body_without_session_is_dropped(make_daemon, kind, request_line):
    d = make_daemon(SLOW)
    with connect(d, kind) as sock:
        sock.sendall(f"{request_line}\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                     .encode())
        r = read_response(sock, request_line.split()[0])
        assert r.headers.get("connection") == "close"
        # The answer came; the rest of the body is not waited for beyond
        # the lingering close.
        elapsed = closed_within(sock, transport.Handler.LINGER_S + SLACK_S,
                                drip=b"x" * 1000)
    assert elapsed < transport.Handler.LINGER_S + SLACK_S


def test_small_unread_body_is_drained_and_the_connection_kept(daemon):
    with connect(daemon, "tcp") as sock:
        sock.sendall(b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 3\r\n\r\nabc"
                     b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n\r\n")
        [first, second] = read_responses(sock, 2)
    assert first[0] == second[0] == 200
    assert "connection" not in first[1]


@pytest.mark.parametrize("kind", KINDS)
def test_connection_close_is_echoed(daemon, kind):
    with connect(daemon, kind) as sock:
        sock.sendall(b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        r = read_response(sock, "OPTIONS")
        assert r.status == 200
        assert r.headers["connection"] == "close"
        assert sock.recv(1) == b""


def test_refused_path_gets_a_lingering_close(daemon):
    # The client sends its body before it reads the answer: closing at once
    # would reset the connection and lose the answer.
    with connect(daemon, "tcp") as sock:
        sock.sendall(b"PUT /images/a%2fb HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 4194304\r\n\r\n")
        sock.sendall(b"x" * (2 * MiB))
        r = response_or_none(sock, "PUT")
    assert r is not None and r.status == 400
    assert r.headers["connection"] == "close"


def test_stalled_client_is_dropped_quietly(make_daemon, tmp_path):
    d = make_daemon(SLOW)
    path = sparse_file(tmp_path / "big.raw", 64 * MiB, [(0, os.urandom(MiB))])
    sid = d.add_session(path)
    with connect(d, "tcp", rcvbuf=4096) as sock:
        sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # Never read: the daemon's sends stall, and after the inactivity
        # timeout it drops the connection.
        deadline = time.monotonic() + 2 + 10 * SLACK_S
        while "no progress for too long" not in d.log():
            assert time.monotonic() < deadline, d.log_tail()
            time.sleep(0.1)
    assert "Traceback" not in d.log()


def slow_download(d, kind, sid, size, piece_bytes, pause_s):
    """GET a whole image reading `piece_bytes` every `pause_s`: (head, body, seconds)."""
    got = bytearray()
    start = time.monotonic()
    with connect(d, kind, rcvbuf=64 * KiB) as sock:
        sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < size:
            # A TLS socket returns a record (16 KiB) at most per call.
            want = len(got) + piece_bytes
            while len(got) < want:
                piece = sock.recv(want - len(got))
                if not piece:
                    break
                got += piece
            else:
                time.sleep(pause_s)
                continue
            break
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    return head, body, time.monotonic() - start


@pytest.mark.parametrize("kind", KINDS)
def test_slow_steady_client_gets_a_whole_chunk(make_daemon, tmp_path, kind):
    # The server hands over a whole 8 MiB buffer in one send; a client that
    # takes longer than the inactivity timeout (2 s) for it, but never
    # stops for that long, must get every byte.
    d = make_daemon(SLOW)
    data = os.urandom(8 * MiB)
    sid = d.add_session(sparse_file(tmp_path / "big.raw", len(data), [(0, data)]))
    # ~1.6 MiB/s: 5 s for the chunk.
    head, body, elapsed = slow_download(d, kind, sid, len(data), 64 * KiB, 0.04)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert body == data, (len(body), d.log_tail())
    assert elapsed > 2 * 2, elapsed     # longer than two inactivity timeouts
    assert "no progress for too long" not in d.log()


def kernel_queue_bytes(local_port, remote_port):
    """Bytes a TCP socket holds unacknowledged or unsent (/proc/net/tcp tx_queue)."""
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16) == local_port
                    and int(remote.split(":")[1], 16) == remote_port):
                return int(fields[4].split(":")[0], 16)
    return 0


@pytest.mark.parametrize("kind", ["tls", "tcp"])
@pytest.mark.parametrize("lowat", [128 * KiB, 0], ids=["lowat", "kernel-default"])
def test_slow_client_unsent_data_stays_out_of_the_kernel(make_daemon, tmp_path, kind, lowat):
    # server.tcp_notsent_lowat_bytes: toward a client reading slowly
    # through a 64 KiB receive buffer, the daemon's socket holds about that
    # much unsent data, not the megabytes the kernel would take.
    d = make_daemon({"server": {"tcp_notsent_lowat_bytes": lowat}})
    data = os.urandom(16 * MiB)
    sid = d.add_session(sparse_file(tmp_path / "big.raw", len(data), [(0, data)]))
    server_port = d.tls_port if kind == "tls" else d.tcp_port
    peak = 0
    got = bytearray()
    with connect(d, kind, rcvbuf=64 * KiB) as sock:
        sock.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        client_port = sock.getsockname()[1]
        for _ in range(40):
            got += sock.recv(16 * KiB)
            time.sleep(0.01)
            peak = max(peak, kernel_queue_bytes(server_port, client_port))
        while len(got.partition(b"\r\n\r\n")[2]) < len(data):
            piece = sock.recv(MiB)
            assert piece, len(got)
            got += piece
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert body == data
    print(f"peak {peak} bytes queued in the kernel")
    if lowat:
        # The low-water mark, plus what one write may add past it (a
        # loopback segment) and what is in flight.
        assert peak < lowat + 256 * KiB, peak
    else:
        assert peak > MiB, peak


@pytest.mark.slow
def test_slow_steady_client_outlasts_a_full_send_buffer(make_daemon, tmp_path):
    # 400 KiB/s: the kernel frees room in the server's (autotuned, up to 4
    # MiB) send buffer only every ~3 s, longer than the 2 s inactivity
    # timeout; the client never stops reading and must get every byte.
    d = make_daemon(SLOW)
    data = os.urandom(6 * MiB)
    sid = d.add_session(sparse_file(tmp_path / "big.raw", len(data), [(0, data)]))
    head, body, elapsed = slow_download(d, "tcp", sid, len(data), 16 * KiB, 0.04)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert body == data, (len(body), d.log_tail())
    assert "no progress for too long" not in d.log()


# The header deadline, on a socket pair: armed and disarmed in one place,
# whichever way reading the head ends.

class _Server:
    application = None
    links = set()


def handler_on(data, shut=True):
    a, b = gevent.socket.socketpair()
    b.sendall(data)
    if shut:
        b.shutdown(socket.SHUT_WR)
    h = transport.Handler(a, ("127.0.0.1", 1), _Server())
    h.link = transport.Link(a)
    return h, a, b


@pytest.mark.parametrize("data,status", [
    (b"GET /images/x", 400),                          # EOF inside the line.
    (b"G" * (transport.MAX_REQUEST_LINE_BYTES + 10), 414),
    (b"GET /images/x HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET /images/x HTTP/1.1\r\nHost", 400),         # EOF inside headers.
    (b"GET /images/x HTTP/1.1\r\nHost: x\r\n", 400),  # EOF before the blank line.
    (b"GET /images/x HTTP/1.1\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n", 400),
    (b"GET /images/x HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 400),
    (b"GET /images/x HTTP/1.1\r\nHost: x\r\nX-A: 1\r\r\n\r\n", 400),  # A stray CR.
    (b"GET /images/x HTTP/1.1\nHost: x\nRange: bytes=0-1\n\n", None),  # Bare LF endings.
])
def test_header_deadline_is_disarmed(data, status):
    h, a, b = handler_on(data)
    with a, b:
        result = h._read_head()
        assert (result and result[0]) == status
        assert not h._header_deadline.pending


def sized_body_app(environ, start_response):
    body = b"x" * int(environ["PATH_INFO"].strip("/"))
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def test_response_head_goes_out_with_a_small_first_piece():
    # On a SOCK_SEQPACKET pair every write arrives as its own message.
    a, b = gevent.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = transport.Server(("127.0.0.1", 0), sized_body_app,
                              handler_class=transport.Handler)
    g = gevent.spawn(server.handle, a, "")
    try:
        with b:
            for length in (1, config.SMALL_BODY_BYTES):
                b.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % length)
                m = b.recv(2 * MiB)
                assert m.startswith(b"HTTP/1.1 200 OK\r\n")
                assert m.endswith(b"\r\n\r\n" + b"x" * length)
            # A larger piece is not copied: the head leaves first.
            length = config.SMALL_BODY_BYTES + 1
            b.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % length)
            m = b.recv(2 * MiB)
            assert b"Content-Length: %d\r\n" % length in m and m.endswith(b"\r\n\r\n")
            assert b.recv(2 * MiB) == b"x" * length
            # No body: the head alone.
            b.sendall(b"GET /0 HTTP/1.1\r\nHost: x\r\n\r\n")
            m = b.recv(2 * MiB)
            assert b"Content-Length: 0\r\n" in m and m.endswith(b"\r\n\r\n")
    finally:
        g.join(timeout=5)
        assert g.dead


def test_head_is_parsed_into_headers():
    h, a, b = handler_on(b"GET /images/x?flush=y HTTP/1.1\r\nHost: x\r\n"
                         b"Range: bytes=0-1\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    with a, b:
        assert h._read_head() is None
        assert h.headers.get("range") == "bytes=0-1"
        assert h.headers.get_all("X-A") == ["1", "2"]
        # pywsgi builds the WSGI environ from these.
        fields = list(h._headers())
        assert ("HTTP_RANGE", "bytes=0-1") in fields
        assert [v for k, v in fields if k == "HTTP_X_A"] == ["1", "2"]


def test_header_deadline_fires_and_is_disarmed():
    h, a, b = handler_on(b"GET /images/x HTTP/1.1\r\n", shut=False)
    h.header_timeout_s = 0.2
    with a, b:
        start = time.monotonic()
        assert h._read_head()[0] == 408
        assert time.monotonic() - start < 0.2 + SLACK_S
        assert not h._header_deadline.pending


def test_header_deadline_is_armed_again_for_each_head():
    # One deadline serves every request of a connection: cancelled after a
    # head that came in time, it must fire for a later head that does not.
    h, a, b = handler_on(b"GET /images/x HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"GET /images/y HTTP/1.1\r\n", shut=False)
    h.header_timeout_s = 0.2
    with a, b:
        assert h._read_head() is None
        first = h._header_deadline
        # Longer than the deadline between the heads: only the time a head
        # takes counts.
        gevent.sleep(0.3)
        start = time.monotonic()
        with gevent.Timeout(0.2 + SLACK_S):     # Not armed: no hang.
            assert h._read_head()[0] == 408
        assert time.monotonic() - start >= 0.15
        assert h._header_deadline is first
        assert not first.pending
