"""
The transport: client connections and the HTTP/1.1 wire, under the apps.

This is the only module that touches sockets, gevent's pywsgi internals and
ssl internals. What it gives the layers above:

- `Link`: one client connection, shared by its requests, in
  `environ[LINK_KEY]`. Apps may ask it to close after the answer, abort it
  (the cancel hook of a transfer), cork it while a response streams, change
  its idle timeout, and keep their own per-connection state in
  `link.context`, cleaned up by `link.on_close()` callbacks.
- `body(environ)`: the request body as a reader with `readinto(view)`.
- `Handler` and `Server`: pywsgi's handler and server made strict and
  bounded: the request head is parsed by imaged.framing before any app sees
  it; the TLS handshake and the request head each have one deadline; idle
  connections are dropped; a connection whose request body was not read is
  closed (after a bounded lingering close) instead of drained; and
  `Connection: close` is echoed whenever the connection will close.

pywsgi's documented extension points are subclassing WSGIHandler and
WSGIServer. Besides them this module uses WSGIHandler's request loop
attributes (rfile, socket, close_connection, code, headers, requestline,
response_length, wsgi_input and its `_discard` hook) and its `_sendall`,
WSGIServer's `wrap_socket_and_handle`, `_log_error`, pywsgi.Input's
chunked decoder, the `_sslobj` of gevent's SSLSocket, and the `_sock`,
`_wait`, `_read_event` and `_write_event` of gevent's sockets. Verified against gevent 22.10
(Debian 12's python3-gevent, which the packages run on) and 26.9 (the
development venv).
"""

import contextlib
import errno
import fcntl
import functools
import logging
import os
import select
import socket
import ssl
import struct
import termios
import time

import gevent
import gevent.lock
import gevent.monkey
import gevent.ssl
from gevent import pywsgi

from . import config
from . import errors
from . import framing
from . import tls

log = logging.getLogger("transport")

LINK_KEY = "imaged.link"
BODY_KEY = "imaged.body"
RAW_PATH_KEY = "imaged.raw_path"

TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)

# pywsgi's limit on a request line.
MAX_REQUEST_LINE_BYTES = pywsgi.MAX_REQUEST_LINE


# Raised by the body readers; one class with the images service, which
# reports such an operation as "client gone".
ClientGone = errors.ClientGone


class Link:
    """
    One client connection, shared by the requests it carries.

    Created by the Handler for each accepted connection; apps find it in
    `environ[LINK_KEY]`. A detached Link (no socket) serves WSGI servers
    other than ours (webtest in the tests): its requests work the same, but
    cork() and set_idle_timeout() do nothing.
    """

    def __init__(self, sock=None, idle_timeout_s=None):
        self.sock = sock
        self.idle_timeout_s = idle_timeout_s
        # Torn down by abort(): failures of its requests are expected.
        self.aborted = False
        # A request is being answered (an idle connection can be dropped).
        self.busy = False
        # Per-connection state of the services above, by name.
        self.context = {}
        self._close_requested = False
        self._closers = []
        self._closed = False
        # The TLS read buffer under a request body (tls.ReadBuffer): None
        # before the first, False where TLS buffers are off.
        self._read_buffer = None

    @property
    def detached(self):
        return self.sock is None

    def close_after_response(self):
        """
        Carry no further request on this connection.

        An app refusing a request whose body it did not read calls this:
        the transport then closes (with a bounded lingering close) instead
        of reading a body that may be many GiB.
        """
        self._close_requested = True

    @property
    def close_requested(self):
        return self._close_requested

    def on_close(self, callback):
        """Call `callback()` once when the connection ends."""
        self._closers.append(callback)

    def set_idle_timeout(self, timeout_s):
        """Drop the connection after `timeout_s` without progress."""
        if self.sock is not None and timeout_s:
            self.sock.settimeout(min(timeout_s, config.MAX_TIMEOUT_S))

    def cork(self, on):
        """
        Hold back (on) or let go (off) partial TCP segments.

        A response body is handed to TLS in 16 KiB records, each a separate
        write to the socket; with TCP_NODELAY each would leave as its own
        packet. Corked, the kernel sends full segments (64 KiB on loopback),
        which costs server and client less CPU per byte; uncorking sends the
        tail at once. No-op on other sockets.
        """
        if self.sock is None or self.sock.family not in TCP_FAMILIES:
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
        except OSError:
            pass    # The connection is gone; its handler will notice.

    def abort(self):
        """Tear the connection down, waking any greenlet blocked on it."""
        self._close_requested = True
        self.aborted = True
        if self.sock is not None:
            try:
                # An abortive close: when the socket is closed, a reset,
                # even if everything the client sent was read. A client
                # still sending learns at once instead of waiting for its
                # timeout (after shutdown the kernel stops opening the
                # receive window, and a FIN does not stop a sender).
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def buffer_reads(self, conn):
        """
        Read a large request body through a TLS read buffer (see
        tls.ReadBuffer) on `conn`, the connection's C object, until
        end_buffered_reads().
        """
        if self._read_buffer is None:
            self._read_buffer = tls.ReadBuffer.attach(conn) or False

    def end_buffered_reads(self):
        """
        After a request: back to OpenSSL's read-ahead, once the read buffer
        holds none of what the client sent next; else after a later request.
        """
        if self._read_buffer and self._read_buffer.detach():
            self._read_buffer = None

    def close(self):
        """The connection ended: run the on_close callbacks, once."""
        if self._closed:
            return
        self._closed = True
        closers, self._closers = self._closers, []
        for callback in closers:
            try:
                callback()
            except Exception:
                log.exception("cleaning up a connection failed")


