"""
The proxy role (SPEC §9): a host daemon and a proxy daemon, both real
imaged processes with real TLS; clients (requests, curl, ovirt-imageio's
client) talk to the proxy, which relays to the host; sessions come from
the proxy's control API or from signed tokens.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import threading
import uuid

import pytest
import requests

from tests import token_helpers as th
from tests.conftest import Daemon, free_port, needs_tool
from tests.test_metrics import scrape, value

KiB = 1024
MiB = 1024**2
SIZE = 8 * MiB + 4096


# Fixtures: the host and the proxy (tokens of engine_key, TLS even to this
# machine) are tests/conftest.py's; a second proxy for the module here.

@pytest.fixture(scope="module")
def local_proxy(tmp_path_factory, tls_files):
    """The default: a host on this machine is reached by its unix socket."""
    d = Daemon(tmp_path_factory.mktemp("local-proxy"), tls_files,
               {"proxy": {"ca_file": tls_files[0]}})
    d.start()
    yield d
    d.stop()


def make_image(tmp_path, size=SIZE, seed=1):
    path = str(tmp_path / f"image-{uuid.uuid4().hex[:8]}.raw")
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def host_url(host, sid):
    return f"https://localhost:{host.tls_port}/images/{sid}"


def add_proxy_session(proxy, url, size, ops=("read", "write"), **extra):
    sid = str(uuid.uuid4())
    body = dict({"url": url, "size": size, "ops": list(ops), "timeout": 300}, **extra)
    with proxy.control() as c:
        r = c.put(proxy.control_url + sid, data=json.dumps(body))
    assert r.status_code == 200, r.text
    return sid


def relayed(host, proxy, path, ops=("read", "write"), host_ops=("read", "write")):
    """A host session for `path` and a proxy session relaying to it."""
    hsid = host.add_session(path, ops=host_ops)
    psid = add_proxy_session(proxy, host_url(host, hsid), os.path.getsize(path), ops)
    return hsid, psid


def host_session(host, hsid):
    with host.control() as c:
        r = c.get(host.control_url + hsid)
    assert r.status_code == 200, r.text
    return r.json()


def read(path):
    with open(path, "rb") as f:
        return f.read()


# Data through the proxy.

def test_get(host, proxy, tmp_path):
    path, data = make_image(tmp_path)
    _, psid = relayed(host, proxy, path, ops=["read"], host_ops=["read"])
    s = proxy.https()
    url = proxy.tls_url + psid
    r = s.get(url)
    assert r.status_code == 200
    assert r.content == data
    for header, start, end in (("bytes=0-99", 0, 100),
                               ("bytes=4095-1048580", 4095, 1048581),
                               (f"bytes={SIZE - 10}-", SIZE - 10, SIZE),
                               ("bytes=-7", SIZE - 7, SIZE)):
        r = s.get(url, headers={"Range": header})
        assert r.status_code == 206, r.text
        assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
        assert r.content == data[start:end]


def test_put_with_content_range_and_flush(host, proxy, tmp_path):
    path, data = make_image(tmp_path)
    hsid, psid = relayed(host, proxy, path)
    s = proxy.https()
    url = proxy.tls_url + psid
    new = bytearray(data)
    chunk = random.Random(2).randbytes(3 * MiB + 17)
    offset = 1234
    r = s.put(url + "?flush=n", data=chunk,
              headers={"Content-Range": f"bytes {offset}-{offset + len(chunk) - 1}/*"})
    assert r.status_code == 200, r.text
    new[offset:offset + len(chunk)] = chunk
    tail = b"\xab" * 5000
    r = s.put(url, data=tail, headers={"Content-Range": f"bytes {SIZE - 5000}-{SIZE - 1}/*"})
    assert r.status_code == 200, r.text
    new[SIZE - 5000:] = tail
    r = s.patch(url, data=json.dumps({"op": "flush"}))
    assert r.status_code == 200, r.text
    assert read(path) == new
    assert host_session(host, hsid)["transferred"] >= len(chunk) + len(tail)


def test_whole_put_then_get_back(host, proxy, tmp_path):
    path, _ = make_image(tmp_path)
    _, psid = relayed(host, proxy, path)
    data = random.Random(3).randbytes(SIZE)
    s = proxy.https()
    r = s.put(proxy.tls_url + psid, data=data)
    assert r.status_code == 200, r.text
    assert read(path) == data
    assert s.get(proxy.tls_url + psid).content == data


def test_patch_zero(host, proxy, tmp_path):
    path, data = make_image(tmp_path)
    _, psid = relayed(host, proxy, path)
    r = proxy.https().patch(proxy.tls_url + psid, data=json.dumps(
        {"op": "zero", "offset": 4096, "size": MiB + 100, "flush": True}))
    assert r.status_code == 200, r.text
    got = read(path)
    assert got[4096:4096 + MiB + 100] == bytes(MiB + 100)
    assert got[:4096] == data[:4096]
    assert got[4096 + MiB + 100:] == data[4096 + MiB + 100:]


def test_options_are_the_hosts(host, proxy, tmp_path):
    path, _ = make_image(tmp_path)
    hsid, psid = relayed(host, proxy, path)
    r = proxy.https().options(proxy.tls_url + psid)
    assert r.status_code == 200, r.text
    body = r.json()
    direct = host.https().options(host.tls_url + hsid).json()
    # The host's limits (configured unlike the proxy's defaults).
    assert body["max_writers"] == direct["max_writers"] == 3
    assert body["max_readers"] == direct["max_readers"] == 5
    assert sorted(body["features"]) == sorted(direct["features"])
    assert set(r.headers["Allow"].split(",")) == {"OPTIONS", "GET", "PUT", "PATCH"}
    # A read-only host session: no write features, whatever the proxy's
    # session says.
    path2, _ = make_image(tmp_path)
    _, psid2 = relayed(host, proxy, path2, host_ops=["read"])
    body = proxy.https().options(proxy.tls_url + psid2).json()
    assert "zero" not in body["features"] and "flush" not in body["features"]
    assert body["max_writers"] == 0


def test_extents_and_checksum_come_from_the_host(host, proxy, tmp_path):
    path = str(tmp_path / "sparse.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(b"x" * 64 * KiB)
    hsid, psid = relayed(host, proxy, path, ops=["read"])
    s = proxy.https()
    got = s.get(proxy.tls_url + psid + "/extents")
    assert got.status_code == 200, got.text
    want = host.https().get(host.tls_url + hsid + "/extents").json()
    assert got.json() == want
    assert any(e["zero"] for e in want) and any(not e["zero"] for e in want)
    window = s.get(proxy.tls_url + psid + f"/extents?start={MiB}&length={MiB}").json()
    assert window[0]["start"] == MiB
    assert sum(e["length"] for e in window) == MiB
    for query in ("", "?algorithm=sha256&block_size=1048576"):
        got = s.get(proxy.tls_url + psid + "/checksum" + query)
        assert got.status_code == 200, got.text
        assert got.json() == host.https().get(host.tls_url + hsid + "/checksum" + query).json()


# Errors of the host reach the client; a dead host is 502.

def test_host_4xx_reach_the_client(host, proxy, tmp_path):
    path, _ = make_image(tmp_path)
    hsid = host.add_session(path, size=SIZE - 4096)
    # The proxy's session is larger than the host's.
    psid = add_proxy_session(proxy, host_url(host, hsid), SIZE)
    s = proxy.https()
    r = s.get(proxy.tls_url + psid, headers={"Range": f"bytes={SIZE - 100}-{SIZE - 1}"})
    direct = host.https().get(host.tls_url + hsid,
                              headers={"Range": f"bytes={SIZE - 100}-{SIZE - 1}"})
    assert r.status_code == direct.status_code == 416
    assert r.text == direct.text
    assert r.headers["Content-Range"] == f"bytes */{SIZE - 4096}"
    # The host's session goes away: its 403 and message.
    with host.control() as c:
        assert c.delete(host.control_url + hsid).status_code == 204
    r = proxy.https().get(proxy.tls_url + psid, headers={"Range": "bytes=0-9"})
    assert r.status_code == 403
    assert r.text == "no such session, or it expired\n"
    r = proxy.https().put(proxy.tls_url + psid, data=b"x" * 100)
    assert r.status_code == 403


def test_host_down_is_502(proxy):
    port = free_port()
    psid = add_proxy_session(proxy, f"https://localhost:{port}/images/{uuid.uuid4()}", MiB)
    r = proxy.https().get(proxy.tls_url + psid)
    assert r.status_code == 502
    assert f"localhost:{port}" in r.text and "connect" in r.text
    assert proxy.https().put(proxy.tls_url + psid, data=b"x" * 10).status_code == 502
    assert proxy.https().options(proxy.tls_url + psid).status_code == 502


@pytest.mark.parametrize("answer", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!",
    b"",
])
def test_host_answering_garbage_is_502(proxy, answer):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    # accept() returns now and then to see whether the test is over.
    srv.settimeout(0.1)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with c:
                c.settimeout(5)
                c.recv(65536)
                c.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        port = srv.getsockname()[1]
        psid = add_proxy_session(proxy, f"http://127.0.0.1:{port}/images/abc", MiB)
        r = proxy.https().get(proxy.tls_url + psid)
        assert r.status_code == 502
        assert f"127.0.0.1:{port}" in r.text
    finally:
        done.set()
        t.join(5)
        srv.close()


def test_untrusted_host_certificate_is_502(host, tmp_path_factory, tls_files, tmp_path):
    from imaged import lab
    other = tmp_path_factory.mktemp("other-ca")
    cert, key = str(other / "cert.pem"), str(other / "key.pem")
    lab.ensure_certificate(cert, key)
    d = Daemon(tmp_path_factory.mktemp("strict-proxy"), tls_files,
               {"proxy": {"ca_file": cert}})
    d.start()
    try:
        path, _ = make_image(tmp_path)
        hsid, psid = relayed(host, d, path)
        r = d.https().get(d.tls_url + psid)
        assert r.status_code == 502
        assert "certificate" in r.text
        # Nothing reached the host's session.
        assert host_session(host, hsid)["connections"] == 0
    finally:
        d.stop()


@pytest.mark.parametrize("url", [
    "https://localhost:54322/images/",
    "https://localhost:54322/images/a/b",
    "https://localhost:54322/other/abc",
    "https://localhost:54322/images/abc?x=1",
    "https://user:pw@localhost:54322/images/abc",
    "https://localhost:notaport/images/abc",
    "https:///images/abc",
    "ftp://localhost/images/abc",
])
def test_session_url_is_validated(proxy, url):
    with proxy.control() as c:
        r = c.put(proxy.control_url + str(uuid.uuid4()), data=json.dumps(
            {"url": url, "size": MiB, "ops": ["read"], "timeout": 60}))
    assert r.status_code == 400
    assert "url" in r.text


def test_local_host_is_reached_by_its_unix_socket(host, local_proxy, tmp_path):
    path, data = make_image(tmp_path)
    _, psid = relayed(host, local_proxy, path)
    s = local_proxy.https()
    assert s.get(local_proxy.tls_url + psid).content == data
    new = random.Random(9).randbytes(SIZE)
    assert s.put(local_proxy.tls_url + psid, data=new).status_code == 200
    assert read(path) == new
    assert "relaying through its unix socket" in local_proxy.log()


def test_each_client_connection_keeps_its_host_connection(host, proxy, tmp_path):
    path, data = make_image(tmp_path)
    hsid, psid = relayed(host, proxy, path)
    a, b = proxy.https(), proxy.https()
    for i in range(3):
        for s in (a, b):
            r = s.get(proxy.tls_url + psid, headers={"Range": f"bytes={i * MiB}-{i * MiB + 99}"})
            assert r.content == data[i * MiB:i * MiB + 100]
    # Two client connections, two host connections, kept alive.
    assert host_session(host, hsid)["connections"] == 2


# Real clients through the proxy.

@needs_tool("curl")
def test_curl_through_proxy(host, proxy, tmp_path):
    path, _ = make_image(tmp_path)
    _, psid = relayed(host, proxy, path)
    src = tmp_path / "src.raw"
    data = random.Random(4).randbytes(SIZE)
    src.write_bytes(data)
    url = proxy.tls_url + psid
    base = ["curl", "-sS", "--fail", "--cacert", proxy.cert]
    subprocess.run(base + ["-T", str(src), url], check=True, timeout=60)
    assert read(path) == data
    out = tmp_path / "out.raw"
    subprocess.run(base + ["-o", str(out), url], check=True, timeout=60)
    assert out.read_bytes() == data
    # Chunked (no length, as a browser may send): from stdin.
    chunked = random.Random(5).randbytes(3 * MiB + 1)
    subprocess.run(base + ["-T", "-", "-H", "Transfer-Encoding: chunked", url + "?flush=y"],
                   input=chunked, check=True, timeout=60)
    assert read(path)[:len(chunked)] == chunked
    assert read(path)[len(chunked):] == data[len(chunked):]


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd is not installed "
                    "(make sysdeps installs qemu-utils)")
def test_ovirt_imageio_client_through_proxy(host, proxy, tmp_path):
    client = pytest.importorskip("ovirt_imageio.client")
    path, _ = make_image(tmp_path)
    _, psid = relayed(host, proxy, path)
    src = tmp_path / "src.raw"
    data = bytearray(SIZE)
    data[MiB:2 * MiB] = random.Random(6).randbytes(MiB)
    data[SIZE - 100:] = b"z" * 100
    src.write_bytes(data)
    client.upload(str(src), proxy.tls_url + psid, proxy.cert)
    assert read(path) == data
    out = str(tmp_path / "out.raw")
    client.download(proxy.tls_url + psid, out, proxy.cert, fmt="raw")
    assert read(out) == data


# Signed tokens: no session on the proxy, the token is the authorization.

def token_for(key, host, hsid, size, ops=("read", "write"), **claims):
    sid = str(uuid.uuid4())
    session = {"url": host_url(host, hsid), "size": size, "ops": list(ops)}
    return sid, th.sign(key, "EdDSA", th.claims(sid, session, **claims))


def test_token_get_and_put(host, proxy, tmp_path, engine_key):
    path, data = make_image(tmp_path)
    hsid = host.add_session(path)
    sid, token = token_for(engine_key, host, hsid, SIZE)
    s = proxy.https()
    s.headers["Authorization"] = f"Bearer {token}"
    url = proxy.tls_url + sid
    assert s.get(url).content == data
    new = random.Random(8).randbytes(MiB)
    r = s.put(url, data=new, headers={"Content-Range": f"bytes 0-{MiB - 1}/*"})
    assert r.status_code == 200, r.text
    assert read(path)[:MiB] == new
    assert s.options(url).json()["max_writers"] == 3
    # The token is no secret kept in the proxy's logs.
    log = proxy.log()
    assert token not in log and token.split(".")[2] not in log
    # Without the token, the id alone is nothing.
    assert requests.get(url, verify=proxy.cert).status_code == 403


def test_token_alone_in_authorization(host, proxy, tmp_path, engine_key):
    """Without "Bearer ": how ovirt-imageio's proxy took the signed ticket."""
    path, data = make_image(tmp_path)
    hsid = host.add_session(path, ops=["read"])
    sid, token = token_for(engine_key, host, hsid, SIZE, ops=["read"])
    r = proxy.https().get(proxy.tls_url + sid, headers={"Authorization": token})
    assert r.status_code == 200, r.text
    assert r.content == data
    r = proxy.https().get(proxy.tls_url + sid, headers={"Authorization": f"Basic {token}"})
    assert r.status_code == 403
    assert "Bearer" in r.text


