#!/usr/bin/env python3
"""
imaged benchmark, side by side with nginx and ovirt-imageio.

    bench/run [--smoke] [--reps N] [--keep] [--no-nginx] [--no-ovirt] ...
    make bench          # full run (about 15-25 minutes on 2 cores)
    make bench-smoke    # a few seconds: proves the harness works

See docs/benchmarks.md for how to read the results. Everything the run
creates lives in bench/out/ (or --out); the large images are removed at the
end unless --keep. Everything started is stopped at the end, also on a
failure or Ctrl-C.

Methodology
-----------

Images. A fully allocated raw file of random data (2 GiB; 32 MiB in smoke
mode) and a sparse raw file (8 GiB; 256 MiB in smoke mode) with about 10%
of its size in data extents scattered over the whole file (one extent of
64 KiB-3 MiB at a random place in every 16 MiB; seeded, so every run makes
the same layout). Uploads go to a separate, preallocated file per server.

Servers, all on loopback, started by this script with their own config:
imaged from this tree (default config but for the listeners), nginx from
the distribution package (HTTPS GET of the same file, `worker_processes
auto`, access log off) and ovirt-imageio from PyPI in its own virtualenv
(a file ticket added over its control socket). Each gets the same
self-signed certificate.

Clients. curl for HTTPS and unix-socket GET and PUT (PUT with `flush=y`
and no `Expect: 100-continue` round trip), imaged-client for upload and
download with 1 and 4 connections and for the sparse download, over HTTPS
(`--no-unix-socket`: a client on this host would otherwise switch to the
server's unix socket, which the curl rows already cover).

Client rows on disk formats (issue 18). A qcow2 source of 8 GiB virtual
size with 2 GiB of random data (32 MiB data extents every 256 MiB; 256 MiB
with 64 MiB of data in smoke mode), made with `qemu-img convert` from a
sparse raw twin. imaged-client and ovirt-imageio's client (its `upload`
and `download` functions, run from a Python with ovirt-imageio installed,
converting through qemu-nbd too) move it against the same imaged, with 1
and 4 connections: upload of the qcow2 into a sparse raw session
(compared with the raw twin after), download of the raw session into a
qcow2 (`qemu-img compare`d with the twin after). ovirt-imageio's client
always switches to a server's local unix socket, so imaged-client does too
in these rows. Throughput is the virtual size over the client's wall time;
the table puts imaged-client under "imaged" and ovirt-imageio's client
under "ovirt-imageio". The resume row: the 2 GiB random image uploaded
with 4 connections, killed (SIGKILL) once it reported half of it sent, then
finished with `--resume`; the time of that second run against a whole
upload started over.

NBD rows (issue 16). imaged and ovirt-imageio read and write the same
qemu-nbd export of a qcow2 (started as a host agent starts it; each PUT
into a new empty qcow2). The rows over the local socket also run nbdcopy
(libnbd's copier, in C, no HTTP) on that export: what the export gives
any client, so the ceiling of both daemons there. In its column "server
CPU" and peak RSS are nbdcopy's own.

Interleaving. For each transfer kind, the repetitions alternate between the
servers: imaged, peer(s), imaged, peer(s), ... so a drift of the machine
(absolute numbers here drift up to 2x between runs) hits every server
alike. Only the ratios of one run mean anything. The table shows medians
of the repetitions (5 by default); results.json keeps every sample.

Throughput is the transferred image size (virtual size for the sparse
download) divided by the wall time of the client process (curl's
time_total for curl), in GB/s (10^9 bytes/s), TLS handshake and
connection setup included.

Verification, always outside the timed part; a failure fails the run.
Every upload: before it the destination is zeroed (fallocate ZERO_RANGE,
so it stays allocated), after it the destination is compared with the
source (cmp). Every imaged-client download: written to a scratch file in
RAM (/dev/shm when it has room, so the client's disk does not limit
downloads) and compared with the source. curl downloads: timed into
/dev/null (writing 2 GiB into RAM costs curl ~1.5 s of CPU, which a 2-core
machine takes from the server), checking curl's byte count; for each
server and path one extra, untimed download into RAM is compared with the
source before the timed ones. --verify-every-get verifies every curl
download instead (timed into RAM).

Server CPU and memory. Around each transfer the script reads the server's
CPU time (utime + stime of /proc/PID/stat, all threads, summed over the
server's processes: nginx's master and workers) and its peak RSS: before
the transfer it resets the peak with `echo 5 > /proc/PID/clear_refs`
(Linux resets VmHWM to the current RSS), after it reads VmHWM from
/proc/PID/status. So "peak RSS" is the server's high-water mark during that
transfer (summed over processes for nginx), not the growth. Where
clear_refs is not writable the cumulative VmHWM is reported (marked in the
output).

Idle keep-alive connections. After one warm-up GET on a connection of its
own (so a cache of buffers shared by all connections is already filled),
N (50) TLS connections each GET 16 MiB (two chunks, so a connection's
buffers are in use) and then stay open and idle; the growth of the
server's VmRSS from before the first of them to when all are idle is
reported.

Machine limits, measured in the same run (at the start and again at the
end): dd with O_DIRECT reading the 2 GiB image and writing a new file of
the same size, the same O_DIRECT read into a huge-page buffer (as imaged
reads; see direct_read_rate), and `openssl speed -evp aes-128-gcm` (and
aes-256-gcm, the cipher TLS 1.3 negotiates here) on one core.

Profiling. With --profile, after the measurements, one extra transfer of
each curl kind and of the 4-connection client transfers runs against
imaged under py-spy (installed in the running
venv if missing); collapsed stacks and a top-functions summary go to the
out directory. Profiled transfers are not part of the table.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from imaged import testing, util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KiB, MiB, GiB = 1024, 1024**2, 1024**3
GB = 10**9

OVIRT_VERSION = "2.5.1"

# Targets of issue 5: (case, peer, minimum ratio imaged/peer).
TARGETS = [
    # Issue 19 raised the HTTPS GET targets from 1.0x nginx, 1.7x ovirt-imageio.
    ("https-get", "nginx", 1.2),
    ("https-get", "ovirt-imageio", 1.8),
    ("https-put", "ovirt-imageio", 1.3),
    ("unix-get", "ovirt-imageio", 1.5),
    ("unix-put", "ovirt-imageio", 1.5),
    ("client-sparse-download", "ovirt-imageio", 5.0),
    # Issue 16: the NBD backend, both servers on the same qemu-nbd exports.
    ("nbd-https-get", "ovirt-imageio", 1.5),
    ("nbd-https-put", "ovirt-imageio", 1.5),
    ("nbd-unix-get", "ovirt-imageio", 1.5),
    ("nbd-unix-put", "ovirt-imageio", 1.5),
    ("nbd-client-sparse-download", "ovirt-imageio", 1.5),
    # Issue 18: imaged-client against ovirt-imageio's client, both on imaged.
    ("qcow2-upload-1", "ovirt-imageio", 1.3),
    ("qcow2-upload-4", "ovirt-imageio", 1.3),
    ("qcow2-download-1", "ovirt-imageio", 1.3),
    ("qcow2-download-4", "ovirt-imageio", 1.3),
]

# ovirt-imageio's client, run as a program: python -c OVIRT_CLIENT OP SRC DST CA N.
OVIRT_CLIENT = """\
import sys
from ovirt_imageio import client
op, src, dst, ca, n = sys.argv[1:]
if op == "upload":
    client.upload(src, dst, ca, max_workers=int(n))
else:
    client.download(src, dst, ca, fmt="qcow2", max_workers=int(n))
"""
# Server CPU per byte: (case, peer, maximum ratio imaged/peer) of the
# median server CPU seconds (the same bytes move in both).
CPU_TARGETS = [
    # Issue 19.
    ("https-get", "nginx", 0.8),
    ("https-put", "ovirt-imageio", 0.85),
    # Issue 16: no higher than ovirt-imageio's NBD backend.
    ("nbd-https-get", "ovirt-imageio", 1.0),
    ("nbd-https-put", "ovirt-imageio", 1.0),
    ("nbd-unix-get", "ovirt-imageio", 1.0),
    ("nbd-unix-put", "ovirt-imageio", 1.0),
    ("nbd-client-sparse-download", "ovirt-imageio", 1.0),
]
MAX_PEAK_RSS_MIB = 64
MAX_IDLE_GROWTH_MIB = 10

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_ZERO_RANGE = 0x10


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# Processes: everything started is stopped at the end.

class Procs:
    """Background processes started by the run; stop_all() ends them all."""

    def __init__(self):
        self._procs = []

    def start(self, name, argv, **kw):
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self._procs.append((name, proc))
        return proc

    def stop(self, proc, sig=signal.SIGTERM, timeout=15):
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # The process group: nginx workers, py-spy children.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self):
        for name, proc in reversed(list(self._procs)):
            self.stop(proc)


def run(argv, timeout, **kw):
    """Run a command to completion (bounded); raise with its output on failure."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    try:
        p = subprocess.run(argv, timeout=timeout, text=True, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    if p.returncode != 0:
        raise BenchError(f"failed ({p.returncode}): {' '.join(argv)}\n"
                         f"{(p.stderr or '')[-2000:]}{(p.stdout or '')[-1000:]}")
    return p


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.1)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def unix_request(sock_path, method, url, body=None):
    conn = UnixHTTPConnection(sock_path)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


# /proc accounting.

