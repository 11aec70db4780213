"""
A small keep-alive HTTP connection for the images API, on http.client.

One `Connection` is used by one thread at a time; the transfer uses one per
worker. It speaks HTTPS (verified by default), plain HTTP, or HTTP over a
unix socket (the daemon's local fast path). Network failures become
imaged.client.errors exceptions with a one-line message, and error statuses
become HTTPError subclasses carrying the server's short message.

Keep-alive connections idle for long may have been closed by the server;
a request that fails before any response byte on a reused connection is
sent once more on a new connection at once. Every images API request is
idempotent (PUT and GET carry explicit ranges), so a retry is safe; other
transient failures are retried with a backoff one level up (see
imaged.client.retry).
"""

import http.client
import ipaddress
import logging
import socket
import ssl
import urllib.parse

from .. import tls
from . import errors

log = logging.getLogger("imaged.client")

# Error bodies of the images API are short; never read more of one.
_MAX_ERROR_BODY = 64 * 1024

# Failures of a reused keep-alive connection that mean the server closed it
# while it was idle.
_STALE_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError,
                 BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
                 ssl.SSLZeroReturnError)

# Sentinel: use the connection's default timeout.
DEFAULT = object()

# A buffer under each HTTPS connection's reads (imaged.tls.ReadBuffer),
# kept for the life of the connection. Python's ssl module reads a TLS
# record with two read() calls, its 5-byte header and then the rest:
# 102,900 calls for the 784 MiB of the bench's sparse download, most of
# the client's system time. With the buffer the socket is read 256 KiB
# at a time.
TLS_READ_BUFFER_BYTES = 256 * 1024


def tls_context(cafile=None, insecure=False):
    """
    A client TLS context: TLS 1.2 minimum, server verified against `cafile`
    (or the system CAs when None), unless `insecure`.
    """
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    tls.set_read_buffer(ctx, TLS_READ_BUFFER_BYTES)
    return ctx


def is_local_host(host):
    """
    True if `host` is this machine: localhost, or a name or address that
    resolves to an address one of our interfaces has.
    """
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    for family, _, _, _, addr in infos:
        try:
            if ipaddress.ip_address(addr[0].split("%")[0]).is_loopback:
                return True
        except ValueError:
            continue
        # Binding works only to an address of a local interface: this needs
        # no interface listing and no privileges.
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((addr[0], 0) + tuple(addr[2:]))
            return True
        except OSError:
            continue
    return False


def show_unix_socket(path):
    """How a unix socket path is shown to users (abstract sockets as @name)."""
    return "@" + path[1:] if path.startswith("\0") else path


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (a path, or "\\0name" for abstract)."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Stream:
    """
    A request body of `length` bytes, produced piece by piece: `pieces()`
    returns an iterator of bytes-like objects, each sent before the next is
    asked for (so one buffer can serve them all). Called again when the
    request is sent again on a new connection.
    """

    def __init__(self, length, pieces):
        self.length = length
        self.pieces = pieces


