"""
Glue between Bottle and the rest of imaged.

- `make_app()` builds a Bottle app whose errors are short plain-text bodies.
- `handles_errors` maps imaged.errors classes to HTTP statuses, in one place.
- `read_json()` reads a small JSON body with a cap, without Bottle's
  buffering of large bodies.
- `Connection` is the per-connection state the server puts into the WSGI
  environ (see imaged.server); tests without a server get a detached one.
"""

import functools
import json
import logging
import os
import select
import socket
import ssl
import struct
import time

import bottle
import gevent
import gevent.lock
import gevent.monkey
import gevent.ssl

from . import errors

log = logging.getLogger("web")

CONNECTION_KEY = "imaged.connection"

TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def make_app():
    """A Bottle app answering its own errors (404, 405, 500) in plain text."""
    app = _App(catchall=True)
    app.config["json.enable"] = False
    app.default_error_handler = _plain_error
    return app


class _App(bottle.Bottle):
    """
    A Bottle app that also works under WSGI servers other than ours
    (webtest in the tests): a request arriving without a connection from
    imaged.server gets its own, closed when the response ends, so that it
    is not counted in its session forever.
    """

    def __call__(self, environ, start_response):
        if CONNECTION_KEY in environ:
            return super().__call__(environ, start_response)
        conn = environ[CONNECTION_KEY] = Connection(None)
        try:
            result = super().__call__(environ, start_response)
        except BaseException:
            conn.close()
            raise
        return _ClosingResult(result, conn.close)


class _ClosingResult:
    """A WSGI response iterable calling `on_close` after its own close()."""

    def __init__(self, result, on_close):
        self._result = result
        self._on_close = on_close

    def __iter__(self):
        return iter(self._result)

    def close(self):
        try:
            if hasattr(self._result, "close"):
                self._result.close()
        finally:
            self._on_close()


def _plain_error(res):
    bottle.response.content_type = "text/plain; charset=utf-8"
    if res.status_code == 500:
        # Bottle's own catchall: the exception is logged, not shown.
        if res.exception is not None:
            log.error("unhandled error: %s\n%s", res.exception, res.traceback)
        return "Internal server error\n"
    if res.status_code == 404:
        return "No such resource\n"
    if res.status_code == 405:
        return "Method not allowed\n"
    return f"{res.body}\n"


def handles_errors(func):
    """
    Turn imaged.errors into HTTP responses with a short text body.

    Any other exception is a server fault: logged with its traceback, and
    answered 500 without details.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except errors.Error as e:
            if e.status >= 500:
                # A fault on our side (an I/O error on the image): the
                # client gets the message, the operator a log line.
                log.error("%s failed: %s", func.__name__, e.message)
            return error_response(e)
        except Exception:
            log.exception("internal error in %s", func.__name__)
            return error_response(errors.ServerError("Internal server error"))
    return wrapper


def error_response(e, close=False):
    """An HTTPResponse for an imaged.errors.Error."""
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if isinstance(e, errors.RangeNotSatisfiable) and e.size is not None:
        headers["Content-Range"] = f"bytes */{e.size}"
    conn = bottle.request.environ.get(CONNECTION_KEY)
    if e.status == 403 or close or isinstance(e, ClientGone) or \
            (conn is not None and conn.close_after_response):
        # A refused client may be sending a huge body: close instead of
        # reading it all (see imaged.server.Input).
        headers["Connection"] = "close"
        if conn is not None:
            conn.close_after_response = True
    return bottle.HTTPResponse(f"{e.message}\n", status=e.status, **headers)


def json_response(obj, status=200):
    body = json.dumps(obj).encode("utf-8") + b"\n"
    return bottle.HTTPResponse(body, status=status,
                               **{"Content-Type": "application/json"})


def read_json(environ, max_bytes):
    """
    Read and parse a JSON request body of at most `max_bytes`.

    Raises PayloadTooLarge above the cap (checked before reading when the
    length is announced), BadRequest for invalid JSON.
    """
    length = content_length(environ)
    chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
    if length:
        if length > max_bytes:
            _close_connection(environ)
            raise errors.PayloadTooLarge(
                f"request body too large: {length} bytes, limit {max_bytes}")
        data = environ["wsgi.input"].read(length)
    elif chunked:
        data = environ["wsgi.input"].read(max_bytes + 1)
        if len(data) > max_bytes:
            _close_connection(environ)
            raise errors.PayloadTooLarge(
                f"request body too large: limit {max_bytes} bytes")
    else:
        data = b""
    if not data:
        raise errors.BadRequest("missing JSON body")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.BadRequest(f"invalid JSON body: {e}") from None
    except RecursionError:
        raise errors.BadRequest("invalid JSON body: nested too deeply") from None


def content_length(environ):
    """The request's Content-Length, or None when it has none."""
    raw = environ.get("CONTENT_LENGTH")
    if not raw:
        return None
    try:
        length = int(raw)
    except ValueError:
        raise errors.BadRequest("invalid Content-Length") from None
    if length < 0:
        raise errors.BadRequest("invalid Content-Length")
    return length


