"""
imaged.outbound: the proxy role's outgoing connections, against real HTTP
servers on loopback (plain, TLS with the test certificate, a unix socket),
in this process and, as the daemon runs them, in a gevent pool thread of a
monkey-patched process.
"""

import hashlib
import http.server
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from imaged import outbound
from tests.hardening_helpers import write_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024**2
BODY = random.Random(7).randbytes(3 * MiB + 4321)


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /big: BODY; GET /small: 5 bytes; both keep the connection."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        data = BODY if self.path == "/big" else b"small"
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # In pieces, so that the client gets short reads mid-body.
        for i in range(0, len(data), 100_000):
            self.wfile.write(data[i:i + 100_000])

    def do_PUT(self):
        # Answers the body's sha256; "/slow" reads 64 KiB at a time, with a
        # pause between reads, so that the sender finds its socket full.
        slow = self.path == "/slow"
        length = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while length:
            if slow:
                time.sleep(0.005)
            chunk = self.rfile.read(min(length, 64 * 1024 if slow else MiB))
            assert chunk
            digest.update(chunk)
            length -= len(chunk)
        answer = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, family=socket.AF_INET, tls=None, rcvbuf=None):
        self.address_family = family
        self._tls = tls
        self._rcvbuf = rcvbuf
        super().__init__(address, Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self._rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_side=True)
        return sock, addr or ("local", 0)


@pytest.fixture
def serve():
    servers = []

    def start(address, family=socket.AF_INET, tls_files=None, rcvbuf=None):
        tls = None
        if tls_files:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(*tls_files)
        s = Server(address, family, tls, rcvbuf)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def get(con, path, buf):
    con.request("GET", path)
    res = con.getresponse()
    assert res.status == 200
    got = 0
    calls = 0
    with memoryview(buf) as view:
        while True:
            count = res.readinto(view[got:])
            calls += 1
            if not count:
                break
            got += count
    return bytes(buf[:got]), calls


def test_tls_body_fills_a_large_buffer_in_one_call(serve, tls_files):
    s = serve(("127.0.0.1", 0), tls_files=tls_files)
    con = outbound.connect_tcp("localhost", s.server_address[1],
                               outbound.tls_context(tls_files[0]))
    try:
        data, calls = get(con, "/big", bytearray(8 * MiB))
        assert data == BODY
        # One readinto() for the whole body, one more to see its end,
        # although the server wrote it in 100 KB pieces.
        assert calls == 2
        # The connection is kept: a short answer next does not wait for
        # bytes that are not coming.
        data, _ = get(con, "/small", bytearray(64))
        assert data == b"small"
        assert con.is_local()
    finally:
        con.close()


def put(con, path, body):
    con.request("PUT", path, body=body)
    res = con.getresponse()
    assert res.status == 200
    return res.read().decode()


@pytest.mark.parametrize("write_buffer_bytes", [256 * 1024, 0], ids=["write-buffer", "off"])
def test_tls_body_writes(serve, tls_files, write_buffer_bytes):
    s = serve(("127.0.0.1", 0), tls_files=tls_files)
    body = random.Random(8).randbytes(8 * MiB)
    con = outbound.connect_tcp("localhost", s.server_address[1],
                               outbound.tls_context(tls_files[0], write_buffer_bytes))
    try:
        con.connect()
        before = write_calls("self")
        # Twice: the second send takes the buffer the first one left.
        for _ in range(2):
            assert put(con, "/put", body) == hashlib.sha256(body).hexdigest()
        writes = write_calls("self") - before
        # The connection goes on: nothing stayed behind in a buffer.
        assert put(con, "/put", b"tail") == hashlib.sha256(b"tail").hexdigest()
    finally:
        con.close()
    records = 2 * len(body) // (16 * 1024)
    print(f"{writes} write() calls for {records} TLS records")
    if write_buffer_bytes:
        assert writes < records // 8, writes
    else:
        assert writes >= records, writes