def link(environ):
    """The Link of this request (a detached one outside our server)."""
    lnk = environ.get(LINK_KEY)
    if lnk is None:
        lnk = environ[LINK_KEY] = Link()
    return lnk


def body(environ):
    """The request body as a reader (see RequestBody and PortableBody)."""
    b = environ.get(BODY_KEY)
    if b is None:
        b = environ[BODY_KEY] = PortableBody(environ)
    return b


class PortableBody:
    """
    A request body read through `wsgi.input`, for WSGI servers other than
    ours (webtest in the tests). Same interface as RequestBody.
    """

    def __init__(self, environ):
        self._input = environ["wsgi.input"]
        self.chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        raw = environ.get("CONTENT_LENGTH")
        self.length = None if self.chunked else int(raw or 0)
        self._left = self.length

    def allow_spin(self, allowed):
        """As RequestBody.allow_spin(); this reader never spins."""

    def readinto(self, view):
        """Read up to len(view) bytes; 0 at the end of the body."""
        want = len(view) if self._left is None else min(len(view), self._left)
        if want <= 0:
            return 0
        data = self._input.read(want)
        view[:len(data)] = data
        if self._left is not None:
            self._left -= len(data)
        return len(data)


class RequestBody:
    """
    The body of one request on our server, read straight from the
    connection into caller-owned buffers, without copies.

    A large read runs in a pool thread, blocking in the kernel: a client
    such as curl sends 64 KiB at a time, and receiving each piece through
    the event loop (an EAGAIN, a hub switch, a timeout) cost more CPU than
    the copy. Over TLS the thread has OpenSSL decrypt record after record
    straight into the buffer, with the GIL released, instead of four
    Python layers of the stream and gevent's socket per 16 KiB record
    (22% of the daemon's CPU on an HTTPS upload). That is safe because
    nothing else uses the connection meanwhile: its greenlet waits for the
    thread, and Link.abort() only shuts the socket down (waking the
    thread's wait) and makes its close a reset.

    Chunked bodies are decoded by pywsgi's chunked reader.
    """

    # Reads smaller than this are not worth a trip to a pool thread.
    THREAD_READ_MIN_BYTES = 256 * 1024
    # What the first large read takes from the connection's stream, which
    # buffers much less than this (8 KiB).
    DRAIN_BYTES = 64 * 1024
    # Uploads receiving in pool threads at once, so that many local uploads
    # cannot take the pool from the disk I/O; the others use the event loop.
    THREAD_READERS = 4
    # How long a thread read of a local (unix socket) upload keeps retrying
    # an empty socket before it sleeps; see _recv_blocking().
    UNIX_SPIN_S = 50e-6
    # A pool-thread read of a TCP connection sleeps until this much has
    # arrived (SO_RCVLOWAT), not until the first byte; see _recv_blocking.
    TCP_WAKE_BYTES = 128 * 1024

    _thread_readers = None

    def __init__(self, link, rfile, message, expect_continue):
        self._link = link
        self._rfile = rfile
        self.chunked = message.chunked
        self.length = message.content_length
        self._left = message.content_length or 0
        self._continue = expect_continue
        # A read failed midway: where the next request starts is unknown.
        self.broken = False
        self._ended = not self.chunked and not self._left
        self._chunked_input = (pywsgi.Input(rfile, None, chunked_input=True)
                               if self.chunked else None)
        sock = link.sock
        # The file descriptor for pool thread reads, once the stream's own
        # buffer no longer holds body bytes.
        self._fd = None
        self._tls = isinstance(sock, gevent.ssl.SSLSocket)
        # Only local clients: they send fast enough that a spin bridges the
        # gaps. A remote client's gaps are longer than any worthwhile spin,
        # and over TLS decrypting already keeps both cores busy (a spin
        # there cost 13% more server CPU and no throughput). The
        # application may still say no (allow_spin): into NBD a spin takes
        # the core qemu-nbd writes with.
        local = sock is not None and sock.family == socket.AF_UNIX
        self._spin = Spin(self.UNIX_SPIN_S) if local else None

    def allow_spin(self, allowed):
        """
        Whether pool-thread reads of this body may spin through the gaps
        between a local client's pieces (see Spin); they may by default.
        The application says no where what it does with the bytes needs
        the core a spin would hold (imaged.backends.Capabilities.upload_spin).
        """
        if not allowed:
            self._spin = None

    @property
    def complete(self):
        """The whole body was read (or there was none)."""
        return self._ended

    @property
    def unread_bytes(self):
        """Bytes of body not read yet; None if unknown (chunked)."""
        if self._ended:
            return 0
        return None if self.chunked else self._left

    def readinto(self, view):
        """Read up to len(view) bytes; 0 at the end of the body."""
        if self._ended or not len(view):
            return 0
        if self.broken:
            raise ClientGone("the request body could not be read")
        try:
            self._send_continue()
            if self.chunked:
                count = self._read_chunked(view)
            else:
                count = self._read_plain(view[:min(len(view), self._left)])
                if not count:
                    raise ClientGone(
                        f"request body ended early: {self._left} bytes missing")
                self._left -= count
                if not self._left:
                    self._ended = True
        except OSError as e:
            self.broken = True
            raise ClientGone(f"connection lost while reading the body: {e}") from None
        except BaseException:
            self.broken = True
            raise
        return count

    def discard(self, max_bytes, deadline):
        """
        Read and drop the rest of a small body before monotonic `deadline`.

        Returns True if the body is complete afterwards.
        """
        buf = memoryview(bytearray(min(max_bytes, 64 * 1024) or 1))
        left = max_bytes
        timeout = gevent.Timeout(max(deadline - time.monotonic(), 0.001))
        timeout.start()
        try:
            while not self._ended and left > 0:
                left -= self.readinto(buf[:min(len(buf), left)])
        except (gevent.Timeout, errors.Error):
            pass
        finally:
            timeout.close()
        return self._ended

    def _send_continue(self):
        # Answer "Expect: 100-continue" once, when the app first reads.
        if self._continue:
            self._continue = False
            self._link.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_chunked(self, view):
        try:
            data = self._chunked_input.read(len(view))
        except (ValueError, OSError) as e:
            # pywsgi's decoder raises an IOError subclass for bad framing.
            self.broken = True
            raise errors.BadRequest(f"invalid chunked body: {e}") from None
        if not data:
            self._ended = True
            return 0
        view[:len(data)] = data
        return len(data)

    def _read_plain(self, view):
        sock = self._link.sock
        if self._fd is not None:
            # The stream's buffer was drained (_drain_stream): from now on
            # the socket itself, also for small reads in the event loop. The
            # stream's readinto() fills its buffer past a view with a small
            # tail, and the thread reads that follow never look there: a
            # local upload beside four others waited 60 s for the last
            # 8 KiB of a body that sat in that buffer, then failed (400).
            if len(view) >= self.THREAD_READ_MIN_BYTES:
                return self._read_in_thread(view, sock)
            return sock.recv_into(view)
        if len(view) >= self.THREAD_READ_MIN_BYTES:
            return self._drain_stream(view, sock)
        return self._rfile.readinto(view)

    def _drain_stream(self, view, sock):
        # read1() returns only bytes the stream has buffered, or if it has
        # none makes one read of the socket; either way, when it returns
        # fewer bytes than asked, the stream's buffer is empty and the rest
        # of the body can be read from the socket itself.
        data = self._rfile.read1(min(len(view), self.DRAIN_BYTES))
        view[:len(data)] = data
        if len(data) < self.DRAIN_BYTES and data:
            self._fd = sock.fileno()
        return len(data)

    def _read_in_thread(self, view, sock):
        cls = RequestBody
        if cls._thread_readers is None:
            cls._thread_readers = gevent.lock.BoundedSemaphore(cls.THREAD_READERS)
        if not cls._thread_readers.acquire(blocking=False):
            # In the event loop, from the socket itself (see _read_plain).
            return sock.recv_into(view)
        try:
            conn = None
            if self._tls:
                # The C object under gevent's SSLSocket; None once abort()
                # shut the connection down.
                conn = sock._sslobj
                if conn is None:
                    raise ClientGone("connection shut down while reading the body")
                self._link.buffer_reads(conn)
            wake = None
            if sock.family in TCP_FAMILIES:
                # Bytes of the body surely still to come through the socket:
                # a wait for more must never ask for bytes that already wait
                # above it, in OpenSSL's buffer and the read buffer under it
                # (tls.ReadBuffer).
                buffered_max = 64 * 1024
                if conn is not None:
                    buffered_max += 2 * tls.read_buffer_bytes(sock.context)
                coming = self._left - buffered_max
                if coming >= self.TCP_WAKE_BYTES:
                    wake = (functools.partial(sock.setsockopt, socket.SOL_SOCKET,
                                              socket.SO_RCVLOWAT),
                            self.TCP_WAKE_BYTES, coming)
            result = gevent.get_hub().threadpool.spawn(
                _recv_blocking, self._fd, view, sock.gettimeout(), conn, self._spin, wake)
            try:
                return result.get()
            except BaseException:
                if not result.ready():
                    # Interrupted (the daemon is stopping): the thread writes
                    # into `view`, so it must be done before the buffer goes
                    # back to the pool. Waking it takes tearing the
                    # connection down.
                    self._link.abort()
                    result.wait()
                raise
        finally:
            cls._thread_readers.release()


