"""
End-to-end tests of the daemon core: a real imaged subprocess, its real
sockets, TLS and signals.
"""

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import warnings

import pytest
import requests
import yaml

from tests.conftest import ROOT


def wait_until(predicate, timeout=10, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(1024 * 1024))
    return str(path)


def session_body(image, **kw):
    body = {"url": f"file://{image}", "size": os.path.getsize(image),
            "ops": ["read", "write"], "timeout": 300}
    body.update(kw)
    return json.dumps(body)


def test_ready_notification_and_socket_modes(daemon):
    assert "READY=1" in daemon.notifications
    st = os.stat(daemon.control_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_control_api_over_unix_socket(daemon, image):
    c = daemon.control()
    url = daemon.control_url + "s-1"
    r = c.put(url, data=session_body(image, transfer_id="t-1"))
    assert r.status_code == 200
    r = c.get(url)
    assert r.status_code == 200
    info = r.json()
    assert info["uuid"] == "s-1"
    assert info["transfer_id"] == "t-1"
    assert info["ops"] == ["read", "write"]
    assert info["expires"] <= time.monotonic() + 300 + 1
    assert info["canceled"] is False
    # Idempotent add, conflicting re-add.
    assert c.put(url, data=session_body(image, transfer_id="t-1")).status_code == 200
    assert c.put(url, data=session_body(image, size=1)).status_code == 409
    # Extend.
    old = info["expires"]
    assert c.patch(url, data=json.dumps({"timeout": 3000})).status_code == 200
    assert c.get(url).json()["expires"] > old + 2000
    # The alias.
    assert c.get("http+unix://imaged/tickets/s-1").json()["uuid"] == "s-1"
    # Bad bodies.
    r = c.put(daemon.control_url + "s-2", data=session_body(image, size="big"))
    assert r.status_code == 400 and "size" in r.text
    r = c.put(daemon.control_url + "s-2", data="not json")
    assert r.status_code == 400
    # Delete, twice.
    assert c.delete(url).status_code == 204
    assert c.delete(url).status_code == 204
    assert c.get(url).status_code == 404


def test_session_gives_image_access_over_tls(daemon, image):
    sid = daemon.add_session(image)
    r = daemon.https().get(daemon.tls_url + sid)
    assert r.status_code == 200
    with open(image, "rb") as f:
        assert r.content == f.read()


def test_expiry_by_the_reaper(daemon, image):
    c = daemon.control()
    url = daemon.control_url + "short"
    assert c.put(url, data=session_body(image, timeout=1)).status_code == 200
    assert c.get(url).status_code == 200
    assert wait_until(lambda: c.get(url).status_code == 404, timeout=10)
    r = daemon.https().get(daemon.tls_url + "short")
    assert r.status_code == 403


def test_extend_keeps_the_session(daemon, image):
    c = daemon.control()
    url = daemon.control_url + "ext"
    assert c.put(url, data=session_body(image, timeout=1)).status_code == 200
    assert c.patch(url, data=json.dumps({"timeout": 60})).status_code == 200
    time.sleep(1.5)
    assert c.get(url).status_code == 200


def test_delete_all(daemon, image):
    c = daemon.control()
    for sid in ("a", "b", "c"):
        assert c.put(daemon.control_url + sid, data=session_body(image)).status_code == 200
    assert c.delete(daemon.control_url).status_code == 204
    assert c.get("http+unix://imaged/progress").json() == []


def test_control_api_is_not_on_the_images_listener(daemon, image):
    r = daemon.https().put(daemon.tls_url.replace("/images/", "/sessions/") + "x",
                           data=session_body(image))
    assert r.status_code == 404


def test_tls_refuses_tls_1_1(daemon):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with socket.create_connection(("127.0.0.1", daemon.tls_port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(s) as tls:
                tls.do_handshake()


def test_tls_1_2_works(daemon):
    ctx = ssl.create_default_context(cafile=daemon.cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", daemon.tls_port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"


def test_sigterm_exits_0_and_removes_sockets(daemon):
    assert os.path.exists(daemon.control_path)
    assert daemon.stop(signal.SIGTERM) == 0
    assert "STOPPING=1" in daemon.notifications
    assert not os.path.exists(daemon.control_path)
    assert not os.path.exists(daemon.local_path)


def test_sigint_exits_0(daemon):
    daemon.wait_notification("READY=1")
    daemon.proc.send_signal(signal.SIGINT)
    daemon.wait_notification("STOPPING=1")
    assert daemon.proc.wait(20) == 0


def test_stale_socket_is_replaced(make_daemon):
    d = make_daemon(start=False)
    # A socket file left by a daemon that was killed.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(d.control_path)
    s.close()
    assert os.path.exists(d.control_path)
    d.start()
    r = d.control().get("http+unix://imaged/progress")
    assert r.status_code == 200


def test_logs_never_show_session_ids(daemon, image):
    sid = "secret-" + "9" * 30
    c = daemon.control()
    assert c.put(daemon.control_url + sid, data=session_body(image)).status_code == 200
    daemon.https().get(daemon.tls_url + sid)
    daemon.https().get(daemon.tls_url + sid + "-unknown")
    c.delete(daemon.control_url + sid)
    daemon.stop()
    log = daemon.log() + daemon.output
    assert "session secret-9..." in log or "secret-9" in log
    assert sid not in log


def run_imaged(*args):
    return subprocess.run([sys.executable, "-m", "imaged", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_bad_config_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listeners:\n  - {name: r, kind: tls, port: abc, apps: [images]}\n")
    r = run_imaged("--config", str(cfg))
    assert r.returncode == 2
    assert "listeners[0].port: expected an integer 0-65535, got 'abc'" in r.stderr


def test_check_mode(tmp_path):
    r = run_imaged("--config", os.path.join(ROOT, "config", "imaged.yaml"), "--check")
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("logging: {level: LOUD}\nlisteners: []\n")
    assert run_imaged("--config", str(cfg), "--check").returncode == 2


def test_version():
    r = run_imaged("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("imaged ")


def test_entry_script(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "imaged.py"), "--version"],
                       capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imaged ")


def test_port_in_use_exits_1(make_daemon):
    d = make_daemon(start=False)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", d.tls_port))
        s.listen()
        r = run_imaged("--config", d.config_file)
    assert r.returncode == 1
    assert not os.path.exists(d.control_path)


def test_unreachable_control_on_tcp_without_opt_in(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listeners:\n  - {name: c, kind: tcp, host: '0.0.0.0', port: 1, "
                   "apps: [sessions]}\n")
    r = run_imaged("--config", str(cfg), "--check")
    assert r.returncode == 2
    assert "allow_remote_control" in r.stderr


def test_control_body_cap_over_socket(daemon, image):
    big = session_body(image, transfer_id="x" * 200000)
    r = daemon.control().put(daemon.control_url + "big", data=big)
    assert r.status_code == 413


def test_plain_tcp_listener_logs_a_warning(daemon):
    assert "plain TCP without TLS" in daemon.log()


def test_requests_against_many_connections(daemon, image):
    sid = daemon.add_session(image)
    sessions = [daemon.https() for _ in range(10)]
    for s in sessions:
        assert s.get(daemon.tls_url + sid, headers={"Range": "bytes=0-9"}).status_code == 206
    info = daemon.control().get(daemon.control_url + sid).json()
    assert info["connections"] == 10
    for s in sessions:
        s.close()
    assert wait_until(lambda: daemon.control().get(
        daemon.control_url + sid).json()["connections"] == 0)


def test_world_readable_key_is_refused(make_daemon, tmp_path, tls_files):
    key = tmp_path / "open-key.pem"
    key.write_bytes(open(tls_files[1], "rb").read())
    key.chmod(0o644)
    d = make_daemon({"tls": {"key_file": str(key)}}, start=False)
    r = run_imaged("--config", d.config_file)
    assert r.returncode == 1
    assert "unsafe mode 0644" in d.log()
    key.chmod(0o640)
    # Group-readable is fine (the imaged group may read it).
    d.start()


def test_slow_headers_are_dropped(make_daemon):
    d = make_daemon({"server": {"header_timeout_s": 1.0}})
    with socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"GET /images/x HTTP/1.1\r\n")
        # Drip a header byte now and then, faster than any idle timeout.
        try:
            for c in b"X-Slow: 1234567890":
                s.sendall(bytes([c]))
                time.sleep(0.2)
            data = s.recv(1024)
        except ConnectionError:
            data = b""
        elapsed = time.monotonic() - start
    assert data == b"" or data.startswith(b"HTTP/1.1 400")
    assert elapsed < 8


def test_idle_connection_is_dropped(make_daemon):
    d = make_daemon({"images": {"inactivity_timeout_s": 1}})
    with socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10) as s:
        start = time.monotonic()
        assert s.recv(1024) == b""
        assert time.monotonic() - start < 8


def test_show_config_prints_the_merged_config(tmp_path):
    main = tmp_path / "imaged.yaml"
    with open(os.path.join(ROOT, "config", "imaged.yaml")) as f:
        main.write_text(f.read())
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "50-vdsm.yaml").write_text("images: {allowed_dirs: [/rhev/data-center]}\n")
    (drop / "90-admin.yaml").write_text("logging: {level: debug}\n")
    r = run_imaged("--config", str(main), "--config-dir", str(drop), "--show-config")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["images"]["allowed_dirs"] == ["/rhev/data-center"]
    assert shown["logging"]["level"] == "DEBUG"
    assert shown["images"]["max_readers"] == 8          # a default, shown too
    assert [lst["name"] for lst in shown["listeners"]] == ["remote", "local", "control"]
    # Without --config-dir: conf.d next to the file, here missing.
    r = run_imaged("--config", str(main), "--show-config")
    assert yaml.safe_load(r.stdout)["images"]["allowed_dirs"] == []


def test_bad_drop_in_exits_2_naming_file_and_key(tmp_path):
    main = tmp_path / "imaged.yaml"
    main.write_text("listeners:\n  - {name: c, kind: unix, path: /tmp/c.sock, apps: [sessions]}\n")
    (tmp_path / "conf.d").mkdir()
    bad = tmp_path / "conf.d" / "50-vdsm.yaml"
    bad.write_text("images: {max_readers: lots}\n")
    for extra in ([], ["--check"], ["--show-config"]):
        r = run_imaged("--config", str(main), *extra)
        assert r.returncode == 2
        assert f"{bad}: images.max_readers: expected an integer" in r.stderr, r.stderr


def test_daemon_applies_drop_ins(make_daemon, image):
    d = make_daemon(start=False)
    (d.dir / "conf.d").mkdir()
    (d.dir / "conf.d" / "50-limits.yaml").write_text(
        "sessions: {max_body_bytes: 1024}\n")
    d.start()
    r = d.control().put(d.control_url + "s-1", data=session_body(image, transfer_id="x" * 2000))
    assert r.status_code == 413
