"""
Shared fixtures: test certificates, a real imaged daemon subprocess with a
temporary config, and HTTP sessions for its sockets.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import requests
import yaml

from tests.unixhttp import UnixAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds to wait for the daemon to start or stop.
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 20


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


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A running imaged subprocess and ways to talk to it."""

    def __init__(self, tmp_path, tls_files, overrides=None):
        self.dir = tmp_path
        self.cert, self.key = tls_files
        # Unix socket paths are limited to 107 bytes: keep them short.
        self.sock_dir = tempfile.mkdtemp(prefix="imaged-", dir="/tmp")
        self.control_path = os.path.join(self.sock_dir, "control.sock")
        self.local_path = os.path.join(self.sock_dir, "images.sock")
        self.tls_port = free_port()
        self.tcp_port = free_port()
        self.log_file = str(tmp_path / "imaged.log")
        cfg = {
            "tls": {"cert_file": self.cert, "key_file": self.key},
            "listeners": [
                {"name": "remote", "kind": "tls", "host": "127.0.0.1",
                 "port": self.tls_port, "apps": ["images"]},
                {"name": "plain", "kind": "tcp", "host": "127.0.0.1",
                 "port": self.tcp_port, "apps": ["images"]},
                {"name": "local", "kind": "unix", "path": self.local_path,
                 "apps": ["images"]},
                {"name": "control", "kind": "unix", "path": self.control_path,
                 "apps": ["sessions", "progress"]},
            ],
            "sessions": {"reaper_interval_s": 0.1},
            "logging": {"level": "DEBUG", "file": self.log_file},
        }
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        self.config_file = str(tmp_path / "imaged.yaml")
        with open(self.config_file, "w") as f:
            yaml.safe_dump(cfg, f)
        self.proc = None
        self.notifications = []
        self._http = []

    def start(self):
        notify_path = os.path.join(self.sock_dir, "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(START_TIMEOUT_S)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imaged", "--config", self.config_file],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._notify = notify
        try:
            self.wait_notification("READY=1")
        except Exception:
            self.stop()
            raise AssertionError(f"imaged did not start:\n{self.log()}")
        return self

    def wait_notification(self, state):
        deadline = time.monotonic() + START_TIMEOUT_S
        while state not in self.notifications:
            self._notify.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                self.notifications.append(self._notify.recv(4096).decode())
            except socket.timeout:
                raise AssertionError(f"no {state} from imaged") from None

    def stop(self, sig=signal.SIGTERM):
        """Stop the daemon; returns its exit code."""
        for s in self._http:
            s.close()
        if self.proc is None:
            return None
        if self.proc.stdout.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output = self.proc.stdout.read().decode(errors="replace")
        self.proc.stdout.close()
        self._notify.setblocking(False)
        while True:
            try:
                self.notifications.append(self._notify.recv(4096).decode())
            except BlockingIOError:
                break
        self._notify.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        return self.proc.returncode

    def log(self):
        try:
            with open(self.log_file) as f:
                return f.read()
        except FileNotFoundError:
            return ""

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
