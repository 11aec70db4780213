"""
Disk image formats on the client side: detection, and the guest-visible
data of a qcow2, vmdk, vhdx or vpc file through a local qemu-nbd.

The images API moves raw guest bytes. A source in another format is read
through `qemu-nbd` (started here on a private unix socket, read-only,
stopped by its PID at the end) with libnbd, the NBD client library made for
the job; its extents come from the export's `base:allocation` context, so
unallocated and zero clusters are neither read nor sent. A download into
qcow2 writes through a qemu-nbd exporting a qcow2 made with `qemu-img
create`, so unallocated clusters stay unallocated.

Runtime dependencies: qemu-img and qemu-nbd (Debian qemu-utils, Fedora
qemu-img) and libnbd's Python bindings (python3-libnbd); raw files need
neither.
"""

import bisect
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from typing import NamedTuple

from . import errors
from . import local
from .images import Extent

log = logging.getLogger("imaged.client")

# Formats a source may have; the names are qemu's.
FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vpc")
# Formats whose qemu driver reports zeroed or never written areas as data
# (measured with qemu 7.2: a 24 MiB vhdx with 4 MiB of data maps as 24 MiB of
# data, a vpc as 10 MiB): their data chunks are checked for zeroes, so that
# zero areas still go as zero requests.
DETECT_ZEROES_FORMATS = ("vmdk", "vhdx", "vpc")
# Formats a download may write.
DOWNLOAD_FORMATS = ("raw", "qcow2")

# Seconds to wait for qemu-nbd to listen, and to exit when asked.
QEMU_NBD_START_TIMEOUT_S = 10.0
QEMU_NBD_STOP_TIMEOUT_S = 10.0

# glibc malloc settings for the qemu-nbd we start. qemu-nbd allocates a
# new buffer for every NBD request and frees it after; glibc serves
# 8 MiB from a new mmap() each time, or returns the freed heap top to the
# kernel, so each request faulted in and zeroed 2,048 fresh pages: with a
# 2 GiB qcow2 upload (one connection) qemu-nbd spent 1.5-1.7 s of CPU,
# 0.5-0.6 s with buffers up to the 32 MiB NBD request limit kept on the
# heap and a heap top kept up to 256 MiB (either setting alone: 1.2-1.4 s).
# What it keeps stays bounded: 66 MiB of RSS after 300 reads of 8 MiB on
# one connection (9 MiB without).
QEMU_NBD_MALLOC_MMAP_THRESHOLD_BYTES = 32 * 1024**2
QEMU_NBD_MALLOC_TRIM_THRESHOLD_BYTES = 256 * 1024**2

# Extents are asked in windows of this size: not every NBD server answers
# a block status of 4 GiB or more.
BLOCK_STATUS_STEP_BYTES = 1024**3

# base:allocation flags (NBD protocol).
_STATE_HOLE = 1
_STATE_ZERO = 2

# Magic bytes, when qemu-img is not installed: (offset, bytes, format).
# A fixed-size vpc file has its footer at the end only; qemu-img finds it.
_MAGIC = ((0, b"QFI\xfb", "qcow2"), (0, b"KDMV", "vmdk"),
          (0, b"# Disk DescriptorFile", "vmdk"), (0, b"vhdxfile", "vhdx"),
          (0, b"conectix", "vpc"))


def _tool(name):
    path = shutil.which(name)
    if path is None:
        raise errors.UnsupportedError(
            f"{name} is needed for images that are not raw: install qemu-utils "
            "(Debian/Ubuntu) or qemu-img (Fedora/RHEL)")
    return path


def _nbd():
    try:
        import nbd
    except ImportError:
        raise errors.UnsupportedError(
            "libnbd's Python bindings are needed for images that are not raw: "
            "install python3-libnbd") from None
    return nbd


def _magic(path):
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise errors.ClientError(f"cannot open {path}: {e.strerror}") from None
    for offset, magic, fmt in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return fmt
    return "raw"