@pytest.mark.parametrize("size", [900 * 1024, 4 * MiB + 123], ids=["in-buffer", "larger"])
def test_tls_body_to_a_slow_reader(serve, tls_files, size):
    # Small socket buffers and a server that reads slowly, so the socket is
    # full when a write comes: a body smaller than the write buffer leaves
    # only when it is flushed, and that must wait for room; a larger one
    # waits in OpenSSL's writes too.
    s = serve(("127.0.0.1", 0), tls_files=tls_files, rcvbuf=32 * 1024)
    body = random.Random(9).randbytes(size)
    con = outbound.connect_tcp("localhost", s.server_address[1],
                               outbound.tls_context(tls_files[0], 1024 * 1024), timeout_s=20)
    try:
        con.connect()
        con.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        assert put(con, "/slow", body) == hashlib.sha256(body).hexdigest()
    finally:
        con.close()


def test_tls_context_verifies():
    ctx = outbound.tls_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname


def test_untrusted_certificate_is_refused(serve, tls_files, tmp_path):
    s = serve(("127.0.0.1", 0), tls_files=tls_files)
    # The system CAs do not know the test certificate.
    con = outbound.connect_tcp("localhost", s.server_address[1], outbound.tls_context())
    with pytest.raises(outbound.CertificateError):
        con.request("GET", "/small")
    con.close()


def test_host_name_is_checked(serve, tls_files):
    # The certificate names localhost and 127.0.0.1, not 127.0.0.2.
    s = serve(("127.0.0.2", 0), tls_files=tls_files)
    con = outbound.connect_tcp("127.0.0.2", s.server_address[1],
                               outbound.tls_context(tls_files[0]))
    with pytest.raises(outbound.CertificateError):
        con.request("GET", "/small")
    con.close()


def test_plain_tcp_and_is_local(serve):
    s = serve(("127.0.0.2", 0))
    con = outbound.connect_tcp("127.0.0.2", s.server_address[1])
    try:
        data, calls = get(con, "/big", bytearray(4 * MiB))
        assert data == BODY and calls == 2
        # 127.0.0.1 to 127.0.0.2: two addresses, taken for two machines
        # (the rule ovirt-imageio's proxy uses to pick the unix socket).
        assert not con.is_local()
    finally:
        con.close()


def test_unix_socket(serve, tmp_path):
    path = str(tmp_path / "http.sock")
    serve(path, family=socket.AF_UNIX)
    con = outbound.connect_unix(path, timeout_s=10)
    try:
        data, calls = get(con, "/big", bytearray(4 * MiB))
        assert data == BODY and calls == 2
        assert con.is_local()
    finally:
        con.close()


def test_timeout(tmp_path):
    # A server that accepts and never answers.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    con = outbound.connect_tcp("127.0.0.1", listener.getsockname()[1], timeout_s=0.2)
    try:
        con.request("GET", "/small")
        with pytest.raises(outbound.Timeout):
            con.getresponse()
    finally:
        con.close()
        listener.close()


def test_connection_refused():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    con = outbound.connect_tcp("127.0.0.1", number, connect_timeout_s=2)
    with pytest.raises(ConnectionRefusedError):
        con.request("GET", "/small")
    con.close()


MONKEY_PATCHED = """
import sys
from gevent import monkey
monkey.patch_all()
import gevent
from imaged import outbound

def fetch(port, ca):
    con = outbound.connect_tcp("localhost", port, outbound.tls_context(ca))
    con.request("GET", "/big")
    res = con.getresponse()
    buf = bytearray(8 * 1024**2)
    n = res.readinto(buf)
    con.close()
    return bytes(buf[:n])

data = gevent.get_hub().threadpool.apply(fetch, (int(sys.argv[1]), sys.argv[2]))
sys.stdout.buffer.write(data)
"""


def test_in_a_pool_thread_of_a_monkey_patched_process(serve, tls_files):
    """The daemon's case: gevent patched the stdlib, the backend runs in a
    pool thread; the blocking TLS connection must work there."""
    s = serve(("127.0.0.1", 0), tls_files=tls_files)
    p = subprocess.run([sys.executable, "-c", MONKEY_PATCHED, str(s.server_address[1]),
                        tls_files[0]], cwd=ROOT, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == BODY