def test_token_cannot_open_the_proxys_own_files(proxy, tmp_path, engine_key):
    """A signed token relays to a host; the proxy's files are not its to
    open, whatever images.allowed_dirs says (empty here: anything)."""
    path, data = make_image(tmp_path)
    for url in (f"file://{path}", f"nbd:unix:{tmp_path}/nbd.sock"):
        sid = str(uuid.uuid4())
        token = th.sign(engine_key, "EdDSA", th.claims(
            sid, {"url": url, "size": SIZE, "ops": ["read", "write"]}))
        s = proxy.https()
        s.headers["Authorization"] = f"Bearer {token}"
        r = s.get(proxy.tls_url + sid)
        assert r.status_code == 403
        assert "host's images URL" in r.text
        r = s.put(proxy.tls_url + sid, data=b"\0" * MiB)
        assert r.status_code == 403
    assert read(path) == data


def test_token_transfers_are_visible_to_operators(host, proxy, tmp_path, engine_key):
    """No host agent added a token session, but its transfer shows in the
    proxy's metrics and in its /progress list."""
    path, data = make_image(tmp_path)
    hsid = host.add_session(path, ops=["read"])
    sid, token = token_for(engine_key, host, hsid, SIZE, ops=["read"])
    before = scrape(proxy)
    r = proxy.https().get(proxy.tls_url + sid, headers={"Authorization": f"Bearer {token}"})
    assert r.content == data
    after = scrape(proxy)
    assert value(after, "imaged_bytes_total", op="read") - \
        value(before, "imaged_bytes_total", op="read") == SIZE
    assert value(after, "imaged_token_sessions") >= 1
    with proxy.control() as c:
        listed = c.get("http+unix://imaged/progress").json()
    mine = [p for p in listed if p["id"] == sid]
    assert len(mine) == 1
    assert mine[0]["token"] is True
    assert mine[0]["transferred"] == SIZE and mine[0]["size"] == SIZE