def descendants(pid):
    """pid and all its descendants (nginx workers)."""
    result, todo = [], [pid]
    while todo:
        p = todo.pop()
        result.append(p)
        for task in _listdir(f"/proc/{p}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return result


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def status_kib(pid, key):
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    return 0


def reset_peak(pids):
    """Reset VmHWM to the current RSS; False if the kernel refuses."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def peak_rss_mib(pids):
    return sum(status_kib(p, "VmHWM") for p in pids) / 1024


def rss_mib(pids):
    return sum(status_kib(p, "VmRSS") for p in pids) / 1024


# Images.

def make_random_image(path, size):
    """A fully allocated raw image of random data; reused when complete."""
    done = path + ".done"
    if os.path.exists(done) and os.path.exists(path) and os.path.getsize(path) == size:
        return
    log(f"creating {path} ({size / GiB:.2f} GiB of random data)")
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(8 * MiB, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    open(done, "w").close()


def sparse_layout(size, seed=5):
    """(offset, length) data extents: one per 16 MiB region, ~10% of size."""
    rng = random.Random(seed)
    region = 16 * MiB
    unit = 64 * KiB
    layout = []
    for base in range(0, size, region):
        span = min(region, size - base)
        length = rng.randint(1, 48) * unit          # 64 KiB - 3 MiB, mean ~1.5 MiB
        length = min(length, span)
        offset = base + rng.randrange(0, (span - length) // unit + 1) * unit
        layout.append((offset, length))
    return layout


def make_sparse_image(path, size):
    done = path + ".done"
    if os.path.exists(done) and os.path.exists(path) and os.path.getsize(path) == size:
        return
    log(f"creating {path} ({size / GiB:.2f} GiB, ~10% data in scattered extents)")
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in sparse_layout(size):
            f.seek(offset)
            f.write(os.urandom(length))
        f.flush()
        os.fsync(f.fileno())
    open(done, "w").close()


def data_bytes(path):
    """Allocated data according to SEEK_DATA/SEEK_HOLE."""
    total = 0
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
    return total


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def prepare_destination(path, size):
    """A preallocated destination of `size` bytes reading as zeroes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, 0)
            os.posix_fallocate(fd, 0, size)
        elif _libc.fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, size) != 0:
            # No ZERO_RANGE here: start over with a new allocation.
            os.ftruncate(fd, 0)
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def same_content(a, b, timeout):
    p = subprocess.run(["cmp", "-s", a, b], timeout=timeout)
    return p.returncode == 0


# The proxy rows reach the host at this address: a proxy decides a host is
# this machine when its connection's two ends have the same address
# (ovirt-imageio's rule, and imaged's), and would then relay through the
# host's unix socket; from 127.0.0.1 to 127.0.0.2 the second leg is HTTPS.
PROXY_HOST_ADDRESS = "127.0.0.2"


def make_certificate(cert, key):
    if os.path.exists(cert) and os.path.exists(key):
        # One made by an older run lacks the proxy rows' host address.
        san = ssl._ssl._test_decode_cert(cert).get("subjectAltName", ())
        if ("IP Address", PROXY_HOST_ADDRESS) in san:
            return
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=localhost",
         "-addext",
         f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{PROXY_HOST_ADDRESS}"],
        timeout=60)
    os.chmod(key, 0o600)


# Servers.

class Server:
    name = None
    pid = None
    https_url = None     # base URL ending with /images/
    unix_socket = None   # images unix socket, if any

    def pids(self):
        return descendants(self.pid)

    def add_ticket(self, path, size, ops):
        raise NotImplementedError


class Imaged(Server):
    name = "imaged"
    role = ""

    def __init__(self, env, python):
        self.env = env
        self.python = python

    def overrides(self):
        listeners = {"plain": None}
        if self.env.args.proxy:
            # Where the proxies reach this daemon as their host.
            self.proxy_port = free_port()
            listeners["remote-proxied"] = {
                "kind": "tls", "host": PROXY_HOST_ADDRESS, "port": self.proxy_port,
                "apps": ["images"]}
        return {"listeners": listeners, "logging": {"level": "INFO"}}

    def start(self):
        e = self.env
        # imaged.testing's daemon minus its plain TCP listener; its sockets
        # in the run's short socket directory, its process tracked by Procs.
        overrides = testing.merge(self.overrides(),
                                  json.loads(e.args.imaged_config or "{}"))
        workdir = os.path.join(e.out, self.role) if self.role else e.out
        sock_dir = os.path.join(e.sock_dir, self.role) if self.role else e.sock_dir
        os.makedirs(sock_dir, exist_ok=True)
        out = os.path.join(workdir, "imaged.out")
        self.daemon = testing.Daemon(
            workdir, e.cert, e.key, overrides=overrides, python=self.python,
            sock_dir=sock_dir, output_file=out,
            spawn=lambda argv, **kw: e.procs.start(self.name, argv, **kw))
        try:
            self.daemon.start(timeout=30)
        except testing.DaemonError as err:
            raise BenchError(f"{str(err).splitlines()[0]}; see {out} "
                             f"and {workdir}/imaged.log") from None
        self.proc = self.daemon.proc
        self.pid = self.proc.pid
        self.port = self.daemon.tls_port
        self.control = self.daemon.control_path
        self.unix_socket = self.daemon.local_path
        self.https_url = f"https://127.0.0.1:{self.port}/images/"
        return self

    def add_ticket(self, path, size, ops):
        return self.add_url_ticket(f"file://{path}", size, ops)

    def add_url_ticket(self, url, size, ops):
        sid = str(uuid.uuid4())
        status, text = unix_request(self.control, "PUT", f"/sessions/{sid}", {
            "url": url, "size": size, "ops": ops, "timeout": 24 * 3600})
        if status != 200:
            raise BenchError(f"imaged: adding a session failed: {status} {text}")
        return sid


class ImagedProxy(Imaged):
    """imaged in the proxy role: sessions relay to the host's https URL."""

    name = "imaged proxy"
    role = "proxy"

    def overrides(self):
        return {"listeners": {"plain": None},
                "proxy": {"ca_file": self.env.cert},
                "logging": {"level": "INFO"}}


