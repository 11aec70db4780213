"""
Real NBD exports for the tests: qcow2 images made with qemu-img and
qemu-io (data, holes, a backing chain, a dirty bitmap), served by a qemu-nbd
that the test starts and kills by its PID.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

try:
    import nbd as libnbd
except ImportError:
    libnbd = None

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# Seconds qemu-nbd may take to start serving or to exit.
START_TIMEOUT_S = 10
STOP_TIMEOUT_S = 10

_TOOLS = ("qemu-img", "qemu-io", "qemu-nbd")

needs_nbd = pytest.mark.skipif(
    libnbd is None or any(shutil.which(t) is None for t in _TOOLS),
    reason="needs qemu-utils and python3-libnbd visible in the venv "
           "(make sysdeps venv-nbd installs and links them)")


# Images.

def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def qemu_io(path, *commands, fmt="qcow2"):
    """Run qemu-io commands (e.g. "write -P 0x11 0 64k") on an image."""
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    p = subprocess.run(argv + [path], capture_output=True, text=True, timeout=60)
    # qemu-io exits 0 even when a command fails; it says so on stdout.
    if p.returncode != 0 or "failed" in p.stdout or "error" in p.stdout.lower():
        raise AssertionError(f"qemu-io {commands} failed: {p.stdout}{p.stderr}")


def pattern_writes(content, writes):
    """Apply [(offset, length, byte)] to the bytearray `content`."""
    for offset, length, value in writes:
        content[offset:offset + length] = bytes([value]) * length


def write_qcow2(path, writes):
    """qemu-io writes [(offset, length, byte)]; byte None: write zeroes."""
    cmds = []
    for offset, length, value in writes:
        if value is None:
            cmds.append(f"write -z {offset} {length}")
        else:
            cmds.append(f"write -P {value:#x} {offset} {length}")
    if cmds:
        qemu_io(path, *cmds)


def make_qcow2(path, size, writes=(), backing=None, cluster_size=None):
    """
    A qcow2 image of `size` with `writes` [(offset, length, byte)]; with
    `backing`, on top of that qcow2 image.
    """
    args = ["create", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    if cluster_size:
        args += ["-o", f"cluster_size={cluster_size}"]
    qemu_img(*args, path, str(size))
    write_qcow2(path, writes)


def guest_bytes(path, fmt="qcow2"):
    """The guest-visible content of an image, read by qemu-img."""
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as out:
        qemu_img("convert", "-f", fmt, "-O", "raw", path, out.name)
        with open(out.name, "rb") as f:
            return f.read()


def qemu_map(path):
    """qemu-img map --output=json of an image (its whole chain)."""
    p = subprocess.run(["qemu-img", "map", "--output=json", path],
                       check=True, capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout)


# A backing chain: base.qcow2 <- top.qcow2, 8 MiB, 64 KiB clusters.
CHAIN_SIZE = 8 * MiB
BASE_WRITES = [(0, MiB, 0x11), (4 * MiB, MiB, 0x22)]
TOP_WRITES = [(MiB, MiB, 0x33), (4 * MiB + 512 * KiB, 512 * KiB, 0x44),
              (0, 64 * KiB, None)]


def make_chain(directory):
    """
    base.qcow2 <- top.qcow2 in `directory`; returns (top, base, content),
    content the guest-visible bytes of top.

    Layers (MiB):   0    1    2    3    4    4.5   5 ... 8
      base          1111                2222 2222
      top           0333                     4444
    The first 64 KiB of top are a zero cluster hiding base's data.
    """
    base = os.path.join(directory, "base.qcow2")
    top = os.path.join(directory, "top.qcow2")
    make_qcow2(base, CHAIN_SIZE, BASE_WRITES)
    make_qcow2(top, CHAIN_SIZE, TOP_WRITES, backing=base)
    content = bytearray(CHAIN_SIZE)
    pattern_writes(content, [(o, n, v or 0) for o, n, v in BASE_WRITES])
    pattern_writes(content, [(o, n, v or 0) for o, n, v in TOP_WRITES])
    return top, base, content


# Extents of the chain as the export shows them (64 KiB clusters).
# Exported with its backing file: hole only where no layer has data.
CHAIN_EXTENTS = [
    (0, 64 * KiB, True, False),                 # top's zero cluster
    (64 * KiB, 2 * MiB - 64 * KiB, False, False),   # base, then top
    (2 * MiB, 2 * MiB, True, True),             # nowhere
    (4 * MiB, MiB, False, False),               # base, then top
    (5 * MiB, 3 * MiB, True, True),             # nowhere
]
# Exported without its backing file (one layer, as a backup reads it):
# hole wherever top has nothing.
TOP_ONLY_EXTENTS = [
    (0, 64 * KiB, True, False),
    (64 * KiB, MiB - 64 * KiB, True, True),
    (MiB, MiB, False, False),
    (2 * MiB, 2 * MiB + 512 * KiB, True, True),
    (4 * MiB + 512 * KiB, 512 * KiB, False, False),
    (5 * MiB, 3 * MiB, True, True),
]


def make_dirty(directory, size=8 * MiB, bitmap="b0"):
    """
    A qcow2 image with data, a dirty bitmap `bitmap` added after the first
    writes, then more writes (some zeroes); returns (path, content,
    dirty ranges [(start, length)] at the bitmap's 64 KiB granularity).
    """
    path = os.path.join(directory, "dirty.qcow2")
    before = [(0, 2 * MiB, 0x55), (6 * MiB, MiB, 0x66)]
    after = [(MiB, 64 * KiB, 0x77), (3 * MiB + 100, 1000, 0x78),
             (6 * MiB + 128 * KiB, 128 * KiB, None)]
    make_qcow2(path, size, before)
    qemu_img("bitmap", "--add", "--enable", path, bitmap)
    write_qcow2(path, after)
    content = bytearray(size)
    pattern_writes(content, [(o, n, v or 0) for o, n, v in before + after])
    dirty = [(MiB, 64 * KiB), (3 * MiB, 64 * KiB), (6 * MiB + 128 * KiB, 128 * KiB)]
    return path, content, dirty


# qemu-nbd.

def short_dir():
    """A directory for unix sockets (their paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="nbd-", dir="/tmp")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuNbd:
    """
    A qemu-nbd serving one image, started by the test, stopped by PID.

    socket: unix socket path (default: a new one), or tcp=True for a
    loopback TCP port. export: export name (-x). shared: clients at once.
    depth: -A (qemu:allocation-depth). bitmap: -B NAME. read_only: -r.
    backing=False exports a qcow2 without its backing file.
    """

    def __init__(self, image, fmt="qcow2", *, tcp=False, export=None,
                 shared=8, depth=True, bitmap=None, read_only=False,
                 backing=True, discard=True):
        self.image = image
        self.fmt = fmt
        self.export = export
        self.tcp = tcp
        self.dir = short_dir()
        self.socket = None if tcp else os.path.join(self.dir, "nbd.sock")
        self.port = free_port() if tcp else None
        argv = ["qemu-nbd", "--persistent", f"--shared={shared}",
                "--cache=none", "--aio=native"]
        if discard:
            argv.append("--discard=unmap")
        if tcp:
            argv += ["--bind=127.0.0.1", f"--port={self.port}"]
        else:
            argv += [f"--socket={self.socket}"]
        if export is not None:
            argv += [f"--export-name={export}"]
        if depth:
            argv.append("--allocation-depth")
        if bitmap:
            argv += ["--bitmap", bitmap]
        if read_only:
            argv.append("--read-only")
        if backing:
            argv += [f"--format={fmt}", image]
        else:
            # One layer as a backup reads it: the backing file left out.
            spec = {"driver": fmt, "backing": None,
                    "file": {"driver": "file", "filename": image}}
            argv.append("json:" + json.dumps(spec))
        self.argv = argv
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace")
                raise AssertionError(f"qemu-nbd exited: {out}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("qemu-nbd did not start listening")
            time.sleep(0.02)
        return self

    def _listening(self):
        if self.tcp:
            s = socket.socket()
            addr = ("127.0.0.1", self.port)
        else:
            if not os.path.exists(self.socket):
                return False
            s = socket.socket(socket.AF_UNIX)
            addr = self.socket
        with s:
            try:
                s.connect(addr)
                return True
            except OSError:
                return False

    @property
    def pid(self):
        return self.proc.pid

    def kill(self, sig=signal.SIGKILL):
        """Send `sig` to qemu-nbd (SIGKILL: die now; SIGSTOP: hang)."""
        os.kill(self.proc.pid, sig)

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # URLs of this export, every form imaged takes.

    def url(self, form=None):
        name = self.export or ""
        if self.tcp:
            form = form or "qemu-tcp"
            if form == "qemu-tcp":
                return f"nbd:127.0.0.1:{self.port}" + (
                    f":exportname={name}" if self.export is not None else "")
            assert form == "uri-tcp"
            return f"nbd://127.0.0.1:{self.port}/{name}"
        form = form or "qemu-unix"
        if form == "qemu-unix":
            return f"nbd:unix:{self.socket}" + (
                f":exportname={name}" if self.export is not None else "")
        assert form == "uri-unix"
        return f"nbd+unix:///{name}?socket={self.socket}"


needs_nbdkit = pytest.mark.skipif(
    shutil.which("nbdkit") is None,
    reason="nbdkit is not installed (make sysdeps installs it)")


class Nbdkit(QemuNbd):
    """An nbdkit serving `args` (plugin, filters, parameters) on a unix socket."""

    def __init__(self, *args):
        self.tcp = False
        self.export = None
        self.dir = short_dir()
        self.socket = os.path.join(self.dir, "nbd.sock")
        self.port = None
        # --foreground: the PID we started is the server's.
        self.argv = ["nbdkit", "--foreground", "--exit-with-parent",
                     f"--unix={self.socket}", *args]
        self.proc = None


@pytest.fixture
def nbdkit():
    """Factory: nbdkit(*args) -> a started Nbdkit, stopped at the end."""
    servers = []

    def start(*args):
        server = Nbdkit(*args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def qemu_nbd():
    """Factory: qemu_nbd(image, **options) -> a started QemuNbd, stopped at the end."""
    servers = []

    def start(image, *args, **kw):
        server = QemuNbd(image, *args, **kw)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def raw_block_status(url_socket, contexts, offset, length, export=""):
    """
    What the export says for `contexts` over one block status request,
    read with libnbd directly: {context: [(length, flags), ...]}.
    """
    h = libnbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.set_export_name(export)
    h.connect_unix(url_socket)
    got = {c: [] for c in contexts}

    def cb(ctx, off, entries, err):
        got.setdefault(ctx, []).extend(zip(entries[::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb)
    h.shutdown()
    return got
