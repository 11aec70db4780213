"""
The lab page (`ui` app): upload a local file into a session, or download a
session's image, from a browser.

    GET /ui/          the page (imaged/static/ui/index.html)
    GET /ui/app.js    its script; GET /ui/style.css its style

Small, dependency-free HTML and JavaScript shipped as package data: no
build step, nothing fetched from elsewhere. The page talks to the images
API of this daemon, or of any other (a host or a proxy), with fetch();
it works with session ids and with signed tokens (docs/proxy.md).
"""

import os

import bottle

from .. import web

PREFIXES = ("/ui/",)

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "static", "ui")

# Only these files are served: no path from a request reaches the file system.
FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "index.html": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
}

# The page may fetch() any images server (a proxy or a host elsewhere), but
# runs only its own script and style.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src *; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def make_app(cfg=None):
    """The ui app; `cfg` is unused (the page has no settings)."""
    app = web.make_app()
    app.route("/ui", "GET", _redirect)
    app.route("/ui/", "GET", _page)
    app.route("/ui/<name>", "GET", _page)
    return app


def _redirect():
    return bottle.HTTPResponse(status=301, Location="/ui/", **{"Content-Length": "0"})


def _page(name=""):
    entry = FILES.get(name)
    if entry is None:
        return bottle.HTTPResponse("No such resource\n", status=404,
                                   **{"Content-Type": "text/plain; charset=utf-8"})
    filename, mimetype = entry
    with open(os.path.join(STATIC_DIR, filename), "rb") as f:
        body = f.read()
    headers = dict(SECURITY_HEADERS)
    headers["Content-Type"] = mimetype
    headers["Content-Length"] = str(len(body))
    return bottle.HTTPResponse(body, status=200, **headers)