class Connection:
    """
    A keep-alive connection to the server of an images `url`.

    `unix_socket`: talk HTTP over this unix socket instead of the URL's
    host (same paths). `timeout`: seconds to wait for the server on any
    socket operation.
    """

    def __init__(self, url, *, cafile=None, insecure=False, unix_socket=None,
                 timeout=60.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("https", "http"):
            raise errors.ClientError(
                f"unsupported URL scheme {parsed.scheme!r}: expected https or http")
        if not parsed.hostname:
            raise errors.ClientError("invalid URL: no host")
        if not parsed.path.strip("/"):
            raise errors.ClientError("invalid URL: expected .../images/SESSION-ID")
        try:
            port = parsed.port
        except ValueError:
            raise errors.ClientError("invalid URL: bad port") from None
        self.host = parsed.hostname
        self.path = parsed.path.rstrip("/")
        self.timeout = timeout
        self.unix_socket = unix_socket
        self._aborted = False
        self._method = None  # of the request being answered, for messages
        # Called when a request is sent again at once on a new connection.
        self.on_retry = None
        if unix_socket:
            self.transport = "unix"
            self.where = f"unix socket {show_unix_socket(unix_socket)}"
            self._conn = _UnixHTTPConnection(unix_socket, timeout)
        elif parsed.scheme == "https":
            self.transport = "https"
            self.port = port or 443
            self.where = _show_host(self.host, self.port)
            self._conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout,
                context=tls_context(cafile, insecure))
        else:
            self.transport = "http"
            self.port = port or 80
            self.where = _show_host(self.host, self.port)
            self._conn = http.client.HTTPConnection(
                self.host, self.port, timeout=timeout)

    # Requests.

    def request(self, method, target, body=None, headers=None, ok=(200,),
                timeout=DEFAULT):
        """
        Send a request and return its http.client.HTTPResponse.

        `target` is the path and query. `body` is a bytes-like object, sent
        without copying, or a Stream. The caller must read the whole
        response (see read_into, read_all) before the next request. A status
        not in `ok` raises the matching HTTPError after reading the short
        error body.
        """
        self._set_timeout(self.timeout if timeout is DEFAULT else timeout)
        self._method = method
        for attempt in (1, 2):
            reused = self._conn.sock is not None
            if not reused:
                self._connect(method)
            send_error = None
            try:
                self._send(method, target, body, headers)
            except errors.ClientError:
                # The body's source failed (a local read): the request is
                # cut short, the connection unusable.
                self.close()
                raise
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, socket.timeout):
                    # The server stopped reading: no answer will come.
                    self.close()
                    raise self._failure(method, e) from None
                # The server may have refused the request before reading its
                # body (e.g. 403 and close): its answer says more than EPIPE.
                send_error = e
            try:
                resp = self._conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self.close()
                first = send_error or e
                if (reused and attempt == 1 and not self._aborted
                        and isinstance(first, _STALE_ERRORS)):
                    log.debug("connection to %s was closed while idle, reconnecting",
                              self.where)
                    if self.on_retry is not None:
                        self.on_retry()
                    continue
                raise self._failure(method, first) from None
            break
        if resp.status not in ok:
            raise self._http_error(method, resp)
        return resp

    def _connect(self, method):
        # Connecting apart from sending tells a refused connection or a
        # failed TLS handshake from a request the server did not take.
        if self._aborted:
            raise _aborted(self.where)
        try:
            self._conn.connect()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise self._failure(method, e, connecting=True) from None
        if self.transport == "https":
            # Never detached: OpenSSL frees it with the connection.
            tls.ReadBuffer.attach(self._conn.sock._sslobj)

    def _send(self, method, target, body, headers):
        conn = self._conn
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if isinstance(body, Stream):
            conn.putheader("Content-Length", str(body.length))
        elif body is not None:
            conn.putheader("Content-Length", str(memoryview(body).nbytes))
        elif method in ("PUT", "PATCH", "POST"):
            conn.putheader("Content-Length", "0")
        conn.endheaders()
        if isinstance(body, Stream):
            sent = 0
            for piece in body.pieces():
                conn.send(piece)
                sent += memoryview(piece).nbytes
            if sent != body.length:
                raise errors.ClientError(
                    f"request body has {sent} bytes, announced {body.length}")
        elif body is not None and len(body):
            conn.send(body)

    def read_into(self, resp, view):
        """Read exactly len(view) body bytes of `resp` into `view`."""
        got = 0
        try:
            while got < len(view):
                n = resp.readinto(view[got:])
                if not n:
                    raise http.client.IncompleteRead(b"", len(view) - got)
                got += n
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.close()
            raise self._failure(self._method, e) from None

    def read_all(self, resp, limit=16 * 1024**2):
        """Read a small response body whole (JSON answers)."""
        try:
            data = resp.read(limit + 1)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.close()
            raise self._failure(self._method, e) from None
        if len(data) > limit:
            self.close()
            raise errors.ClientError(f"response from {self.where} is too large")
        if resp.length:
            # read(amt) returns what came before the connection was lost.
            self.close()
            raise self._failure(self._method, http.client.IncompleteRead(data, resp.length))
        return data

    def discard(self, resp):
        """Finish a response whose body is not needed (keeps the connection)."""
        self.read_all(resp, _MAX_ERROR_BODY)

    # Connection state.

    def _set_timeout(self, timeout):
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)

    def abort(self):
        """
        Break the connection from another thread: a request blocked on it
        fails at once. The connection is not usable afterwards.
        """
        self._aborted = True
        sock = self._conn.sock
        if sock is not None:
            try:
                # socket.socket.shutdown, not SSLSocket.shutdown: the latter
                # drops the TLS object under the feet of the blocked thread.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._conn.close()

    # Errors.

    def _failure(self, method, e, connecting=False):
        """The ClientError for a network failure `e` during `method`."""
        if self._aborted:
            return _aborted(self.where)
        if isinstance(e, socket.timeout):
            return errors.TransferTimeout(
                f"timed out after {self.timeout:g} s waiting for {self.where}")
        if isinstance(e, ssl.SSLCertVerificationError):
            return errors.ClientError(
                f"TLS certificate verification failed for {self.where}: "
                f"{e.verify_message or e.reason}; use --cafile with the CA "
                f"certificate that signed the server certificate, or --insecure")
        if isinstance(e, socket.gaierror):
            return errors.ConnectionLostError(f"cannot resolve host {self.host}: {e.strerror}")
        if isinstance(e, ssl.SSLError):
            return errors.ConnectionLostError(f"TLS error with {self.where}: {e.reason or e}")
        if connecting:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            return errors.ConnectionLostError(f"cannot connect to {self.where}: {reason}")
        if isinstance(e, http.client.IncompleteRead):
            return errors.ConnectionLostError(
                f"connection to {self.where} lost during {method}: response ended early")
        if isinstance(e, http.client.RemoteDisconnected):
            return errors.ConnectionLostError(
                f"connection to {self.where} lost during {method}: server closed the connection")
        if isinstance(e, OSError) and e.strerror:
            return errors.ConnectionLostError(
                f"connection to {self.where} lost during {method}: {e.strerror}")
        return errors.ConnectionLostError(
            f"connection to {self.where} lost during {method}: {type(e).__name__} {e}".rstrip())

    def _http_error(self, method, resp):
        try:
            body = resp.read(_MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            body = b""
        if not resp.will_close and resp.length:
            # A body longer than an error message: do not keep reading it.
            self.close()
        msg = body.decode("utf-8", "replace").strip().splitlines()
        msg = msg[0][:300] if msg else resp.reason
        # Some servers quote the session id in errors: it is a secret.
        secret = self.path.rsplit("/", 1)[-1]
        if len(secret) >= 8:
            msg = msg.replace(secret, "***")
        text = f"{method} failed: {resp.status} {resp.reason}: {msg}"
        if resp.status == 403:
            return errors.ForbiddenError(text, resp.status)
        if resp.status == 416:
            return errors.OutOfRangeError(text, resp.status)
        return errors.HTTPError(text, resp.status)


def _aborted(where):
    e = errors.ConnectionLostError(f"connection to {where} aborted")
    # Stopped on purpose (see abort()): never retried.
    e.aborted = True
    return e


def _show_host(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