class OvirtImageio(Server):
    name = "ovirt-imageio"
    role = "ovirt"
    extra_conf = ""

    def __init__(self, env):
        self.env = env
        self.venv = os.path.join(env.out, "venv-ovirt")

    def install(self):
        exe = os.path.join(self.venv, "bin", "ovirt-imageio")
        if os.path.exists(exe):
            return exe
        log(f"installing ovirt-imageio {OVIRT_VERSION} into {self.venv}")
        base = getattr(sys, "_base_executable", None) or sys.executable
        run([base, "-m", "venv", self.venv], timeout=300)
        run([os.path.join(self.venv, "bin", "python"), "-m", "pip", "install",
             "--quiet", f"ovirt-imageio=={OVIRT_VERSION}"], timeout=900)
        return exe

    def start(self):
        e = self.env
        exe = self.install()
        self.port = free_port()
        d = os.path.join(e.out, self.role)
        run_dir = os.path.join(e.sock_dir, self.role)
        os.makedirs(os.path.join(d, "conf.d"), exist_ok=True)
        os.makedirs(run_dir, exist_ok=True)
        self.control = os.path.join(run_dir, "control.sock")
        self.unix_socket = os.path.join(run_dir, "local.sock")
        with open(os.path.join(d, "conf.d", "50-bench.conf"), "w") as f:
            f.write("# Written by bench/bench.py.\n")
            f.write(testing.ovirt_imageio_config(
                run_dir, self.port, e.cert, e.key, self.unix_socket, self.control,
                os.path.join(e.out, self.role + "-imageio.log")))
            f.write(self.extra_conf)
        self.proc = e.procs.start(self.name, [exe, "--conf-dir", d],
                                  stdout=e.logfile(self.role + "-imageio.out"),
                                  stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

        def ready():
            if self.proc.poll() is not None:
                raise BenchError(f"ovirt-imageio exited with {self.proc.returncode}; "
                                 f"see {e.out}/{self.role}-imageio.log")
            status, _ = unix_request(self.control, "GET", "/tickets/none")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
            return status in (200, 404)

        wait_for(ready, 30, "ovirt-imageio to start")
        self.https_url = f"https://127.0.0.1:{self.port}/images/"
        return self

    def add_ticket(self, path, size, ops):
        return self.add_url_ticket(f"file://{path}", size, ops)

    def add_url_ticket(self, url, size, ops):
        tid = str(uuid.uuid4())
        status, text = unix_request(self.control, "PUT", f"/tickets/{tid}", {
            "uuid": tid, "url": url, "size": size, "ops": ops,
            "timeout": 24 * 3600})
        if status != 200:
            raise BenchError(f"ovirt-imageio: adding a ticket failed: {status} {text}")
        return tid


class OvirtImageioProxy(OvirtImageio):
    """
    ovirt-imageio in its proxy role: a ticket whose url is the host's https
    URL, relayed by its http backend (verifying with backend_http.ca_file).
    """

    name = "ovirt-imageio proxy"
    role = "ovirt-proxy"

    @property
    def extra_conf(self):
        return f"\n[backend_http]\nca_file = {self.env.cert}\n"


class Nginx(Server):
    name = "nginx"

    def __init__(self, env, allow_install):
        self.env = env
        self.allow_install = allow_install

    def install(self):
        exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if exe:
            return exe
        if not self.allow_install:
            raise BenchError("nginx is not installed")
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise BenchError("nginx is not installed (apt-get install nginx-light as root)")
        log("installing nginx-light with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "-qq", "nginx-light"], timeout=600, env=env)
        # The package may start its own nginx where an init system runs;
        # leave it alone: ours has its own config and port.
        return shutil.which("nginx") or "/usr/sbin/nginx"

    def start(self):
        e = self.env
        exe = self.install()
        self.port = free_port()
        d = os.path.join(e.out, "nginx")
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        user = "user root;" if os.geteuid() == 0 else ""
        tmp = os.path.join(d, "tmp")
        with open(conf, "w") as f:
            f.write(f"""\
# Written by bench/bench.py: HTTPS GET of the bench images on loopback.
{user}
worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {e.cert};
        ssl_certificate_key {e.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location /images/ {{ alias {e.images}/; }}
    }}
}}
""")
        self.proc = e.procs.start("nginx", [exe, "-p", d, "-c", conf, "-e", f"{d}/error.log"],
                                  stdout=e.logfile("nginx.out"), stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

        def ready():
            if self.proc.poll() is not None:
                raise BenchError(f"nginx exited with {self.proc.returncode}; see {d}/error.log")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_for(ready, 30, "nginx to start")
        self.https_url = f"https://127.0.0.1:{self.port}/images/"
        return self

    def add_ticket(self, path, size, ops):
        # nginx serves files by name from the images directory.
        return os.path.relpath(path, self.env.images)


class NbdExport:
    """
    A qemu-nbd serving one qcow2 image for the NBD rows, started and stopped
    by this script; imaged's and ovirt-imageio's sessions both name it, so
    they read and write the very same export. Options as a host agent
    starts it (docs/images.md#nbd-images): --cache=none --aio=native,
    --shared=8 (multi-conn), --allocation-depth.
    """

    def __init__(self, env, name, image, read_only):
        self.env = env
        self.name = name
        self.image = image
        self.read_only = read_only
        self.socket = os.path.join(env.sock_dir, f"nbd-{name}.sock")
        self.url = f"nbd:unix:{self.socket}"
        self.proc = None

    def start(self):
        argv = ["qemu-nbd", "--persistent", "--shared=8", "--cache=none",
                "--aio=native", "--discard=unmap", "--allocation-depth",
                "--format=qcow2", f"--socket={self.socket}"]
        if self.read_only:
            argv.append("--read-only")
        self.proc = self.env.procs.start(f"qemu-nbd {self.name}", argv + [self.image],
                                         stdout=self.env.logfile("qemu-nbd.out"),
                                         stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                raise BenchError(f"qemu-nbd exited with {self.proc.returncode}; "
                                 f"see {self.env.out}/qemu-nbd.out")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.socket)
            return True

        wait_for(ready, 30, f"qemu-nbd {self.name}")
        return self

    def stop(self):
        if self.proc is not None:
            self.env.procs.stop(self.proc)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


def nbd_available(python):
    """Why the NBD rows cannot run, or None."""
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make sysdeps)"
    p = subprocess.run([python, "-c", "import nbd"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
    if p.returncode != 0:
        return "imaged's python cannot import libnbd's bindings (make sysdeps venv-nbd)"
    return None


def make_qcow2_copy(raw, qcow2):
    """qemu-img convert of a raw bench image into qcow2 (holes stay holes)."""
    done = qcow2 + ".done"
    if os.path.exists(done) and os.path.exists(qcow2) and \
            os.path.getmtime(qcow2) >= os.path.getmtime(raw):
        return
    log(f"converting {raw} to {qcow2}")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], timeout=1800)
    open(done, "w").close()


class ClientPeer:
    """
    A client as the "server" of a case whose rows compare clients against
    the same server: named like the column it fills, accounting the CPU
    and memory of that server.
    """

    def __init__(self, name, server):
        self.name = name
        self.server = server

    def pids(self):
        return self.server.pids()


class NbdCopy:
    """
    nbdcopy (libnbd's copier, in C, no HTTP) on the export of an NBD row:
    what the export itself gives a client, the ceiling of both daemons on
    that row. No server: its "server CPU" and peak RSS are nbdcopy's own.
    """

    name = "nbdcopy"

    def pids(self):
        return []


# Transfers.

class Transfer:
    """What one timed run of a case did."""

    def __init__(self, seconds, nbytes, cpu, peak, client_cpu, peak_exact, other_cpu):
        self.other_cpu = other_cpu
        self.seconds = seconds
        self.nbytes = nbytes
        self.cpu = cpu
        self.peak = peak
        self.client_cpu = client_cpu
        self.peak_exact = peak_exact

    @property
    def gbps(self):
        return self.nbytes / self.seconds / GB

    def as_dict(self):
        return {"seconds": round(self.seconds, 4), "bytes": self.nbytes,
                "gbps": round(self.gbps, 4), "server_cpu_s": round(self.cpu, 3),
                "server_peak_rss_mib": round(self.peak, 1),
                "client_cpu_s": round(self.client_cpu, 3),
                "other_cpu_s": round(self.other_cpu, 3),
                "peak_rss_reset": self.peak_exact}


def machine_busy_seconds():
    """CPU seconds all cores spent busy (or stolen by the hypervisor) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(server, fn):
    """Run fn() -> (seconds, nbytes) while accounting the server's CPU and peak RSS."""
    pids = server.pids()
    exact = reset_peak(pids)
    cpu0, ccpu0, busy0 = cpu_seconds(pids), children_cpu(), machine_busy_seconds()
    seconds, nbytes = fn()
    ccpu1, busy1 = children_cpu(), machine_busy_seconds()
    pids = server.pids()
    cpu = cpu_seconds(pids) - cpu0
    client = ccpu1 - ccpu0
    # Whatever else kept the cores busy: other programs, the hypervisor's
    # steal, kernel threads. A noise indicator, not part of any figure.
    other = max(0.0, (busy1 - busy0) - cpu - client)
    return Transfer(seconds, nbytes, cpu, peak_rss_mib(pids), client, exact, other)


def curl_base(server):
    base = ["curl", "-sS", "--fail", "-H", "Expect:"]
    if server.https_url and server.https_url.startswith("https"):
        base += ["--cacert", server.env.cert]
    return base


def curl_time(argv, timeout, expect_bytes):
    """Run curl; returns its time_total after checking the bytes it moved."""
    p = run(argv + ["-w", " %{time_total} %{size_download} %{size_upload}"],
            timeout=timeout)
    seconds, down, up = p.stdout.strip().split()[-3:]
    if expect_bytes not in (int(down), int(up)):
        raise BenchError(f"curl moved {down}/{up} bytes, expected {expect_bytes}: "
                         f"{' '.join(argv)}")
    return float(seconds)


class Case:
    """A kind of transfer run against several servers."""

    def __init__(self, key, title, servers, fn, nbytes):
        self.key = key
        self.title = title
        self.servers = servers
        self.fn = fn          # fn(server, rep) -> Transfer (verified)
        self.nbytes = nbytes
        self.samples = {s.name: [] for s in servers}
        self.skipped = None


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.out = os.path.abspath(args.out)
        self.images = os.path.join(self.out, "images")
        os.makedirs(self.images, exist_ok=True)
        # Unix socket paths are limited to 107 bytes: keep them short.
        self.sock_dir = tempfile.mkdtemp(prefix="imaged-bench-", dir="/tmp")
        scratch = "/dev/shm"
        need = (args.size + args.sparse_size) * 1.2
        if not (os.path.isdir(scratch) and shutil.disk_usage(scratch).free > need):
            scratch = self.out
        self.scratch = tempfile.mkdtemp(prefix="imaged-bench-", dir=scratch)
        self.procs = Procs()
        self.cert = os.path.join(self.out, "cert.pem")
        self.key = os.path.join(self.out, "key.pem")
        self.servers = {}
        self.notes = []
        self.deadline = time.monotonic() + args.max_minutes * 60
        self._logs = []

    def logfile(self, name):
        f = open(os.path.join(self.out, name), "ab")
        self._logs.append(f)
        return f

    def timeout_for(self, nbytes):
        # Generous but bounded: 20 MB/s would be pathological here.
        return 60 + nbytes / (20 * 10**6)

    def close(self):
        self.procs.stop_all()
        for f in self._logs:
            f.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        if not self.args.keep:
            for name in os.listdir(self.images):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.images, name))
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.out, "dd-write.tmp"))

    # Setup.

    def setup(self):
        a = self.args
        make_certificate(self.cert, self.key)
        self.big = os.path.join(self.images, "random.raw")
        self.sparse = os.path.join(self.images, "sparse.raw")
        make_random_image(self.big, a.size)
        make_sparse_image(self.sparse, a.sparse_size)
        for p in (self.big, self.sparse):
            os.chmod(p, 0o644)
        self.sparse_data = data_bytes(self.sparse)
        log(f"sparse image: {self.sparse_data / MiB:.0f} MiB data in "
            f"{a.sparse_size / GiB:.2f} GiB")

        self.servers["imaged"] = Imaged(self, a.imaged_python).start()
        log(f"imaged started (pid {self.servers['imaged'].pid})")
        for name, enabled, factory in (
                ("nginx", a.nginx, lambda: Nginx(self, allow_install=not self.smoke)),
                ("ovirt-imageio", a.ovirt, lambda: OvirtImageio(self))):
            if not enabled:
                self.notes.append(f"{name}: skipped (--no-{name.split('-')[0]}"
                                  f"{' or smoke mode' if self.smoke else ''})")
                continue
            try:
                self.servers[name] = factory().start()
                log(f"{name} started (pid {self.servers[name].pid})")
            except BenchError as e:
                log(f"{name}: not available: {e}")
                self.notes.append(f"{name}: not available: {str(e).splitlines()[0]}")

        # Tickets: read-only on the sources, read-write on a destination per server.
        self.tickets = {}
        for name, s in self.servers.items():
            t = {"get": s.add_ticket(self.big, a.size, ["read"]),
                 "sparse": s.add_ticket(self.sparse, a.sparse_size, ["read"])}
            if name != "nginx":
                dest = os.path.join(self.images, f"upload-{name}.raw")
                prepare_destination(dest, a.size)
                t["put"] = s.add_ticket(dest, a.size, ["read", "write"])
                t["dest"] = dest
            self.tickets[name] = t

        self.nbd = None
        if a.nbd:
            why = nbd_available(a.imaged_python)
            if why:
                self.notes.append(f"NBD rows: skipped: {why}")
            else:
                self.setup_nbd()
        if a.proxy:
            self.setup_proxies()

        self.client = self.find_client()
        self.ovirt_python = self.find_ovirt_client()
        self.qcow2 = None
        if shutil.which("qemu-img") and shutil.which("qemu-nbd"):
            self.setup_qcow2()
        else:
            self.notes.append("qcow2 rows: skipped: qemu-img/qemu-nbd not installed")
        # Now: imaged's code may change in the tree while the run goes on.
        self.versions = versions(self)

    def setup_nbd(self):
        """qcow2 copies of the bench images behind qemu-nbd, and sessions on them."""
        a = self.args
        big = os.path.join(self.images, "random.qcow2")
        sparse = os.path.join(self.images, "sparse.qcow2")
        make_qcow2_copy(self.big, big)
        make_qcow2_copy(self.sparse, sparse)
        self.nbd = {
            "get": NbdExport(self, "get", big, read_only=True).start(),
            "sparse": NbdExport(self, "sparse", sparse, read_only=True).start(),
            # Uploads go to a new, empty qcow2 each time (see nbd_put).
            "put": NbdExport(self, "put", os.path.join(self.images, "upload.qcow2"),
                             read_only=False),
        }
        self.new_upload_target()
        for name, s in self.servers.items():
            if name == "nginx":
                continue
            t = self.tickets[name]
            t["nbd-get"] = s.add_url_ticket(self.nbd["get"].url, a.size, ["read"])
            t["nbd-sparse"] = s.add_url_ticket(self.nbd["sparse"].url, a.sparse_size, ["read"])
            t["nbd-put"] = s.add_url_ticket(self.nbd["put"].url, a.size, ["read", "write"])
        log("NBD exports started")

    def new_upload_target(self):
        """An empty qcow2 behind the upload export, as for a new disk."""
        export = self.nbd["put"]
        export.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(export.image)
        run(["qemu-img", "create", "-q", "-f", "qcow2", export.image, str(self.args.size)],
            timeout=60)
        export.start()

    def setup_proxies(self):
        """
        The proxy rows: imaged (and ovirt-imageio) as a proxy in front of
        the imaged above, reached over HTTPS at PROXY_HOST_ADDRESS; each
        proxy has its own host sessions, and its own upload destination.
        """
        a = self.args
        host = self.servers["imaged"]
        self.proxies = {}
        candidates = [("imaged proxy", lambda: ImagedProxy(self, a.imaged_python))]
        if a.ovirt:
            candidates.append(("ovirt-imageio proxy", lambda: OvirtImageioProxy(self)))
        for name, factory in candidates:
            try:
                self.proxies[name] = factory().start()
                log(f"{name} started (pid {self.proxies[name].pid})")
            except BenchError as e:
                if name == "imaged proxy":
                    raise
                log(f"{name}: not available: {e}")
                self.notes.append(f"{name}: not available: {str(e).splitlines()[0]}")
        base = f"https://{PROXY_HOST_ADDRESS}:{host.proxy_port}/images/"
        # The same host at 127.0.0.1: both proxies see it is this machine
        # and relay through its unix socket.
        local = f"https://127.0.0.1:{host.port}/images/"
        for name, p in self.proxies.items():
            dest = os.path.join(self.images, f"upload-{p.role}.raw")
            prepare_destination(dest, a.size)
            host_get = host.add_ticket(self.big, a.size, ["read"])
            host_put = host.add_ticket(dest, a.size, ["read", "write"])
            self.tickets[name] = {
                "get": p.add_url_ticket(base + host_get, a.size, ["read"]),
                "put": p.add_url_ticket(base + host_put, a.size, ["read", "write"]),
                "get-local": p.add_url_ticket(local + host_get, a.size, ["read"]),
                "put-local": p.add_url_ticket(local + host_put, a.size, ["read", "write"]),
                "dest": dest}

    def setup_qcow2(self):
        a = self.args
        vsize, data = a.qcow2_size, a.qcow2_data
        self.qcow2_raw = os.path.join(self.images, "qcow2-guest.raw")
        self.qcow2 = os.path.join(self.images, "source.qcow2")
        done = self.qcow2 + f".{vsize}-{data}.done"
        if not os.path.exists(done):
            log(f"creating {self.qcow2} ({vsize / GiB:.3g} GiB, {data / GiB:.3g} GiB data)")
            regions = 32
            step, length = vsize // regions, data // regions
            with open(self.big, "rb") as src, open(self.qcow2_raw, "wb") as dst:
                dst.truncate(vsize)
                for i in range(regions):
                    src.seek((i * length) % max(a.size - length + 1, 1))
                    dst.seek(i * step)
                    left = length
                    while left:
                        chunk = src.read(min(8 * MiB, left))
                        if not chunk:
                            src.seek(0)
                            continue
                        dst.write(chunk)
                        left -= len(chunk)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.qcow2)
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", self.qcow2_raw,
                 self.qcow2], timeout=self.timeout_for(vsize))
            open(done, "w").close()
        for p in (self.qcow2, self.qcow2_raw):
            os.chmod(p, 0o644)
        imaged = self.servers["imaged"]
        self.qcow2_dest = os.path.join(self.images, "qcow2-upload.raw")
        with open(self.qcow2_dest, "wb") as f:
            f.truncate(vsize)
        self.tickets["imaged"]["qcow2-get"] = imaged.add_ticket(
            self.qcow2_raw, vsize, ["read"])
        self.tickets["imaged"]["qcow2-put"] = imaged.add_ticket(
            self.qcow2_dest, vsize, ["read", "write"])

    def find_ovirt_client(self):
        """A Python that can import ovirt-imageio's client, or None."""
        ovirt = self.servers.get("ovirt-imageio")
        candidates = [self.args.imaged_python]
        if ovirt is not None:
            candidates.insert(0, os.path.join(ovirt.venv, "bin", "python"))
        for python in candidates:
            p = subprocess.run([python, "-c", "import ovirt_imageio.client"],
                               capture_output=True, timeout=60)
            if p.returncode == 0:
                return python
        self.notes.append("ovirt-imageio's client: not importable; its qcow2 rows skipped")
        return None

    def proxy_local_get(self, server, rep):
        key = "get" if server.name == "imaged" else "get-local"
        return self.curl_get(server, server.https_url + self.tickets[server.name][key], (), rep)

    def proxy_local_put(self, server, rep):
        key = "put" if server.name == "imaged" else "put-local"
        return self.curl_put(server, server.https_url + self.tickets[server.name][key])

    def find_client(self):
        argv = [self.args.imaged_python, "-m", "imaged.client.cli"]
        try:
            p = subprocess.run(argv + ["--help"], cwd=ROOT, timeout=60,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired:
            p = None
        if p is None or p.returncode != 0:
            why = (p.stdout.strip().splitlines() or ["?"])[-1] if p else "timed out"
            self.notes.append(f"imaged-client: skipped: `python -m imaged.client.cli "
                              f"--help` failed ({why})")
            return None
        return argv

    # Transfer kinds. Each returns a verified Transfer.

    def curl_get(self, server, url, extra, rep):
        """
        Timed downloads go to /dev/null: writing 2 GiB into RAM costs curl
        ~1.5 s of CPU here, which on 2 cores is taken from the server.
        Before the first timed one, an untimed download of the same URL is
        verified (--verify-every-get times downloads into RAM instead and
        verifies each).
        """
        size = self.args.size
        argv = curl_base(server) + list(extra)
        dest = os.path.join(self.scratch, "download.raw")
        timed_dest = dest if self.args.verify_every_get else "/dev/null"
        if rep == 0 and not self.args.verify_every_get:
            curl_time(argv + ["-o", dest, url], self.timeout_for(size), size)
            self.verify(dest, self.big, f"{server.name} GET {url}")
            os.unlink(dest)

        def go():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
            return curl_time(argv + ["-o", timed_dest, url], self.timeout_for(size),
                             size), size

        t = measured(server, go)
        if self.args.verify_every_get:
            self.verify(dest, self.big, f"{server.name} GET {url}")
            os.unlink(dest)
        return t

    def curl_put(self, server, url, extra=()):
        size = self.args.size
        dest = self.tickets[server.name]["dest"]
        prepare_destination(dest, size)
        t = measured(server, lambda: (curl_time(
            curl_base(server) + list(extra) + ["-o", "/dev/null", "-T", self.big,
                                               "-X", "PUT", url + "?flush=y"],
            self.timeout_for(size), size), size))
        self.verify(dest, self.big, f"{server.name} PUT")
        return t

    def https_get(self, server, rep):
        return self.curl_get(server, server.https_url + self.tickets[server.name]["get"],
                             (), rep)

    def https_put(self, server, rep):
        return self.curl_put(server, server.https_url + self.tickets[server.name]["put"])

    def unix_get(self, server, rep):
        return self.curl_get(server, "http://localhost/images/" + self.tickets[server.name]["get"],
                             ["--unix-socket", server.unix_socket], rep)

    def unix_put(self, server, rep):
        return self.curl_put(server, "http://localhost/images/" + self.tickets[server.name]["put"],
                             ["--unix-socket", server.unix_socket])

    def nbd_get(self, unix):
        def fn(server, rep):
            if server.name == NbdCopy.name:
                uri = f"nbd+unix:///?socket={self.nbd['get'].socket}"
                return self.nbdcopy([uri, "null:"], self.args.size)
            t = self.tickets[server.name]["nbd-get"]
            if unix:
                return self.curl_get(server, "http://localhost/images/" + t,
                                     ["--unix-socket", server.unix_socket], rep)
            return self.curl_get(server, server.https_url + t, (), rep)
        return fn

    def nbd_put(self, unix):
        def fn(server, rep):
            size = self.args.size
            self.new_upload_target()
            if server.name == NbdCopy.name:
                uri = f"nbd+unix:///?socket={self.nbd['put'].socket}"
                tr = self.nbdcopy(["--flush", self.big, uri], size)
            else:
                t = self.tickets[server.name]["nbd-put"]
                if unix:
                    url = "http://localhost/images/" + t
                    extra = ["--unix-socket", server.unix_socket]
                else:
                    url, extra = server.https_url + t, []
                tr = measured(server, lambda: (curl_time(
                    curl_base(server) + extra + ["-o", "/dev/null", "-T", self.big,
                                                 "-X", "PUT", url + "?flush=y"],
                    self.timeout_for(size), size), size))
            # The guest view of the qcow2 is the source (the export keeps
            # running: -U shares its image).
            p = subprocess.run(["qemu-img", "compare", "-U", "-q", "-f", "qcow2", "-F", "raw",
                                self.nbd["put"].image, self.big],
                               timeout=self.timeout_for(size))
            if p.returncode != 0:
                raise BenchError(f"verification failed: {server.name} NBD PUT: "
                                 f"qemu-img compare exited with {p.returncode}")
            return tr
        return fn

    def nbdcopy(self, argv, nbytes):
        """
        Run nbdcopy ARGV; a Transfer with nbdcopy's own CPU time and peak
        RSS in the place of a server's.
        """
        busy0 = machine_busy_seconds()
        with open(os.path.join(self.out, "nbdcopy.out"), "ab") as out:
            t0 = time.monotonic()
            proc = subprocess.Popen(["nbdcopy"] + argv, stdout=out, stderr=out)
            killer = threading.Timer(self.timeout_for(nbytes), proc.kill)
            killer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                killer.cancel()
            seconds = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise BenchError(f"nbdcopy {' '.join(argv)} exited with {proc.returncode}; "
                             f"see {self.out}/nbdcopy.out")
        cpu = usage.ru_utime + usage.ru_stime
        other = max(0.0, machine_busy_seconds() - busy0 - cpu)
        return Transfer(seconds, nbytes, cpu, usage.ru_maxrss / 1024, 0.0, True, other)

    def client_run(self, argv, nbytes):
        t0 = time.monotonic()
        run(self.client + argv, timeout=self.timeout_for(nbytes), cwd=ROOT)
        return time.monotonic() - t0, nbytes

    def client_download(self, conns, sparse=False, ticket=None):
        def fn(server, rep):
            src = self.sparse if sparse else self.big
            size = self.args.sparse_size if sparse else self.args.size
            dest = os.path.join(self.scratch, "client-download.raw")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
            key = ticket or ("sparse" if sparse else "get")
            url = server.https_url + self.tickets[server.name][key]
            t = measured(server, lambda: self.client_run(
                ["download", url, dest, "--connections", str(conns),
                 "--cafile", self.cert, "--no-unix-socket", "--quiet"], size))
            self.verify(dest, src, f"{server.name} client download")
            os.unlink(dest)
            return t
        return fn

    def client_upload(self, conns):
        def fn(server, rep):
            size = self.args.size
            dest = self.tickets[server.name]["dest"]
            prepare_destination(dest, size)
            url = server.https_url + self.tickets[server.name]["put"]
            t = measured(server, lambda: self.client_run(
                ["upload", self.big, url, "--connections", str(conns),
                 "--cafile", self.cert, "--no-unix-socket", "--quiet"], size))
            self.verify(dest, self.big, f"{server.name} client upload")
            return t
        return fn

    def qcow2_upload(self, conns):
        def fn(peer, rep):
            vsize = self.args.qcow2_size
            dest = self.qcow2_dest
            # A sparse destination: both clients zero what the qcow2 lacks.
            with open(dest, "r+b") as f:
                f.truncate(0)
                f.truncate(vsize)
            url = self.servers["imaged"].https_url + self.tickets["imaged"]["qcow2-put"]
            if peer.name == "imaged":
                argv = self.client + ["upload", self.qcow2, url, "--connections",
                                      str(conns), "--cafile", self.cert, "--quiet"]
            else:
                argv = [self.ovirt_python, "-c", OVIRT_CLIENT, "upload", self.qcow2, url,
                        self.cert, str(conns)]
            t = measured(peer, lambda: self.timed_run(argv, vsize))
            self.verify(dest, self.qcow2_raw, f"{peer.name} client qcow2 upload")
            return t
        return fn

    def qcow2_download(self, conns):
        def fn(peer, rep):
            vsize = self.args.qcow2_size
            dest = os.path.join(self.scratch, "client-download.qcow2")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
            url = self.servers["imaged"].https_url + self.tickets["imaged"]["qcow2-get"]
            if peer.name == "imaged":
                argv = self.client + ["download", url, dest, "--format", "qcow2",
                                      "--connections", str(conns), "--cafile", self.cert,
                                      "--quiet"]
            else:
                argv = [self.ovirt_python, "-c", OVIRT_CLIENT, "download", url, dest,
                        self.cert, str(conns)]
            t = measured(peer, lambda: self.timed_run(argv, vsize))
            run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", self.qcow2_raw,
                 dest], timeout=self.timeout_for(vsize))
            os.unlink(dest)
            return t
        return fn

    def timed_run(self, argv, nbytes):
        t0 = time.monotonic()
        run(argv, timeout=self.timeout_for(nbytes), cwd=ROOT)
        return time.monotonic() - t0, nbytes

    def resume_row(self):
        """
        Seconds to finish an upload killed at half of it with --resume,
        against a whole upload started over; medians of the repetitions.
        """
        size = self.args.size
        dest = self.tickets["imaged"]["dest"]
        url = self.servers["imaged"].https_url + self.tickets["imaged"]["put"]
        base = self.client + ["upload", self.big, url, "--connections", "4",
                              "--cafile", self.cert]
        over, resumed, moved = [], [], []
        for rep in range(self.args.reps):
            prepare_destination(dest, size)
            over.append(self.timed_run(base + ["--quiet"], size)[0])
            self.verify(dest, self.big, "upload started over")
            prepare_destination(dest, size)
            proc = self.procs.start("imaged-client", base + [
                "--json", "--progress-interval", "0"], stdout=subprocess.PIPE,
                text=True)
            deadline = time.monotonic() + self.timeout_for(size)
            try:
                for line in proc.stdout:
                    event = json.loads(line)
                    if event.get("event") == "progress" and event["phase"] == "upload" \
                            and event["done"] >= size // 2:
                        break
                    if time.monotonic() > deadline:
                        raise BenchError("upload to interrupt did not progress")
                else:
                    raise BenchError("upload to interrupt ended before half of it")
            finally:
                self.procs.stop(proc, sig=signal.SIGKILL)
                proc.stdout.close()
            t0 = time.monotonic()
            p = run(base + ["--resume", "--json", "--quiet"], timeout=self.timeout_for(size),
                    cwd=ROOT)
            resumed.append(time.monotonic() - t0)
            result = json.loads(p.stdout.splitlines()[-1])
            moved.append(result["data_bytes"] + result["zero_bytes"])
            self.verify(dest, self.big, "resumed upload")
            log(f"resume row rep {rep + 1}: started over {over[-1]:.2f} s, resumed "
                f"{resumed[-1]:.2f} s moving {moved[-1] / MiB:.0f} MiB")
        return {"start_over_s": statistics.median(over),
                "resume_s": statistics.median(resumed),
                "moved_bytes": statistics.median(moved), "size": size,
                "samples": {"start_over_s": over, "resume_s": resumed,
                            "moved_bytes": moved}}

    def verify(self, got, want, what):
        if not same_content(got, want, timeout=self.timeout_for(os.path.getsize(want))):
            raise BenchError(f"verification failed: {what}: {got} differs from {want}")

    # The run.

    def cases(self):
        s = self.servers
        imaged = s["imaged"]
        peers_get = [s[n] for n in ("nginx", "ovirt-imageio") if n in s]
        ovirt = [s["ovirt-imageio"]] if "ovirt-imageio" in s else []
        size, sparse = self.args.size, self.args.sparse_size
        cases = [
            Case("https-get", "HTTPS GET (curl)", [imaged] + peers_get, self.https_get, size),
            Case("https-put", "HTTPS PUT flush (curl)", [imaged] + ovirt, self.https_put, size),
            Case("unix-get", "unix socket GET (curl)", [imaged] + ovirt, self.unix_get, size),
            Case("unix-put", "unix socket PUT flush (curl)", [imaged] + ovirt, self.unix_put, size),
        ]
        for conns in (1, 4):
            cases.append(Case(f"client-download-{conns}", f"client download, {conns} conn",
                              [imaged] + ovirt, self.client_download(conns), size))
        for conns in (1, 4):
            cases.append(Case(f"client-upload-{conns}", f"client upload, {conns} conn",
                              [imaged] + ovirt, self.client_upload(conns), size))
        cases.append(Case("client-sparse-download",
                          f"client sparse download ({sparse / GiB:.3g} GiB, "
                          f"{self.sparse_data / sparse:.0%} data)",
                          [imaged] + ovirt, self.client_download(1, sparse=True), sparse))
        if self.nbd:
            sq = "NBD qcow2"
            # The export's own pace, without HTTP: the ceiling of the rows
            # over the local socket, where nothing else (TLS) limits.
            nbdcopy = [NbdCopy()] if shutil.which("nbdcopy") else []
            cases += [
                Case("nbd-https-get", f"{sq}: HTTPS GET (curl)", [imaged] + ovirt,
                     self.nbd_get(unix=False), size),
                Case("nbd-https-put", f"{sq}: HTTPS PUT flush (curl)", [imaged] + ovirt,
                     self.nbd_put(unix=False), size),
                Case("nbd-unix-get", f"{sq}: unix socket GET (curl)", [imaged] + ovirt + nbdcopy,
                     self.nbd_get(unix=True), size),
                Case("nbd-unix-put", f"{sq}: unix socket PUT flush (curl)",
                     [imaged] + ovirt + nbdcopy, self.nbd_put(unix=True), size),
                Case("nbd-client-sparse-download",
                     f"{sq}: client sparse download ({sparse / GiB:.3g} GiB, "
                     f"{self.sparse_data / sparse:.0%} data)", [imaged] + ovirt,
                     self.client_download(1, sparse=True, ticket="nbd-sparse"), sparse),
            ]
        if self.args.proxy:
            # Through a proxy, beside the same transfer straight to the host.
            servers = [self.proxies["imaged proxy"], imaged] + \
                [self.proxies[n] for n in ("ovirt-imageio proxy",) if n in self.proxies]
            cases.append(Case("proxy-https-get", "proxy HTTPS GET (curl)", servers,
                              self.https_get, size))
            cases.append(Case("proxy-https-put", "proxy HTTPS PUT flush (curl)", servers,
                              self.https_put, size))
            cases.append(Case("proxy-local-get", "proxy HTTPS GET, host's unix socket (curl)",
                              servers, self.proxy_local_get, size))
            cases.append(Case("proxy-local-put", "proxy HTTPS PUT flush, host's unix socket "
                              "(curl)", servers, self.proxy_local_put, size))
        if self.qcow2:
            q = self.args.qcow2_size
            peers = [ClientPeer("imaged", imaged)]
            if self.ovirt_python:
                peers.append(ClientPeer("ovirt-imageio", imaged))
            for conns in (1, 4):
                cases.append(Case(f"qcow2-upload-{conns}",
                                  f"qcow2 upload, {conns} conn (clients, both to imaged)",
                                  peers, self.qcow2_upload(conns), q))
            for conns in (1, 4):
                cases.append(Case(f"qcow2-download-{conns}",
                                  f"qcow2 download, {conns} conn (clients, both from imaged)",
                                  peers, self.qcow2_download(conns), q))
        if self.args.only:
            cases = [c for c in cases if c.key in self.args.only]
        if self.client is None:
            for c in cases:
                if c.key.startswith(("client-", "qcow2-")):
                    c.skipped = "imaged-client not available"
        return cases

    def measure(self, cases):
        reps = self.args.reps
        todo = [c for c in cases if not c.skipped]
        total = sum(len(c.servers) for c in todo) * reps
        n = 0
        for case in todo:
            for rep in range(reps):
                # Interleaved: imaged, peers, imaged, peers, ...
                for server in case.servers:
                    n += 1
                    if time.monotonic() > self.deadline:
                        if not case.skipped:
                            self.notes.append(f"time limit (--max-minutes "
                                              f"{self.args.max_minutes}) reached: "
                                              f"fewer repetitions from {case.title} on")
                        case.skipped = case.skipped or "time limit"
                        break
                    os.sync()
                    t = case.fn(server, rep)
                    case.samples[server.name].append(t)
                    exact = "" if t.peak_exact else " (cumulative peak)"
                    log(f"[{n}/{total}] {case.title}: {server.name} rep {rep + 1}: "
                        f"{t.gbps:.3f} GB/s, {t.seconds:.2f} s, server CPU {t.cpu:.2f} s, "
                        f"peak RSS {t.peak:.0f} MiB{exact}, verified")

    # Idle keep-alive connections.

    def idle_connections(self, server, count, per_conn):
        """Growth of the server's RSS with `count` idle keep-alive connections."""
        ctx = ssl.create_default_context(cafile=self.cert)
        # A session per connection, like 50 clients with a transfer each (a
        # session allows a bounded number of connections).
        tickets = [server.add_ticket(self.big, self.args.size, ["read"])
                   for _ in range(count)]
        pids = server.pids()
        # One transfer first, on its own connection: a server that caches
        # buffers across connections (imaged's pool) shows its cache here,
        # not as a cost of the idle connections measured next.
        warm = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx,
                                           timeout=60)
        try:
            warm.request("GET", f"/images/{tickets[0]}",
                         headers={"Range": f"bytes=0-{per_conn - 1}"})
            warm.getresponse().read()
        finally:
            warm.close()
        time.sleep(0.5)
        before = rss_mib(pids)
        reset_peak(pids)
        conns = []
        try:
            for ticket in tickets:
                c = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx,
                                                timeout=60)
                c.request("GET", f"/images/{ticket}",
                          headers={"Range": f"bytes=0-{per_conn - 1}"})
                r = c.getresponse()
                body_len = 0
                while True:
                    chunk = r.read(1024 * 1024)
                    if not chunk:
                        break
                    body_len += len(chunk)
                if r.status not in (200, 206) or body_len != per_conn:
                    raise BenchError(f"{server.name}: idle test GET answered {r.status}, "
                                     f"{body_len} bytes")
                conns.append(c)
            time.sleep(1.0)
            idle = rss_mib(pids)
            peak = peak_rss_mib(pids)
        finally:
            for c in conns:
                c.close()
        time.sleep(1.0)
        after = rss_mib(pids)
        return {"connections": count, "bytes_per_connection": per_conn,
                "rss_before_mib": round(before, 1), "rss_idle_mib": round(idle, 1),
                "growth_mib": round(idle - before, 1), "peak_mib": round(peak, 1),
                "rss_after_close_mib": round(after, 1)}

    # Machine limits.

    def limits(self):
        size = self.args.size
        result = {}
        p = run(["dd", f"if={self.big}", "of=/dev/null", "bs=8M", "iflag=direct"],
                timeout=self.timeout_for(size))
        result["dd_read_direct_gbps"] = dd_rate(p.stderr)
        result["huge_read_direct_gbps"] = direct_read_rate(self.big, 8 * MiB)
        tmp = os.path.join(self.out, "dd-write.tmp")
        try:
            p = run(["dd", f"if={self.big}", f"of={tmp}", "bs=8M", "oflag=direct",
                     "conv=fsync"], timeout=self.timeout_for(size))
            result["dd_write_direct_gbps"] = dd_rate(p.stderr)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        secs = "1" if self.smoke else "3"
        for cipher in ("aes-128-gcm", "aes-256-gcm"):
            argv = ["openssl", "speed", "-evp", cipher, "-seconds", secs, "-bytes", "16384"]
            if shutil.which("taskset"):
                argv = ["taskset", "-c", "0"] + argv
            p = run(argv, timeout=120)
            result[f"openssl_{cipher.replace('-', '_')}_gbps"] = openssl_rate(p.stdout)
        return result

    def negotiated(self, server):
        ctx = ssl.create_default_context(cafile=self.cert)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                return f"{s.version()} {s.cipher()[0]}"

    # Profiling.

    def profile(self):
        imaged = self.servers["imaged"]
        venv = os.path.join(self.out, "venv-tools")
        spy = os.path.join(venv, "bin", "py-spy")
        if not os.path.exists(spy):
            log(f"installing py-spy into {venv} for --profile")
            base = getattr(sys, "_base_executable", None) or sys.executable
            run([base, "-m", "venv", venv], timeout=300)
            run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet",
                 "py-spy"], timeout=600)
        summaries = {}
        kinds = [("https-get", self.https_get), ("https-put", self.https_put),
                 ("unix-get", self.unix_get), ("unix-put", self.unix_put)]
        if self.client:
            kinds += [("client-download-4", self.client_download(4)),
                      ("client-upload-4", self.client_upload(4))]
        for key, fn in kinds:
            raw = os.path.join(self.out, f"profile-{key}.txt")
            proc = self.procs.start("py-spy", [spy, "record", "--format", "raw", "--rate", "250",
                                               "--nonblocking", "--threads",
                                               "-o", raw, "-p", str(imaged.pid)],
                                    stdout=self.logfile("py-spy.out"), stderr=subprocess.STDOUT)
            time.sleep(1.0)
            try:
                fn(imaged, 0)
            finally:
                self.procs.stop(proc, sig=signal.SIGINT, timeout=60)
            summaries[key] = top_frames(raw)
            log(f"profile of {key}: {raw}")
        return summaries


