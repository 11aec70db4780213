"""
The proxy role with ovirt-imageio as the host: imaged relays to a real
ovirt-imageio daemon (the PyPI package of requirements-test.txt) holding a
file ticket, over verified TLS.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from imaged import testing
from tests.conftest import free_port

MiB = 1024**2
SIZE = 8 * MiB

OVIRT_IMAGEIO = os.path.join(os.path.dirname(sys.executable), "ovirt-imageio")

pytestmark = pytest.mark.skipif(
    not os.access(OVIRT_IMAGEIO, os.X_OK),
    reason="ovirt-imageio is not installed (`make venv` installs it from "
           "requirements-test.txt)")


def control(sock_path, method, url, body=None):
    import http.client

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(sock_path)

    c = Conn("localhost")
    try:
        c.request(method, url, body=json.dumps(body).encode() if body else None)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


@pytest.fixture(scope="module")
def ovirt_host(tmp_path_factory, tls_files):
    d = tmp_path_factory.mktemp("ovirt-host")
    run_dir = tempfile.mkdtemp(prefix="ovirt-", dir="/tmp")
    port = free_port()
    conf = d / "conf.d"
    conf.mkdir()
    ctl = os.path.join(run_dir, "control.sock")
    (conf / "50-test.conf").write_text(testing.ovirt_imageio_config(
        run_dir, port, tls_files[0], tls_files[1], os.path.join(run_dir, "local.sock"),
        ctl, d / "ovirt-imageio.log"))
    proc = subprocess.Popen([OVIRT_IMAGEIO, "--conf-dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "ovirt-imageio exited"
            try:
                status, _ = control(ctl, "GET", "/tickets/none")
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                if status in (200, 404):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "ovirt-imageio did not start"
            time.sleep(0.1)
        yield {"port": port, "control": ctl}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


def add_ticket(host, path, ops):
    tid = str(uuid.uuid4())
    status, body = control(host["control"], "PUT", f"/tickets/{tid}", {
        "uuid": tid, "url": f"file://{path}", "size": os.path.getsize(path),
        "ops": ops, "timeout": 300})
    assert status == 200, body
    return tid


def test_relay_to_ovirt_imageio(ovirt_host, proxy, tmp_path):
    path = tmp_path / "disk.raw"
    data = random.Random(3).randbytes(SIZE)
    path.write_bytes(data)
    tid = add_ticket(ovirt_host, path, ["read", "write"])
    sid = str(uuid.uuid4())
    with proxy.control() as c:
        r = c.put(proxy.control_url + sid, data=json.dumps({
            "url": f"https://localhost:{ovirt_host['port']}/images/{tid}",
            "size": SIZE, "ops": ["read", "write"], "timeout": 300}))
    assert r.status_code == 200, r.text
    s = proxy.https()
    url = proxy.tls_url + sid
    # OPTIONS: ovirt-imageio's features and limits.
    opts = s.options(url)
    assert opts.status_code == 200, opts.text
    assert {"extents", "zero", "flush"} <= set(opts.json()["features"])
    assert s.get(url).content == data
    r = s.get(url, headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206 and r.content == data[1000:2000]
    new = random.Random(4).randbytes(2 * MiB)
    r = s.put(url, data=new, headers={"Content-Range": f"bytes {MiB}-{3 * MiB - 1}/*"})
    assert r.status_code == 200, r.text
    r = s.patch(url, data=json.dumps({"op": "zero", "offset": 0, "size": 4096,
                                      "flush": True}))
    assert r.status_code == 200, r.text
    want = bytearray(data)
    want[MiB:3 * MiB] = new
    want[:4096] = bytes(4096)
    assert path.read_bytes() == want
    ext = s.get(url + "/extents")
    assert ext.status_code == 200, ext.text
    assert sum(e["length"] for e in ext.json()) == SIZE
    # ovirt-imageio's errors reach the client: its ticket removed.
    status, _ = control(ovirt_host["control"], "DELETE", f"/tickets/{tid}")
    assert status == 204
    r = proxy.https().get(url, headers={"Range": "bytes=0-9"})
    assert r.status_code == 403