def test_forged_tokens_are_refused_and_nothing_is_relayed(host, proxy, tmp_path, engine_key):
    path, data = make_image(tmp_path)
    hsid = host.add_session(path)
    pem = th.public_pem(engine_key)
    other = th.generate("EdDSA")
    session = {"url": host_url(host, hsid), "size": SIZE, "ops": ["read", "write"]}
    cases = {
        "bad signature": lambda sid: th.tampered(
            th.sign(engine_key, "EdDSA", th.claims(sid, dict(session, size=1))),
            session=session),
        "unknown key": lambda sid: th.sign(other, "EdDSA", th.claims(sid, session)),
        "alg none": lambda sid: th.unsigned(th.claims(sid, session)),
        "HS256 with the public key": lambda sid: th.hs256_with_public_key(
            pem, th.claims(sid, session)),
        "wrong sub": lambda sid: th.sign(engine_key, "EdDSA",
                                         th.claims(str(uuid.uuid4()), session)),
        "expired": lambda sid: th.sign(engine_key, "EdDSA",
                                       th.claims(sid, session, exp_in=-1)),
        "not yet valid": lambda sid: th.sign(engine_key, "EdDSA", th.claims(
            sid, session, nbf=th.claims(sid, session)["iat"] + 600)),
        "malformed session": lambda sid: th.sign(engine_key, "EdDSA", th.claims(
            sid, dict(session, size="big"))),
    }
    origin = {"Origin": "http://page.example"}
    for name, make in cases.items():
        sid = str(uuid.uuid4())
        token = make(sid)
        auth = dict(origin, Authorization=f"Bearer {token}")
        s = proxy.https()
        r = s.get(proxy.tls_url + sid, headers=auth)
        assert r.status_code == 403, name
        assert r.text.strip(), name
        assert r.headers["Access-Control-Allow-Origin"] == "*", name
        r = s.put(proxy.tls_url + sid, data=b"\xff" * MiB, headers=auth)
        assert r.status_code == 403, name
        assert proxy.https().options(proxy.tls_url + sid, headers=auth).status_code == 403
        assert token not in proxy.log()
    # Nothing reached the host.
    info = host_session(host, hsid)
    assert info["connections"] == 0 and info["transferred"] == 0
    assert read(path) == data


