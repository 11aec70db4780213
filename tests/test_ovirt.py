"""
imaged as the oVirt engine and Vdsm drive it (SPEC §2, §3, §10): engine
tickets through /tickets/, the download file name, /info for the engine's
"Test Connection". A real daemon, its real sockets and TLS.
"""

import hashlib
import json
import os
import subprocess
import uuid

import pytest

from tests.conftest import needs_tool

MiB = 1024**2


def engine_ticket(sid, path, size, ops="write", filename=None):
    """
    A ticket body byte for byte as the engine sends it: ImageTicket.toDict()
    (a Java HashMap, serialized in its bucket order) passed on unchanged by
    Vdsm with Python's json.dumps.
    """
    transfer_id = str(uuid.uuid4())
    if filename is None:
        body = (
            f'{{"dirty": false, "ops": ["{ops}"], "size": {size}, '
            f'"sparse": true, "inactivity_timeout": 60, '
            f'"transfer_id": "{transfer_id}", "uuid": "{sid}", '
            f'"timeout": 300, "url": "file://{path}"}}')
    else:
        body = (
            f'{{"dirty": false, "ops": ["{ops}"], "filename": "{filename}", '
            f'"size": {size}, "sparse": true, "inactivity_timeout": 60, '
            f'"transfer_id": "{transfer_id}", "uuid": "{sid}", '
            f'"timeout": 300, "url": "file://{path}"}}')
    return body.encode(), transfer_id


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\0" * (4 * MiB))
    return str(path)


def test_engine_ticket_through_tickets_alias(daemon, image):
    sid = str(uuid.uuid4())
    body, transfer_id = engine_ticket(sid, image, 4 * MiB)
    c = daemon.control()
    r = c.put(f"http+unix://imaged/tickets/{sid}", data=body)
    assert r.status_code == 200, r.text
    info = c.get(f"http+unix://imaged/tickets/{sid}").json()
    assert info["transfer_id"] == transfer_id
    assert info["dirty"] is False and info["sparse"] is True
    assert info["inactivity_timeout"] == 60
    assert "filename" not in info
    for key in ("expires", "idle_time", "transferred", "connections", "size", "timeout"):
        assert type(info[key]) is int, key
    # Same content again (Vdsm retries): idempotent.
    assert c.put(f"http+unix://imaged/tickets/{sid}", data=body).status_code == 200

    # The transfer the ticket allows, over TLS.
    data = os.urandom(4 * MiB)
    s = daemon.https()
    r = s.put(daemon.tls_url + sid, data=data)
    assert r.status_code == 200, r.text
    with open(image, "rb") as f:
        assert f.read() == data
    assert c.get(f"http+unix://imaged/tickets/{sid}").json()["transferred"] == 4 * MiB
    assert c.delete(f"http+unix://imaged/tickets/{sid}").status_code == 204


def test_engine_download_ticket_with_filename(daemon, image):
    sid = str(uuid.uuid4())
    body, _ = engine_ticket(sid, image, 4 * MiB, ops="read",
                            filename="fedora-35 (1).raw")
    c = daemon.control()
    assert c.put(f"http+unix://imaged/tickets/{sid}", data=body).status_code == 200
    assert c.get(f"http+unix://imaged/tickets/{sid}").json()["filename"] == \
        "fedora-35 (1).raw"
    r = daemon.https().get(daemon.tls_url + sid, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206
    assert r.headers["Content-Disposition"] == 'attachment; filename="fedora-35 (1).raw"'


@needs_tool("curl")
def test_non_ascii_filename_saved_by_curl(daemon, image, tmp_path):
    # curl -OJ saves under the server's name: the header works for a real
    # client, not only for our own parser.
    sid = daemon.add_session(image, ops=["read"], filename="été.raw")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["curl", "-sfOJ", "--cacert", daemon.cert, daemon.tls_url + sid],
                   cwd=out, check=True, timeout=60)
    (saved,) = os.listdir(out)
    # curl takes the ASCII fallback; browsers take filename*.
    assert saved == "ete.raw"
    assert hashlib.sha256((out / saved).read_bytes()).digest() == \
        hashlib.sha256(open(image, "rb").read()).digest()


@pytest.mark.parametrize("field, value", [
    ("filename", 'a"b.raw'),
    ("filename", "a\r\nSet-Cookie: x=1"),
    ("filename", "../etc/passwd"),
    ("filename", "x" * 256),
    ("dirty", "true"),
    ("inactivity_timeout", 3_000_000),
    ("inactivity_timeout", "60"),
])
def test_bad_engine_values_are_refused_naming_the_field(daemon, image, field, value):
    sid = str(uuid.uuid4())
    body = json.loads(engine_ticket(sid, image, 4 * MiB)[0])
    body[field] = value
    c = daemon.control()
    r = c.put(f"http+unix://imaged/tickets/{sid}", data=json.dumps(body))
    assert r.status_code == 400
    assert field in r.text
    assert c.get(f"http+unix://imaged/tickets/{sid}").status_code == 404


def test_unknown_keys_are_ignored_and_logged_once(daemon, image):
    c = daemon.control()
    for _ in range(3):
        sid = str(uuid.uuid4())
        body = json.loads(engine_ticket(sid, image, 4 * MiB)[0])
        body["engine_feature_from_2030"] = {"nested": [1, 2]}
        r = c.put(f"http+unix://imaged/tickets/{sid}", data=json.dumps(body))
        assert r.status_code == 200, r.text
        assert "engine_feature_from_2030" not in c.get(
            f"http+unix://imaged/tickets/{sid}").json()
    lines = [line for line in daemon.log().splitlines()
             if "engine_feature_from_2030" in line]
    assert len(lines) == 1, lines
    assert " INFO " in lines[0]


def test_longest_inactivity_timeout_still_uploads(daemon, image):
    # The largest value accepted must work on every path of an upload:
    # the pool-thread body reader turns it into a poll() timeout.
    sid = daemon.add_session(image, inactivity_timeout=2_147_483)
    data = os.urandom(4 * MiB)
    for s, url in ((daemon.https(), daemon.tls_url), (daemon.local(), daemon.local_url)):
        r = s.put(url + sid, data=data)
        assert r.status_code == 200, r.text
        r = s.get(url + sid)
        assert r.status_code == 200 and r.content == data


@pytest.mark.parametrize("path", ["/info", "/info/"])
def test_info_answers_the_version(daemon, path):
    from imaged import __version__
    s = daemon.https()
    base = daemon.tls_url[:-len("/images/")]
    r = s.get(base + path, headers={"Origin": "https://engine.example.com"})
    assert r.status_code == 200
    assert r.json() == {"version": __version__}
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = s.options(base + path, headers={
        "Origin": "https://engine.example.com",
        "Access-Control-Request-Method": "GET"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_info_is_not_on_the_control_socket(daemon):
    assert daemon.control().get("http+unix://imaged/info/").status_code == 404


def test_ticket_in_the_docs_is_accepted():
    # docs/ovirt.md shows the engine's ticket: it must stay one imaged takes.
    import re
    from imaged import sessions
    from tests.conftest import ROOT
    with open(os.path.join(ROOT, "docs", "ovirt.md")) as f:
        text = f.read()
    section = text[text.index("## 5."):]
    body = json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))
    spec = sessions.parse_spec(body["uuid"], body)
    assert spec["filename"] == "fedora-35.raw" and spec["dirty"] is False