# The real poll(), not gevent's (imaged monkey patches): this one waits in
# a pool thread, outside the event loop.
_thread_poll = gevent.monkey.get_original("select", "poll")

# How long a pool-thread body read waits for RequestBody.TCP_WAKE_BYTES
# before it takes fewer (see _recv_blocking).
WAKE_WAIT_MS = 50


class Spin:
    """
    Whether a pool-thread read of a local upload retries an empty socket
    for `spin_s` before it sleeps (see _recv_blocking), learned from how
    the last spins of the request ended.

    A spin pays when the client's next piece comes within it: the reader
    saves a sleep and a wakeup, and so does the client. It costs its whole
    `spin_s` of CPU when nothing comes, and the client is not sending
    because it is waiting for a core, often one the spin holds: on this
    2-core VM with 1.6 cores taken by other programs, a unix socket PUT
    into an NBD export (where qemu-nbd wants a core too) ended 72% of its
    21,000 spins without data, 0.75 s of CPU per 2 GiB, 0.8 of the 2.0
    server CPU s (ovirt-imageio's: 1.2 s); a file upload on that machine
    lost half of its spins, and up to 98% in one transfer. So the reader
    spins while at least MIN_SUCCESS of the recent spins ended with data
    (an average weighing the latest by WEIGHT, starting at 1: a quiet
    machine, where the spin doubled throughput, keeps spinning), and
    otherwise spins on one gap in PROBE_EVERY, to notice when spinning
    pays again. A/B on that machine, alternating, 3 pairs each: unix PUT
    into NBD 1.77-2.03 -> 1.37-1.61 server CPU s, into a file 1.28-1.40 ->
    0.78-1.06 s, throughput unchanged within the noise. Used by one pool
    thread at a time (the request's).
    """

    WEIGHT = 1 / 8
    MIN_SUCCESS = 0.5
    PROBE_EVERY = 16

    def __init__(self, spin_s):
        self.spin_s = spin_s
        # Recent share of spins that ended with data.
        self.success = 1.0
        self.spins = 0
        self._skipped = 0

    def wanted(self):
        """Spin through this gap?"""
        if self.spin_s <= 0:
            return False
        if self.success >= self.MIN_SUCCESS:
            return True
        self._skipped += 1
        if self._skipped >= self.PROBE_EVERY:
            self._skipped = 0
            return True
        return False

    def ended(self, got_data):
        """A spin ended with data (True) or in a sleep (False)."""
        self.spins += 1
        self.success += (float(got_data) - self.success) * self.WEIGHT


