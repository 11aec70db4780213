"""
Listeners: sockets, TLS and one gevent WSGIServer per listener.

pywsgi needs help for a streaming daemon (see NOTES in the docs):

- `Handler` keeps a `web.Connection` per client connection in the environ,
  closes it when the connection ends, and drops idle connections through the
  socket timeout (pywsgi has no inactivity timeout of its own).
- `Input` skips pywsgi's draining of an unread request body when the app
  asked to close the connection: an early 403 to a 100 GiB PUT must not read
  100 GiB. `Handler` then drops the rest of the body for a bounded while
  before closing (a lingering close), so that the client still gets the
  answer instead of a connection reset.
- Servers spawn from a `gevent.pool.Pool`, so `stop()` kills the handlers
  still running.
"""

import errno
import grp
import logging
import os
import re
import socket
import ssl
import time

import gevent
from gevent import pool
from gevent import pywsgi

from . import config
from . import errors
from . import web

log = logging.getLogger("server")


class Input(pywsgi.Input):
    """Request body that is not drained when the connection will close."""

    __slots__ = ("handler",)

    def _discard(self):
        if self.handler.close_connection or self.handler.connection.close_after_response:
            self.handler.close_connection = True
            return
        super()._discard()


class Handler(pywsgi.WSGIHandler):
    """WSGI handler with per-connection state."""

    inactivity_timeout_s = None
    header_timeout_s = 30

    def handle(self):
        if self.socket.family in web.TCP_FAMILIES:
            # The tail of a response must not wait for the client's delayed
            # ACK (Nagle): with one request per extent that cost ~20 ms each.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection = web.Connection(
            self.socket, inactivity_timeout_s=self.inactivity_timeout_s)
        if self.inactivity_timeout_s:
            self.socket.settimeout(self.inactivity_timeout_s)
        self.server.connections.add(self.connection)
        try:
            super().handle()
        except socket.timeout:
            log.debug("dropping idle connection from %s", self._client())
        finally:
            self.server.connections.discard(self.connection)
            self.connection.close()

    def _client(self):
        addr = self.client_address
        return addr[0] if isinstance(addr, tuple) else "local"

    def get_environ(self):
        env = super().get_environ()
        # Replace pywsgi's Input with ours, reading the same stream.
        old = self.wsgi_input
        new = Input(old.rfile, old.content_length, socket=old.socket,
                    chunked_input=old.chunked_input)
        new.handler = self
        self.wsgi_input = new
        if env.get("wsgi.input") is old:
            env["wsgi.input"] = new
        env[web.CONNECTION_KEY] = self.connection
        # The path as sent, before pywsgi's percent-decoding, so that the
        # dispatcher can tell an encoded slash from a real one.
        env["imaged.raw_path"] = self.path.split("?", 1)[0]
        return env

    # Closing a socket with unread request data makes the kernel reset the
    # connection, and the client may lose the answer it has not read yet (a
    # client uploading a body reads the answer only once it has sent it).
    # After refusing a request without reading its body, the rest of the body
    # is dropped for a bounded while before closing: a "lingering close".
    linger_s = 2.0
    linger_bytes = 256 * 1024**2

    def handle_one_response(self):
        self.connection.busy = True
        try:
            super().handle_one_response()
        finally:
            self.connection.busy = False
            # The response is sent (or abandoned): an idle keep-alive
            # connection holds no transfer buffers.
            self.connection.end_request()
        if self.connection.close_after_response:
            self.close_connection = True
            self._linger()

    def _linger(self):
        inp = self.wsgi_input
        sock = self.socket
        if inp is None or sock is None:
            return
        if inp.chunked_input:
            unread = inp.chunk_length != 0
        else:
            unread = inp.position < (inp.content_length or 0)
        if not unread:
            return
        deadline = time.monotonic() + self.linger_s
        left = self.linger_bytes
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

    def read_requestline(self):
        try:
            # Waiting for the first byte of a request is idleness, bounded
            # by the inactivity timeout of the socket.
            self.rfile.peek(1)
        except socket.timeout:
            # Idle keep-alive connection: end it quietly.
            return None
        # From the first byte on, the request line and headers must arrive
        # within the header timeout: a client dripping a byte now and then
        # would otherwise hold the connection forever.
        self._header_deadline = gevent.Timeout(
            self.header_timeout_s, socket.timeout("request header timeout"))
        self._header_deadline.start()
        try:
            return super().read_requestline()
        except BaseException:
            self._header_deadline.close()
            raise

    def read_request(self, raw_requestline):
        line = raw_requestline.rstrip("\r\n")
        if _UNSAFE_REQUEST_LINE.search(line):
            # pywsgi splits the line on any Unicode white space, so bytes
            # like \x1e would end the path early and change its meaning.
            self._header_deadline.close()
            log.warning("invalid request line from %s", self._client())
            return False
        try:
            return super().read_request(raw_requestline)
        except socket.timeout:
            log.warning("dropping client %s: request headers too slow", self._client())
            self.close_connection = True
            return False
        finally:
            self._header_deadline.close()

    def log_request(self):
        # The access log would show session ids in URLs; request logging
        # happens in the apps, with ids shortened.
        pass

    def log_error(self, msg, *args):
        # pywsgi's messages quote the request line, which holds the session
        # id: log only that a client sent something invalid.
        log.warning("invalid request from %s", self._client())

    def _log_error(self, t, v, tb):
        if self.connection.aborted and issubclass(t, (OSError, errors.Canceled)):
            # The session was canceled, expired or removed: its transfer was
            # cut on purpose, this is no server fault.
            log.info("transfer to %s aborted: session canceled", self._client())
            return
        if issubclass(t, (ConnectionError, ssl.SSLEOFError)):
            # The client went away mid-response: a client's choice.
            log.info("connection from %s lost: %s", self._client(), v)
            return
        # pywsgi would print the environ (session id in PATH_INFO).
        log.error("request failed: %s: %s", t.__name__, v, exc_info=(t, v, tb))