def direct_read_rate(path, chunk):
    """
    GB/s of an O_DIRECT read of `path`, `chunk` bytes at a time, into a
    buffer made as imaged makes its transfer buffers (transparent huge
    pages). dd's buffer is 4 KiB pages wherever malloc put them: on a
    device that caps the segments of a request, its figure depends on
    memory fragmentation.
    """
    view = util.huge_page_area(chunk)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        began = time.monotonic()
        pos = 0
        while True:
            count = os.preadv(fd, [view], pos)
            if not count:
                break
            pos += count
        return pos / (time.monotonic() - began) / GB
    finally:
        os.close(fd)


def dd_rate(stderr):
    m = re.search(r"(\d+) bytes .* copied, ([\d.,]+) s", stderr)
    if not m:
        return None
    return int(m.group(1)) / float(m.group(2).replace(",", ".")) / GB


def openssl_rate(stdout):
    # "AES-128-GCM   123456.78k" (1000s of bytes per second for 16384-byte blocks)
    for line in stdout.splitlines():
        m = re.match(r"^(AES-\d+-GCM|aes-\d+-gcm)\s+([\d.]+)k\s*$", line.strip())
        if m:
            return float(m.group(2)) * 1000 / GB
    return None


def top_frames(raw_path, count=15):
    """Self (leaf) and inclusive sample shares of the busiest functions."""
    leaf, incl, total = {}, {}, 0
    with contextlib.suppress(OSError):
        with open(raw_path) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                if not stack or not n.isdigit():
                    continue
                n = int(n)
                total += n
                frames = stack.split(";")
                name = frames[-1]
                leaf[name] = leaf.get(name, 0) + n
                for fr in set(frames[1:]):   # the first frame is the thread
                    incl[fr] = incl.get(fr, 0) + n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def top(d):
        return [(k, round(100 * v / total, 1))
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:count]]

    return {"samples": total, "self": top(leaf), "inclusive": top(incl)}


