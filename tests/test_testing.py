"""
imaged.testing: the throwaway daemon that tests, tools/load.py and
bench/bench.py share.
"""

import os
import socket
import time

import pytest
import requests

from imaged import testing
from tests.unixhttp import UnixAdapter

BASE = {
    "images": {"max_readers": 8, "allowed_dirs": ["/a"]},
    "listeners": [
        {"name": "remote", "kind": "tls", "port": 1, "apps": ["images"]},
        {"name": "control", "kind": "unix", "path": "/c", "apps": ["sessions"]},
    ],
}


def test_merge_is_deep_and_replaces_lists():
    cfg = testing.merge(BASE, {"images": {"max_writers": 2, "allowed_dirs": ["/b"]}})
    assert cfg["images"] == {"max_readers": 8, "max_writers": 2, "allowed_dirs": ["/b"]}
    # The base is not changed.
    assert BASE["images"] == {"max_readers": 8, "allowed_dirs": ["/a"]}


def test_merge_one_listener_by_name():
    cfg = testing.merge(BASE, {"listeners": {"control": {"group": "kvm"}}})
    assert cfg["listeners"] == [
        BASE["listeners"][0],
        {"name": "control", "kind": "unix", "path": "/c", "apps": ["sessions"],
         "group": "kvm"},
    ]


def test_merge_drops_and_adds_listeners():
    cfg = testing.merge(BASE, {"listeners": {
        "remote": None,
        "extra": {"kind": "tcp", "port": 2, "apps": ["images"]}}})
    assert [lst["name"] for lst in cfg["listeners"]] == ["control", "extra"]
    assert cfg["listeners"][1] == {"name": "extra", "kind": "tcp", "port": 2,
                                   "apps": ["images"]}


def test_merge_listener_overrides_combine_before_the_base():
    # conftest merges its test settings with a test's overrides first.
    combined = testing.merge({"logging": {"level": "DEBUG"}},
                             {"listeners": {"remote": None}})
    combined = testing.merge(combined, {"listeners": {"control": {"mode": 0o600}}})
    cfg = testing.merge(BASE, combined)
    assert cfg["listeners"] == [dict(BASE["listeners"][1], mode=0o600)]


def test_merge_list_of_listeners_replaces_all():
    only = [{"name": "x", "kind": "tcp", "port": 3, "apps": ["images"]}]
    assert testing.merge(BASE, {"listeners": only})["listeners"] == only


def test_daemon_runs_with_one_key_and_one_listener_overridden(tmp_path, tls_files):
    name = f"\0/imaged-testing-{os.getpid()}-{time.monotonic_ns()}"
    d = testing.Daemon(tmp_path, *tls_files, overrides={
        "images": {"max_readers": 3},
        "listeners": {"local": {"path": name}, "plain": None},
    })
    assert d.listener("plain") is None
    assert d.listener("local")["path"] == name
    try:
        d.start()
        pid = d.pid
        os.kill(pid, 0)
        # The overridden listener: the abstract socket answers.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(name)
            s.sendall(b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
        # The dropped listener is not there.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", d.tcp_port), timeout=5).close()
        # The overridden key.
        with requests.Session() as c:
            c.mount("http+unix://", UnixAdapter(d.control_path))
            image = tmp_path / "disk.raw"
            image.write_bytes(b"\0" * 4096)
            r = c.put("http+unix://imaged/sessions/s1", json={
                "url": f"file://{image}", "size": 4096, "ops": ["read"],
                "timeout": 60})
            assert r.status_code == 200, r.text
        with requests.Session() as s:
            s.verify = d.cert
            s.trust_env = False
            r = s.options(f"https://localhost:{d.tls_port}/images/s1")
            assert r.json()["max_readers"] == 3
    finally:
        status = d.stop()
    assert status == 0
    assert "READY=1" in d.notifications
    assert "STOPPING=1" in d.notifications
    assert not os.path.exists(d.sock_dir)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_daemon_that_cannot_start_is_reported_at_once(tmp_path, tls_files):
    d = testing.Daemon(tmp_path, *tls_files, overrides={"images": {"no_such_key": 1}})
    start = time.monotonic()
    with pytest.raises(testing.DaemonError) as e:
        d.start()
    # Exit status 2 is noticed by polling, not after the start timeout.
    assert time.monotonic() - start < testing.START_TIMEOUT_S / 2
    assert "images.no_such_key: unknown key" in str(e.value)
    assert d.proc.returncode == 2