def _recv_blocking(fd, view, timeout_s, tls=None, spin=None, wake=None):
    """
    Fill `view` from socket `fd` in a pool thread; fewer bytes at the end
    of the stream. Raises socket.timeout after `timeout_s` without data.

    With `tls` (the ssl._SSLSocket over the non-blocking `fd`), OpenSSL
    decrypts straight into `view`.

    With `spin` (a Spin), an empty socket is retried for up to spin.spin_s
    before the thread sleeps in poll(), when spin.wanted(). A client sends
    in pieces (curl: 64 KiB) into a socket that holds only a few of them.
    A reader that sleeps as soon as it has drained the socket must be woken
    for nearly every piece, and the client, finding the socket full
    meanwhile, must be woken in turn: an interrupt from one core to the
    other each time, costly on a virtual machine. Over a unix socket that
    was what limited an upload on a quiet machine; a 50 us spin keeps the
    reader awake through the gaps between pieces, and costs less CPU than
    the wakeups it saves, as long as the pieces do come within it
    (docs/benchmarks.md).

    With `wake` (set_lowat, wake_bytes, coming_bytes), an empty TCP socket
    is waited for until wake_bytes have arrived (SO_RCVLOWAT), while at
    least that many of the `coming_bytes` the client has still to send are
    yet to come. A reader that keeps up with its client otherwise wakes for
    every few segments: a 2 GiB HTTPS upload from curl made up to 80,800
    read() and 15,200 poll() calls (23,100 and 5,000 when curl kept
    ahead); waking per 128 KiB, 19,400-28,100 and 2,100-3,200, and the
    server's system time per upload fell from 0.53 to 0.37 s (medians of
    6, alternating; docs/benchmarks.md). A wait that gets fewer bytes
    within WAKE_WAIT_MS takes what there is, so
    a slow client (or a kernel that would not open its window that far)
    costs a wakeup, never a stall; the idle timeout still counts from the
    last byte.
    """
    poller = _thread_poll()
    timeout_ms = -1 if timeout_s is None else int(timeout_s * 1000)
    got = 0
    # In a gap (the socket found empty): None before, 0.0 when not
    # spinning through it, else when the spin ends.
    spin_until = None
    # The socket's SO_RCVLOWAT: 1 is the kernel's default.
    lowat = 1
    try:
        while got < len(view):
            try:
                if tls is None:
                    count = os.readv(fd, [view[got:]])
                else:
                    count = tls.read(len(view) - got, view[got:])
            except (BlockingIOError, ssl.SSLWantReadError):
                # No data yet, or OpenSSL needs more of a record.
                if spin is not None:
                    now = time.monotonic()
                    if spin_until is None:
                        spin_until = now + spin.spin_s if spin.wanted() else 0.0
                    if now < spin_until:
                        continue
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                # OpenSSL must answer the client first (a TLS 1.3 key update).
                events = select.POLLOUT
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            else:
                if not count:
                    break
                short = count < len(view) - got
                got += count
                if spin_until:
                    spin.ended(True)
                spin_until = None
                if not short or tls is not None:
                    continue
                # A short read took all the socket had: the next read would
                # find it empty (an EAGAIN, an exception built in Python, then
                # this poll). Poll first, unless this gap is to be spun
                # through. A 2 GiB NBD upload over the unix socket, spins off:
                # 32,700 readv() calls instead of 59,000, 1.01-1.12 server CPU
                # s instead of 1.14-1.37 (3 each; ovirt-imageio 0.97-1.10, one
                # recv per piece after a poll).
                if spin is not None:
                    spin_until = time.monotonic() + spin.spin_s if spin.wanted() else 0.0
                    if spin_until:
                        continue
                events = select.POLLIN
            if spin_until:
                spin.ended(False)
            spin_until = None
            if wake is not None:
                set_lowat, wake_bytes, coming = wake
                want = wake_bytes if coming - got >= wake_bytes else 1
                if want != lowat:
                    set_lowat(want)
                    lowat = want
            poller.register(fd, events)
            if lowat > 1 and events == select.POLLIN:
                if poller.poll(WAKE_WAIT_MS):
                    continue
                # Fewer than wake_bytes came meanwhile: take what there is.
                set_lowat(1)
                lowat = 1
            if not poller.poll(timeout_ms):
                raise socket.timeout("timed out waiting for the request body")
    finally:
        if lowat != 1:
            try:
                set_lowat(1)
            except OSError:
                pass    # The connection is gone.
    return got