# Report.

def median(samples, attr):
    values = [getattr(t, attr) for t in samples]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


PEERS = ("nginx", "ovirt-imageio", NbdCopy.name)


def table(cases):
    names = ["imaged"] + [p for p in PEERS if any(c.samples.get(p) for c in cases)]
    head = ["transfer"] + [f"{n} GB/s" for n in names] + \
        [f"imaged/{p}" for p in names[1:]] + \
        ["server CPU s (" + " / ".join(names) + ")",
         "peak RSS MiB (" + " / ".join(names) + ")"]
    rows = []
    for c in cases:
        row = [c.title]
        med = {n: median(c.samples.get(n, []), "gbps") for n in names}
        if c.skipped and not any(c.samples.values()):
            rows.append([c.title] + [f"skipped: {c.skipped}"] + [""] * (len(head) - 2))
            continue
        row += [fmt(med[n], ".3f") for n in names]
        for p in names[1:]:
            r = med[p] and med["imaged"] and med["imaged"] / med[p]
            row.append(fmt(r, ".2f") + ("×" if r else ""))
        row.append(" / ".join(fmt(median(c.samples.get(n, []), "cpu"), ".1f") for n in names))
        row.append(" / ".join(fmt(max((t.peak for t in c.samples.get(n, [])), default=None),
                                  ".0f") for n in names))
        rows.append(row)
    return markdown(head, rows)


