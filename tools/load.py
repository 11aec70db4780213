#!/usr/bin/env python3
"""
Load and stall test for imaged: figures for docs/security.md.

    .venv/bin/python tools/load.py                  # 60 s, 200 connections
    .venv/bin/python tools/load.py --duration 5     # quick mode
    .venv/bin/python tools/load.py --json out.json  # also write the figures

Starts its own imaged (temporary config, self-signed certificate, sparse
images, loopback and unix sockets only), then:

1. Main phase: --connections keep-alive connections (default 200) spread
   over --sessions sessions (default 20) do a mix of GET (ranges), PUT
   (64 KiB-1 MiB at random offsets, flush=n or y), PATCH zero and GET
   extents for --duration seconds. Each connection writes only its own
   slice of its image, so its last write can be read back and checked.
   Daemon RSS, open fds and threads are sampled every second.
2. Stall phase: a few normal connections run alone, then again next to
   clients that stopped reading a large GET and clients that send a PUT body
   a few bytes at a time; the normal clients' latencies are compared.

Prints a report (requests/s, errors, p50/p99 latency per kind, RSS) and exits
1 if there was any error. Everything it starts is stopped at the end, also on
Ctrl-C; nothing is left but the report (and --json).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from imaged import lab, testing  # noqa: E402

KiB = 1024
MiB = 1024**2

# Operation mix of the main phase: (kind, weight).
MIX = (("get", 40), ("put", 30), ("zero", 15), ("extents", 15))
GET_SIZES = (64 * KiB, 256 * KiB, MiB)
PUT_SIZES = (64 * KiB, 256 * KiB, MiB)
ZERO_SIZES = (64 * KiB, MiB, 4 * MiB)
PUT_FLUSH_Y = 0.25      # Share of PUTs with flush=y (fsync before the answer).

# Hard limits: this tool must stay bounded whatever it is asked.
MAX_CONNECTIONS = 1000
MAX_DURATION_S = 3600
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30


# A small HTTP/1.1 client: cheap enough that 200 connections on a 2-core
# machine leave the CPU to the daemon.

class HTTPError(Exception):
    pass


class Conn:
    """One keep-alive connection to a listener of the daemon."""

    def __init__(self, target, rcvbuf=None):
        self.target = target
        self.rcvbuf = rcvbuf
        self.sock = None
        self.rfile = None
        self.buf = None

    def connect(self):
        t = self.target
        if t["kind"] == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = t["path"]
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            addr = ("127.0.0.1", t["port"])
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.settimeout(t.get("timeout", 60))
        sock.connect(addr)
        if t["kind"] == "tls":
            sock = t["ssl_context"].wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.rfile = sock.makefile("rb", 256 * KiB)

    def close(self):
        for thing in (self.rfile, self.sock):
            if thing is not None:
                try:
                    thing.close()
                except OSError:
                    pass
        self.sock = self.rfile = None

    def send_head(self, method, path, headers=()):
        if self.sock is None:
            self.connect()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
        for name, value in headers:
            head += f"{name}: {value}\r\n"
        self.sock.sendall((head + "\r\n").encode("latin-1"))

    def request(self, method, path, headers=(), body=None, into=None):
        """
        Send a request and read its answer: (status, headers, body). With
        `into` (a bytearray), a body of known length is read into it and
        returned as a memoryview, without allocating.
        """
        if body is not None:
            headers = list(headers) + [("Content-Length", str(len(body)))]
        try:
            self.send_head(method, path, headers)
            if body:
                self.sock.sendall(body)
            return self.read_response(method, into)
        except BaseException:
            self.close()
            raise

    def read_response(self, method="GET", into=None):
        line = self.rfile.readline(65537)
        if not line:
            raise HTTPError("connection closed by the daemon")
        status = int(line.split(b" ", 2)[1])
        headers = {}
        while True:
            h = self.rfile.readline(65537)
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                raise HTTPError("connection closed in the headers")
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if method != "HEAD" and status not in (204, 304) \
                and headers.get("transfer-encoding", "").lower() == "chunked":
            # Streamed answers (extents) come chunked.
            body = self._read_chunked()
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers, body
        length = int(headers.get("content-length", "0"))
        if method == "HEAD" or status in (204, 304):
            length = 0
        if into is not None and length <= len(into):
            view = memoryview(into)[:length]
            got = 0
            while got < length:
                n = self.rfile.readinto(view[got:])
                if not n:
                    raise HTTPError("connection closed in the body")
                got += n
            body = view
        else:
            body = self.rfile.read(length)
            if len(body) != length:
                raise HTTPError("connection closed in the body")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def _read_chunked(self):
        body = bytearray()
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise HTTPError("connection closed in a chunked body")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers, up to the empty line.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(body)
            data = self.rfile.read(size)
            if len(data) != size:
                raise HTTPError("connection closed in a chunked body")
            body += data
            self.rfile.readline(65537)


# The daemon.

class Daemon(testing.Daemon):
    """An imaged subprocess (imaged.testing) with its config in `workdir`."""

    def __init__(self, workdir, args):
        cert = os.path.join(workdir, "cert.pem")
        key = os.path.join(workdir, "key.pem")
        lab.ensure_certificate(cert, key)
        # Connections per session: the main phase's share plus the stall
        # phase's clients, all allowed to run at once.
        per_session = -(-args.connections // args.sessions) + 8
        super().__init__(workdir, cert, key, overrides={
            "images": {"max_readers": per_session, "max_writers": per_session,
                       "max_connections_per_session": max(32, per_session)},
            "logging": {"level": "INFO"},
        })
        self.exit_status = None

    def start(self):
        try:
            return super().start(START_TIMEOUT_S)
        except testing.DaemonError as e:
            raise RuntimeError(str(e)) from None

    def stop(self):
        if self.exit_status is None and self.proc is not None:
            self.exit_status = super().stop(timeout=STOP_TIMEOUT_S)
        return self.exit_status

    def control(self, method, path, body=None):
        conn = Conn({"kind": "unix", "path": self.control_path, "timeout": 60})
        try:
            data = json.dumps(body).encode() if body is not None else None
            status, _, answer = conn.request(method, path, body=data)
            return status, bytes(answer)
        finally:
            conn.close()

    def add_session(self, sid, path, size):
        status, body = self.control("PUT", f"/sessions/{sid}", {
            "url": f"file://{path}", "size": size, "ops": ["read", "write"],
            "timeout": 3600, "sparse": True, "transfer_id": f"load-{sid[:8]}"})
        if status != 200:
            raise RuntimeError(f"cannot add a session: {status} {body!r}")

    def progress(self):
        status, body = self.control("GET", "/progress")
        if status != 200:
            raise RuntimeError(f"progress: {status} {body!r}")
        return json.loads(body)

    def sample(self):
        """(rss_kib, fds, threads, cpu_s) of the daemon process."""
        pid = self.proc.pid
        rss = threads = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds, threads, _cpu_seconds(pid)


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Statistics.

class Stats:
    def __init__(self):
        self.latencies = {}
        self.errors = []
        self.error_count = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def ok(self, kind, seconds):
        self.latencies.setdefault(kind, []).append(seconds)

    def error(self, kind, message):
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(f"{kind}: {message}")

    def count(self):
        return sum(len(v) for v in self.latencies.values())

    def summary(self, seconds):
        kinds = {}
        everything = []
        for kind, values in sorted(self.latencies.items()):
            everything += values
            kinds[kind] = _latency(values, seconds)
        return {
            "requests": len(everything) + self.error_count,
            "requests_per_s": round((len(everything) + self.error_count) / seconds, 1),
            "errors": self.error_count,
            "error_samples": self.errors,
            "all": _latency(everything, seconds),
            "kinds": kinds,
            "read_mib_per_s": round(self.bytes_read / MiB / seconds, 1),
            "written_mib_per_s": round(self.bytes_written / MiB / seconds, 1),
        }


def _latency(values, seconds):
    if not values:
        return {"count": 0}
    values = sorted(values)

    def pct(p):
        return round(values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000, 2)

    return {"count": len(values), "per_s": round(len(values) / seconds, 1),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(values[-1] * 1000, 2)}


# Clients.

class Worker:
    """
    One connection doing the operation mix on one session. Writes stay in
    the worker's own slice of the image, so that its last write is known
    and can be checked at the end.
    """

    def __init__(self, n, target, session, slice_, payload, seed):
        self.n = n
        self.conn = Conn(target)
        self.sid, self.image_size = session
        self.lo, self.hi = slice_
        self.payload = payload
        self.rnd = random.Random(seed)
        self.into = bytearray(max(GET_SIZES))
        self.last_put = None    # (offset, length, payload start)

    def run(self, stats, stop, mix=MIX):
        kinds = [k for k, _ in mix]
        weights = [w for _, w in mix]
        while not stop.is_set():
            kind = self.rnd.choices(kinds, weights)[0]
            start = time.perf_counter()
            try:
                getattr(self, "do_" + kind)(stats)
            except (OSError, HTTPError, ValueError, IndexError) as e:
                stats.error(kind, f"{type(e).__name__}: {e}")
                self.conn.close()
                continue
            except AssertionError as e:
                stats.error(kind, str(e))
                self.conn.close()
                continue
            stats.ok(kind, time.perf_counter() - start)

    def _aligned(self, lo, hi, length):
        return self.rnd.randrange(lo // 4096, (hi - length) // 4096 + 1) * 4096

    def do_get(self, stats):
        length = self.rnd.choice(GET_SIZES)
        offset = self._aligned(0, self.image_size, length)
        status, _, body = self.conn.request(
            "GET", f"/images/{self.sid}",
            [("Range", f"bytes={offset}-{offset + length - 1}")], into=self.into)
        assert status == 206, f"GET answered {status}: {bytes(body[:200])!r}"
        assert len(body) == length, f"GET returned {len(body)} of {length} bytes"
        stats.bytes_read += length

    def do_put(self, stats):
        length = self.rnd.choice(PUT_SIZES)
        offset = self._aligned(self.lo, self.hi, length)
        start = self.rnd.randrange(0, len(self.payload) - length)
        flush = "y" if self.rnd.random() < PUT_FLUSH_Y else "n"
        status, _, body = self.conn.request(
            "PUT", f"/images/{self.sid}?flush={flush}",
            [("Content-Range", f"bytes {offset}-{offset + length - 1}/*")],
            body=self.payload[start:start + length])
        assert status == 200, f"PUT answered {status}: {bytes(body[:200])!r}"
        self.last_put = (offset, length, start)
        stats.bytes_written += length

    def do_zero(self, stats):
        length = min(self.rnd.choice(ZERO_SIZES), self.hi - self.lo)
        offset = self._aligned(self.lo, self.hi, length)
        msg = json.dumps({"op": "zero", "offset": offset, "size": length,
                          "flush": self.rnd.random() < 0.1}).encode()
        status, _, body = self.conn.request(
            "PATCH", f"/images/{self.sid}",
            [("Content-Type", "application/json")], body=msg)
        assert status == 200, f"PATCH zero answered {status}: {bytes(body[:200])!r}"
        if self.last_put and offset < self.last_put[0] + self.last_put[1] \
                and self.last_put[0] < offset + length:
            self.last_put = None

    def do_extents(self, stats):
        status, _, body = self.conn.request("GET", f"/images/{self.sid}/extents")
        assert status == 200, f"extents answered {status}: {bytes(body[:200])!r}"
        extents = json.loads(body)
        assert sum(e["length"] for e in extents) == self.image_size, \
            "extents do not cover the image"

    def verify(self):
        """True if the last write reads back intact (or there was none)."""
        if self.last_put is None:
            return None
        offset, length, start = self.last_put
        status, _, body = self.conn.request(
            "GET", f"/images/{self.sid}",
            [("Range", f"bytes={offset}-{offset + length - 1}")], into=self.into)
        return status == 206 and body == self.payload[start:start + length]


class StalledReader:
    """GETs a whole image and stops reading after the headers."""

    def __init__(self, target, sid):
        self.conn = Conn(target, rcvbuf=64 * KiB)
        self.sid = sid

    def start(self):
        self.conn.send_head("GET", f"/images/{self.sid}")
        line = self.conn.rfile.readline()
        assert line.startswith(b"HTTP/1.1 200"), line
        # Not another byte from now on.

    def close(self):
        self.conn.close()


class SlowWriter:
    """PUTs a large body a few bytes at a time."""

    def __init__(self, target, sid, offset, length=64 * MiB, step=4 * KiB, every_s=0.25):
        self.conn = Conn(target)
        self.sid = sid
        self.offset = offset
        self.length = length
        self.step = step
        self.every_s = every_s
        self.sent = 0
        self.greenlet = None
        self.failed = None

    def start(self):
        self.conn.send_head("PUT", f"/images/{self.sid}?flush=n", [
            ("Content-Range", f"bytes {self.offset}-{self.offset + self.length - 1}/*"),
            ("Content-Length", str(self.length))])
        self.greenlet = gevent.spawn(self._drip)

    def _drip(self):
        chunk = b"s" * self.step
        try:
            while self.sent + self.step < self.length:
                self.conn.sock.sendall(chunk)
                self.sent += self.step
                gevent.sleep(self.every_s)
        except OSError as e:
            self.failed = e

    def close(self):
        if self.greenlet is not None:
            self.greenlet.kill()
        self.conn.close()


# The run.

def sampler(daemon, samples, stop):
    while not stop.is_set():
        try:
            samples.append((time.monotonic(),) + daemon.sample())
        except OSError:
            return
        stop.wait(1.0)


def run_phase(workers, seconds, mix=MIX):
    stats = Stats()
    stop = gevent.event.Event()
    greenlets = [gevent.spawn(w.run, stats, stop, mix) for w in workers]
    start = time.monotonic()
    gevent.sleep(seconds)
    stop.set()
    gevent.joinall(greenlets, timeout=120)
    elapsed = time.monotonic() - start
    gevent.killall([g for g in greenlets if not g.dead])
    return stats, elapsed


def connect_all(workers):
    jobs = [gevent.spawn(w.conn.connect) for w in workers]
    gevent.joinall(jobs, raise_error=True)


def run(args, workdir, report):
    daemon = Daemon(workdir, args)
    target = {"kind": args.transport}
    daemon.start()
    try:
        report["daemon_pid"] = daemon.proc.pid
        if args.transport == "tls":
            ctx = ssl.create_default_context(cafile=daemon.cert)
            target.update(port=daemon.tls_port, ssl_context=ctx)
        elif args.transport == "tcp":
            target.update(port=daemon.tcp_port)
        else:
            target.update(path=daemon.local_path)

        image_size = args.image_size_mib * MiB
        sessions = []
        for i in range(args.sessions):
            path = os.path.join(workdir, f"image-{i:02d}.raw")
            with open(path, "wb") as f:
                f.truncate(image_size)
            sid = os.urandom(16).hex()
            daemon.add_session(sid, path, image_size)
            sessions.append((sid, image_size))

        payload = memoryview(os.urandom(2 * max(PUT_SIZES)))
        per_session = -(-args.connections // args.sessions)
        slice_size = (image_size // per_session) // (4 * MiB) * (4 * MiB)
        if slice_size < max(ZERO_SIZES):
            raise SystemExit("--image-size-mib too small for the connections per session")
        workers = []
        for n in range(args.connections):
            s, k = n % args.sessions, n // args.sessions
            workers.append(Worker(n, target, sessions[s],
                                  (k * slice_size, (k + 1) * slice_size),
                                  payload, seed=args.seed + n))

        samples = []
        sampling = gevent.event.Event()
        sampler_g = gevent.spawn(sampler, daemon, samples, sampling)
        # One request first: the daemon's thread pool starts on first use
        # and keeps a descriptor of its own; the idle figures include it.
        warm = Conn(target)
        warm.request("GET", f"/images/{sessions[0][0]}", [("Range", "bytes=0-0")])
        warm.close()
        gevent.sleep(0.5)
        idle_rss, idle_fds = daemon.sample()[:2]

        # Main phase: all connections open before the clock starts.
        connect_all(workers)
        cpu0, own0, t0 = daemon.sample()[3], _own_cpu(), time.monotonic()
        stats, elapsed = run_phase(workers, args.duration)
        cpu1, own1, t1 = daemon.sample()[3], _own_cpu(), time.monotonic()
        main = stats.summary(elapsed)
        main["seconds"] = round(elapsed, 2)
        main["daemon_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
        main["client_cpu_pct"] = round(100 * (own1 - own0) / (t1 - t0), 1)

        # Every connection's last write reads back intact.
        results = [w.verify() for w in workers]
        checked = [r for r in results if r is not None]
        main["verified_writes"] = sum(1 for r in checked if r)
        main["verify_failures"] = sum(1 for r in checked if not r)
        main["errors"] += main["verify_failures"]
        report["main"] = main
        for w in workers:
            w.conn.close()

        after_main = daemon.sample()
        if not args.no_stall:
            report["stall"] = stall_phase(args, daemon, target, sessions, payload,
                                          slice_size)
        sampling.set()
        sampler_g.join(5)
        # Every client is gone: the daemon should be back to its idle fds.
        settle_start = time.monotonic()
        while True:
            settled = daemon.sample()
            if settled[1] <= idle_fds or time.monotonic() - settle_start > 10:
                break
            gevent.sleep(0.2)

        rss = [s[1] for s in samples]
        fds = [s[2] for s in samples]
        report["daemon"] = {
            "rss_idle_mib": round(idle_rss / 1024, 1),
            "rss_min_mib": round(min(rss) / 1024, 1),
            "rss_max_mib": round(max(rss) / 1024, 1),
            "rss_after_main_mib": round(after_main[0] / 1024, 1),
            "rss_end_mib": round(rss[-1] / 1024, 1),
            "fds_min": min(fds), "fds_max": max(fds), "fds_end": fds[-1],
            "threads_max": max(s[3] for s in samples),
            "fds_idle": idle_fds,
            "fds_settled": settled[1],
            "settled_in_s": round(time.monotonic() - settle_start, 1),
            "rss_settled_mib": round(settled[0] / 1024, 1),
            "samples": len(samples),
            "rss_series_mib": [round(r / 1024) for r in rss],
        }
        report["daemon_log_errors"] = _log_errors(daemon.log_file)
    finally:
        report["daemon_exit_status"] = daemon.stop()


def stall_phase(args, daemon, target, sessions, payload, slice_size):
    """Normal clients alone, then next to stalled ones: their latencies."""
    seconds = args.stall_duration or min(15.0, max(3.0, args.duration / 4))
    n_normal = min(args.stall_normal, len(sessions) * 4)
    n_stalled = args.stalled

    def normal_workers(seed):
        ws = [Worker(n, target, sessions[n % len(sessions)],
                     (0, slice_size), payload, seed=seed + n)
              for n in range(n_normal)]
        connect_all(ws)
        return ws

    mix = (("get", 50), ("put", 35), ("extents", 15))
    result = {"seconds_per_run": seconds, "normal_connections": n_normal,
              "stalled_readers": n_stalled, "slow_writers": n_stalled}

    ws = normal_workers(10_000)
    stats, elapsed = run_phase(ws, seconds, mix)
    result["alone"] = stats.summary(elapsed)
    for w in ws:
        w.conn.close()

    # The stalled clients use the same sessions as the normal ones.
    readers = [StalledReader(target, sessions[i % len(sessions)][0])
               for i in range(n_stalled)]
    image_size = sessions[0][1]
    writers = [SlowWriter(target, sessions[i % len(sessions)][0], offset=slice_size,
                          length=min(64 * MiB, image_size - slice_size))
               for i in range(n_stalled)]
    try:
        for r in readers:
            r.conn.connect()
            r.start()
        for w in writers:
            w.conn.connect()
            w.start()
        # Wait until the readers' operations are stuck (their done stops).
        blocked = _wait_readers_blocked(daemon, n_stalled)
        result["readers_blocked_before_run"] = blocked
        ws = normal_workers(20_000)
        stats, elapsed = run_phase(ws, seconds, mix)
        result["with_stalled"] = stats.summary(elapsed)
        for w in ws:
            w.conn.close()
        # The stalled clients' operations are still there: nobody dropped
        # them (the inactivity timeout is longer than the run).
        ops = [op["kind"] for p in daemon.progress() for op in p["operations"]]
        result["readers_still_stalled_after_run"] = ops.count("read")
        result["writers_still_sending_after_run"] = sum(
            1 for w in writers if w.failed is None and not w.greenlet.dead)
        result["writes_still_running_after_run"] = ops.count("write")
    finally:
        for r in readers:
            r.close()
        for w in writers:
            w.close()
    # Everything the stalled clients held is released at once.
    start = time.monotonic()
    while time.monotonic() - start < 30:
        if not any(p["active"] for p in daemon.progress()):
            break
        gevent.sleep(0.05)
    result["released_in_s"] = round(time.monotonic() - start, 2)
    result["released"] = not any(p["active"] for p in daemon.progress())

    # Alone again: a difference that is still there is not the stalled
    # clients' doing.
    ws = normal_workers(30_000)
    stats, elapsed = run_phase(ws, seconds, mix)
    result["alone_again"] = stats.summary(elapsed)
    for w in ws:
        w.conn.close()
    return result


def _wait_readers_blocked(daemon, count, timeout=15):
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sorted(op["done"] for p in daemon.progress()
                      for op in p["operations"] if op["kind"] == "read")
        if len(done) >= count and done == last:
            return len(done)
        last = done
        gevent.sleep(0.5)
    return 0


def _own_cpu():
    t = os.times()
    return t.user + t.system


def _log_errors(path):
    try:
        with open(path) as f:
            return [line.rstrip() for line in f
                    if " ERROR " in line or "Traceback" in line][:20]
    except OSError:
        return []


# The report.

def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem,
            "kernel": platform.release(), "python": platform.python_version()}


def print_report(args, report, out=sys.stdout):
    m = report["machine"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"imaged load test, {report['date']}")
    p(f"machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, "
      f"Python {m['python']}")
    p(f"setup: {args.sessions} sessions on {args.image_size_mib} MiB sparse images, "
      f"{args.connections} keep-alive connections over {args.transport} (loopback), "
      f"daemon and load client on the same machine")
    main = report.get("main")
    if main:
        p("")
        p(f"main phase: {main['seconds']} s, mix " +
          ", ".join(f"{k} {w}%" for k, w in MIX) +
          f" (PUT/GET 64 KiB-1 MiB, flush=y on {int(PUT_FLUSH_Y * 100)}% of PUTs)")
        p(f"  requests {main['requests']}  requests/s {main['requests_per_s']}  "
          f"errors {main['errors']}")
        p(f"  {'kind':<10}{'count':>8}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}"
          f"{'p99 ms':>9}{'max ms':>9}")
        for kind, lat in list(main["kinds"].items()) + [("all", main["all"])]:
            if lat["count"]:
                p(f"  {kind:<10}{lat['count']:>8}{lat['per_s']:>9}{lat['p50_ms']:>9}"
                  f"{lat['p90_ms']:>9}{lat['p99_ms']:>9}{lat['max_ms']:>9}")
        p(f"  data: read {main['read_mib_per_s']} MiB/s, written "
          f"{main['written_mib_per_s']} MiB/s")
        p(f"  last write of each connection read back intact: "
          f"{main['verified_writes']}, corrupt: {main['verify_failures']}")
        p(f"  CPU: daemon {main['daemon_cpu_pct']}% of one core, load client "
          f"{main['client_cpu_pct']}%")
        for e in main["error_samples"][:5]:
            p(f"  error: {e}")
    d = report.get("daemon")
    if d:
        p(f"  daemon RSS: idle {d['rss_idle_mib']} MiB, min {d['rss_min_mib']}, "
          f"max {d['rss_max_mib']}, after main phase {d['rss_after_main_mib']}, "
          f"end {d['rss_end_mib']} MiB; open fds {d['fds_min']}-{d['fds_max']} "
          f"(end {d['fds_end']}); threads max {d['threads_max']}")
        p(f"  with every client gone: open fds {d['fds_settled']} (idle before: "
          f"{d['fds_idle']}) after {d['settled_in_s']} s, RSS {d['rss_settled_mib']} MiB")
    s = report.get("stall")
    if s:
        p("")
        p(f"stall phase: {s['normal_connections']} normal connections, "
          f"{s['seconds_per_run']} s alone, then {s['seconds_per_run']} s next to "
          f"{s['stalled_readers']} clients that stopped reading a whole-image GET "
          f"and {s['slow_writers']} clients sending a PUT body at 16 KiB/s")
        p(f"  {'normal clients':<16}{'req/s':>7}{'errors':>7}" +
          "".join(f"{k + ' p50/p99':>18}" for k in ("all", "get", "put", "extents"))
          + "  (ms)")
        for name, label in (("alone", "alone"), ("with_stalled", "with stalled"),
                            ("alone_again", "alone again")):
            r = s.get(name)
            if r:
                cols = ""
                for lat in [r["all"]] + [r["kinds"].get(k, {}) for k in
                                         ("get", "put", "extents")]:
                    cols += f"{lat.get('p50_ms', '-'):>10.1f}/{lat.get('p99_ms', '-'):<7.1f}" \
                        if lat.get("count") else f"{'-':>18}"
                p(f"  {label:<16}{r['requests_per_s']:>7}{r['errors']:>7}{cols}")
        p(f"  stalled reads blocked in the daemon: {s['readers_blocked_before_run']} "
          f"before the run, {s['readers_still_stalled_after_run']} after it; slow "
          f"writes running after it: {s['writes_still_running_after_run']}")
        p(f"  closing the stalled clients released their operations in "
          f"{s['released_in_s']} s: {'yes' if s['released'] else 'NO'}")
    p("")
    if report.get("daemon_log_errors"):
        p("daemon log errors:")
        for line in report["daemon_log_errors"][:5]:
            p("  " + line)
    p(f"daemon exit status: {report.get('daemon_exit_status')}")
    p(f"result: {'PASS' if report['ok'] else 'FAIL'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of the main phase (default 60)")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--image-size-mib", type=int, default=256)
    parser.add_argument("--transport", choices=("tls", "tcp", "unix"), default="tls")
    parser.add_argument("--stall-duration", type=float, default=None,
                        help="seconds of each stall run (default duration/4, 3-15)")
    parser.add_argument("--stall-normal", type=int, default=20,
                        help="normal connections in the stall phase")
    parser.add_argument("--stalled", type=int, default=4,
                        help="stalled readers, and as many slow writers")
    parser.add_argument("--no-stall", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=None,
                        help="where the temporary images go (default: the temp dir)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (config, log, images)")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections must be 1-{MAX_CONNECTIONS}")
    if not 1 <= args.sessions <= args.connections:
        parser.error("--sessions must be 1-connections")
    if not 0 <= args.stalled <= 50 or not 1 <= args.stall_normal <= 200:
        parser.error("--stalled must be 0-50 and --stall-normal 1-200")

    # Unix socket paths must stay short: the work dir is in the temp dir.
    workdir = tempfile.mkdtemp(prefix="imaged-load-", dir=args.workdir)
    need = args.sessions * args.image_size_mib * MiB + 256 * MiB
    if shutil.disk_usage(workdir).free < need:
        shutil.rmtree(workdir, ignore_errors=True)
        raise SystemExit(f"not enough free space in {workdir}: need {need // MiB} MiB")
    report = {"date": datetime.datetime.now(datetime.timezone.utc)
              .strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "args": vars(args)}
    # A bound on the whole run, whatever happens.
    limit = args.duration + 2 * (args.stall_duration or 15) + 300
    try:
        with gevent.Timeout(limit, RuntimeError(f"load test took over {limit} s")):
            run(args, workdir, report)
    except (Exception, KeyboardInterrupt) as e:
        report["failure"] = f"{type(e).__name__}: {e}"
    finally:
        if args.keep:
            report["workdir"] = workdir
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    main_ok = report.get("main", {}).get("errors", 1) == 0
    stall = report.get("stall")
    stall_ok = stall is None or (
        all(stall[k]["errors"] == 0 for k in ("alone", "with_stalled", "alone_again"))
        and stall["released"])
    report["ok"] = (main_ok and stall_ok and "failure" not in report
                    and report.get("daemon_exit_status") == 0)
    print_report(args, report)
    if "failure" in report:
        print(f"failure: {report['failure']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
