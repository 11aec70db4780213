"""
Helpers for the client tests: sparse test images, running the CLI, a
throttling TCP proxy (to interrupt transfers at a known point) and a
minimal server of the old images API (no OPTIONS, PATCH or extents).
"""

import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from imaged.client.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KiB = 1024
MiB = 1024**2
BLOCK = 4096

# Seconds a CLI run may take in a test before it counts as hung.
CLI_TIMEOUT_S = 60


def make_sparse_image(path, size, regions=8, seed=0, max_region=MiB):
    """
    Create a sparse file of `size` bytes with `regions` random data
    regions at scattered offsets; returns the [(offset, length)] written.
    Regions may start and end at any byte, not only on block boundaries.
    """
    rnd = random.Random(seed)
    written = []
    with open(path, "wb") as f:
        f.truncate(size)
        slot = size // max(regions, 1)
        for i in range(regions):
            length = rnd.randint(1, min(max_region, slot // 2))
            offset = i * slot + rnd.randint(0, slot - length)
            f.seek(offset)
            f.write(rnd.randbytes(length))
            written.append((offset, length))
    return written


def fill_random(path, size, seed=1):
    """A fully allocated file of random bytes (garbage to be overwritten)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for pos in range(0, size, MiB):
            f.write(rnd.randbytes(min(MiB, size - pos)))


def allocated(path):
    """Bytes allocated on disk for `path`."""
    return os.stat(path).st_blocks * 512


def data_bytes(regions):
    """Upper bound of the bytes allocated for data `regions` (whole blocks)."""
    total = 0
    for offset, length in regions:
        start = offset - offset % BLOCK
        end = -(-(offset + length) // BLOCK) * BLOCK
        total += end - start
    return total


def assert_sparse(path, regions, slack=64 * KiB):
    """The file allocates about its data only, and its holes are holes."""
    used = allocated(path)
    assert used <= data_bytes(regions) + slack, \
        f"{path}: {used} bytes allocated for {data_bytes(regions)} bytes of data"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        fd = f.fileno()
        ends = sorted(o + n for o, n in regions)
        starts = sorted(o for o, n in regions)
        # Just after each region's last block there is a hole (or EOF), and
        # SEEK_DATA from there skips to the next region.
        for end, next_start in zip(ends, starts[1:] + [size]):
            hole_start = -(-end // BLOCK) * BLOCK
            if hole_start + BLOCK > next_start - next_start % BLOCK:
                continue
            try:
                found = os.lseek(fd, hole_start, os.SEEK_DATA)
            except OSError:
                found = size
            assert found >= next_start - next_start % BLOCK, \
                f"{path}: data at {found} inside a hole [{hole_start}, {next_start})"


def same_content(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def corrupt(path, offset, length=BLOCK):
    """Overwrite a block of `path` with other bytes, durably."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, length, offset)
        os.pwrite(fd, bytes(b ^ 0xFF for b in old), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# qemu-utils, for the tests of disk formats.

needs_qemu_utils = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
    reason="needs qemu-utils (make sysdeps)")


def qemu_img(*args):
    """Run qemu-img with `args`; returns its stdout (it must succeed)."""
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


# The CLI.

def cli_command(*args):
    return [sys.executable, "-m", "imaged.client.cli"] + [str(a) for a in args]


def run_cli(*args, timeout=CLI_TIMEOUT_S, dump_after=None, dump_pids=()):
    """
    Run imaged-client; returns the CompletedProcess (text output).

    `dump_after`: seconds after which the stacks of the client and of the
    processes `dump_pids` (daemons) are printed (py-spy, when installed),
    once, while the run goes on until `timeout`: a stall shows where it is.
    """
    proc = subprocess.Popen(cli_command(*args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        try:
            out, err = proc.communicate(timeout=dump_after)
        except subprocess.TimeoutExpired:
            dump_stacks([proc.pid, *dump_pids], f"still running after {dump_after} s")
            out, err = proc.communicate(timeout=timeout - dump_after)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def dump_stacks(pids, why):
    """
    Print the Python stacks of `pids` to stderr with py-spy, when it is
    installed; without it, only the client's (the first pid): the CLI
    prints them on SIGUSR1, into its own stderr.
    """
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    for i, pid in enumerate(pids):
        print(f"--- stacks of {pid}: {why}", file=sys.stderr)
        if not os.path.exists(spy):
            if i == 0:
                os.kill(pid, signal.SIGUSR1)
            print("(py-spy is not installed)", file=sys.stderr)
            continue
        r = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True,
                           text=True, timeout=60)
        print(r.stdout, r.stderr, file=sys.stderr)


def start_cli(*args):
    """Start imaged-client with --json progress lines readable on stdout."""
    return subprocess.Popen(cli_command(*args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_progress(proc, done_at_least=1):
    """Read JSON lines until a progress event shows some bytes moved."""
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"client ended early: {proc.stderr.read()}")
        event = json.loads(line)
        if event["event"] == "progress" and event["phase"] in ("upload", "download") \
                and event["done"] >= done_at_least:
            return event
    raise AssertionError("no progress from the client")


def finish(proc):
    """Wait for a started client; returns (exit code, stdout, stderr)."""
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    return proc.returncode, out, err


def assert_one_line_error(stderr):
    """Expected failures print one line, never a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("imaged-client: error")
              or line.startswith("imaged-client: interrupted")]
    assert len(errors) == 1, stderr
    return errors[0]


# A slow TCP proxy.

class RecordingProgress(Progress):
    """Records the byte counts a transfer reports (from any thread)."""

    def __init__(self):
        self.updates = []

    def update(self, count):
        self.updates.append(count)

    @property
    def done(self):
        return sum(self.updates)


class Relay:
    """
    A TCP relay on a loopback port to `target` (host, port): each accepted
    connection gets its own upstream connection and a thread per direction
    that forwards what it reads through forward(). Subclasses decide what
    is forwarded and when a connection breaks; close() breaks them all.
    """

    def __init__(self, target):
        self.target = target
        self.accepted = 0
        self._socks = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, sid):
        return f"http://127.0.0.1:{self.port}/images/{sid}"

    def admit(self, client):
        """Whether to relay the new connection `client` (else it is handled)."""
        return True

    def connection(self):
        """State shared by both directions of a new relayed connection."""
        return None

    def forward(self, data, dst, state):
        """Send `data` to `dst`; False breaks the connection."""
        dst.sendall(data)
        return True

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if not self.admit(client):
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            state = self.connection()
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, state),
                                 daemon=True).start()

    def _pump(self, src, dst, state):
        try:
            while True:
                data = src.recv(64 * KiB)
                if not data or not self.forward(data, dst, state):
                    break
        except OSError:
            pass
        finally:
            # Closed, not only shut down: a peer still sending gets a reset
            # at once instead of filling a buffer nobody reads.
            for sock in (src, dst):
                _shutdown(sock)
                sock.close()

    def close(self):
        self.listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            _shutdown(sock)
            sock.close()


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class SlowProxy(Relay):
    """
    A relay forwarding at most `rate` bytes per second in each direction of
    each connection. pause() stops forwarding (the server seems to hang).
    """

    def __init__(self, target, rate):
        self.rate = rate
        self._forwarding = threading.Event()
        self._forwarding.set()
        super().__init__(target)

    def forward(self, data, dst, state):
        self._forwarding.wait()
        dst.sendall(data)
        time.sleep(len(data) / self.rate)
        return True

    def pause(self):
        self._forwarding.clear()

    def close(self):
        self._forwarding.set()
        super().close()


class CuttingProxy(Relay):
    """
    A relay that breaks connections, as a flaky network or a restarting
    host does: each of the first `cut_connections` connections is cut (both
    sockets closed) after `cut_after` bytes went through it, both
    directions counted, so in the middle of a request body or of a
    response; and every `busy_every`-th new connection (if set) is answered
    503 and closed instead of being relayed. Counts `cuts` and `busy`.
    """

    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n")

    def __init__(self, target, cut_after, cut_connections=3, busy_every=None):
        self.cut_after = cut_after
        self.cut_connections = cut_connections
        self.busy_every = busy_every
        self.cuts = 0
        self.busy = 0
        self.relayed = 0
        super().__init__(target)

    def admit(self, client):
        if self.busy_every and self.accepted % self.busy_every == 0:
            self.busy += 1
            threading.Thread(target=self._busy, args=(client,), daemon=True).start()
            return False
        return True

    def connection(self):
        # Bytes left before the cut, shared by both directions.
        self.relayed += 1
        return [self.cut_after if self.relayed <= self.cut_connections else None]

    def _busy(self, client):
        try:
            client.recv(64 * KiB)
            client.sendall(self.BUSY)
        except OSError:
            pass
        finally:
            client.close()

    def forward(self, data, dst, budget):
        with self._lock:
            left = budget[0]
            cut = left is not None and len(data) >= left
            if cut and left >= 0:
                # The other direction sees -1: already cut.
                budget[0] = -1
                self.cuts += 1
            elif left is not None and not cut:
                budget[0] -= len(data)
            left = max(left or 0, 0)
        if cut:
            dst.sendall(data[:left])
            return False
        dst.sendall(data)
        return True


# A server of the old images API.

_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/\*$")


class OldServer:
    """
    GET with Range and PUT with Content-Range on one file, over plain HTTP,
    like images servers before OPTIONS existed. Records every request as
    (method, path).
    """

    def __init__(self, path):
        self.path = path
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_OPTIONS(self):
                server.requests.append(("OPTIONS", self.path))
                self._answer(405, b"method not allowed\n")

            def do_PATCH(self):
                server.requests.append(("PATCH", self.path))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer(405, b"method not allowed\n")

            def do_GET(self):
                server.requests.append(("GET", self.path))
                if self.path != "/images/old":
                    # Like ovirt-imageio, quoting the id it does not know.
                    ticket = self.path.rsplit("/", 1)[-1]
                    self._answer(403, f"No such ticket {ticket}\n".encode())
                    return
                size = os.path.getsize(server.path)
                m = _RANGE.match(self.headers.get("Range", ""))
                first, last = int(m.group(1)), int(m.group(2))
                if last >= size:
                    self._answer(416, b"out of range\n", [("Content-Range", f"bytes */{size}")])
                    return
                with open(server.path, "rb") as f:
                    f.seek(first)
                    body = f.read(last - first + 1)
                self._answer(206, body, [("Content-Range", f"bytes {first}-{last}/{size}")])

            def do_PUT(self):
                server.requests.append(("PUT", self.path))
                length = int(self.headers["Content-Length"])
                m = _CONTENT_RANGE.match(self.headers.get("Content-Range", ""))
                body = self.rfile.read(length)
                with open(server.path, "r+b") as f:
                    f.seek(int(m.group(1)))
                    f.write(body)
                self._answer(200)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/images/old"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
