import json

import pytest
import webtest

from imaged import config
from imaged import sessions
from imaged.apps import progress as progress_app
from imaged.apps import sessions as sessions_app
from imaged.server import Dispatcher

CFG = config.validate({"listeners": [
    {"name": "c", "kind": "unix", "path": "/tmp/c.sock", "apps": ["sessions", "progress"]}]})

BODY = {"url": "file:///var/tmp/disk.raw", "size": 4096, "ops": ["read"], "timeout": 60}


@pytest.fixture
def registry():
    return sessions.Registry(remove_timeout_s=0.5)


@pytest.fixture
def app(registry):
    return webtest.TestApp(Dispatcher({
        "/sessions/": sessions_app.make_app(registry, CFG),
        "/tickets/": sessions_app.make_app(registry, CFG),
        "/progress/": progress_app.make_app(registry, CFG),
    }))


def put(app, sid, body, status=200, prefix="/sessions/"):
    return app.put(prefix + sid, json.dumps(body), status=status,
                   content_type="application/json")


@pytest.mark.parametrize("prefix", ["/sessions/", "/tickets/"])
def test_add_get_extend_delete(app, prefix):
    put(app, "abc", BODY, prefix=prefix)
    info = app.get(prefix + "abc").json
    assert info["uuid"] == "abc" and info["size"] == 4096
    assert info["active"] is False and info["transferred"] == 0
    old = info["expires"]
    app.patch(prefix + "abc", json.dumps({"timeout": 600}), status=200)
    assert app.get(prefix + "abc").json["expires"] > old + 500
    app.delete(prefix + "abc", status=204)
    app.delete(prefix + "abc", status=204)
    app.get(prefix + "abc", status=404)


def test_alias_sees_the_same_sessions(app):
    put(app, "abc", BODY, prefix="/sessions/")
    assert app.get("/tickets/abc").json["uuid"] == "abc"


def test_idempotent_add_and_conflict(app):
    put(app, "abc", BODY)
    put(app, "abc", BODY)
    r = put(app, "abc", dict(BODY, size=1), status=409)
    assert r.content_type == "text/plain"


@pytest.mark.parametrize("body, field", [
    (dict(BODY, size="x"), "size"),
    ({k: v for k, v in BODY.items() if k != "url"}, "url"),
    (dict(BODY, ops=["exec"]), "ops"),
    (dict(BODY, timeout=-1), "timeout"),
])
def test_bad_body_names_the_field(app, body, field):
    r = put(app, "abc", body, status=400)
    assert field in r.text
    app.get("/sessions/abc", status=404)


def test_invalid_json(app):
    r = app.put("/sessions/abc", "{nope", status=400)
    assert "JSON" in r.text


def test_body_cap(app):
    big = dict(BODY, transfer_id="x" * 100000)
    r = put(app, "abc", big, status=413)
    assert "too large" in r.text


def test_patch_validation(app):
    put(app, "abc", BODY)
    app.patch("/sessions/abc", json.dumps({"timeout": "x"}), status=400)
    app.patch("/sessions/abc", json.dumps({"size": 1}), status=400)
    app.patch("/sessions/missing", json.dumps({"timeout": 1}), status=404)


def test_delete_all(app, registry):
    put(app, "a", BODY)
    put(app, "b", BODY)
    app.delete("/sessions/", status=204)
    assert len(registry) == 0


def test_delete_conflict_when_operation_does_not_stop(app, registry):
    put(app, "abc", BODY)
    registry.get("abc").add_operation(sessions.Operation("read", 0, 10))
    r = app.delete("/sessions/abc", status=409)
    assert "did not stop" in r.text


def test_progress(app, registry):
    put(app, "abc", dict(BODY, transfer_id="t-1"))
    listing = app.get("/progress").json
    assert [p["transfer_id"] for p in listing] == ["t-1"]
    p = app.get("/progress/abc").json
    for key in ("size", "transferred", "active", "operations", "throughput_bps", "expires"):
        assert key in p
    op = sessions.Operation("write", 0, 4096)
    registry.get("abc").add_operation(op)
    op.progress(1024)
    p = app.get("/progress/abc").json
    assert p["active"] is True
    assert p["transferred"] == 1024
    assert p["operations"] == [{"kind": "write", "offset": 0, "length": 4096, "done": 1024}]
    app.get("/progress/nope", status=404)


def test_unknown_paths_are_plain_text_404(app):
    r = app.get("/nothing", status=404)
    assert r.content_type == "text/plain"
    r = app.post("/sessions/abc", "{}", status=405)
    assert "<" not in r.text