class Dispatcher:
    """A WSGI app sending each request to the app mounted for its prefix."""

    def __init__(self, apps):
        # apps: {"/images/": wsgi_app, ...}
        self._apps = sorted(apps.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        problem = _path_problem(environ)
        if problem:
            body = f"invalid path: {problem}\n".encode()
            start_response("400 Bad Request", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Connection", "close")])
            return [body]
        for prefix, app in self._apps:
            if path.startswith(prefix) or path == prefix.rstrip("/"):
                return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", "17")])
        return [b"No such resource\n"]


# Control bytes and the extra white space of latin-1 have no place in a
# request line.
_UNSAFE_REQUEST_LINE = re.compile("[\x00-\x1f\x7f\x85\xa0]")

_ENCODED_SEPARATOR = re.compile("%(2f|5c|00)", re.IGNORECASE)


def _path_problem(environ):
    """Why the request path is refused, or None if it is fine."""
    raw = environ.get("imaged.raw_path")
    if raw is not None and _ENCODED_SEPARATOR.search(raw):
        # An encoded slash must not split a session id from its resource.
        return "encoded '/', '\\' or NUL"
    try:
        # WSGI carries the path bytes as latin-1; Bottle would decode them as
        # UTF-8 ignoring errors, silently turning "A%80" into "A".
        environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        return "not UTF-8"
    return None


def make_ssl_context(tls):
    """A server TLS context: TLS 1.2 minimum, modern AEAD ciphers only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are
    # all fine and not affected by set_ciphers.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS")
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(tls["cert_file"], tls["key_file"])
    if tls["ca_file"]:
        ctx.load_verify_locations(tls["ca_file"])
    if tls.get("verify_clients"):
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def bind(lst):
    """Create and bind the listening socket for a listener config."""
    if lst["kind"] == "unix":
        return _bind_unix(lst)
    return _bind_tcp(lst["host"], lst["port"])


def _bind_tcp(host, port):
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC,
                               socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            # "::" means all addresses, IPv4 included.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_unix(lst):
    path = lst["path"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path.startswith("\0"):
            _remove_stale(path)
            # Create the socket without access for others, then relax it to
            # the configured mode: no window where it is too open.
            old_umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            if lst["group"] is not None:
                gid = lst["group"] if isinstance(lst["group"], int) \
                    else grp.getgrnam(lst["group"]).gr_gid
                os.chown(path, -1, gid)
            os.chmod(path, lst["mode"])
        else:
            sock.bind(path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path):
    """Remove a socket file left by a daemon that did not exit cleanly."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    import stat
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")


class Listener:
    """One configured listener: its socket and its WSGIServer."""

    def __init__(self, lst, app, tls, cfg):
        self.config = lst
        self.name = lst["name"]
        self.sock = bind(lst)
        ssl_context = make_ssl_context(tls) if lst["kind"] == "tls" else None

        handler = type("Handler", (Handler,), {
            "inactivity_timeout_s": cfg["images"]["inactivity_timeout_s"],
            "header_timeout_s": cfg["server"]["header_timeout_s"]})
        tls_args = {"ssl_context": ssl_context} if ssl_context else {}
        self.server = _Server(
            self.sock, app,
            handler_class=handler,
            spawn=pool.Pool(cfg["server"]["max_connections"]),
            log=None,
            error_log=_ErrorLog(),
            **tls_args)
        if lst["kind"] == "tcp":
            log.warning("listener %s: plain TCP without TLS, for labs and tests only",
                        self.name)

    @property
    def address(self):
        """Where clients connect: (host, port) or a unix socket path."""
        if self.config["kind"] == "unix":
            return self.config["path"]
        return self.sock.getsockname()[:2]

    def start(self):
        self.server.start()
        log.info("listener %s (%s) serving %s on %s", self.name,
                 self.config["kind"], ",".join(self.config["apps"]),
                 _show_address(self.address))

    def close(self):
        """Stop accepting, and drop connections waiting for a request."""
        if not self.server.closed:
            self.server.close()
        for conn in list(self.server.connections):
            if not conn.busy:
                conn.abort()

    def stop(self, timeout):
        """Wait up to `timeout` for running requests, then end them."""
        self.close()
        self.server.stop(timeout=timeout)
        path = self.config.get("path")
        if self.config["kind"] == "unix" and not path.startswith("\0"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _show_address(addr):
    if isinstance(addr, str):
        return "@" + addr[1:] if addr.startswith("\0") else addr
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


class _Server(pywsgi.WSGIServer):
    """WSGIServer with a deadline on the TLS handshake and quiet failures."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The web.Connection of every open client connection.
        self.connections = set()

    def wrap_socket_and_handle(self, client_socket, address):
        # A client that connects and never speaks must not hold a greenlet
        # and a socket forever.
        client_socket.settimeout(self.handler_class.inactivity_timeout_s)
        try:
            ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake failed: %s", e)
            client_socket.close()
            return
        with ssl_socket:
            return self.handle(ssl_socket, address)


class _ErrorLog:
    """pywsgi error log into our logging, without request details."""

    def write(self, msg):
        msg = msg.strip()
        if msg:
            log.error("%s", msg)

    def flush(self):
        pass


__all__ = ["Listener", "Dispatcher", "make_ssl_context", "config"]
