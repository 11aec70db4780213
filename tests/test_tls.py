"""
imaged.tls: the server's suite preference (AES-128-GCM first, among the
suites the system allows) and OpenSSL's read-ahead, against a real
daemon over real TLS. The protocol policy and client certificates are in
test_tls_clients.py.
"""

import os
import socket
import ssl

import pytest

from imaged import config, tls
from tests.hardening_helpers import KiB, handshake

MiB = 1024 * KiB
RECORD_BYTES = 16 * KiB


def test_clients_ask_for_aes256_first():
    # What makes the server's preference matter: a default client (like
    # curl) lists AES-256 before AES-128.
    names = [c["name"] for c in ssl.create_default_context().get_ciphers()]
    assert names.index("TLS_AES_256_GCM_SHA384") < names.index("TLS_AES_128_GCM_SHA256")


def test_tls13_prefers_aes128_gcm(daemon):
    assert handshake(daemon, version=ssl.TLSVersion.TLSv1_3) == \
        ("TLSv1.3", "TLS_AES_128_GCM_SHA256")


def test_tls12_prefers_aes128_gcm(daemon):
    version, cipher = handshake(daemon)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and cipher.endswith("AES128-GCM-SHA256"), cipher


def test_client_without_aes128_gets_what_it_asks(daemon):
    assert handshake(daemon, "ECDHE-RSA-AES256-GCM-SHA384") == \
        ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384")


def test_client_order_when_turned_off(make_daemon):
    d = make_daemon({"tls": {"prefer_aes128_gcm": False}})
    assert handshake(d, version=ssl.TLSVersion.TLSv1_3) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")


def test_preference_adds_no_suite_the_system_left_out():
    # A crypto policy without AES-128: reordering must not bring it back.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lib = tls._libssl(ctx)
    assert lib.SSL_CTX_set_ciphersuites(
        tls._ssl_ctx(ctx), b"TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384") == 1
    tls.prefer_aes128_gcm(ctx)
    suites = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert suites == ["TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_256_GCM_SHA384"]
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_server_context_settings(tls_files):
    cfg = dict(config.DEFAULTS["tls"], cert_file=tls_files[0], key_file=tls_files[1])
    ctx = tls.server_context(cfg)
    assert tls.read_ahead(ctx)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    ctx = tls.server_context(dict(cfg, read_buffer_bytes=0, prefer_aes128_gcm=False))
    assert not tls.read_ahead(ctx)
    assert ctx.get_ciphers()[0]["name"] == "TLS_AES_256_GCM_SHA384"


def read_calls(pid):
    """read() calls the process made so far, all threads (/proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["syscr"])


def put_then_get(d, image, data):
    """
    A PUT and, in the same write, a GET of what it wrote: the GET arrives
    with the PUT's last records, so with read-ahead it is in OpenSSL's
    buffer, not the socket, when the server looks for the next request.
    Returns the GET's body.
    """
    sid = d.add_session(image)
    ctx = ssl.create_default_context(cafile=d.cert)
    get = (f"GET /images/{sid} HTTP/1.1\r\nHost: localhost\r\n"
           f"Range: bytes=0-{len(data) - 1}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", d.tls_port), timeout=30) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as conn:
            conn.sendall(f"PUT /images/{sid}?flush=y HTTP/1.1\r\nHost: localhost\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n".encode() + data + get)
            f = conn.makefile("rb")
            replies = []
            for _ in range(2):
                status = f.readline()
                length = 0
                while True:
                    line = f.readline()
                    assert line, replies
                    if line == b"\r\n":
                        break
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                replies.append((status, f.read(length)))
    assert replies[0][0].startswith(b"HTTP/1.1 200"), replies[0]
    assert replies[1][0].startswith(b"HTTP/1.1 206"), replies[1][0]
    return replies[1][1]


@pytest.mark.parametrize("read_buffer_bytes", [256 * KiB, 0], ids=["read-ahead", "off"])
def test_upload_reads_and_pipelined_request(make_daemon, tmp_path, read_buffer_bytes):
    d = make_daemon({"tls": {"read_buffer_bytes": read_buffer_bytes}})
    size = 8 * MiB
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * size)
    data = os.urandom(size)
    before = read_calls(d.pid)
    assert put_then_get(d, image, data) == data
    reads = read_calls(d.pid) - before
    assert image.read_bytes() == data
    records = size // RECORD_BYTES
    print(f"{reads} read() calls for {records} TLS records")
    if read_buffer_bytes:
        # Several records per read() where the socket holds them.
        assert reads < records, reads
    else:
        # OpenSSL's default: a header, then the record.
        assert reads >= 2 * records, reads


def test_idle_connections_keep_no_read_buffer(make_daemon, tmp_path):
    # Each connection uploads a little (so read-ahead filled its buffer),
    # then stays open and idle: OpenSSL must have let go of the buffers.
    d = make_daemon({"tls": {"read_buffer_bytes": 4 * MiB}})
    image = tmp_path / "image.raw"
    image.write_bytes(b"\0" * MiB)
    sid = d.add_session(image)
    ctx = ssl.create_default_context(cafile=d.cert)
    body = os.urandom(MiB)
    conns = []

    def rss_kib():
        with open(f"/proc/{d.pid}/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])

    def upload(count):
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", d.tls_port), timeout=30)
            conn = ctx.wrap_socket(s, server_hostname="localhost")
            conns.append(conn)
            conn.sendall(f"PUT /images/{sid} HTTP/1.1\r\nHost: localhost\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")

    try:
        upload(4)               # the daemon's own buffers, once
        before = rss_kib()
        upload(20)
        grown_mib = (rss_kib() - before) / 1024
    finally:
        for conn in conns:
            conn.close()
    print(f"RSS grew {grown_mib:.1f} MiB with 20 idle connections")
    # 20 kept 4 MiB buffers would be 80 MiB.
    assert grown_mib < 16, grown_mib
