"""
Shared fixtures: test certificates, a real imaged daemon subprocess with a
temporary config, and HTTP sessions for its sockets.
"""

import json
import os
import shutil
import signal
import uuid

import pytest
import requests

from imaged import testing
from imaged.testing import free_port  # noqa: F401 (tests import it from here)
from tests.unixhttp import UnixAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the tests' daemons add to imaged.testing's base config: a fast
# reaper (expiry tests poll for it) and everything logged.
TEST_CONFIG = {
    "sessions": {"reaper_interval_s": 0.1},
    "logging": {"level": "DEBUG"},
    # GET /metrics next to the control API, as the shipped config has it.
    "listeners": {"control": {"apps": ["sessions", "progress", "metrics"]}},
}


def needs_tool(name):
    return pytest.mark.skipif(shutil.which(name) is None,
                              reason=f"{name} is not installed (make sysdeps installs it)")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate for localhost: (cert_file, key_file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (make sysdeps installs it)")
    from imaged import lab
    d = tmp_path_factory.mktemp("pki")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    lab.ensure_certificate(cert, key)
    return cert, key


class Daemon(testing.Daemon):
    """
    A running imaged subprocess (imaged.testing.Daemon) and ways to talk
    to it. `overrides` merge over the test config: mappings key by key,
    and `{"listeners": {"local": {...}, "plain": None}}` changes or drops
    one listener by name.
    """

    def __init__(self, tmp_path, tls_files, overrides=None):
        cert, key = tls_files
        super().__init__(tmp_path, cert, key,
                         overrides=testing.merge(TEST_CONFIG, overrides))
        self._http = []

    def stop(self, sig=signal.SIGTERM):
        """Stop the daemon; returns its exit code."""
        for s in self._http:
            s.close()
        return super().stop(sig)

    # HTTP access.

    def control(self):
        """A requests session for the control socket: base http+unix://imaged"""
        s = requests.Session()
        s.mount("http+unix://", UnixAdapter(self.control_path))
        self._http.append(s)
        return s

    def local(self):
        s = requests.Session()
        s.mount("http+unix://", UnixAdapter(self.local_path))
        self._http.append(s)
        return s

    def https(self):
        s = requests.Session()
        s.verify = self.cert
        # Otherwise REQUESTS_CA_BUNDLE from the environment wins over
        # s.verify, and proxies from the environment apply.
        s.trust_env = False
        self._http.append(s)
        return s

    control_url = "http+unix://imaged/sessions/"
    local_url = "http+unix://imaged/images/"

    @property
    def tls_url(self):
        return f"https://localhost:{self.tls_port}/images/"

    @property
    def tcp_url(self):
        return f"http://127.0.0.1:{self.tcp_port}/images/"

    def add_session(self, path, size=None, ops=("read", "write"), timeout=300, **extra):
        """Add a session for `path`; returns its id."""
        sid = str(uuid.uuid4())
        body = {"url": f"file://{path}",
                "size": os.path.getsize(path) if size is None else size,
                "ops": list(ops), "timeout": timeout}
        body.update(extra)
        with self.control() as c:
            r = c.put(self.control_url + sid, data=json.dumps(body))
        assert r.status_code == 200, r.text
        return sid


@pytest.fixture
def make_daemon(tmp_path, tls_files):
    """Factory: make_daemon(overrides) -> started Daemon; stopped at the end."""
    daemons = []

    def make(overrides=None, start=True):
        d_dir = tmp_path / f"d{len(daemons)}"
        d_dir.mkdir()
        d = Daemon(d_dir, tls_files, overrides)
        daemons.append(d)
        return d.start() if start else d

    yield make
    for d in daemons:
        d.stop()


@pytest.fixture
def daemon(make_daemon):
    """A started imaged with TLS, plain TCP, local and control listeners."""
    return make_daemon()


# The proxy role (SPEC §9): a host daemon and a proxy daemon in front of it,
# shared by the modules that test it (tests/test_proxy.py, the lab page in
# a browser, the proxy in front of ovirt-imageio's host).

@pytest.fixture(scope="module")
def engine_key():
    """The engine's signing key, whose public half the proxy trusts."""
    from tests import token_helpers
    return token_helpers.generate("EdDSA")


@pytest.fixture(scope="module")
def host(tmp_path_factory, tls_files):
    """
    The host daemon: limits of its own (max_writers 3, max_readers 5), so
    that a test can tell the host's OPTIONS from the proxy's, and the lab
    page on its plain listener.
    """
    d = Daemon(tmp_path_factory.mktemp("host"), tls_files, {
        "images": {"max_writers": 3, "max_readers": 5},
        "listeners": {"plain": {"apps": ["images", "ui"]}},
    })
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, tls_files, engine_key):
    """
    The proxy daemon: trusts the test certificate and `engine_key`'s
    tokens, and relays over TLS even to this machine (the second leg is
    real HTTPS too).
    """
    from tests import token_helpers
    d = Daemon(tmp_path_factory.mktemp("proxy"), tls_files, {
        "proxy": {"ca_file": tls_files[0], "use_unix_socket": False},
        "tokens": {"public_keys": [token_helpers.public_pem(engine_key)]},
    })
    d.start()
    yield d
    d.stop()