def send_all(sock, data):
    """
    Send all of `data` on the gevent socket `sock` (TLS or not).

    The socket's timeout bounds a wait in which the client takes nothing,
    not the whole call: gevent's sendall() gives the whole call one
    deadline, so a large piece to a slow but steady client would be taken
    for an idle connection. With this, the images service hands over a
    whole read buffer (8 MiB) at once instead of 1 MiB slices, each of
    which cost a trip through the WSGI iteration, pywsgi's write and
    gevent's sendall (a getsockopt() call among them).
    """
    view = memoryview(data).cast("B")
    if not isinstance(sock, gevent.ssl.SSLSocket):
        _send_loop(sock, view, sock._sock.send)
        return
    write = functools.partial(_write, sock)
    if len(view) < config.TLS_WRITE_BUFFER_MIN_BYTES:
        _send_loop(sock, view, write)
        return
    # A large piece: OpenSSL's records leave in large writes (tls.write_buffer).
    # `conn` keeps OpenSSL's connection alive while its buffer is in place,
    # also if abort() closes the socket meanwhile.
    conn = sock._sslobj
    if conn is None:
        raise BrokenPipeError("connection shut down while sending")
    with tls.write_buffer(conn, lambda: _wait_for_room(sock)):
        _send_loop(sock, view, write)


def _write(sock, piece):
    # The C object, looked up for every write: None once abort() shut the
    # connection down (gevent's send() would then write plain text).
    conn = sock._sslobj
    if conn is None:
        raise BrokenPipeError("connection shut down while sending")
    # OpenSSL writes records until the socket is full.
    return conn.write(piece)


def _send_loop(sock, view, send):
    sent = 0
    while sent < len(view):
        try:
            sent += send(view[sent:])
        except (ssl.SSLWantWriteError, BlockingIOError):
            _wait_for_room(sock)
        except ssl.SSLWantReadError:
            # OpenSSL must read first (a TLS 1.3 key update).
            sock._wait(sock._read_event)


def _wait_for_room(sock):
    # The kernel reports room only once a good part of the send buffer is
    # free (a third of what is queued, for TCP), and the buffer grows to
    # 4 MiB: a client reading 16 KiB records at 400 KiB/s took 3.3 s to
    # make room, longer than a short inactivity timeout, while it never
    # stopped reading. So a timeout counts only if the bytes queued in the
    # socket did not go down meanwhile.
    queued = _queued_bytes(sock)
    while True:
        try:
            sock._wait(sock._write_event)
            return
        except socket.timeout:
            now = _queued_bytes(sock)
            if now is None or queued is None or now >= queued:
                raise
            queued = now


