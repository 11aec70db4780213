"""
Helpers for the hardening tests (faults, hostile input, TLS clients): raw
HTTP over sockets of a test daemon (tests.conftest.Daemon), polling,
system call counts, file digests, and scratch file systems (tmpfs, ext4
on a loop device, device-mapper) that are always taken down again.
"""

import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest

# Shared with the images tests: sizes, the wait and polling with a deadline.
from tests.images_helpers import KiB, MiB, WAIT_S, wait_for  # noqa: F401


# System calls.

def read_calls(pid):
    """read() calls process `pid` ("self": this one) made so far, all threads."""
    return _io_counter(pid, "syscr")


def write_calls(pid):
    """write() calls process `pid` ("self": this one) made so far, all threads."""
    return _io_counter(pid, "syscw")


def _io_counter(pid, name):
    with open(f"/proc/{pid}/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())[name])


# Files.

def sparse_file(path, size, data=()):
    """A sparse file of `size` bytes with `data` = [(offset, bytes)] in it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in data:
            f.seek(offset)
            f.write(chunk)
    return str(path)


def digest(path):
    """sha256 of a file's content and its size: what "unchanged" means."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(MiB)
            if not block:
                break
            h.update(block)
    return h.hexdigest(), os.path.getsize(path)


def read_range(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# Raw connections to a tests.conftest.Daemon.

def connect(daemon, kind="tcp", rcvbuf=None, timeout=WAIT_S, cert=None):
    """
    A connected socket to the images app of `daemon` over `kind` (tcp, tls,
    unix). `rcvbuf` shrinks the receive buffer before connecting, so that a
    client that stops reading stalls the daemon quickly. `cert` is a
    (cert_file, key_file) client certificate for TLS.
    """
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = daemon.local_path
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        addr = ("127.0.0.1", daemon.tls_port if kind == "tls" else daemon.tcp_port)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
        if kind == "tls":
            ctx = ssl.create_default_context(cafile=daemon.cert)
            if cert:
                ctx.load_cert_chain(*cert)
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise
    return sock


def handshake(d, ciphers=None, version=ssl.TLSVersion.TLSv1_2):
    """(version, cipher) a default Python client negotiates with `d`'s TLS listener."""
    ctx = ssl.create_default_context(cafile=d.cert)
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", d.tls_port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            return tls.version(), tls.cipher()[0]


def control_connect(daemon, timeout=WAIT_S):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(daemon.control_path)
    return sock


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:80]!r}>"


def read_response(sock, method="GET", max_body=64 * MiB):
    """
    Read one HTTP/1.1 response from `sock`; returns a Response, or None if
    the peer closed the connection before a status line. Reads through a
    buffer that is dropped afterwards: one request per connection.
    """
    f = sock.makefile("rb")
    try:
        line = f.readline(65537)
        if not line:
            return None
        parts = line.decode("latin-1").split(" ", 2)
        status = int(parts[1])
        headers = {}
        while True:
            h = f.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif length is not None:
            body = f.read(min(int(length), max_body))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(f.readline().split(b";")[0], 16)
                if not size:
                    f.readline()
                    break
                body += f.read(size)
                f.readline()
        else:
            body = f.read(max_body)
        return Response(status, headers, body)
    finally:
        f.close()


def raw_request(sock, request_line, headers=(), body=b"", method=None):
    """
    Send a request whose request line is given as bytes (anything goes:
    NUL, non-UTF-8, very long) and read the answer; None if the daemon
    closed the connection without one.
    """
    if isinstance(request_line, str):
        request_line = request_line.encode("latin-1")
    head = request_line + b"\r\nHost: localhost\r\n"
    for name, value in headers:
        head += f"{name}: {value}\r\n".encode("latin-1")
    if body:
        head += f"Content-Length: {len(body)}\r\n".encode()
    head += b"\r\n"
    try:
        sock.sendall(head + body)
        return read_response(sock, method or request_line.split(b" ")[0].decode("latin-1"))
    except (ConnectionError, socket.timeout, ssl.SSLError):
        return None


def request(daemon, method, path, headers=(), body=b"", kind="tcp"):
    """One request on a new connection to the images app; returns a Response."""
    with connect(daemon, kind) as sock:
        line = f"{method} {path} HTTP/1.1".encode("latin-1")
        return raw_request(sock, line, headers, body, method=method)