PROXY_COLUMNS = ("imaged proxy", "imaged", "ovirt-imageio proxy")
PROXY_MIN_VS_DIRECT = 0.8
PROXY_MIN_VS_OVIRT = 1.5


def proxy_table(cases):
    head = ["transfer", "imaged proxy GB/s", "straight to the host GB/s",
            "ovirt-imageio proxy GB/s", "proxy/direct", "proxy/ovirt-imageio proxy",
            "proxy CPU s (imaged / ovirt-imageio)",
            "proxy peak RSS MiB (imaged / ovirt-imageio)"]
    rows = []
    for c in cases:
        med = {n: median(c.samples.get(n, []), "gbps") for n in PROXY_COLUMNS}
        p, d, o = (med[n] for n in PROXY_COLUMNS)
        rows.append([c.title] + [fmt(med[n], ".3f") for n in PROXY_COLUMNS] + [
            fmt(p and d and p / d, ".2f") + ("×" if p and d else ""),
            fmt(p and o and p / o, ".2f") + ("×" if p and o else ""),
            " / ".join(fmt(median(c.samples.get(n, []), "cpu"), ".1f")
                       for n in PROXY_COLUMNS[::2]),
            " / ".join(fmt(max((t.peak for t in c.samples.get(n, [])), default=None), ".0f")
                       for n in PROXY_COLUMNS[::2])])
    return markdown(head, rows)


