"""
imaged.tls: the server's suite preference (AES-128-GCM first, among the
suites the system allows), OpenSSL's read-ahead and the write buffer,
against a real daemon over real TLS. The protocol policy and client certificates are in
test_tls_clients.py.
"""

import os
import socket
import ctypes
import ssl
import threading
import time

import pytest

from imaged import config, tls
from tests.hardening_helpers import KiB, handshake, read_calls, write_calls

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
    assert tls.write_buffer_bytes(ctx) == 256 * KiB
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    ctx = tls.server_context(dict(cfg, read_buffer_bytes=0, prefer_aes128_gcm=False,
                                  write_buffer_bytes=0))
    assert not tls.read_ahead(ctx)
    assert tls.write_buffer_bytes(ctx) == 0
    assert ctx.get_ciphers()[0]["name"] == "TLS_AES_256_GCM_SHA384"


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


def test_read_buffer_keeps_what_follows_a_body(tls_files):
    # tls.ReadBuffer under a request body, on a real TLS connection: the
    # body arrives whole; the client's next request, read into the buffer
    # with the body's last records, keeps the buffer in place until it is
    # read; then the connection is back on OpenSSL's read-ahead.
    cfg = dict(config.DEFAULTS["tls"], cert_file=tls_files[0], key_file=tls_files[1])
    server_ctx = tls.server_context(cfg)
    client_ctx = ssl.create_default_context(cafile=tls_files[0])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        b = socket.create_connection(listener.getsockname(), timeout=30)
        a, _ = listener.accept()
    a.settimeout(30)
    clients = []
    t = threading.Thread(target=lambda: clients.append(
        client_ctx.wrap_socket(b, server_hostname="localhost")))
    t.start()
    server = server_ctx.wrap_socket(a, server_side=True)
    t.join()
    client, = clients
    lib = tls._lib
    lib.SSL_get_read_ahead.restype = ctypes.c_int
    lib.SSL_get_read_ahead.argtypes = [ctypes.c_void_p]
    conn = server._sslobj
    ssl_ptr = tls._ssl_of(conn)
    try:
        body = os.urandom(64 * KiB)
        # Records the body's reads take in with it: all of it fits in the
        # socket before the server reads.
        client.sendall(body)
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        rb = tls.ReadBuffer.attach(conn)
        assert rb is not None
        assert lib.SSL_get_rbio(ssl_ptr) != lib.SSL_get_wbio(ssl_ptr)
        assert lib.SSL_get_read_ahead(ssl_ptr) == 0
        got = bytearray()
        while len(got) < len(body):
            got += conn.read(len(body) - len(got))
        assert got == body
        assert not rb.detach()
        assert lib.SSL_get_rbio(ssl_ptr) != lib.SSL_get_wbio(ssl_ptr)
        assert conn.read(100) == b"GET / HTTP/1.1\r\n\r\n"
        assert rb.detach()
        assert lib.SSL_get_rbio(ssl_ptr) == lib.SSL_get_wbio(ssl_ptr)
        assert lib.SSL_get_read_ahead(ssl_ptr) == 1
        # The connection goes on as before: both ways.
        client.sendall(b"more")
        assert server.recv(10) == b"more"
        server.sendall(b"answer")
        assert client.recv(10) == b"answer"
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("write_buffer_bytes,lowat,records_per_write", [
    (256 * KiB, 0, 8),
    # TCP_NOTSENT_LOWAT (server.tcp_notsent_lowat_bytes) lets the kernel
    # take only part of a 256 KiB write while the client catches up (on
    # loopback 2.7-5.8 records per write()).
    (256 * KiB, config.DEFAULTS["server"]["tcp_notsent_lowat_bytes"], 2),
    (0, 0, None),
], ids=["write-buffer", "write-buffer-lowat", "off"])
def test_download_writes(make_daemon, tmp_path, write_buffer_bytes, lowat, records_per_write):
    d = make_daemon({"tls": {"write_buffer_bytes": write_buffer_bytes},
                     "server": {"tcp_notsent_lowat_bytes": lowat}})
    size = 8 * MiB
    data = os.urandom(size)
    image = tmp_path / "image.raw"
    image.write_bytes(data)
    sid = d.add_session(image)
    ctx = ssl.create_default_context(cafile=d.cert)
    with socket.create_connection(("127.0.0.1", d.tls_port), timeout=30) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as conn:
            f = conn.makefile("rb")
            got = []
            before = write_calls(d.pid)
            # Twice on one connection: nothing of the first answer may stay
            # behind in a buffer, and the second is served the same way.
            for _ in range(2):
                conn.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                assert f.readline().startswith(b"HTTP/1.1 200")
                while f.readline() != b"\r\n":
                    pass
                got.append(f.read(size))
            writes = write_calls(d.pid) - before
    assert got == [data, data]
    records = 2 * size // RECORD_BYTES
    print(f"{writes} write() calls for {records} TLS records")
    if write_buffer_bytes:
        # 16 records per 256 KiB; a few writes for the heads and the log.
        assert writes < records // records_per_write, writes
    else:
        assert writes >= records, writes


def test_idle_connections_keep_no_buffer(make_daemon, tmp_path):
    # Each connection uploads and downloads a little (so read-ahead and the
    # write buffer were used), then stays open and idle: OpenSSL must have
    # let go of the buffers.
    d = make_daemon({"tls": {"read_buffer_bytes": 4 * MiB, "write_buffer_bytes": 4 * MiB}})
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
            f = conn.makefile("rb")
            assert f.readline().startswith(b"HTTP/1.1 200")
            while f.readline() != b"\r\n":
                pass
            conn.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            assert f.readline().startswith(b"HTTP/1.1 200")
            while f.readline() != b"\r\n":
                pass
            assert f.read(len(body)) == body

    try:
        upload(4)               # the daemon's own buffers, once
        before = rss_kib()
        upload(20)
        grown_mib = (rss_kib() - before) / 1024
    finally:
        for conn in conns:
            conn.close()
    print(f"RSS grew {grown_mib:.1f} MiB with 20 idle connections")
    # 20 kept 4 MiB buffers would be 80 MiB, twice that with both kinds.
    assert grown_mib < 16, grown_mib


def test_download_to_a_slow_reader(make_daemon, tmp_path):
    # The daemon sends 8 MiB pieces, which fit in a 16 MiB write buffer
    # whole and so leave only when it is flushed; the kernel takes at most
    # 4 MiB (net.ipv4.tcp_wmem), and the client reads slowly through a
    # small receive buffer, so the flush waits for room again and again.
    d = make_daemon({"tls": {"write_buffer_bytes": 16 * MiB}})
    data = os.urandom(10 * MiB)
    image = tmp_path / "image.raw"
    image.write_bytes(data)
    sid = d.add_session(image)
    ctx = ssl.create_default_context(cafile=d.cert)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
    s.settimeout(30)
    s.connect(("127.0.0.1", d.tls_port))
    with ctx.wrap_socket(s, server_hostname="localhost") as conn:
        conn.sendall(f"GET /images/{sid} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        reply = b""
        while len(reply) < len(data) or b"\r\n\r\n" not in reply:
            chunk = conn.recv(64 * KiB)
            assert chunk, reply[:200]
            reply += chunk
            time.sleep(0.001)
        head, _, body = reply.partition(b"\r\n\r\n")
        while len(body) < len(data):
            body += conn.recv(len(data) - len(body))
    assert head.startswith(b"HTTP/1.1 200")
    assert body == data
