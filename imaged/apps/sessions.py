"""
The sessions (control) API: the host agent adds, inspects, extends and
removes sessions. Mounted on the control unix socket only.

`/tickets/` is an exact alias of `/sessions/`, so tools written for
ovirt-imageio's ticket API work unchanged.
"""

import logging
import urllib.parse

import bottle
import gevent

from .. import allowed
from .. import backends
from .. import errors
from .. import sessions
from .. import validate
from .. import web

log = logging.getLogger("sessions")

PREFIXES = ("/sessions/", "/tickets/")


def make_app(registry, cfg):
    """The control app over `registry` (an imaged.sessions.Registry)."""
    app = web.make_app()
    res = Sessions(registry, cfg["sessions"]["max_body_bytes"],
                   cfg["images"]["allowed_dirs"])
    for prefix in PREFIXES:
        app.route(prefix + "<session_id>", "PUT", res.put)
        app.route(prefix + "<session_id>", "GET", res.get)
        app.route(prefix + "<session_id>", "PATCH", res.patch)
        app.route(prefix + "<session_id>", "DELETE", res.delete)
        app.route(prefix, "DELETE", res.delete_all)
    return app


class Sessions:
    """/sessions/{id} (and /tickets/{id}): one session of the registry."""

    def __init__(self, registry, max_body_bytes, allowed_dirs=()):
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.allowed_dirs = allowed_dirs

    def put(self, session_id):
        sessions.check_id(session_id)
        body = web.read_json(bottle.request.environ, self.max_body_bytes)
        spec = sessions.parse_spec(session_id, body)
        # Where the image may be first: nothing is said about files
        # outside the allowed directories.
        self._check_allowed(spec)
        # A stat() in a pool thread: the image may be on slow storage.
        gevent.get_hub().threadpool.apply(backends.check_image, (spec["url"],))
        self.registry.add(spec)
        return web.empty_response()

    def _check_allowed(self, spec):
        """images.allowed_dirs, told to the host agent now (403), not to
        the client at its first request."""
        url = urllib.parse.urlsplit(spec["url"])
        if not self.allowed_dirs or url.scheme != "file":
            return
        try:
            # In a pool thread: stat() on a dead NFS mount must not stall
            # the daemon.
            gevent.get_hub().threadpool.apply(
                allowed.check_path, (url.path, self.allowed_dirs))
        except errors.Forbidden:
            log.warning("session %s refused: image outside allowed_dirs",
                        sessions.name_of(spec))
            raise

    def get(self, session_id):
        sessions.check_id(session_id)
        return web.json_response(self.registry.get(session_id).info())

    def patch(self, session_id):
        sessions.check_id(session_id)
        body = validate.json_object(
            web.read_json(bottle.request.environ, self.max_body_bytes))
        unknown = set(body) - {"timeout"}
        if unknown:
            raise errors.BadRequest(
                f"invalid body: unknown field {sorted(unknown)[0]!r}, only timeout may change")
        self.registry.extend(session_id, validate.integer(body, "timeout"))
        return web.empty_response()

    def delete(self, session_id):
        sessions.check_id(session_id)
        self.registry.remove(session_id)
        return web.empty_response(204)

    def delete_all(self):
        self.registry.remove_all()
        return web.empty_response(204)
