"""
imaged.transport pieces that need no server: the blocking body reader that runs
in pool threads, on real socket pairs, plain and TLS (real handshakes).
"""

import functools
import io
import os
import socket
import ssl
import threading
import time

import pytest

from imaged import transport as web


class Link:
    """
    The server end of a socket pair as the body reader sees it (a
    non-blocking socket, with TLS its C object) and the client end.
    """

    def __init__(self, server, client, tls, spin=None):
        self.server = server
        self.client = client
        self.tls = tls
        self.spin = spin

    def recv(self, view, timeout_s):
        """What BodyReader runs in a pool thread."""
        return web._recv_blocking(self.server.fileno(), view, timeout_s, self.tls,
                                  self.spin)


def tls_link(a, b, tls_files):
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    client = client_ctx.wrap_socket(b, server_hostname="localhost",
                                    do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    server = server_ctx.wrap_socket(a, server_side=True)
    t.join(10)
    server.setblocking(False)
    return Link(server, client, server._sslobj)


@pytest.fixture(params=["plain", "plain-spin", "tls"])
def link(request):
    a, b = socket.socketpair()
    if request.param == "tls":
        link = tls_link(a, b, request.getfixturevalue("tls_files"))
    else:
        # Like a gevent socket: the file descriptor is non-blocking.
        a.setblocking(False)
        spin = (web.Spin(web.RequestBody.UNIX_SPIN_S) if request.param == "plain-spin"
                else None)
        link = Link(a, b, None, spin)
    yield link
    link.server.close()
    link.client.close()


def test_recv_fills_the_view_from_many_sends(link):
    data = os.urandom(3 * 1024**2 + 5)

    def send():
        for start in range(0, len(data), 64 * 1024):
            link.client.sendall(data[start:start + 64 * 1024])

    t = threading.Thread(target=send)
    t.start()
    view = memoryview(bytearray(len(data)))
    assert link.recv(view, 10) == len(data)
    t.join()
    assert view.tobytes() == data


def test_recv_stops_at_the_end_of_the_stream(link):
    # No TLS close_notify either: a client that died mid-upload.
    link.client.sendall(b"abc")
    link.client.shutdown(socket.SHUT_WR)
    view = memoryview(bytearray(10))
    assert link.recv(view, 10) == 3
    assert view[:3] == b"abc"


def test_recv_times_out_without_data(link):
    link.client.sendall(b"x")
    with pytest.raises(socket.timeout):
        link.recv(memoryview(bytearray(10)), 0.2)


def test_recv_wakes_when_the_connection_is_torn_down(link):
    # Aborting a transfer shuts the server's socket down (and nothing
    # more, see Connection.abort): the pool thread must return at once,
    # not wait for its timeout.
    result = []
    t = threading.Thread(target=lambda: result.append(
        link.recv(memoryview(bytearray(10)), 60)))
    t.start()
    link.client.sendall(b"12")
    socket.socket.shutdown(link.server, socket.SHUT_RDWR)
    t.join(10)
    assert not t.is_alive()
    assert result and result[0] <= 2


def test_recv_tls_stops_at_close_notify(tls_files):
    a, b = socket.socketpair()
    link = tls_link(a, b, tls_files)
    try:
        link.client.sendall(b"abc")
        # Sends close_notify, then waits for the server's, which never comes.
        link.client.settimeout(0.5)
        with pytest.raises(OSError):
            link.client.unwrap()
        view = memoryview(bytearray(10))
        assert link.recv(view, 10) == 3
        assert view[:3] == b"abc"
    finally:
        link.server.close()
        link.client.close()


def test_recv_tls_times_out_on_half_a_record(tls_files):
    # A record cut short: OpenSSL keeps asking for the rest.
    a, b = socket.socketpair()
    link = tls_link(a, b, tls_files)
    try:
        with socket.socket(fileno=os.dup(link.client.fileno())) as raw:
            raw.sendall(bytes([23, 3, 3, 0x40, 0x00]) + b"x" * 100)
        with pytest.raises(socket.timeout):
            link.recv(memoryview(bytearray(10)), 0.2)
    finally:
        link.server.close()
        link.client.close()


class CountingPoll:
    """Stands in for the real poll(): counts the times the reader slept."""

    def __init__(self, real):
        self.real = real
        self.sleeps = 0
        # Set each time the reader goes to sleep.
        self.slept = threading.Event()

    def __call__(self):
        poller = self.real()
        counter = self

        class Poller:
            def register(self, fd, events):
                poller.register(fd, events)

            def poll(self, timeout_ms):
                counter.sleeps += 1
                counter.slept.set()
                return poller.poll(timeout_ms)

        return Poller()


@pytest.mark.parametrize("spin_s, sleeps", [(0.0, 1), (10.0, 0)])
def test_recv_spins_before_sleeping(monkeypatch, spin_s, sleeps):
    # The second piece arrives 50 ms after the first: within a 10 s spin
    # the reader never sleeps; without a spin it sleeps once, in poll().
    counting = CountingPoll(web._thread_poll)
    monkeypatch.setattr(web, "_thread_poll", counting)
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        b.sendall(b"first")
        later = threading.Timer(0.05, b.sendall, [b"second"])
        later.start()
        view = memoryview(bytearray(11))
        assert web._recv_blocking(a.fileno(), view, 10, None, web.Spin(spin_s)) == 11
        later.join()
    assert view.tobytes() == b"firstsecond"
    assert counting.sleeps == sleeps


def test_recv_waits_after_a_short_read_instead_of_reading_again(monkeypatch):
    # Each piece comes only once the reader sleeps. A read that returned
    # less than asked took all the socket had: the reader polls next,
    # instead of a read that finds the socket empty (and raises). About
    # one read per piece (a piece may arrive in two parts), plus the first
    # one, which finds nothing yet; reading again after each piece made
    # two per piece.
    counting = CountingPoll(web._thread_poll)
    monkeypatch.setattr(web, "_thread_poll", counting)
    reads = []
    real_readv = os.readv
    monkeypatch.setattr(os, "readv", lambda fd, bufs: reads.append(1) or real_readv(fd, bufs))
    pieces = [os.urandom(64 * 1024) for _ in range(8)]
    a, b = socket.socketpair()
    a.setblocking(False)

    def send():
        for piece in pieces:
            assert counting.slept.wait(10)
            counting.slept.clear()
            b.sendall(piece)

    with a, b:
        t = threading.Thread(target=send)
        t.start()
        view = memoryview(bytearray(8 * 64 * 1024))
        assert web._recv_blocking(a.fileno(), view, 10, None, None) == len(view)
        t.join()
    assert view.tobytes() == b"".join(pieces)
    assert len(reads) <= 1.5 * len(pieces), len(reads)


def test_recv_spin_gives_way_to_the_timeout(monkeypatch):
    # A spin longer than the socket timeout still ends in poll() and its
    # timeout once the spin is over: the spin delays the sleep, nothing more.
    counting = CountingPoll(web._thread_poll)
    monkeypatch.setattr(web, "_thread_poll", counting)
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        with pytest.raises(socket.timeout):
            web._recv_blocking(a.fileno(), memoryview(bytearray(10)), 0.05, None,
                               web.Spin(0.1))
    assert counting.sleeps == 1


def body_reader_on(sock):
    from imaged import framing
    return web.RequestBody(web.Link(sock), io.BufferedReader(io.BytesIO()),
                           framing.Framing(content_length=10), False)


def test_body_reader_spins_only_for_local_clients():
    unix_a, unix_b = socket.socketpair(socket.AF_UNIX)
    tcp = socket.socket(socket.AF_INET)
    with unix_a, unix_b, tcp:
        assert body_reader_on(unix_a)._spin.spin_s == web.RequestBody.UNIX_SPIN_S
        assert body_reader_on(tcp)._spin is None


def test_body_read_in_the_event_loop_leaves_nothing_behind(monkeypatch):
    # Body reads in the event loop (every thread reader busy, or a view
    # too small for a thread) must not read ahead into the connection's
    # stream buffer: the next read, in a pool thread, reads the socket
    # itself and never looks there. (A resumed upload once waited 60 s for
    # the last 8 KiB of a request body that sat in that buffer, then failed
    # with a 400.)
    import gevent
    import gevent.event
    import gevent.lock
    import gevent.socket
    from imaged import framing

    view_bytes = 512 * 1024
    data = os.urandom(1000 + view_bytes + 1024**2)
    a, b = gevent.socket.socketpair()
    a.settimeout(5)
    steps = [gevent.event.Event() for _ in range(2)]

    def send():
        # A short first piece: the stream is drained, then the socket read.
        b.sendall(data[:1000])
        steps[0].wait()
        # All but 100 bytes of the next view, then the rest: a reader
        # through the stream buffers what goes past the view.
        b.sendall(data[1000:1000 + view_bytes - 100])
        steps[1].wait()
        b.sendall(data[1000 + view_bytes - 100:])

    sender = gevent.spawn(send)
    slots = gevent.lock.BoundedSemaphore(web.RequestBody.THREAD_READERS)
    monkeypatch.setattr(web.RequestBody, "_thread_readers", slots)
    body = web.RequestBody(web.Link(a), a.makefile("rb", -1),
                           framing.Framing(content_length=len(data)), False)
    got = bytearray()
    buf = memoryview(bytearray(view_bytes))
    got += buf[:body.readinto(buf)]
    steps[0].set()
    # Every thread reader busy.
    for _ in range(web.RequestBody.THREAD_READERS):
        slots.acquire()
    gevent.spawn_later(0.2, steps[1].set)
    while len(got) < 1000 + view_bytes:
        got += buf[:body.readinto(buf[:1000 + view_bytes - len(got)])]
    for _ in range(web.RequestBody.THREAD_READERS):
        slots.release()
    # A thread reader again, for the rest.
    while len(got) < len(data):
        got += buf[:body.readinto(buf)]
    sender.join(5)
    assert bytes(got) == data
    a.close()
    b.close()


def spin_receive(monkeypatch, spin_s, pieces, gap_s=None):
    """
    _recv_blocking with a Spin of `spin_s` while another thread sends
    `pieces` bytes one at a time, `gap_s` apart, or each only once the
    reader has gone to sleep if `gap_s` is None: (the Spin, the poll sleeps).
    """
    counting = CountingPoll(web._thread_poll)
    monkeypatch.setattr(web, "_thread_poll", counting)
    spin = web.Spin(spin_s)
    a, b = socket.socketpair()
    a.setblocking(False)

    def send():
        for _ in range(pieces):
            if gap_s is None:
                assert counting.slept.wait(10)
                counting.slept.clear()
            else:
                time.sleep(gap_s)
            b.sendall(b"x")

    with a, b:
        t = threading.Thread(target=send)
        t.start()
        view = memoryview(bytearray(pieces))
        assert web._recv_blocking(a.fileno(), view, 10, None, spin) == pieces
        t.join()
    return spin, counting.sleeps


def test_recv_stops_spinning_where_spins_find_no_data(monkeypatch):
    # A client that sends each piece only after the reader has slept: every
    # spin ends without data, so the reader soon stops spinning, and spins
    # again only on one gap in Spin.PROBE_EVERY.
    pieces = 40
    spin, sleeps = spin_receive(monkeypatch, 0.005, pieces)
    assert sleeps == pieces
    # Spins while the success rate is still >= 1/2 (1.0 * (7/8)**6 < 1/2),
    # then one probe in 16 gaps.
    assert spin.success < web.Spin.MIN_SUCCESS
    assert 6 <= spin.spins <= 6 + pieces // web.Spin.PROBE_EVERY + 1


def test_recv_keeps_spinning_where_spins_find_data(monkeypatch):
    # Pieces 1 ms apart and a 1 s spin: every spin ends with data and the
    # reader never sleeps.
    spin, sleeps = spin_receive(monkeypatch, 1.0, 40, 0.001)
    assert sleeps == 0
    assert spin.success == 1.0
    assert spin.spins >= 1


def tcp_pair():
    """A connected TCP pair on loopback: (server end, non-blocking; client end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    server.setblocking(False)
    return server, client


def wake_on(sock, coming, wake_bytes=128 * 1024):
    """_recv_blocking's `wake` for `sock`: SO_RCVLOWAT of wake_bytes."""
    set_lowat = functools.partial(sock.setsockopt, socket.SOL_SOCKET, socket.SO_RCVLOWAT)
    return set_lowat, wake_bytes, coming


def test_recv_wakes_once_wake_bytes_have_come(monkeypatch):
    # A client sending 16 KiB a millisecond, slower than the reader: the
    # reader sleeps until 128 KiB are there, not for every piece.
    counting = CountingPoll(web._thread_poll)
    monkeypatch.setattr(web, "_thread_poll", counting)
    data = os.urandom(2 * 1024**2)
    server, client = tcp_pair()

    def send():
        for start in range(0, len(data), 16 * 1024):
            client.sendall(data[start:start + 16 * 1024])
            time.sleep(0.001)

    with server, client:
        t = threading.Thread(target=send)
        t.start()
        view = memoryview(bytearray(len(data)))
        assert web._recv_blocking(server.fileno(), view, 10, wake=wake_on(server, len(data))) \
            == len(data)
        t.join()
        # Back to the kernel's default for whoever reads next.
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert view.tobytes() == data
    # 16 wakes of 128 KiB, a few more where a wait took fewer; a reader
    # that woke for every piece would sleep about 128 times.
    assert counting.sleeps <= 40, counting.sleeps


def test_recv_takes_fewer_than_wake_bytes_from_a_slow_client():
    # 16 KiB every 100 ms: each wait for 128 KiB gives up after
    # WAKE_WAIT_MS and takes what came. The timeout (0.5 s) counts from
    # the last byte, not from the start of the wait for 128 KiB.
    pieces = [os.urandom(16 * 1024) for _ in range(8)]
    server, client = tcp_pair()

    def send():
        for piece in pieces:
            client.sendall(piece)
            time.sleep(0.1)

    with server, client:
        t = threading.Thread(target=send)
        t.start()
        view = memoryview(bytearray(8 * 16 * 1024))
        assert web._recv_blocking(server.fileno(), view, 0.5,
                                  wake=wake_on(server, 1024**2)) == len(view)
        t.join()
    assert view.tobytes() == b"".join(pieces)


def test_recv_waits_for_single_bytes_near_the_end(monkeypatch):
    # 150 KiB, then after a pause the last 50 KiB: fewer than 128 KiB are
    # still to come, so the reader wakes for any byte (one sleep), instead
    # of waiting WAKE_WAIT_MS for bytes that will never come (two).
    counting = CountingPoll(web._thread_poll)
    monkeypatch.setattr(web, "_thread_poll", counting)
    head, tail = os.urandom(150 * 1024), os.urandom(50 * 1024)
    server, client = tcp_pair()
    with server, client:
        client.sendall(head)
        later = threading.Timer(0.2, client.sendall, [tail])
        later.start()
        view = memoryview(bytearray(200 * 1024))
        got = 0
        # As RequestBody does: whatever the first read takes, then the rest.
        while got < len(head):
            try:
                got += server.recv_into(view[got:len(head)])
            except BlockingIOError:
                time.sleep(0.01)
        counting.sleeps = 0
        assert web._recv_blocking(server.fileno(), view[got:], 10,
                                  wake=wake_on(server, len(tail))) == len(tail)
        later.join()
    assert view.tobytes() == head + tail
    assert counting.sleeps == 1, counting.sleeps