def test_cors_preflight_allows_the_token(proxy):
    r = proxy.https().options(proxy.tls_url + str(uuid.uuid4()), headers={
        "Origin": "http://page.example",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization,content-range,content-type"})
    assert r.status_code == 200
    allowed = [h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")]
    for h in ("authorization", "content-range", "content-type"):
        assert h in allowed
    assert "PUT" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_download_abandoned_midway(host, proxy, tmp_path):
    # A client going away in the middle of a download leaves the proxy's
    # answer from the host unread: the next clients are served as usual.
    path, data = make_image(tmp_path)
    hsid, psid = relayed(host, proxy, path, ops=["read"])
    with proxy.https() as s:
        r = s.get(proxy.tls_url + psid, stream=True)
        assert r.status_code == 200
        assert r.raw.read(MiB) == data[:MiB]
        r.close()
    s = proxy.https()
    assert s.get(proxy.tls_url + psid).content == data
    r = s.get(proxy.tls_url + psid, headers={"Range": "bytes=100-199"})
    assert r.content == data[100:200]


def test_upload_abandoned_midway(host, proxy, tmp_path):
    # A client sending less than its Content-Length: the host never gets a
    # whole body, and nothing is reported written.
    import http.client
    import ssl
    path, data = make_image(tmp_path)
    _, psid = relayed(host, proxy, path)
    ctx = ssl.create_default_context(cafile=proxy.cert)
    c = http.client.HTTPSConnection("localhost", proxy.tls_port, context=ctx, timeout=30)
    c.putrequest("PUT", f"/images/{psid}")
    c.putheader("Content-Length", str(SIZE))
    c.endheaders()
    c.send(b"\x07" * (3 * MiB))
    c.close()
    # The proxy is fine, and a full upload still works.
    new = random.Random(11).randbytes(SIZE)
    assert proxy.https().put(proxy.tls_url + psid, data=new).status_code == 200
    assert read(path) == new
