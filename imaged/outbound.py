"""
Outgoing connections: imaged as an HTTP client of another images daemon
(the proxy role, imaged.backends.http).

The transport layer's other half: imaged.transport owns the connections
clients make to us, this module the ones we make. It is the only place
that knows how those sockets are made, so the backend above it only speaks
HTTP (http.client) over what `connect_tcp()` and `connect_unix()` return.

Why these are special: a backend runs in gevent's threadpool, blocking.
imaged monkey patches the stdlib, and gevent's socket and ssl classes park
a blocked call on the event loop of the thread that made them, which a
pool thread must not do. So the connections use the stdlib's real,
blocking classes (gevent.monkey.get_original), and TLS runs on the C
object of the ssl module (what ssl.SSLSocket wraps): ssl.SSLSocket itself
cannot be used once gevent has patched the module, because its methods
look their class up by module name and find gevent's. In a pool thread
OpenSSL then decrypts and encrypts with the GIL released.

Bodies: a response body read into a large buffer is read straight into it
in one loop (see _BodyReader); a request body is written from the caller's
buffer in one sendall(), over TLS through the write buffer of imaged.tls
(records leave in large writes, not one write() per 16 KiB record).
"""

import http.client
import io
import select
import socket
import ssl

import _ssl

from gevent import monkey

from . import config
from . import tls as tls_settings

# The real blocking classes, also when imaged has monkey patched the stdlib.
_socket = monkey.get_original("socket", "socket")
_getaddrinfo = monkey.get_original("socket", "getaddrinfo")
_SSLContext = monkey.get_original("ssl", "SSLContext")
_poll = monkey.get_original("select", "poll")

# What callers catch, so that they need not import ssl or socket.
CertificateError = ssl.SSLCertVerificationError
Timeout = socket.timeout


def tls_context(ca_file=None, write_buffer_bytes=0):
    """
    A verifying TLS client context (TLS 1.2 minimum, host names checked);
    request bodies leave in writes of `write_buffer_bytes` (0: a write per
    record; see imaged.tls.write_buffer).
    """
    ctx = _SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The C setter: ssl.SSLContext's Python property looks the class up by
    # its module name, which is gevent's class once monkey patched (and
    # recurses forever).
    _ssl._SSLContext.minimum_version.__set__(ctx, ssl.TLSVersion.TLSv1_2)
    if ca_file:
        ctx.load_verify_locations(ca_file)
    else:
        ctx.load_default_certs()
    if write_buffer_bytes:
        tls_settings.set_write_buffer(ctx, write_buffer_bytes)
    return ctx


def connect_tcp(host, port, tls=None, connect_timeout_s=10.0, timeout_s=60.0):
    """
    An HTTP connection to HOST:PORT, over TLS with the ssl context `tls`
    (see tls_context) or plain. Connects on first use; the TCP connect and
    the TLS handshake are bounded by `connect_timeout_s`, every later wait
    for the peer by `timeout_s`.
    """
    return _TCPConnection(host, port, tls, connect_timeout_s, timeout_s)


def connect_unix(path, timeout_s=60.0):
    """An HTTP connection over the unix socket `path` (or abstract name)."""
    return _UnixConnection(path, timeout_s)


class _BodyReader(io.RawIOBase):
    """
    The raw stream under http.client's buffered reader, reading one socket.

    http.client reads a response body into the caller's buffer through
    io.BufferedReader, which for a large buffer calls readinto() here with
    the caller's memory, again and again until it is full. Through the
    stdlib's socket.SocketIO and a Python recv_into() that was three
    Python calls per 16 KiB TLS record, 131,000 times per 2 GiB. Here a
    large read loops in one frame until the buffer is full (what the
    buffered reader waits for anyway) or the stream ends. Short reads (the
    status line and headers) stay one receive each: they must not wait
    for bytes that are not coming.
    """

    # Reads at least this large are filled in one call.
    FILL_MIN_BYTES = 64 * 1024

    def __init__(self, sock, recv_into):
        self._sock = sock
        self._recv_into = recv_into

    def readable(self):
        return True

    def readinto(self, b):
        recv_into = self._recv_into
        got = recv_into(b)
        want = len(b)
        if not got or got == want or want < self.FILL_MIN_BYTES:
            return got
        with memoryview(b) as view:
            while got < want:
                count = recv_into(view[got:])
                if not count:
                    break
                got += count
        return got

    def close(self):
        if not self.closed:
            super().close()
            self._sock._decref_socketios()