def _queued_bytes(sock):
    """Bytes in the socket's send queue not yet taken by the peer, or None."""
    try:
        return struct.unpack("i", fcntl.ioctl(
            sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return None


class _NoInput:
    """Stands in for pywsgi's Input, whose draining we replace (see Handler)."""

    def _discard(self):
        pass


class Handler(pywsgi.WSGIHandler):
    """
    pywsgi's connection handler, strict and bounded.

    One request at a time: wait for its first byte (idle timeout), read
    and check its head (one deadline, imaged.framing), run the app, then
    decide in one place (`_must_close`) whether the connection carries
    another request.
    """

    # Set per listener (see imaged.server.Listener).
    idle_timeout_s = None
    header_timeout_s = 30.0
    _header_deadline = None
    # The response head, held back for the first piece of the body (see
    # _write_with_headers).
    _head_held = False
    _head = None
    # TCP_NOTSENT_LOWAT of TCP connections (config
    # server.tcp_notsent_lowat_bytes); 0 or None: the kernel's default.
    notsent_lowat_bytes = None

    # A small unread request body (an OPTIONS with a few bytes) is read and
    # dropped, keeping the connection; anything larger closes it.
    DRAIN_MAX_BYTES = 64 * 1024
    # Closing a socket with unread request data makes the kernel reset the
    # connection, and the client may lose the answer it has not read yet (a
    # client uploading a body reads the answer only once it has sent it).
    # So before closing, the rest of the body is dropped for a bounded
    # while: a "lingering close".
    LINGER_S = 2.0
    LINGER_BYTES = 256 * 1024**2
    # Kernel send buffer of a local (unix socket) connection. What a unix
    # socket holds in flight is the sender's send buffer (the default
    # 208 KiB), so each chunk of a download took many send() calls, EAGAINs
    # and trips through the event loop. With 4 MiB (the kernel caps it at
    # net.core.wmem_max), a 2 GiB NBD download over the unix socket made
    # 533 send() calls and 490 epoll waits instead of 11,068 and 3,454, and
    # cost 0.97-1.04 server CPU s instead of 1.09-1.36 (ovirt-imageio:
    # 0.97-1.05), 3 pairs alternating on a busy 2-core VM
    # (docs/benchmarks.md).
    UNIX_SEND_BUFFER_BYTES = 4 * 1024**2

    def handle(self):
        if self.socket.family in TCP_FAMILIES:
            # The tail of a response must not wait for the client's delayed
            # ACK (Nagle): with one request per extent that cost ~20 ms each.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.notsent_lowat_bytes:
                # Unsent data beyond this waits in our buffers, not the
                # kernel's: queued there, it would leave when the client's
                # ACKs open its window, the kernel doing that work in the
                # client's time (on loopback, in curl's recv()).
                try:
                    self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT,
                                           self.notsent_lowat_bytes)
                except OSError:
                    pass    # An older kernel: more unsent data, same bytes.
        elif self.socket.family == socket.AF_UNIX:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                       self.UNIX_SEND_BUFFER_BYTES)
            except OSError:
                pass    # A smaller buffer only costs CPU.
        self.link = Link(self.socket, idle_timeout_s=self.idle_timeout_s)
        self.link.set_idle_timeout(self.idle_timeout_s)
        self.server.links.add(self.link)
        try:
            super().handle()
        except socket.timeout:
            log.info("dropping connection from %s: idle for too long", self._client())
        finally:
            if self._header_deadline is not None:
                self._header_deadline.close()
            self.server.links.discard(self.link)
            self.link.close()

    def _client(self):
        addr = self.client_address
        return addr[0] if isinstance(addr, tuple) and addr else "local"

    # One request.

    def handle_one_request(self):
        if self.rfile.closed:
            return None
        try:
            # Waiting for the first byte of a request is idleness, bounded
            # by the socket's idle timeout.
            if not self.rfile.peek(1):
                return None
        except socket.timeout:
            log.info("closing idle connection from %s", self._client())
            return None
        except OSError:
            return None
        self.message = None
        self.body = None
        self.code = None
        self.response_length = 0
        self._head_start = time.monotonic()
        refusal = self._read_head()
        if refusal is not None:
            self._refuse(*refusal)
            return None
        self.environ = self.get_environ()
        self.application = self.server.application
        self.link.busy = True
        try:
            self.handle_one_response()
        finally:
            self.link.busy = False
            self.link.end_buffered_reads()
        if self._must_close():
            self.close_connection = True
            self._linger()
            return None
        return True

    def _write_with_headers(self, data):
        # pywsgi sends the response head and the first piece of the body in
        # two writes: over TLS two records and two write() calls, and
        # without TCP_CORK two packets. Held back until that piece comes,
        # the head goes out with it when the piece is small (see _sendall).
        self._head_held = True
        try:
            super()._write_with_headers(data)
            head = self._head
        finally:
            # Also after a failure: a head held back must never be sent
            # with a later response.
            self._head_held = False
            self._head = None
        if head is not None:
            self._sendall(head)     # No piece came (an empty body).

    def _sendall(self, data):
        # pywsgi's one call for response bytes: our send loop instead of
        # gevent's sendall (see send_all).
        if self._head_held:
            if self._head is None:
                self._head = data
                return
            head, self._head = self._head, None
            self._head_held = False
            if len(data) <= config.SMALL_BODY_BYTES:
                data = b"".join((head, data))     # One copy, one write.
            else:
                self._sendall(head)
        try:
            send_all(self.socket, data)
        except OSError as e:
            self.status = f"socket error: {e}"
            if self.code and self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

    def _read_head(self):
        """
        Read and check the request line and headers within the header
        deadline. Returns None, or (status, message) to refuse the request.
        """
        # From the first byte on, the request head must arrive within the
        # header timeout: a client dripping a byte now and then would
        # otherwise hold the connection forever.
        if self._header_deadline is None:
            # One per connection, started for each request head and
            # cancelled after it: a new gevent.Timeout per request (a timer
            # and an exception object) was ~7% of imaged's Python samples
            # answering small GETs (py-spy --gil).
            self._header_deadline = gevent.Timeout(self.header_timeout_s)
        self._header_deadline.start()
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE_BYTES)
            if len(line) >= MAX_REQUEST_LINE_BYTES:
                return 414, "request line too long"
            if not line.endswith(b"\n"):
                # The client closed midway.
                return None if not line else (400, "incomplete request line")
            self.requestline = line.decode("latin-1").rstrip("\r\n")
            self.read_request(self.requestline)
        except gevent.Timeout as t:
            if t is not self._header_deadline:
                raise
            log.warning("dropping client %s: request head too slow", self._client())
            self.close_connection = True
            return 408, "request head too slow"
        except framing.FramingError as e:
            log.warning("invalid request from %s: %s", self._client(), e.message)
            return e.status, e.message
        except OSError:
            return 400, "connection lost"
        finally:
            self._header_deadline.cancel()
        return None

    def read_request(self, raw_requestline):
        """Parse the request head strictly (see imaged.framing)."""
        self.command, self.path, self.request_version = \
            framing.parse_request_line(raw_requestline)
        self.headers = framing.parse_header_lines(self._read_header_lines())
        self.message = framing.message_framing(
            self.request_version,
            self.headers.get_all("Content-Length") or [],
            self.headers.get_all("Transfer-Encoding") or [])
        self.content_length = self.message.content_length
        connection = [t.strip().lower() for v in self.headers.get_all("Connection") or []
                      for t in v.split(",")]
        if self.request_version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection
        return True

    def _read_header_lines(self):
        """The lines of the head after the request line, up to the blank line."""
        lines = []
        while True:
            line = self.rfile.readline(framing.MAX_HEADER_LINE_BYTES + 1)
            if len(line) > framing.MAX_HEADER_LINE_BYTES:
                raise framing.FramingError("header line too long")
            if not line.endswith(b"\n"):
                # The client closed midway.
                raise framing.FramingError("incomplete request head")
            if line == b"\r\n" or line == b"\n":
                return lines
            if len(lines) == framing.MAX_HEADERS:
                raise framing.FramingError("too many headers")
            # Only the line ending: a stray CR before it stays in the
            # value, which check_headers refuses.
            end = -2 if line.endswith(b"\r\n") else -1
            lines.append(line[:end].decode("latin-1"))

    def get_environ(self):
        env = super().get_environ()
        # The length as checked by imaged.framing, not as sent.
        env.pop("CONTENT_LENGTH", None)
        if self.message.content_length is not None:
            env["CONTENT_LENGTH"] = str(self.message.content_length)
        expect = env.get("HTTP_EXPECT", "").lower() == "100-continue"
        self.body = RequestBody(self.link, self.rfile, self.message, expect)
        # pywsgi drains an unread body after the app (Input._discard); we
        # decide that ourselves in _must_close().
        self.wsgi_input = _NoInput()
        env["wsgi.input"] = _WsgiInput(self.body)
        env[BODY_KEY] = self.body
        env[LINK_KEY] = self.link
        # The path as sent, before pywsgi's percent-decoding, so that the
        # dispatcher can tell an encoded slash from a real one.
        env[RAW_PATH_KEY] = self.path.split("?", 1)[0]
        return env

    def start_response(self, status, headers, exc_info=None):
        if self._closing_now() and not any(
                name.lower() == "connection" for name, _ in headers):
            # RFC 9112 §9.6: say so when this is the last answer.
            headers = list(headers) + [("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    # The one rule on closing.

    def _closing_now(self):
        """
        Whether the connection will close after this answer, as known now:
        the client asked, the app asked, the framing requires it, or a
        request body is left that is too large (or unknown) to drain.
        """
        if self.close_connection or self.link.close_requested:
            return True
        if self.message is not None and self.message.must_close:
            return True
        body = self.body
        if body is not None and (body.broken or not body.complete):
            unread = body.unread_bytes
            return unread is None or unread > self.DRAIN_MAX_BYTES
        return False

    def _must_close(self):
        """Whether the connection ends after the answer just sent."""
        if self._closing_now():
            return True
        if self.code is None or self.code < 0 or self.code >= 500:
            # No answer was sent, the client vanished, or a server fault:
            # the state of the request is unknown.
            return True
        if self.body is not None and not self.body.complete:
            deadline = time.monotonic() + self.header_timeout_s
            return not self.body.discard(self.DRAIN_MAX_BYTES, deadline)
        return False

    def _linger(self):
        """Drop what is left of the request body for a bounded while."""
        body, sock = self.body, self.socket
        if sock is None or body is None or body.complete or self.link.aborted:
            return
        deadline = time.monotonic() + self.LINGER_S
        left = self.LINGER_BYTES
        buf = bytearray(256 * 1024)
        try:
            # The answer is sent: end our side, then drop what comes.
            sock.shutdown(socket.SHUT_WR)
            while left > 0:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                sock.settimeout(timeout)
                count = sock.recv_into(buf)
                if not count:
                    break
                left -= count
        except OSError:
            pass

    def _refuse(self, status, message):
        """Answer a request refused before any app saw it, then close."""
        reason = {400: "Bad Request", 408: "Request Timeout",
                  414: "URI Too Long", 501: "Not Implemented"}.get(status, "Error")
        payload = f"{message}\n".encode()
        head = (f"HTTP/1.1 {status} {reason}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n").encode()
        self.close_connection = True
        if self.metrics is not None:
            # Counted like answered requests; the method is known only if
            # the request line was valid ("other" otherwise).
            self.metrics.request(getattr(self, "command", None) or "other", status,
                                 time.monotonic() - self._head_start)
        try:
            self.socket.sendall(head + payload)
        except OSError:
            return
        if status != 408:
            # The client may be sending a body still: let it see the answer.
            self.body = _Unknown()
            self._linger()

    # Logging: never the request line (it holds the session id).

    # Set per listener (see imaged.server.Listener): an imaged.metrics.Metrics.
    metrics = None

    def log_request(self):
        # The access log would show session ids in URLs; request logging
        # happens in the apps, with ids shortened. pywsgi calls this once
        # per answered request: the place to count it.
        if self.metrics is not None:
            self.metrics.request(self.command, self.code if self.status else None,
                                 self.time_finish - self.time_start)

    def log_error(self, msg, *args):
        # pywsgi's messages quote the request line, which holds the session
        # id: log only that a client sent something invalid.
        log.warning("invalid request from %s", self._client())

    def _log_error(self, t, v, tb):
        if self.link.aborted and issubclass(t, (OSError, errors.Canceled)):
            # The session was canceled, expired or removed: its transfer was
            # cut on purpose, this is no server fault.
            log.info("transfer to %s aborted: session canceled", self._client())
            return
        if issubclass(t, socket.timeout):
            log.info("dropping connection from %s: no progress for too long",
                     self._client())
            return
        if issubclass(t, (ConnectionError, ssl.SSLEOFError)) or \
                (issubclass(t, OSError) and v.errno in (errno.EPIPE, errno.ECONNRESET)):
            # The client went away mid-response: a client's choice.
            log.info("connection from %s lost: %s", self._client(), v)
            return
        # pywsgi would print the environ (session id in PATH_INFO).
        log.error("request failed: %s: %s", t.__name__, v, exc_info=(t, v, tb))


class _Unknown:
    """A request body of unknown extent (a refused request's)."""

    complete = False


class _WsgiInput:
    """`wsgi.input` over a RequestBody, for code that reads with read()."""

    def __init__(self, request_body):
        self._body = request_body

    def read(self, size=-1):
        if size is None or size < 0:
            size = 1 << 62
        chunks = []
        while size > 0:
            buf = bytearray(min(size, 64 * 1024))
            count = self._body.readinto(memoryview(buf))
            if not count:
                break
            chunks.append(bytes(buf[:count]))
            size -= count
        return b"".join(chunks)

    def readline(self, size=-1):
        raise NotImplementedError("imaged apps do not read bodies by line")


class Server(pywsgi.WSGIServer):
    """
    pywsgi's server with a deadline on the TLS handshake, the set of open
    Links, and errors logged without request details.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The Link of every open client connection.
        self.links = set()

    def wrap_socket_and_handle(self, client_socket, address):
        # A client that connects and never speaks must not hold a greenlet
        # and a socket forever; one that sends its hello a byte at a time
        # resets a per-read timeout with every byte, so the whole handshake
        # gets one deadline.
        client_socket.settimeout(self.handler_class.idle_timeout_s)
        try:
            # Wrapping takes over the file descriptor: from here on only
            # ssl_socket can close it.
            ssl_socket = self.wrap_socket(client_socket, do_handshake_on_connect=False,
                                          **self.ssl_args)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS setup failed: %s", e)
            client_socket.close()
            return None
        with ssl_socket:
            deadline = gevent.Timeout(self.handler_class.header_timeout_s)
            deadline.start()
            try:
                ssl_socket.do_handshake()
            except gevent.Timeout as t:
                if t is not deadline:
                    raise
                log.info("dropping client %s: TLS handshake too slow", _host(address))
                return None
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake failed: %s", e)
                return None
            finally:
                deadline.close()
            return self.handle(ssl_socket, address)


def _host(address):
    return address[0] if isinstance(address, tuple) and address else "local"


class ErrorLog:
    """pywsgi's error log into our logging, without request details."""

    def write(self, msg):
        msg = msg.strip()
        if msg:
            log.error("%s", msg)

    def flush(self):
        pass


@contextlib.contextmanager
def corked(lnk):
    """Cork `lnk` for the duration of the block (see Link.cork)."""
    lnk.cork(True)
    try:
        yield
    finally:
        lnk.cork(False)
