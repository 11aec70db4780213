"""
Listeners: the configured sockets, TLS, and the apps mounted on each.

- `Listener` binds a listener's socket and serves it with an
  imaged.transport.Server, which spawns from a `gevent.pool.Pool` (so that
  `stop()` kills the handlers still running, and the pool bounds the
  number of connections).
- `Dispatcher` sends each request to the app mounted for its path prefix,
  after refusing paths whose meaning would depend on who decodes them.
- TLS contexts come from imaged.tls, the one place TLS settings are chosen.
"""

import errno
import grp
import logging
import os
import re
import socket
import stat
from gevent import pool

from . import tls
from . import transport

log = logging.getLogger("server")


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


_ENCODED_SEPARATOR = re.compile("%(2f|5c|00)", re.IGNORECASE)


def _path_problem(environ):
    """Why the request path is refused, or None if it is fine."""
    raw = environ.get(transport.RAW_PATH_KEY)
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

    def __init__(self, lst, app, tls_config, cfg, metrics=None):
        self.config = lst
        self.name = lst["name"]
        self.sock = bind(lst)
        ssl_context = tls.server_context(tls_config) if lst["kind"] == "tls" else None

        handler = type("Handler", (transport.Handler,), {
            "idle_timeout_s": cfg["images"]["inactivity_timeout_s"],
            "header_timeout_s": cfg["server"]["header_timeout_s"],
            "notsent_lowat_bytes": cfg["server"]["tcp_notsent_lowat_bytes"],
            "metrics": metrics})
        tls_args = {"ssl_context": ssl_context} if ssl_context else {}
        self.server = transport.Server(
            self.sock, app,
            handler_class=handler,
            spawn=pool.Pool(cfg["server"]["max_connections"]),
            log=None,
            error_log=transport.ErrorLog(),
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
        for link in list(self.server.links):
            if not link.busy:
                link.abort()

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


__all__ = ["Listener", "Dispatcher"]
