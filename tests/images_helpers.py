"""
Helpers for the images API tests: image files, clients for every transport
of a test daemon (see tests.conftest.Daemon), curl, and polling.
"""

import contextlib
import http.client
import os
import socket
import ssl
import subprocess
import time

import pytest
import requests

from tests.unixhttp import UnixAdapter

KiB = 1024
MiB = 1024**2
GiB = 1024**3

# Seconds a test waits for something that should happen at once.
WAIT_S = 10


# Image files.

def make_sparse(path, size, data=()):
    """
    Create a sparse image of `size` bytes with `data` = [(offset, bytes)]
    written into it; returns the expected content as a bytearray when the
    image is small enough to mirror (None otherwise).
    """
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in data:
            f.seek(offset)
            f.write(chunk)
    if size > 256 * MiB:
        return None
    content = bytearray(size)
    for offset, chunk in data:
        content[offset:offset + len(chunk)] = chunk
    return content


def make_allocated(path, size, seed=0):
    """
    Create a fully allocated image of `size` bytes of pseudo random data
    (every block written, no holes); returns its content.
    """
    content = random_bytes(size, seed)
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    return content


def random_bytes(size, seed=0):
    """Reproducible, incompressible bytes (fast for many MiB)."""
    import random
    return bytearray(random.Random(seed).randbytes(size))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def local_checksum(data, block_size=4 * MiB, algorithm="blake2b"):
    """
    The block checksum of `data`, computed here with hashlib alone (not with
    imaged.blkhash), from the algorithm's description in the spec.
    """
    import hashlib

    def new(d=b""):
        if algorithm.startswith("blake2"):
            return hashlib.new(algorithm, d, digest_size=32)
        return hashlib.new(algorithm, d)

    outer = new()
    view = memoryview(data)
    for start in range(0, len(view), block_size):
        outer.update(new(view[start:start + block_size]).digest())
    return outer.hexdigest()


# Daemons.

def start_daemon(tmp_path, tls_files, overrides=None, drop_listeners=()):
    """
    Start a tests.conftest.Daemon, optionally without some of its
    listeners (by name); the caller stops it.
    """
    from tests.conftest import Daemon
    from imaged.testing import merge
    drop = {"listeners": {name: None for name in drop_listeners}}
    return Daemon(tmp_path, tls_files, merge(overrides or {}, drop)).start()


class Transport:
    """
    How a test reaches the images app of a daemon.

    Every client made here is closed by close_all() (the autouse fixture
    `close_clients` calls it after each test), so idle keep-alive
    connections do not pile up in a daemon shared by many tests.
    """

    _clients = []

    def __init__(self, daemon, name):
        self.daemon = daemon
        self.name = name

    def __repr__(self):
        return self.name

    @classmethod
    def close_all(cls):
        clients, cls._clients = cls._clients, []
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()

    def session(self):
        """A requests session to use with url()."""
        s = requests.Session()
        # Otherwise REQUESTS_CA_BUNDLE from the environment wins over
        # s.verify, and proxies from the environment apply.
        s.trust_env = False
        if self.name == "unix":
            s.mount("http+unix://", UnixAdapter(self.daemon.local_path))
        else:
            s.verify = self.daemon.cert
        self._clients.append(s)
        return s

    def url(self, sid, suffix=""):
        base = {"tls": self.daemon.tls_url, "tcp": self.daemon.tcp_url,
                "unix": self.daemon.local_url}[self.name]
        return base + sid + suffix

    def connection(self, timeout=WAIT_S):
        """A new http.client connection, for requests that requests cannot send."""
        if self.name == "tls":
            ctx = ssl.create_default_context(cafile=self.daemon.cert)
            con = http.client.HTTPSConnection(
                "localhost", self.daemon.tls_port, context=ctx, timeout=timeout)
        elif self.name == "tcp":
            con = http.client.HTTPConnection(
                "127.0.0.1", self.daemon.tcp_port, timeout=timeout)
        else:
            con = UnixHTTPConnection(self.daemon.local_path, timeout=timeout)
        self._clients.append(con)
        return con

    def path(self, sid, suffix=""):
        return "/images/" + sid + suffix

    def curl_args(self, sid, suffix=""):
        """curl arguments reaching the image of session `sid`."""
        # No proxy from the environment: the daemon is local.
        if self.name == "tls":
            return ["--noproxy", "*", "--cacert", self.daemon.cert,
                    f"https://localhost:{self.daemon.tls_port}/images/{sid}{suffix}"]
        if self.name == "tcp":
            return ["--noproxy", "*", self.url(sid, suffix)]
        return ["--noproxy", "*", "--unix-socket", self.daemon.local_path,
                f"http://localhost/images/{sid}{suffix}"]


TRANSPORTS = ("tls", "tcp", "unix")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=WAIT_S):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


# Control socket.

def control(daemon):
    """One requests session per daemon for its control socket (closed by
    daemon.stop())."""
    s = getattr(daemon, "_helpers_control", None)
    if s is None:
        s = daemon._helpers_control = daemon.control()
    return s


def session_status(daemon, sid):
    """The status of GET /sessions/{id}: 200, or 404 once removed."""
    return control(daemon).get(daemon.control_url + sid).status_code


def progress(daemon, sid=None):
    url = "http+unix://imaged/progress" + (f"/{sid}" if sid else "")
    r = control(daemon).get(url)
    assert r.status_code == 200, r.text
    return r.json()


def delete_session(daemon, sid):
    """DELETE the session; returns (status, seconds taken)."""
    start = time.monotonic()
    r = control(daemon).delete(daemon.control_url + sid, timeout=60)
    return r.status_code, time.monotonic() - start


@pytest.fixture(autouse=True)
def close_clients():
    """Close the clients a test made (import into a test module to use)."""
    yield
    Transport.close_all()


# Polling.

def wait_for(predicate, timeout=WAIT_S, interval=0.02, message="condition"):
    """Poll `predicate` until it returns a true value; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


# curl.

def curl(*args, check=True, timeout=60):
    """
    Run curl; returns (http status, body bytes). `-s -S` keep it quiet but
    report failures; the status comes from --write-out on stderr.
    """
    cmd = ["curl", "-sS", "--write-out", "%{stderr}%{http_code}", *args]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    err = p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise AssertionError(f"curl failed ({p.returncode}): {err}")
    status = err.strip().splitlines()[-1] if err.strip() else "000"
    return int(status[-3:]), p.stdout
