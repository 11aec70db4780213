"""
Incremental backup with imaged-client against the real daemon serving a
real qemu-nbd export with a dirty bitmap (SPEC §8, §11): a full backup, a
change of the disk, an incremental backup of only the dirty extents into a
qcow2 on top of the full one, checked with `qemu-img compare`, and a
restore of the chain.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from imaged import client
from tests.client.common import (MiB, assert_one_line_error, needs_qemu_utils, qemu_img,
                                 run_cli)

pytestmark = needs_qemu_utils

SIZE = 64 * MiB


def qemu_io(path, *commands):
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run(args + [path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


class QemuNbd:
    """qemu-nbd exporting a qcow2 read-only on a unix socket, as the host agent does."""

    def __init__(self, path, bitmap=None):
        self.dir = tempfile.mkdtemp(prefix="imaged-test-nbd-")
        self.sock = os.path.join(self.dir, "sock")
        cmd = ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "--format=qcow2",
               f"--socket={self.sock}"]
        if bitmap:
            cmd.append(f"--bitmap={bitmap}")
        self.proc = subprocess.Popen(cmd + [path], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)

    @property
    def url(self):
        return f"nbd:unix:{self.sock}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def exports():
    started = []

    def start(path, bitmap=None):
        e = QemuNbd(path, bitmap)
        started.append(e)
        return e

    yield start
    for e in started:
        e.close()


def add_session(server, url, size, ops=("read",), **extra):
    """A session on an NBD export; returns its id."""
    sid = str(uuid.uuid4())
    body = dict({"url": url, "size": size, "ops": list(ops), "timeout": 300}, **extra)
    with server.control() as c:
        r = c.put(server.control_url + sid, data=json.dumps(body))
    assert r.status_code == 200, r.text
    return sid


def allocated_in_layer(path):
    """Bytes the top layer of the qcow2 `path` holds itself."""
    return sum(e["length"] for e in json.loads(qemu_img("map", "--output=json", path))
               if e["depth"] == 0 and e["present"])


def test_full_incremental_restore(server, exports, tmp_path):
    disk = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
    qemu_io(disk, "write -P 0x11 0 8M", "write -P 0x12 20M 4M", "write -P 0x13 60M 4M")
    # The bitmap records what changes after the full backup.
    qemu_img("bitmap", "--add", "--enable", disk, "b1")

    # Full backup.
    e = exports(disk)
    sid = add_session(server, e.url, SIZE)
    full = str(tmp_path / "full.qcow2")
    r = run_cli("download", server.tls_url + sid, full, "--cafile", server.cert,
                "--format", "qcow2")
    assert r.returncode == 0, r.stderr
    e.close()
    qemu_img("compare", disk, full)

    # The guest writes: new data, data over old data, zeroes over data.
    qemu_io(disk, "write -P 0x21 2M 1M", "write -P 0x22 40M 2M", "write -z 20M 4M")

    # Incremental backup: the dirty extents only, on top of the full one.
    e = exports(disk, bitmap="b1")
    sid = add_session(server, e.url, SIZE, dirty=True)
    inc = str(tmp_path / "inc.qcow2")
    r = run_cli("download", server.tls_url + sid, inc, "--cafile", server.cert,
                "--incremental", "--backing-file", full, "--json", "-q")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    # 3 MiB of data and 4 MiB of zeroes changed (in 64 KiB bitmap granules).
    assert result["data_bytes"] == 3 * MiB
    assert result["zero_bytes"] == 4 * MiB
    info = json.loads(qemu_img("info", "--output=json", inc))
    assert info["format"] == "qcow2" and info["backing-filename"] == full
    qemu_img("check", inc)
    # The chain reads as the disk; its top layer holds only what changed.
    qemu_img("compare", disk, inc)
    assert allocated_in_layer(inc) == 7 * MiB
    # The previous backup was not touched.
    qemu_img("check", full)

    # Restore the chain into a raw image through the daemon.
    restored = str(tmp_path / "restored.raw")
    with open(restored, "wb") as f:
        f.truncate(SIZE)
    sid = server.add_session(restored)
    up = client.upload(inc, server.tls_url + sid, cafile=server.cert, verify=True)
    assert up.format == "qcow2"
    qemu_img("compare", "-f", "qcow2", "-F", "raw", disk, restored)


def test_incremental_without_dirty_extents_is_an_error(server, exports, tmp_path):
    disk = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
    qemu_io(disk, "write -P 0x11 0 1M")
    full = str(tmp_path / "full.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", full, SIZE)
    e = exports(disk)
    inc = str(tmp_path / "inc.qcow2")
    # A session without dirty: true, and one on an export without a bitmap.
    for extra in ({}, {"dirty": True}):
        sid = add_session(server, e.url, SIZE, **extra)
        r = run_cli("download", server.tls_url + sid, inc, "--cafile", server.cert,
                    "--incremental", "--backing-file", full)
        assert r.returncode == 1, r.stderr
        line = assert_one_line_error(r.stderr)
        assert "no dirty extents" in line and "incremental" in line
        # Never a silent full download: nothing was written.
        assert not os.path.exists(inc)


def test_incremental_needs_backing_file(server, tmp_path):
    r = run_cli("download", server.tls_url + "x", str(tmp_path / "inc.qcow2"),
                "--incremental")
    assert r.returncode == 1
    assert "--backing-file" in assert_one_line_error(r.stderr)
