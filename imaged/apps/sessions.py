"""
The sessions (control) API: the host agent adds, inspects, extends and
removes sessions. Mounted on the control unix socket only.

`/tickets/` is an exact alias of `/sessions/`, so tools written for
ovirt-imageio's ticket API work unchanged.
"""

import logging

import bottle

from .. import errors
from .. import sessions
from .. import web

log = logging.getLogger("sessions")

PREFIXES = ("/sessions/", "/tickets/")


def make_app(registry, cfg):
    """The control app over `registry` (an imaged.sessions.Registry)."""
    app = web.make_app()
    max_body = cfg["sessions"]["max_body_bytes"]

    @web.handles_errors
    def put(session_id):
        sessions.check_id(session_id)
        body = web.read_json(bottle.request.environ, max_body)
        spec = sessions.parse_spec(session_id, body)
        registry.add(spec)
        return bottle.HTTPResponse(status=200, **{"Content-Length": "0"})

    @web.handles_errors
    def get(session_id):
        sessions.check_id(session_id)
        return web.json_response(registry.get(session_id).info())

    @web.handles_errors
    def patch(session_id):
        sessions.check_id(session_id)
        body = web.read_json(bottle.request.environ, max_body)
        if not isinstance(body, dict):
            raise errors.BadRequest("invalid body: expected a JSON object")
        unknown = set(body) - {"timeout"}
        if unknown:
            raise errors.BadRequest(
                f"invalid body: unknown field {sorted(unknown)[0]!r}, only timeout may change")
        timeout = sessions.integer_field(body, "timeout", minval=0)
        registry.extend(session_id, timeout)
        return bottle.HTTPResponse(status=200, **{"Content-Length": "0"})

    @web.handles_errors
    def delete(session_id):
        sessions.check_id(session_id)
        registry.remove(session_id)
        return bottle.HTTPResponse(status=204)

    @web.handles_errors
    def delete_all():
        registry.remove_all()
        return bottle.HTTPResponse(status=204)

    for prefix in PREFIXES:
        app.route(prefix + "<session_id>", "PUT", put)
        app.route(prefix + "<session_id>", "GET", get)
        app.route(prefix + "<session_id>", "PATCH", patch)
        app.route(prefix + "<session_id>", "DELETE", delete)
        app.route(prefix, "DELETE", delete_all)
    return app