class _Socket(_socket):
    """A blocking socket whose makefile() reads through _BodyReader."""

    def makefile(self, mode="rb", buffering=None, **kwargs):
        if mode != "rb":
            raise ValueError("only binary reads")
        self._io_refs += 1
        return io.BufferedReader(_BodyReader(self, self.recv_into), io.DEFAULT_BUFFER_SIZE)


class _TLSSocket:
    """
    A blocking TLS client socket: a real socket and the ssl module's C
    object. OpenSSL does the TLS and verifies the certificate and host name
    (the context has check_hostname set); this only gives http.client the
    socket methods it calls.
    """

    def __init__(self, sock, context, hostname):
        self._sock = sock
        # Like socket.socket: close() waits for the files made by makefile()
        # (http.client closes the connection before reading the body of an
        # answer that ends it, "Connection: close").
        self._io_refs = 0
        self._closed = False
        self._tls = context._wrap_socket(sock, False, hostname, owner=self)
        self._tls.do_handshake()

    def sendall(self, data):
        with memoryview(data) as view, view.cast("B") as view:
            if len(view) < config.TLS_WRITE_BUFFER_MIN_BYTES:
                self._write_all(view)
            else:
                with tls_settings.write_buffer(self._tls, self._wait_writable):
                    self._write_all(view)

    def _write_all(self, view):
        write = self._tls.write
        while view:
            count = write(view)
            view = view[count:]

    def _wait_writable(self):
        # The ssl module waits like this inside write(); flushing the write
        # buffer happens outside it. Python keeps a socket with a timeout
        # non-blocking underneath.
        poller = _poll()
        poller.register(self._sock.fileno(), select.POLLOUT)
        timeout_s = self._sock.gettimeout()
        if not poller.poll(None if timeout_s is None else timeout_s * 1000):
            raise socket.timeout("timed out sending to the host")

    def send(self, data):
        return self._tls.write(data)

    def recv_into(self, buf, nbytes=0):
        try:
            return self._tls.read(nbytes or len(buf), buf)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0

    def makefile(self, mode="rb", buffering=None, **kwargs):
        if mode != "rb":
            raise ValueError("only binary reads")
        self._io_refs += 1
        return io.BufferedReader(_BodyReader(self, self.recv_into), io.DEFAULT_BUFFER_SIZE)

    def _decref_socketios(self):
        self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._sock.close()

    def settimeout(self, timeout):
        self._sock.settimeout(timeout)

    def gettimeout(self):
        return self._sock.gettimeout()

    def getsockname(self):
        return self._sock.getsockname()

    def getpeername(self):
        return self._sock.getpeername()

    def fileno(self):
        return self._sock.fileno()

    def setsockopt(self, *args):
        self._sock.setsockopt(*args)

    def shutdown(self, how):
        self._sock.shutdown(how)

    def close(self):
        self._closed = True
        if self._io_refs <= 0:
            self._sock.close()


def _create_connection(host, port, timeout):
    error = None
    for family, type_, proto, _, addr in _getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = _Socket(family, type_, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as e:
            error = e
            sock.close()
    raise error or OSError(f"cannot resolve {host}")


class _TCPConnection(http.client.HTTPConnection):
    """HTTP(S) over a blocking TCP socket, with a connect deadline."""

    def __init__(self, host, port, ssl_context, connect_timeout, timeout):
        super().__init__(host, port, timeout=timeout)
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout

    def connect(self):
        sock = _create_connection(self.host, self.port, self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl_context is not None:
                # The handshake is bounded by the connect timeout too.
                sock = _TLSSocket(sock, self._ssl_context, self.host)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def is_local(self):
        """
        The peer is this machine: the connection's two ends have the same
        address (ovirt-imageio's rule). Connects if needed.
        """
        if self.sock is None:
            self.connect()
        return self.sock.getsockname()[0] == self.sock.getpeername()[0]


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a blocking unix socket (a path or an abstract name)."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = _Socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def is_local(self):
        return True


__all__ = ["tls_context", "connect_tcp", "connect_unix", "CertificateError", "Timeout"]
