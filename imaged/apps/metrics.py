"""
The metrics app: GET /metrics in the Prometheus text format.

The shipped config mounts it on the control socket; it shows no session id
or transfer id, so it may also be mounted on a TCP listener for a scraper.
"""

import bottle

from .. import web

PREFIXES = ("/metrics/",)


def make_app(metrics):
    """The metrics app over `metrics` (an imaged.metrics.Metrics)."""
    app = web.make_app()
    res = Metrics(metrics)
    app.route("/metrics", "GET", res.get)
    app.route("/metrics/", "GET", res.get)
    return app


class Metrics:
    """/metrics: every figure of the daemon."""

    def __init__(self, metrics):
        self.metrics = metrics

    def get(self):
        return bottle.HTTPResponse(self.metrics.render(), status=200,
                                   **{"Content-Type": self.metrics.CONTENT_TYPE})