def control_request(daemon, method, path, body=None):
    """One request to the control socket; body is JSON-encoded if not bytes."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    with control_connect(daemon) as sock:
        line = f"{method} {path} HTTP/1.1".encode("latin-1")
        return raw_request(sock, line, body=body or b"", method=method)


def session_info(daemon, sid):
    """The control API view of a session, or None once it is gone."""
    r = control_request(daemon, "GET", "/sessions/" + sid)
    if r.status == 404:
        return None
    assert r.status == 200, r
    return r.json()


def progress(daemon, sid):
    r = control_request(daemon, "GET", "/progress/" + sid)
    assert r.status == 200, r
    return r.json()


def registry_state(daemon):
    """
    Every session as the engine installed it, and whether it was canceled:
    what a refused request must not change. Clocks and counters (expires,
    idle_time, transferred, connections, active) are left out: reading
    legitimately changes them.
    """
    r = control_request(daemon, "GET", "/progress")
    assert r.status == 200, r
    state = {}
    for p in r.json():
        info = session_info(daemon, p["id"])
        for key in ("idle_time", "expires", "transferred", "connections", "active"):
            info.pop(key, None)
        state[p["id"]] = info
    return state


def alive(daemon):
    """The daemon process runs and answers on its images and control sockets."""
    if daemon.proc.poll() is not None:
        return False
    r = request(daemon, "OPTIONS", "/images/*")
    if r is None or r.status != 200:
        return False
    r = control_request(daemon, "GET", "/progress")
    return r is not None and r.status == 200


def drain_until_closed(sock, timeout=WAIT_S):
    """Read and drop data until the peer closes; returns bytes read."""
    got = 0
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout} s")
        sock.settimeout(left)
        try:
            data = sock.recv(256 * KiB)
        except socket.timeout:
            raise AssertionError(f"connection still open after {timeout} s") from None
        except (ConnectionResetError, ssl.SSLError, OSError):
            return got
        if not data:
            return got
        got += len(data)


def start_put(sock, path, length, extra_headers=()):
    """Send the head of a PUT with Content-Length `length`; the body follows."""
    head = f"PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n"
    for name, value in extra_headers:
        head += f"{name}: {value}\r\n"
    sock.sendall((head + "\r\n").encode("latin-1"))


def send_quietly(sock, data):
    """Send `data`; returns False if the daemon closed the connection."""
    try:
        sock.sendall(data)
        return True
    except (ConnectionError, socket.timeout, ssl.SSLError, OSError):
        return False


def response_or_none(sock, method="PUT", timeout=WAIT_S):
    """The response the daemon sent, or None if it closed without one."""
    sock.settimeout(timeout)
    try:
        return read_response(sock, method)
    except (ConnectionError, socket.timeout, ssl.SSLError, OSError, ValueError,
            IndexError):
        return None


# Scratch file systems (root only).

def run(*cmd, check=True):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, check=check, timeout=60)


def _mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def unmount(path):
    """Unmount `path`, lazily if something still holds it."""
    if not _mounted(path):
        return
    if run("umount", path, check=False).returncode != 0:
        run("umount", "-l", path, check=False)


@contextlib.contextmanager
def tmpfs(path, size="2m"):
    """A small tmpfs at `path`; skips the test if it cannot be mounted."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
            str(path), check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        unmount(str(path))


@contextlib.contextmanager
def loop_device(backing_file):
    """A loop device over `backing_file`; skips if losetup is not usable."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed (make sysdeps installs it)")
    r = run("losetup", "--find", "--show", str(backing_file), check=False)
    if r.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


@contextlib.contextmanager
def ext4_on_loop(workdir, size=64 * MiB):
    """An ext4 file system on a loop device, mounted at workdir/mnt."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (make sysdeps installs e2fsprogs)")
    backing = os.path.join(str(workdir), "ext4.img")
    with open(backing, "wb") as f:
        f.truncate(size)
    with loop_device(backing) as dev:
        r = run("mkfs.ext4", "-q", "-F", dev, check=False)
        if r.returncode != 0:
            pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
        mnt = os.path.join(str(workdir), "mnt")
        os.makedirs(mnt, exist_ok=True)
        r = run("mount", dev, mnt, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount ext4 on {dev}: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            unmount(mnt)
    os.unlink(backing)


# EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32); the flag that skips flushing
# the journal, like a disk that died.
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 0x2


def shut_down_fs(mountpoint):
    """
    Make every I/O on the ext4 file system at `mountpoint` fail with EIO,
    as when its disk dies (the kernel's "forced shutdown" of the fs).
    """
    import fcntl
    import struct
    fd = os.open(mountpoint, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("=I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    finally:
        os.close(fd)


def device_mapper_missing():
    """Why device-mapper cannot be used here, or None if it can."""
    if os.geteuid() != 0:
        return "device-mapper needs root"
    if shutil.which("dmsetup") is None:
        return "dmsetup is not installed (make sysdeps installs it)"
    # Checked without running dmsetup: it creates /dev/mapper/control even
    # when the kernel has no device-mapper.
    if not os.path.exists("/sys/class/misc/device-mapper"):
        return ("the kernel has no device-mapper driver "
                "(no /sys/class/misc/device-mapper)")
    return None


@contextlib.contextmanager
def dm_error_device(workdir, name, good=4 * MiB, bad=4 * MiB):
    """
    A block device /dev/mapper/NAME: `good` bytes of a loop device followed
    by `bad` bytes of the device-mapper `error` target (every I/O: EIO).
    """
    why = device_mapper_missing()
    if why:
        pytest.skip(why)
    backing = os.path.join(str(workdir), "dm-backing.img")
    with open(backing, "wb") as f:
        f.truncate(good)
    with loop_device(backing) as dev:
        table = (f"0 {good // 512} linear {dev} 0\n"
                 f"{good // 512} {bad // 512} error\n")
        r = subprocess.run(["dmsetup", "create", name], input=table, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if r.returncode != 0:
            pytest.skip(f"dmsetup create failed: {r.stderr.strip()}")
        try:
            path = f"/dev/mapper/{name}"
            wait_for(lambda: os.path.exists(path), message=f"{path} to appear")
            yield path
        finally:
            for _ in range(50):
                if run("dmsetup", "remove", name, check=False).returncode == 0:
                    break
                time.sleep(0.1)
    os.unlink(backing)
