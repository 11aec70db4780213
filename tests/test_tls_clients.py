"""
TLS of the images listener: client certificates (tls.verify_clients with
tls.ca_file), the protocol and cipher policy, and the key file check.

Certificates are made here with openssl: a CA and a client certificate it
signed, and a rogue CA with a client certificate of its own.
"""

import os
import socket
import ssl
import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT, needs_tool
from tests.hardening_helpers import connect, handshake, raw_request, sparse_file, KiB

pytestmark = needs_tool("openssl")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.pem",
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return os.path.join(d, f"{name}.pem")


def make_client(d, name, ca):
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem",
            "-CAkey", f"{ca}-key.pem", "-CAcreateserial", "-days", "2",
            "-extfile", ext, "-out", f"{name}.pem", cwd=d)
    os.chmod(os.path.join(d, f"{name}-key.pem"), 0o600)
    return os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}-key.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("client-pki"))
    ca = make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    return {
        "ca": ca,
        "client": make_client(d, "client", "ca"),
        "rogue": make_client(d, "rogue", "rogue-ca"),
    }


@pytest.fixture
def verifying(make_daemon, pki, tmp_path):
    d = make_daemon({"tls": {"verify_clients": True, "ca_file": pki["ca"]}})
    d.image = sparse_file(tmp_path / "disk.raw", 64 * KiB, [(0, b"hello")])
    d.sid = d.add_session(d.image)
    return d


def get(d, cert=None, **kw):
    s = d.https()
    if cert:
        s.cert = cert
    return s.get(d.tls_url + d.sid, headers={"Range": "bytes=0-4"}, timeout=10, **kw)


def test_client_with_certificate_is_served(verifying, pki):
    r = get(verifying, cert=pki["client"])
    assert r.status_code == 206 and r.content == b"hello"


@pytest.mark.parametrize("who", ["none", "rogue"])
def test_client_without_valid_certificate_is_refused(verifying, pki, who):
    cert = pki["rogue"] if who == "rogue" else None
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        get(verifying, cert=cert)
    # Nothing was read.
    info = verifying.control().get(verifying.control_url + verifying.sid).json()
    assert info["transferred"] == 0
    # The daemon is fine and still serves good clients.
    assert get(verifying, cert=pki["client"]).status_code == 206


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_handshake_fails_without_certificate(verifying, version):
    ctx = ssl.create_default_context(cafile=verifying.cert)
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", verifying.tls_port), timeout=10) as s:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(s, server_hostname="localhost") as tls:
                # TLS 1.3: the server's verdict comes after the client's
                # handshake is done, with the first read.
                tls.sendall(f"GET /images/{verifying.sid} HTTP/1.1\r\n"
                            f"Host: x\r\n\r\n".encode())
                assert tls.recv(1024) == b""
                raise ConnectionError("closed without an answer")


def test_local_listeners_need_no_client_certificate(verifying):
    # The unix socket is for local clients; file permissions protect it.
    r = verifying.local().get(verifying.local_url + verifying.sid,
                              headers={"Range": "bytes=0-4"})
    assert r.status_code == 206


def test_verify_clients_needs_ca_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tls: {verify_clients: true}\n"
                   "listeners:\n  - {name: r, kind: tls, port: 0, apps: [images]}\n")
    r = subprocess.run([sys.executable, "-m", "imaged", "--config", str(cfg), "--check"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "tls.verify_clients" in r.stderr


# Protocol and ciphers (no client certificates).

@pytest.mark.parametrize("ciphers", [
    "AES128-SHA:AES256-SHA",               # RSA key exchange, CBC
    "AES128-GCM-SHA256:AES256-GCM-SHA384",  # no forward secrecy
    "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA",       # CBC, not AEAD
    "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384",  # CBC, not AEAD
])
def test_weak_tls_1_2_ciphers_are_refused(daemon, ciphers):
    try:
        ssl.create_default_context().set_ciphers(ciphers)
    except ssl.SSLError:
        pytest.skip(f"this OpenSSL cannot offer {ciphers}")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(daemon, ciphers)


def test_tls_1_2_negotiates_forward_secret_aead(daemon):
    version, cipher = handshake(daemon)
    assert version == "TLSv1.2"
    assert cipher.startswith(("ECDHE-", "DHE-")), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher


def test_tls_1_3(daemon):
    version, cipher = handshake(daemon, version=ssl.TLSVersion.TLSv1_3)
    assert version == "TLSv1.3"
    assert cipher.startswith("TLS_"), cipher


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_large_upload_over_each_tls_version(daemon, tmp_path, version):
    # Large bodies are decrypted in a pool thread (imaged.web.BodyReader);
    # the client writes pieces that do not match TLS records or buffers.
    size = 9 * 1024**2 + 4096
    image = tmp_path / "upload.raw"
    with open(image, "wb") as f:
        f.truncate(size)
    sid = daemon.add_session(image)
    data = os.urandom(size)
    ctx = ssl.create_default_context(cafile=daemon.cert)
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", daemon.tls_port), timeout=30) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            tls.sendall(f"PUT /images/{sid}?flush=y HTTP/1.1\r\nHost: localhost\r\n"
                        f"Content-Length: {size}\r\n\r\n".encode() + data[:1000])
            for start in range(1000, size, 100_003):
                tls.sendall(data[start:start + 100_003])
            reply = b""
            while b"\r\n\r\n" not in reply:
                piece = tls.recv(65536)
                assert piece, reply
                reply += piece
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert image.read_bytes() == data


# The key file check at start.

@pytest.mark.parametrize("mode", [0o604, 0o660, 0o666, 0o622])
def test_unsafe_key_file_is_refused(make_daemon, tmp_path, tls_files, mode):
    key = tmp_path / "key.pem"
    key.write_bytes(open(tls_files[1], "rb").read())
    key.chmod(mode)
    d = make_daemon({"tls": {"key_file": str(key)}}, start=False)
    r = subprocess.run([sys.executable, "-m", "imaged", "--config", d.config_file],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"unsafe mode {mode:04o}" in d.log()


def test_owner_only_key_file_is_accepted(make_daemon, tmp_path, tls_files):
    key = tmp_path / "key.pem"
    key.write_bytes(open(tls_files[1], "rb").read())
    key.chmod(0o400)
    d = make_daemon({"tls": {"key_file": str(key)}})
    with connect(d, "tls") as sock:
        r = raw_request(sock, b"OPTIONS /images/* HTTP/1.1")
    assert r.status == 200