def _close_connection(environ):
    conn = environ.get(CONNECTION_KEY)
    if conn is not None:
        conn.close_after_response = True


def connection(environ):
    """The per-connection state of this request (see Connection)."""
    conn = environ.get(CONNECTION_KEY)
    if conn is None:
        conn = environ[CONNECTION_KEY] = Connection(None)
    return conn


class Connection:
    """
    State of one client connection, shared by its requests.

    Borrows transfer buffers for a request (so idle keep-alive connections
    cost no buffer memory), counts the connection in
    each session it uses, and can be aborted from another greenlet.
    """

    def __init__(self, sock, inactivity_timeout_s=None):
        self.sock = sock
        self.close_after_response = False
        # Torn down by abort(): failures of its requests are expected.
        self.aborted = False
        # A request is being answered (idle connections can be dropped).
        self.busy = False
        self.inactivity_timeout_s = inactivity_timeout_s
        self._buffers = None
        self._pool = None
        self._sessions = set()
        # (session, mode, backend) of the image this connection has open.
        self._open = None

    def buffers(self, pool, size, count=2):
        """
        `count` aligned buffers of at most `size` bytes for this request,
        borrowed from `pool` (a buffers.BufferPool) and given back by
        release_buffers() when the request ends.
        """
        if self._buffers is None or len(self._buffers) < count:
            self.release_buffers()
            self._buffers = pool.get(size, count)
            self._pool = pool
        return [memoryview(b) for b in self._buffers[:count]]

    def release_buffers(self):
        """Give the request's buffers back to the pool."""
        if self._buffers is not None:
            self._pool.put(self._buffers)
            self._buffers = None

    def backend(self, session, mode):
        """The open backend of `session` usable in `mode`, or None."""
        if self._open is None:
            return None
        open_session, open_mode, backend = self._open
        if open_session is session and not session.canceled \
                and (open_mode == mode or open_mode == "rw"):
            return backend
        self.close_backend()
        return None

    def keep_backend(self, session, mode, backend):
        """Keep `backend` open for the next requests of this connection."""
        self.close_backend()
        self._open = (session, mode, backend)
        # A removed or expired session must not keep its image open (the
        # host agent may deactivate the volume next).
        session.add_closer(self._session_canceled)

    def _session_canceled(self, session):
        if self._open is not None and self._open[0] is session and not self.busy:
            self.close_backend()
        # A busy connection closes it when its operation ends (see
        # Images.operation and end_request), once nothing uses it.

    def close_backend(self):
        """Close the image this connection keeps open, if any."""
        if self._open is None:
            return
        session, _, backend = self._open
        self._open = None
        session.remove_closer(self._session_canceled)
        try:
            # Closing may flush to storage: never in the event loop.
            gevent.get_hub().threadpool.apply(backend.close)
        except Exception:
            log.exception("session %s: closing the image failed", session.name)

    def end_request(self):
        """The request's answer is done: return buffers, drop a stale image."""
        self.release_buffers()
        if self._open is not None and self._open[0].canceled:
            self.close_backend()

    def use_session(self, session, max_connections):
        """
        Count this connection as one of `session`'s connections.

        Applies the session's inactivity timeout to the socket. Raises
        ServiceUnavailable if the session has too many connections.
        """
        if session not in self._sessions:
            if session.connections >= max_connections:
                raise errors.ServiceUnavailable(
                    f"too many connections for this session (max {max_connections})")
            session.connections += 1
            self._sessions.add(session)
        timeout = session.inactivity_timeout or self.inactivity_timeout_s
        if self.sock is not None and timeout:
            self.sock.settimeout(timeout)

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
        self.close_after_response = True
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

    def close(self):
        for session in self._sessions:
            session.connections -= 1
        self._sessions.clear()
        self.release_buffers()
        self.close_backend()


