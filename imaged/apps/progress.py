"""
The progress API: how far each session's transfers have got.

Mounted with the sessions app on the control socket; the host agent polls
it to report progress to the engine.
"""

from .. import sessions
from .. import web


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
    }


def make_app(registry, cfg):
    """The progress app over `registry`."""
    app = web.make_app()
    res = Progress(registry)
    app.route("/progress", "GET", res.list_all)
    app.route("/progress/", "GET", res.list_all)
    app.route("/progress/<session_id>", "GET", res.get)
    return app


class Progress:
    """/progress and /progress/{id}."""

    def __init__(self, registry):
        self.registry = registry

    def list_all(self):
        return web.json_response(
            [session_progress(s) for s in self.registry.sessions()])

    def get(self, session_id):
        sessions.check_id(session_id)
        return web.json_response(session_progress(self.registry.get(session_id)))