def info(path):
    """qemu-img info of `path` as a dict ("format", "virtual-size", ...)."""
    qemu_img = _tool("qemu-img")
    # --force-share: a running VM's image is read, never locked.
    r = subprocess.run([qemu_img, "info", "--output=json", "--force-share", path],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()
        raise errors.ClientError(
            f"cannot read the format of {path}: {msg[-1] if msg else 'qemu-img failed'}")
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise errors.ClientError(f"qemu-img info of {path} is not JSON") from None


def detect(path, requested=None):
    """
    The format of the local image `path`: (format, guest-visible size or
    None when raw). `requested` (--format) must agree with the file,
    except "raw", which takes any file as its bytes. Unsupported or
    mismatched formats raise ClientError before anything is written.
    """
    if requested is not None and requested not in FORMATS:
        raise errors.ClientError(
            f"unsupported format {requested!r}: expected one of {', '.join(FORMATS)}")
    if requested == "raw":
        return "raw", None
    if shutil.which("qemu-img") is None:
        fmt = _magic(path)
        if fmt == "raw" and requested in (None, "raw"):
            return "raw", None
        _tool("qemu-img")
    data = info(path)
    fmt = data.get("format")
    if fmt not in FORMATS:
        raise errors.UnsupportedError(
            f"{path} is a {fmt} image: supported formats are {', '.join(FORMATS)} "
            "(use --format raw to send its bytes as they are)")
    if requested is not None and fmt != requested:
        raise errors.ClientError(
            f"{path} is a {fmt} image, not {requested} (use --format raw to send "
            "its bytes as they are)")
    if fmt == "raw":
        return "raw", None
    return fmt, int(data["virtual-size"])


def create_qcow2(path, size, backing_file=None):
    """Create an empty qcow2 of `size` bytes, on top of `backing_file` if given."""
    cmd = [_tool("qemu-img"), "create", "-q", "-f", "qcow2"]
    if backing_file is not None:
        backing_fmt = info(backing_file).get("format")
        if backing_fmt not in FORMATS:
            raise errors.ClientError(
                f"backing file {backing_file} is a {backing_fmt} image")
        # Relative to the new image, as qemu resolves it.
        cmd += ["-b", os.path.abspath(backing_file), "-F", backing_fmt]
    cmd += [path, str(size)]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()
        raise errors.ClientError(
            f"cannot create {path}: {msg[-1] if msg else 'qemu-img failed'}")


def _direct_io_works(path, readonly):
    """Whether `path` opens with O_DIRECT (not on tmpfs, for one)."""
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _qemu_nbd_env():
    """Our environment, with the malloc settings for qemu-nbd (see above)."""
    env = dict(os.environ)
    tunables = (f"glibc.malloc.mmap_threshold={QEMU_NBD_MALLOC_MMAP_THRESHOLD_BYTES}:"
                f"glibc.malloc.trim_threshold={QEMU_NBD_MALLOC_TRIM_THRESHOLD_BYTES}")
    # The user's own tunables come last: they win.
    if env.get("GLIBC_TUNABLES"):
        tunables += ":" + env["GLIBC_TUNABLES"]
    env["GLIBC_TUNABLES"] = tunables
    return env


class Mapping(NamedTuple):
    """Guest bytes [start, start + length) lie at `offset` in the image file."""

    start: int
    length: int
    offset: int


def _map(path, fmt, human=False):
    cmd = [_tool("qemu-img"), "map", "--force-share", "-f", fmt]
    if not human:
        cmd.append("--output=json")
    r = subprocess.run(cmd + [path], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()
        raise ValueError(msg[-1] if msg else "qemu-img map failed")
    return r.stdout


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def direct_map(path, fmt):
    """
    Where the guest data of the image `path` (in `fmt`) lies as it is in
    the file itself, from `qemu-img map`: the Mappings of its data at
    depth 0 (not in a backing file) that have an offset (compressed and
    encrypted clusters have none) into `path` itself. The JSON map has no
    file name, and an offset may point into another file (a qcow2's
    external data file, a vmdk's extent files): the human map names the
    file of each range, and only ranges it names `path` for are used.
    Empty on any doubt (the caller then reads everything through qemu-nbd).
    """
    path = os.path.abspath(path)
    try:
        entries = json.loads(_map(path, fmt))
        # "Offset Length Mapped-to File" of the data ranges, with the same
        # merged ranges as the JSON map; it fails on compressed, encrypted
        # or external clusters.
        files = {}
        for line in _map(path, fmt, human=True).splitlines()[1:]:
            start, length, offset, name = line.split(None, 3)
            files[(int(start, 16), int(length, 16), int(offset, 16))] = name
        mappings = []
        for e in entries:
            if e["depth"] != 0 or not e["data"] or e["zero"] or "offset" not in e:
                continue
            m = Mapping(int(e["start"]), int(e["length"]), int(e["offset"]))
            name = files.get(m)
            if name is None or not _same_file(name, path):
                # Data of the image itself in another file (or a range the
                # two maps disagree on): ranges of different files may
                # have been merged, trust none.
                raise ValueError(f"data at {m.start} is not in the image file")
            mappings.append(m)
    except (ValueError, KeyError, TypeError) as e:
        log.debug("reading %s through qemu-nbd only: %s", path, e)
        return []
    return mappings


class QemuNBD:
    """
    A qemu-nbd serving `path` (in `fmt`) on a unix socket in a private
    directory, for this process only. `shared`: how many connections it
    takes. Use as a context manager, or call close(): it is stopped by its
    PID and its directory removed.
    """

    def __init__(self, path, fmt, readonly=True, shared=8):
        qemu_nbd = _tool("qemu-nbd")
        self.nbd = _nbd()
        self.path = path
        self.readonly = readonly
        self._dir = tempfile.mkdtemp(prefix="imaged-client-")
        self.socket = os.path.join(self._dir, "nbd.sock")
        cmd = [qemu_nbd, "--socket", self.socket, "--format", fmt,
               "--shared", str(shared), "--persistent"]
        if _direct_io_works(path, readonly):
            # Reads and writes by DMA, not copied through the page cache:
            # a qcow2 upload (2 GiB of data in 8 GiB, one connection, the
            # source in the page cache) took client and qemu-nbd 3.3-3.8 s
            # of CPU with cache=writeback, 2.6-3.1 s with cache=none
            # (ovirt-imageio's client, which does the same: 2.8-3.2 s).
            cmd += ["--cache=none", "--aio=native"]
        else:
            # tmpfs and other file systems without O_DIRECT.
            cmd += ["--cache=writeback"]
        if readonly:
            cmd.append("--read-only")
        cmd.append(path)
        self._stderr = open(os.path.join(self._dir, "stderr"), "w+")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=self._stderr, env=_qemu_nbd_env())
        except BaseException:
            self._stderr.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self):
        deadline = time.monotonic() + QEMU_NBD_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self._stderr.seek(0)
                msg = self._stderr.read().strip().splitlines()
                raise errors.ClientError(
                    f"qemu-nbd could not open {self.path}: "
                    f"{msg[-1] if msg else 'exit status %d' % self.proc.returncode}")
            # The socket file appears at bind(), before listen(): ready when
            # a connection is accepted.
            if os.path.exists(self.socket) and self._accepts():
                return
            if time.monotonic() > deadline:
                raise errors.ClientError(
                    f"qemu-nbd did not start within {QEMU_NBD_START_TIMEOUT_S:g} s")
            time.sleep(0.01)

    def _accepts(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket)
            except OSError:
                return False
        return True

    def connect(self, meta_contexts=()):
        """A new libnbd handle connected to the export."""
        h = self.nbd.NBD()
        for name in meta_contexts:
            h.add_meta_context(name)
        try:
            h.connect_unix(self.socket)
        except self.nbd.Error as e:
            raise errors.ClientError(f"cannot connect to qemu-nbd: {e}") from None
        return h

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(QEMU_NBD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def close_handle(h):
    """Disconnect a libnbd handle (its memory goes with the object)."""
    try:
        h.shutdown()
    except Exception as e:
        log.debug("closing an NBD connection: %s", e)


def nbd_extents(h, size):
    """Yield the data and zero Extents of [0, size) of a libnbd handle."""
    pos = 0
    pending = None  # merged [start, length, zero]
    while pos < size:
        got = []

        def callback(metacontext, offset, entries, err):
            if metacontext == "base:allocation":
                got.extend(entries)
            return 0

        h.block_status(min(BLOCK_STATUS_STEP_BYTES, size - pos), pos, callback)
        if not got:
            raise errors.ClientError("qemu-nbd sent no extents")
        for i in range(0, len(got), 2):
            length = min(got[i], size - pos)
            if length <= 0:
                break
            zero = bool(got[i + 1] & _STATE_ZERO)
            if pending and pending[2] == zero:
                pending[1] += length
            else:
                if pending:
                    yield Extent(*pending)
                pending = [pos, length, zero]
            pos += length
    if pending:
        yield Extent(*pending)


class NbdReader:
    """Reads of one libnbd handle into caller buffers, without a copy."""

    def __init__(self, server):
        self._nbd = server.nbd
        self.h = server.connect()

    def readinto(self, view, offset):
        """Fill `view` with the image bytes at `offset`."""
        try:
            buf = self._nbd.Buffer.from_buffer(view)
            cookie = self.h.aio_pread(buf, offset)
            while not self.h.aio_command_completed(cookie):
                self.h.poll(-1)
        except self._nbd.Error as e:
            raise errors.ClientError(
                f"reading the local image at {offset} through qemu-nbd failed: "
                f"{e.string}") from None

    def close(self):
        close_handle(self.h)


class NbdWriter:
    """Writes and zeroes of one libnbd handle (a qcow2 being downloaded)."""

    def __init__(self, server):
        self._nbd = server.nbd
        self.h = server.connect()

    def pwrite(self, view, offset):
        try:
            self.h.pwrite(view, offset)
        except self._nbd.Error as e:
            raise errors.ClientError(
                f"writing the local image at {offset} failed: {e.string}") from None

    def zero(self, offset, length):
        # Zero clusters, not holes: with a backing file, a hole would show
        # the backing file's data.
        step = 1024**3
        end = offset + length
        try:
            while offset < end:
                n = min(step, end - offset)
                self.h.zero(n, offset)
                offset += n
        except self._nbd.Error as e:
            raise errors.ClientError(
                f"zeroing the local image at {offset} failed: {e.string}") from None

    def flush(self):
        try:
            self.h.flush()
        except self._nbd.Error as e:
            raise errors.ClientError(f"flushing the local image failed: {e.string}") \
                from None

    def close(self):
        close_handle(self.h)


class MappedReader:
    """
    Reads of a non-raw image: the bytes that `mappings` (see direct_map)
    place in the image file are read from the file `fd` itself (with
    pread, through the page cache), the rest through qemu-nbd (`fallback`,
    an NbdReader).

    A 2 GiB qcow2 upload over the unix socket, one connection: read
    through qemu-nbd it cost qemu-nbd 0.6 s and the client 1.2 s of CPU
    (qemu-nbd copies every byte into the NBD socket and the client out of
    it), read from the file 0.05 s and 1.1 s. Sending the mapped ranges
    with sendfile() instead cost the client only 0.6 s but the daemon
    1.1-1.9 s instead of 0.6-1.0 (it receives page-cache pages spliced
    into the socket), and the upload was slower (2.4-2.9 against
    3.5-3.6 GB/s of virtual size).
    """

    def __init__(self, fd, mappings, fallback):
        self.fd = fd
        self._mappings = mappings
        self._starts = [m.start for m in mappings]
        self._fallback = fallback

    def spans(self, offset, length):
        """
        Yield (start, length, file offset or None) covering
        [offset, offset + length) in order: None where the bytes must be
        read through qemu-nbd.
        """
        end = offset + length
        pos = offset
        # The last mapping starting at or before pos (-1: none).
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if i >= 0:
                m = self._mappings[i]
                if pos < m.start + m.length:
                    n = min(end, m.start + m.length) - pos
                    yield pos, n, m.offset + (pos - m.start)
                    pos += n
                    continue
            nxt = self._starts[i + 1] if i + 1 < len(self._starts) else end
            if pos >= nxt:
                i += 1
                continue
            n = min(end, nxt) - pos
            yield pos, n, None
            pos += n

    def readinto(self, view, offset):
        """Fill `view` with the image bytes at `offset`."""
        for start, n, where in self.spans(offset, len(view)):
            part = view[start - offset:start - offset + n]
            if where is None:
                self._fallback.readinto(part, start)
            else:
                local.pread_exactly(self.fd, part, where)

    def close(self):
        self._fallback.close()