class ClientGone(errors.BadRequest):
    """The client went away or stalled mid-request; the connection is done."""


class BodyReader:
    """
    Reads a request body into caller-owned buffers, without copies.

    pywsgi's Input.read() returns new bytes for every call; for a multi-GiB
    upload we read straight from the connection's buffered stream into the
    transfer buffer, keeping Input's position right so that pywsgi knows how
    much of the body is left. Other WSGI servers (webtest in the tests) get
    the portable read() path.

    A large read runs in a pool thread, blocking in the kernel: a client
    such as curl sends 64 KiB at a time, and receiving each piece through
    the event loop (an EAGAIN, a hub switch, a timeout) cost more CPU than
    the copy. Over TLS the thread has OpenSSL decrypt record after record
    straight into the buffer, with the GIL released, instead of four
    Python layers of the stream and gevent's socket per 16 KiB record
    (22% of the daemon's CPU on an HTTPS upload). That is safe because
    nothing else uses the connection meanwhile: its greenlet waits for the
    thread, and Connection.abort() only shuts the socket down (waking the
    thread's wait) and makes its close a reset.
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

    _thread_readers = None

    def __init__(self, environ):
        self._input = environ["wsgi.input"]
        self.chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        self._direct = (not self.chunked and hasattr(self._input, "rfile")
                        and hasattr(self._input, "position"))
        conn = environ.get(CONNECTION_KEY)
        sock = conn.sock if conn is not None else None
        # The file descriptor for pool thread reads, once the stream's own
        # buffer no longer holds body bytes.
        self._fd = None
        self._threaded = self._direct and sock is not None
        self._tls = isinstance(sock, gevent.ssl.SSLSocket)
        self._sock = sock
        self._conn = conn
        # Only local clients: they send fast enough that a spin bridges the
        # gaps. A remote client's gaps are longer than any worthwhile spin,
        # and over TLS decrypting already keeps both cores busy (a spin
        # there cost 13% more server CPU and no throughput).
        local = sock is not None and sock.family == socket.AF_UNIX
        self._spin_s = self.UNIX_SPIN_S if local else 0.0

    def readinto_exactly(self, view):
        """Fill `view`; raises BadRequest if the body ends first."""
        got = 0
        while got < len(view):
            count = self.readinto_some(view[got:])
            if not count:
                raise errors.BadRequest(
                    f"request body ended early: expected {len(view) - got} more bytes")
            got += count

    def readinto_some(self, view):
        """Read up to len(view) bytes; 0 at the end of the body."""
        if not self._direct:
            try:
                data = self._input.read(len(view))
            except OSError as e:
                raise ClientGone(f"connection lost while reading the body: {e}") from None
            view[:len(data)] = data
            return len(data)
        inp = self._input
        left = (inp.content_length or 0) - inp.position
        if left <= 0:
            return 0
        want = min(len(view), left)
        try:
            # Answer "Expect: 100-continue" before waiting for the body.
            inp._send_100_continue()
            if self._threaded and self._fd is None and want >= self.THREAD_READ_MIN_BYTES:
                count = self._drain_stream(view[:want])
            elif self._fd is not None and want >= self.THREAD_READ_MIN_BYTES:
                count = self._read_in_thread(view[:want])
            else:
                count = inp.rfile.readinto(view[:want])
        except OSError as e:
            raise ClientGone(f"connection lost while reading the body: {e}") from None
        inp.position += count
        return count

    def _drain_stream(self, view):
        # read1() returns only bytes the stream has buffered, or if it has
        # none makes one read of the socket; either way, when it returns
        # fewer bytes than asked, the stream's buffer is empty and the rest
        # of the body can be read from the socket itself.
        data = self._input.rfile.read1(min(len(view), self.DRAIN_BYTES))
        view[:len(data)] = data
        if len(data) < self.DRAIN_BYTES and data:
            self._fd = self._sock.fileno()
        return len(data)

    def _read_in_thread(self, view):
        cls = BodyReader
        if cls._thread_readers is None:
            cls._thread_readers = gevent.lock.BoundedSemaphore(cls.THREAD_READERS)
        if not cls._thread_readers.acquire(blocking=False):
            return self._input.rfile.readinto(view)
        try:
            pool = gevent.get_hub().threadpool
            tls = None
            if self._tls:
                # The C object under gevent's SSLSocket; None once abort()
                # shut the connection down.
                tls = self._sock._sslobj
                if tls is None:
                    raise ClientGone("connection shut down while reading the body")
            result = pool.spawn(_recv_blocking, self._fd, view,
                                self._sock.gettimeout(), tls, self._spin_s)
            try:
                return result.get()
            except BaseException:
                if not result.ready():
                    # Interrupted (the daemon is stopping): the thread writes
                    # into `view`, so it must be done before the buffer goes
                    # back to the pool. Waking it takes tearing the
                    # connection down.
                    self._conn.abort()
                    result.wait()
                raise
        finally:
            cls._thread_readers.release()


# The real poll(), not gevent's (imaged monkey patches): this one waits in
# a pool thread, outside the event loop.
_thread_poll = gevent.monkey.get_original("select", "poll")


def _recv_blocking(fd, view, timeout_s, tls=None, spin_s=0.0):
    """
    Fill `view` from socket `fd` in a pool thread; fewer bytes at the end
    of the stream. Raises socket.timeout after `timeout_s` without data.

    With `tls` (the ssl._SSLSocket over the non-blocking `fd`), OpenSSL
    decrypts straight into `view`.

    With `spin_s`, an empty socket is retried for that long before the
    thread sleeps in poll(). A client sends in pieces (curl: 64 KiB) into a
    socket that holds only a few of them. A reader that sleeps as soon as
    it has drained the socket must be woken for nearly every piece, and the
    client, finding the socket full meanwhile, must be woken in turn: an
    interrupt from one core to the other each time, costly on a virtual
    machine. Over a unix socket that was what limited an upload; a 50 us
    spin keeps the reader awake through the gaps between pieces, and costs
    less CPU than the wakeups it saves (docs/benchmarks.md).
    """
    poller = _thread_poll()
    timeout_ms = -1 if timeout_s is None else int(timeout_s * 1000)
    got = 0
    spin_until = None
    while got < len(view):
        try:
            if tls is None:
                count = os.readv(fd, [view[got:]])
            else:
                count = tls.read(len(view) - got, view[got:])
        except (BlockingIOError, ssl.SSLWantReadError):
            # No data yet, or OpenSSL needs more of a record.
            if spin_s:
                now = time.monotonic()
                if spin_until is None:
                    spin_until = now + spin_s
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
            got += count
            spin_until = None
            continue
        spin_until = None
        poller.register(fd, events)
        if not poller.poll(timeout_ms):
            raise socket.timeout("timed out waiting for the request body")
    return got
