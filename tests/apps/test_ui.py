"""The ui app serves the lab page's files, and nothing else."""

import webtest

from imaged.apps import ui


def app():
    return webtest.TestApp(ui.make_app())


def test_page_and_assets():
    a = app()
    r = a.get("/ui/")
    assert r.content_type == "text/html"
    assert b'<script src="app.js">' in r.body
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    js = a.get("/ui/app.js")
    assert js.content_type == "text/javascript"
    assert b"Authorization" in js.body and b"Content-Range" in js.body
    assert a.get("/ui/style.css").content_type == "text/css"
    assert a.get("/ui", status=301).headers["Location"].endswith("/ui/")


def test_nothing_else_is_served():
    a = app()
    for path in ("/ui/../apps/ui.py", "/ui/ui.py", "/ui/%2e%2e/config.py", "/ui/missing.js"):
        a.get(path, status=404)