def proxy_targets(cases, smoke):
    lines = []
    for c in cases:
        p = median(c.samples.get("imaged proxy", []), "gbps")
        for peer, label, want in (("imaged", "straight to the host", PROXY_MIN_VS_DIRECT),
                                  ("ovirt-imageio proxy", "ovirt-imageio's proxy",
                                   PROXY_MIN_VS_OVIRT)):
            q = median(c.samples.get(peer, []), "gbps")
            if not (p and q):
                lines.append(f"- {c.title} ≥ {want}× {label}: not measured")
                continue
            lines.append(f"- {c.title} ≥ {want}× {label}: {p / q:.2f}× — "
                         f"{'met' if p / q >= want else 'MISSED'}")
    peaks = [t.peak for c in cases for t in c.samples.get("imaged proxy", [])]
    if peaks:
        lines.append(f"- imaged proxy peak RSS ≤ {MAX_PEAK_RSS_MIB} MiB: max {max(peaks):.0f} MiB"
                     f" — {'met' if max(peaks) <= MAX_PEAK_RSS_MIB else 'MISSED'}")
    if smoke:
        lines.append("- (smoke mode: tiny images, 1 repetition; the ratios mean nothing)")
    return "\n".join(lines)


def markdown(head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def targets_report(cases, servers, idle, smoke):
    by_key = {c.key: c for c in cases}
    lines = []

    def ratio(key, peer, attr):
        """(row title, imaged's median / peer's, both medians) or a None ratio."""
        c = by_key.get(key)
        mine = c and median(c.samples.get("imaged", []), attr)
        theirs = c and median(c.samples.get(peer, []), attr)
        title = c.title if c else key
        return title, (mine / theirs if mine and theirs else None), mine, theirs

    for key, peer, want in TARGETS:
        title, r, _, _ = ratio(key, peer, "gbps")
        goal = f"- {title} ≥ {want}× {peer}"
        lines.append(f"{goal}: not measured" if r is None else
                     f"{goal}: {r:.2f}× — {'met' if r >= want else 'MISSED'}")
    for key, peer, most in CPU_TARGETS:
        title, r, mine, theirs = ratio(key, peer, "cpu")
        goal = f"- {title}: server CPU ≤ {most}× {peer}'s"
        lines.append(f"{goal}: not measured" if r is None else
                     f"{goal}: {r:.2f}× ({mine:.2f} / {theirs:.2f} s) — "
                     f"{'met' if r <= most else 'MISSED'}")
    for c in cases:
        # Not a target: where imaged stands against the export itself.
        title, r, _, _ = ratio(c.key, NbdCopy.name, "gbps")
        if r is not None:
            lines.append(f"- {title}: {r:.2f}× nbdcopy on the same export "
                         f"(the export's ceiling; for reading the ratios above)")
    peaks = [t.peak for c in cases for t in c.samples.get("imaged", [])]
    if peaks:
        p = max(peaks)
        lines.append(f"- imaged peak RSS ≤ {MAX_PEAK_RSS_MIB} MiB in every transfer: "
                     f"max {p:.0f} MiB — {'met' if p <= MAX_PEAK_RSS_MIB else 'MISSED'}")
    if idle and "imaged" in idle:
        g = idle["imaged"]["growth_mib"]
        n = idle["imaged"]["connections"]
        lines.append(f"- {n} idle keep-alive connections add < {MAX_IDLE_GROWTH_MIB} MiB: "
                     f"+{g:.1f} MiB — {'met' if g < MAX_IDLE_GROWTH_MIB else 'MISSED'}"
                     + (" (smoke mode: fewer connections)" if smoke else ""))
    if smoke:
        lines.append("- (smoke mode: tiny images, 1 repetition; the ratios mean nothing)")
    return "\n".join(lines)


def machine_info():
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def imaged_revision():
    """The tree's commit, marked when the working tree has changes (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, timeout=10,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                "--", "imaged"], cwd=ROOT, timeout=10,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except (OSError, subprocess.SubprocessError):
        return "?"
    rev = head.stdout.strip() or "?"
    return rev + (" + uncommitted changes in imaged/" if dirty.stdout.strip() else "")


def versions(bench):
    v = {"imaged": imaged_revision()}
    ovirt = getattr(bench.servers.get("ovirt-imageio"), "venv", None)
    if ovirt:
        v["ovirt-imageio"] = OVIRT_VERSION
    for name, argv in (("curl", ["curl", "--version"]), ("nginx", ["nginx", "-v"]),
                       ("openssl", ["openssl", "version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=10)
            first = p.stdout.strip().splitlines()[0]
            # "curl 7.88.1 (...) libcurl/...", "nginx version: nginx/1.22.1",
            # "OpenSSL 3.0.19 27 Jan 2026 (...)": keep the version.
            v[name] = first.split()[-1].split("/")[-1] if name == "nginx" \
                else first.split()[1]
    return v


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny images, 1 repetition, no peers unless asked: "
                             "proves the harness works in seconds")
    parser.add_argument("--reps", type=int, help="repetitions per server and transfer "
                        "(default 5, smoke 1)")
    parser.add_argument("--size", type=int, help="random image size in MiB (default 2048)")
    parser.add_argument("--sparse-size", type=int,
                        help="sparse image size in MiB (default 8192)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out"),
                        help="work directory (default bench/out)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the images in the work directory for the next run")
    parser.add_argument("--nginx", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with nginx (default: yes; no in smoke mode)")
    parser.add_argument("--ovirt", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with ovirt-imageio (default: yes; no in smoke mode)")
    parser.add_argument("--proxy", action=argparse.BooleanOptionalAction, default=True,
                        help="the proxy rows: imaged and ovirt-imageio as proxies in front "
                             "of imaged (default: yes)")
    parser.add_argument("--only", nargs="+", metavar="CASE",
                        help="only these transfers (https-get https-put unix-get unix-put "
                             "proxy-https-get proxy-https-put proxy-local-get proxy-local-put "
                             "client-download-1 client-download-4 client-upload-1 "
                             "client-upload-4 client-sparse-download nbd-https-get "
                             "nbd-https-put nbd-unix-get nbd-unix-put "
                             "nbd-client-sparse-download qcow2-upload-1 "
                             "qcow2-upload-4 qcow2-download-1 qcow2-download-4)")
    parser.add_argument("--nbd", action=argparse.BooleanOptionalAction, default=True,
                        help="the NBD rows: qcow2 copies of the images behind qemu-nbd "
                             "(default: yes, where qemu-nbd and libnbd are installed)")
    parser.add_argument("--qcow2-size", type=int,
                        help="virtual size of the qcow2 rows' image in MiB (default 8192, "
                             "smoke 256)")
    parser.add_argument("--qcow2-data", type=int,
                        help="data in it in MiB (default 2048, smoke 64)")
    parser.add_argument("--resume-row", action=argparse.BooleanOptionalAction,
                        default=True, help="measure the resume row (default: yes)")
    parser.add_argument("--idle-connections", type=int,
                        help="idle keep-alive connections to open (default 50, smoke 10; 0 skips)")
    parser.add_argument("--verify-every-get", action="store_true",
                        help="time curl downloads into RAM and verify each one, instead "
                             "of timing them into /dev/null after one verified download")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, profile imaged with py-spy during one "
                             "transfer of each curl kind")
    parser.add_argument("--max-minutes", type=float, default=90,
                        help="stop repeating after this long (default 90)")
    parser.add_argument("--imaged-config", metavar="JSON",
                        help='settings merged into imaged\'s config, e.g. '
                             '\'{"images": {"direct_io": false}}\'')
    parser.add_argument("--imaged-python", default=None,
                        help="Python that runs imaged (default .venv/bin/python)")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.smoke else 5
    args.size = (args.size or (32 if args.smoke else 2048)) * MiB
    args.sparse_size = (args.sparse_size or (256 if args.smoke else 8192)) * MiB
    args.qcow2_size = (args.qcow2_size or (256 if args.smoke else 8192)) * MiB
    args.qcow2_data = (args.qcow2_data or (64 if args.smoke else 2048)) * MiB
    if args.nginx is None:
        args.nginx = not args.smoke
    if args.ovirt is None:
        args.ovirt = not args.smoke
    if args.idle_connections is None:
        args.idle_connections = 10 if args.smoke else 50
    if args.imaged_python is None:
        venv_py = os.path.join(ROOT, ".venv", "bin", "python")
        args.imaged_python = venv_py if os.path.exists(venv_py) else sys.executable
    if args.reps < 1 or args.size % (1 * MiB) or args.sparse_size < 16 * MiB:
        parser.error("bad --reps, --size or --sparse-size")

    # SIGTERM and SIGHUP end the run like Ctrl-C: through the finally below.
    def terminate(signo, frame):
        raise KeyboardInterrupt(f"signal {signo}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)

    started = datetime.datetime.now().astimezone()
    bench = Bench(args)
    r = argparse.Namespace(cases=[], idle={}, limits_start={}, limits_end={}, tls={},
                           profiles=None, resume=None)

    def extra(what, fn):
        # Extras must not lose the measurements done so far.
        try:
            return fn()
        except (BenchError, OSError, http.client.HTTPException, ssl.SSLError) as e:
            log(f"{what} failed: {e}")
            bench.notes.append(f"{what} failed: {str(e).splitlines()[0]}")
            return None

    status = 0
    try:
        bench.setup()
        log("measuring machine limits")
        r.limits_start = extra("machine limits", bench.limits) or {}
        r.cases = bench.cases()
        bench.measure(r.cases)
        if args.resume_row and bench.client and not (args.only and "resume" not in args.only):
            log("resume row")
            r.resume = extra("resume row", bench.resume_row)
        per_conn = min(16 * MiB, args.size)
        # --idle-connections 0 skips the idle connections test.
        for name in ("imaged", "ovirt-imageio"):
            if name in bench.servers and args.idle_connections > 0:
                log(f"idle keep-alive connections: {name}")
                res = extra(f"idle connections test ({name})", lambda: bench.idle_connections(
                    bench.servers[name], args.idle_connections, per_conn))
                if res:
                    r.idle[name] = res
        r.limits_end = extra("machine limits", bench.limits) or {}
        for n, srv in bench.servers.items():
            r.tls[n] = extra(f"TLS check ({n})", lambda: bench.negotiated(srv)) or "?"
        if args.profile:
            r.profiles = extra("profiling", bench.profile)
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        bench.notes.append("interrupted: results are incomplete")
        status = 130
    except BenchError as e:
        log(f"bench failed: {e}")
        bench.notes.append(f"FAILED: {str(e).splitlines()[0]}")
        status = 1
    finally:
        bench.close()

    if not hasattr(bench, "sparse_data"):
        return status or 1
    report = render(args, bench, r.cases, r.idle, r.limits_start, r.limits_end, r.tls,
                    r.profiles, started, r.resume)
    print(report)
    with open(os.path.join(bench.out, "results.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(bench.out, "results.json"), "w") as f:
        json.dump({
            "date": started.isoformat(timespec="seconds"),
            "machine": machine_info(),
            "versions": bench.versions,
            "args": {k: v for k, v in vars(args).items()},
            "status": status,
            "notes": bench.notes,
            "cases": {c.key: {"title": c.title, "skipped": c.skipped,
                              "samples": {n: [t.as_dict() for t in ts]
                                          for n, ts in c.samples.items()}}
                      for c in r.cases},
            "idle_keepalive": r.idle,
            "limits": {"start": r.limits_start, "end": r.limits_end},
            "tls": r.tls,
            "profiles": r.profiles,
            "resume": r.resume,
        }, f, indent=2)
    log(f"results: {bench.out}/results.md, {bench.out}/results.json")
    return status


def render(args, bench, cases, idle, limits_start, limits_end, tls, profiles, started,
           resume=None):
    mode = "smoke" if args.smoke else "full"
    out = [f"## imaged benchmark ({mode}), {started:%Y-%m-%d %H:%M %Z}", "",
           f"Machine: {machine_info()}",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in bench.versions.items()),
           f"Images: random {args.size / GiB:.3g} GiB; sparse {args.sparse_size / GiB:.3g} GiB "
           f"with {bench.sparse_data / MiB:.0f} MiB data. Medians of {args.reps} "
           f"interleaved repetitions; GB/s = 10^9 bytes/s; every transfer verified.",
           "", table([c for c in cases if not c.key.startswith("proxy-")]),
           ""]
    if resume:
        out += [f"Resume row: an upload of {resume['size'] / GiB:.3g} GiB (random, 4 conn) "
                f"killed at half of it, finished with --resume in "
                f"{resume['resume_s']:.2f} s (moving {resume['moved_bytes'] / GiB:.2f} GiB) "
                f"against {resume['start_over_s']:.2f} s started over: "
                f"{resume['start_over_s'] / resume['resume_s']:.2f}× faster "
                f"(medians of {len(resume['samples']['resume_s'])}).", ""]
    others = [(t.other_cpu / t.seconds) for c in cases for ts in c.samples.values()
              for t in ts]
    if others:
        out += [f"Other load during the transfers (CPU busy outside the server and its "
                f"client, hypervisor steal included): median {statistics.median(others):.2f}, "
                f"max {max(others):.2f} of {os.cpu_count()} cores.", ""]
    if bench.notes:
        out += ["Notes:"] + [f"- {n}" for n in bench.notes] + [""]

    def lim(d, k, spec=".2f"):
        return fmt(d.get(k), spec)

    out += ["Machine limits (start / end of the run):", "",
            f"- dd O_DIRECT read {lim(limits_start, 'dd_read_direct_gbps')} / "
            f"{lim(limits_end, 'dd_read_direct_gbps')} GB/s; "
            f"write {lim(limits_start, 'dd_write_direct_gbps')} / "
            f"{lim(limits_end, 'dd_write_direct_gbps')} GB/s",
            f"- O_DIRECT read, 8 MiB at a time into huge pages (as imaged reads) "
            f"{lim(limits_start, 'huge_read_direct_gbps')} / "
            f"{lim(limits_end, 'huge_read_direct_gbps')} GB/s",
            f"- openssl speed, one core, 16 KiB blocks: aes-128-gcm "
            f"{lim(limits_start, 'openssl_aes_128_gcm_gbps')} / "
            f"{lim(limits_end, 'openssl_aes_128_gcm_gbps')} GB/s; aes-256-gcm "
            f"{lim(limits_start, 'openssl_aes_256_gcm_gbps')} / "
            f"{lim(limits_end, 'openssl_aes_256_gcm_gbps')} GB/s",
            "- TLS negotiated: " + "; ".join(f"{n}: {v}" for n, v in tls.items()), ""]
    if idle:
        out += ["Idle keep-alive connections (each GET "
                f"{next(iter(idle.values()))['bytes_per_connection'] // MiB} MiB, then idle):", ""]
        for name, r in idle.items():
            out.append(f"- {name}: {r['connections']} connections: RSS {r['rss_before_mib']:.0f}"
                       f" → {r['rss_idle_mib']:.0f} MiB (+{r['growth_mib']:.1f} MiB), peak "
                       f"{r['peak_mib']:.0f} MiB, {r['rss_after_close_mib']:.0f} MiB after closing")
        out.append("")
    out += ["Targets (issues 5, 16, 18 and 19, same-run ratios):", "",
            targets_report(cases, bench.servers, idle, args.smoke), ""]
    proxy_cases = [c for c in cases if c.key.startswith("proxy-")]
    if proxy_cases:
        out += ["Proxy role (curl, HTTPS in; the proxies run beside the host imaged and "
                f"reach it over HTTPS at {PROXY_HOST_ADDRESS}, or through its unix socket "
                "when given its 127.0.0.1 URL; CPU and RSS are the proxy's own):", "",
                proxy_table(proxy_cases), "",
                "Targets (issue 17, same-run ratios):", "",
                proxy_targets(proxy_cases, args.smoke), ""]
    out += ["Samples (GB/s):", ""]
    for c in cases:
        for name, ts in c.samples.items():
            if ts:
                out.append(f"- {c.title}, {name}: " + " ".join(f"{t.gbps:.3f}" for t in ts)
                           + f" (median client CPU {median(ts, 'client_cpu'):.1f} s, "
                           f"other load {median(ts, 'other_cpu') / median(ts, 'seconds'):.2f}"
                           " cores)")
    if profiles:
        out += ["", "Profiles of imaged (py-spy, % of samples, self):", ""]
        for key, p in profiles.items():
            out.append(f"- {key} ({p['samples']} samples): " +
                       "; ".join(f"{name} {pct}%" for name, pct in p["self"][:8]))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
