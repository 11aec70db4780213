#!/usr/bin/python3
"""
Runs inside a booted Debian container with the imaged .deb installed (see
test_systemd.py): drives imaged.service with systemctl, makes a transfer
through the packaged daemon, and writes what it saw to /results/result.json,
then powers the container off. Only the standard library: this runs on the
container's python3, not the test's.

Each check is recorded as {"name": ..., "ok": bool, "detail": ...}; the
test on the host asserts on them, so a failure here never hangs the boot.
"""

import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import time
import traceback

RESULTS = "/results/result.json"
CONTROL = "/run/imaged/control.sock"
IMAGE_DIR = "/var/lib/imaged-check"
IMAGE = IMAGE_DIR + "/disk.raw"
MiB = 1024**2
SIZE = 8 * MiB

checks = []


def record(name, ok, detail=""):
    checks.append({"name": name, "ok": bool(ok), "detail": str(detail)[:4000]})


def run(*argv, timeout=60):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def show(*props):
    r = run("systemctl", "show", "imaged", "--property=" + ",".join(props))
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def request(conn, method, url, body=None, headers=None):
    conn.request(method, url, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def setup():
    # The host's certificate: self-signed here, installed as install.md says.
    os.makedirs("/etc/pki/imaged", exist_ok=True)
    r = run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", "/etc/pki/imaged/key.pem", "-out", "/etc/pki/imaged/cert.pem",
            "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    record("certificate made", r.returncode == 0, r.stderr)
    run("chgrp", "imaged", "/etc/pki/imaged/key.pem")
    os.chmod("/etc/pki/imaged/key.pem", 0o640)
    # An image the way hosts keep them: group kvm, which imaged is in.
    os.makedirs(IMAGE_DIR, exist_ok=True)
    with open(IMAGE, "wb") as f:
        f.truncate(SIZE)
    run("chgrp", "-R", "kvm", IMAGE_DIR)
    os.chmod(IMAGE_DIR, 0o770)
    os.chmod(IMAGE, 0o660)


def check_start():
    start = time.monotonic()
    r = run("systemctl", "start", "imaged", timeout=90)
    elapsed = time.monotonic() - start
    record("systemctl start imaged", r.returncode == 0,
           f"rc={r.returncode} in {elapsed:.1f} s {r.stderr}")
    props = show("ActiveState", "SubState", "Type", "MainPID", "NRestarts", "User")
    # Type=notify: "active (running)" only after READY=1.
    record("active after READY=1",
           props.get("ActiveState") == "active" and props.get("SubState") == "running"
           and props.get("Type") == "notify" and props.get("NRestarts") == "0", props)


def check_sandbox():
    pid = int(show("MainPID").get("MainPID") or 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError as e:
        record("sandbox applied", False, e)
        return
    status = {k: v.strip() for k, v in status.items()}
    import pwd
    uid = int(status["Uid"].split()[0])
    record("runs as user imaged", pwd.getpwuid(uid).pw_name == "imaged", status["Uid"])
    record("no capabilities", status["CapEff"] == "0000000000000000"
           and status["CapBnd"] == "0000000000000000",
           f"CapEff={status['CapEff']} CapBnd={status['CapBnd']}")
    record("no new privileges", status.get("NoNewPrivs") == "1", status.get("NoNewPrivs"))
    record("system call filter", status.get("Seccomp") == "2", status.get("Seccomp"))
    groups = [int(g) for g in status["Groups"].split()]
    import grp
    record("in group kvm", grp.getgrnam("kvm").gr_gid in groups, status["Groups"])


def check_transfer():
    sid = "check-" + os.urandom(8).hex()
    ctl = UnixConnection(CONTROL)
    body = json.dumps({"url": "file://" + IMAGE, "size": SIZE, "ops": ["write"],
                       "timeout": 300, "transfer_id": "systemd-check"})
    status, _, text = request(ctl, "PUT", f"/sessions/{sid}", body)
    record("session added over the control socket", status == 200, text)

    ctx = ssl.create_default_context(cafile="/etc/pki/imaged/cert.pem")
    tls = http.client.HTTPSConnection("localhost", 54322, context=ctx, timeout=60)
    data = os.urandom(SIZE)
    status, _, text = request(tls, "PUT", f"/images/{sid}?flush=y", data)
    record("upload over TLS (O_DIRECT write, fsync)", status == 200, text)
    status, _, got = request(tls, "GET", f"/images/{sid}")
    record("download over TLS is the upload", status == 200 and got == data,
           f"status={status} {hashlib.sha256(got).hexdigest()[:16]}")
    status, _, text = request(tls, "PATCH", f"/images/{sid}", json.dumps(
        {"op": "zero", "offset": MiB, "size": 2 * MiB, "flush": True}),
        {"Content-Type": "application/json"})
    record("zero (fallocate) and flush", status == 200, text)
    status, _, text = request(tls, "GET", f"/images/{sid}/extents")
    record("extents (SEEK_DATA/SEEK_HOLE)", status == 200 and json.loads(text), text[:300])
    status, _, text = request(tls, "GET", f"/images/{sid}/checksum")
    record("checksum", status == 200 and "checksum" in json.loads(text), text[:300])
    status, _, text = request(tls, "GET", "/info/")
    record("GET /info/", status == 200 and "version" in json.loads(text), text)

    # The local images socket (abstract, reported in OPTIONS).
    status, _, text = request(tls, "OPTIONS", f"/images/{sid}")
    unix = json.loads(text).get("unix_socket") if status == 200 else None
    record("OPTIONS reports the unix socket", unix == "\0/org/imaged", repr(unix))
    if unix:
        local = UnixConnection(unix)
        status, _, got = request(local, "GET", f"/images/{sid}",
                                 headers={"Range": "bytes=0-1048575"})
        expected = data[:MiB]
        record("range read over the local socket", status == 206 and got == expected,
               f"status={status}")

    status, _, text = request(ctl, "GET", "/metrics")
    record("GET /metrics", status == 200 and b"imaged_bytes_total" in text, text[:200])
    status, _, _ = request(ctl, "DELETE", f"/sessions/{sid}")
    record("session removed", status == 204, status)
    with open(IMAGE, "rb") as f:
        on_disk = f.read()
    expected = data[:MiB] + bytes(2 * MiB) + data[3 * MiB:]
    record("image on disk as written", on_disk == expected, "")


def check_stop():
    start = time.monotonic()
    r = run("systemctl", "stop", "imaged", timeout=90)
    elapsed = time.monotonic() - start
    props = show("ActiveState", "Result")
    lines = run("journalctl", "-u", "imaged", "-o", "cat", "--no-pager").stdout.splitlines()
    # systemd says "Main process exited, code=..., status=..." for a status
    # other than 0 and "Killing" when the stop timed out; SIGTERM handled
    # by the daemon ends with its own "imaged stopped" and exit status 0.
    unclean = [line for line in lines
               if "Main process exited" in line or "Killing" in line
               or "timed out" in line]
    record("systemctl stop imaged exits cleanly",
           r.returncode == 0 and props.get("ActiveState") == "inactive"
           and props.get("Result") == "success" and not unclean
           and any("imaged stopped" in line for line in lines),
           f"rc={r.returncode} in {elapsed:.1f} s {props} {unclean}")
    record("control socket removed", not os.path.exists(CONTROL), "")


def check_journal():
    r = run("journalctl", "-u", "imaged", "-o", "cat", "--no-pager")
    lines = r.stdout.splitlines()
    bad = [line for line in lines
           if "Operation not permitted" in line or " ERROR " in line
           or "Traceback" in line or "Permission denied" in line]
    record("journal without errors", not bad, "\n".join(bad or lines[-40:]))
    record("journal shows READY and the stop",
           any("imaged ready" in line for line in lines)
           and any("imaged stopped" in line for line in lines), "\n".join(lines[-40:]))
    return r.stdout


def main():
    journal = ""
    try:
        # Each step on its own: a failure is recorded and the daemon is
        # still stopped and its journal still read.
        for step in (setup, check_start, check_sandbox, check_transfer, check_stop):
            try:
                step()
            except Exception:
                record(f"{step.__name__} ran", False, traceback.format_exc())
        journal = check_journal()
    except Exception:
        record("check script", False, traceback.format_exc())
    finally:
        with open(RESULTS + ".tmp", "w") as f:
            json.dump({"checks": checks, "journal": journal}, f, indent=1)
        os.rename(RESULTS + ".tmp", RESULTS)
        subprocess.run(["systemctl", "poweroff", "--no-block"])


if __name__ == "__main__":
    main()
