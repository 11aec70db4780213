"""
The progress API: how far each session's transfers have got.

Mounted with the sessions app on the control socket; the host agent polls
it to report progress to the engine, or asks for a stream of server-sent
events (`Accept: text/event-stream`) to be told.
"""

import json

import bottle
import gevent

from .. import sessions
from .. import web

EVENT_STREAM = "text/event-stream"


def session_progress(session):
    """Progress of one session as a JSON-able dict."""
    return {
        "id": session.id,
        "transfer_id": session.transfer_id,
        "size": session.size,
        "transferred": session.transferred(),
        "active": session.active,
        "operations": [op.info() for op in session.operations()],
        "throughput_bps": round(session.throughput()),
        "expires": int(session.expires),
        "canceled": session.canceled,
        # Granted by a signed token (the proxy role), not by the host agent.
        "token": session.token_key is not None,
    }


def wants_events(accept):
    """True if an Accept header asks for server-sent events."""
    if not accept:
        return False
    return any(part.split(";", 1)[0].strip().lower() == EVENT_STREAM
               for part in accept.split(","))


def events(session, interval_s):
    """
    Server-sent events of `session`'s progress: one every `interval_s`
    seconds, the last one once the session is canceled, removed or expired.

    A generator run by the connection's greenlet: between events it sleeps
    in the event loop, holding no pool thread and no transfer buffer; an
    event is a few hundred bytes, built when sent.
    """
    while True:
        data = json.dumps(session_progress(session))
        yield f"data: {data}\n\n".encode()
        if session.canceled:
            return
        gevent.sleep(interval_s)


def make_app(registry, cfg):
    """The progress app over `registry`."""
    app = web.make_app()
    res = Progress(registry, cfg["progress"]["event_interval_s"])
    app.route("/progress", "GET", res.list_all)
    app.route("/progress/", "GET", res.list_all)
    app.route("/progress/<session_id>", "GET", res.get)
    return app


class Progress:
    """/progress and /progress/{id}."""

    def __init__(self, registry, event_interval_s=1.0):
        self.registry = registry
        self.event_interval_s = event_interval_s

    def list_all(self):
        # Token sessions too: an operator of a proxy sees its transfers
        # here, though no host agent added them. /progress/{id} serves only
        # the host agent's sessions: two tokens may name one id.
        return web.json_response(
            [session_progress(s) for s in
             self.registry.sessions() + self.registry.token_sessions()])

    def get(self, session_id):
        sessions.check_id(session_id)
        session = self.registry.get(session_id)
        if wants_events(bottle.request.environ.get("HTTP_ACCEPT")):
            return bottle.HTTPResponse(
                events(session, self.event_interval_s), status=200, **{
                    "Content-Type": EVENT_STREAM,
                    "Cache-Control": "no-cache",
                    # Proxies such as nginx must pass each event on at once.
                    "X-Accel-Buffering": "no",
                })
        return web.json_response(session_progress(session))
