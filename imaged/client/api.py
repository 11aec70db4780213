"""
The client library: upload, download, checksum, verify and info.

Every function takes the image URL (https://host:port/images/SESSION-ID)
and these connection options:

    cafile: CA certificate verifying the server (default: system CAs)
    insecure: do not verify the server certificate (logs a warning)
    timeout: seconds to wait for the server on any socket operation
    use_unix_socket: when the server runs on this host and reports a unix
        socket in OPTIONS, use it instead of the network (faster)

Failures raise imaged.client.errors.ClientError subclasses; KeyboardInterrupt
stops the workers and is re-raised.
"""

import contextlib
import dataclasses
import logging
import os
import stat
import threading
import time
from typing import Optional

from .. import blkhash
from .. import util
from . import errors
from . import formats
from . import http
from . import local
from . import resume as resume_mod
from . import retry as retry_mod
from . import transfer
from .images import Extent
from .images import ImageClient
from .progress import Progress

log = logging.getLogger("imaged.client")

MiB = 1024**2
DEFAULT_CONNECTIONS = 4
# 8 MiB was the sweet spot on real storage; larger was slower.
DEFAULT_BUFFER_SIZE = 8 * MiB
MIN_BUFFER_SIZE = 64 * 1024
MAX_BUFFER_SIZE = 256 * MiB
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = retry_mod.DEFAULT_RETRIES
DEFAULT_RETRY_DELAY = retry_mod.DEFAULT_DELAY_S
# Blocks compared by --resume: the checksum's default block, so a resumed
# transfer moves at most a few MiB more than what was missing.
RESUME_BLOCK_SIZE = blkhash.BLOCK_SIZE


@dataclasses.dataclass
class Result:
    """What a transfer did."""

    operation: str
    size: int
    data_bytes: int
    zero_bytes: int
    elapsed: float
    connections: int
    transport: str
    checksum: Optional[dict] = None
    retries: int = 0
    # Bytes --resume found already in place and did not move.
    skipped_bytes: int = 0
    # Format of the local image.
    format: str = "raw"

    @classmethod
    def of(cls, operation, size, workers, started, target, **kw):
        """What `workers` (transfer workers) did since `started`."""
        return cls(operation, size,
                   sum(w.data_bytes for w in workers),
                   sum(w.zero_bytes for w in workers),
                   time.monotonic() - started, len(workers), target.transport,
                   retries=target.retry.count, **kw)

    @property
    def rate(self):
        """Bytes of the image per second."""
        return self.size / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["elapsed"] = round(self.elapsed, 3)
        d["rate"] = round(self.rate)
        d["verified"] = self.checksum is not None
        return d


class _Target:
    """
    An opened image URL: the first connection, the server's options, and
    how to make more connections (over the unix socket when usable).
    """

    def __init__(self, url, cafile, insecure, timeout, use_unix_socket,
                 retries=0, retry_delay=DEFAULT_RETRY_DELAY):
        self._args = {"cafile": cafile, "insecure": insecure, "timeout": timeout}
        self.url = url
        self.unix_socket = None
        self.retry = retry_mod.Retry(retries, retry_delay)
        conn = http.Connection(url, **self._args)
        if insecure and conn.transport == "https":
            log.warning("TLS certificate verification is disabled (--insecure): "
                        "the server is not authenticated")
        self.image = ImageClient(conn, self.retry)
        self._extra = []
        try:
            self.options = self.image.options()
            if not self.options.supported:
                log.warning("the server does not answer OPTIONS (an older server?): "
                            "using one connection, without extents, zero or flush")
            elif (use_unix_socket and self.options.unix_socket
                    and http.is_local_host(conn.host)):
                self._use_unix_socket(self.options.unix_socket)
        except BaseException:
            self.close()
            raise

    def _use_unix_socket(self, path):
        image = ImageClient(http.Connection(self.url, unix_socket=path,
                                            timeout=self._args["timeout"]), self.retry)
        try:
            options = image.options()
        except errors.ClientError as e:
            # Another network namespace or container: the socket is not ours.
            image.close()
            log.info("not using the local unix socket: %s", e)
            return
        log.debug("using the local unix socket %s", http.show_unix_socket(path))
        self.image.close()
        self.image = image
        self.options = options._replace(unix_socket=path)
        self.unix_socket = path

    @classmethod
    @contextlib.contextmanager
    def opened(cls, *args, **kwargs):
        """A _Target(*args, **kwargs) closed at the end of the block."""
        target = cls(*args, **kwargs)
        try:
            yield target
        finally:
            target.close()

    def writable_size(self):
        """The image size, once it is known that the session takes writes."""
        if not self.options.writable:
            raise errors.ForbiddenError(
                "the session is read-only: upload needs a session allowing 'write'")
        return self.image.size()

    @property
    def transport(self):
        return self.image.transport

    def new_image(self):
        """Another ImageClient on the same transport (closed by close())."""
        image = ImageClient(http.Connection(
            self.url, unix_socket=self.unix_socket, **self._args), self.retry)
        self._extra.append(image)
        return image

    def close(self):
        for image in [self.image] + self._extra:
            image.close()


def _connections(requested, options, kind, work_bytes, chunk_size):
    """
    How many connections to use: what was asked (default 4), within the
    server's limit of `kind` ("reader" or "writer").
    """
    if requested is not None and requested < 1:
        raise errors.ClientError("connections must be at least 1")
    wanted = DEFAULT_CONNECTIONS if requested is None else requested
    limit = max(getattr(options, f"max_{kind}s"), 1)
    if wanted > limit:
        # Servers without OPTIONS were already reported.
        if requested is not None and options.supported:
            log.warning("the server allows at most %d %s%s per session: using %d",
                        limit, kind, "" if limit == 1 else "s", limit)
        wanted = limit
    # More connections than chunks of work would only idle.
    return max(1, min(wanted, -(-work_bytes // chunk_size)))


def _request_size(size, connections, buffer_size, one_buffer=False):
    """
    Bytes per data request: up to transfer.REQUEST_BYTES, moved a buffer at
    a time, but no more than an even share of `size` for each connection;
    a single buffer (`one_buffer`) when each must be looked at for zeroes
    before it is sent.
    """
    if one_buffer:
        return buffer_size
    share = util.round_up(-(-size // connections), buffer_size)
    return max(buffer_size, min(transfer.REQUEST_BYTES, share))


def _check_buffer_size(buffer_size):
    if not MIN_BUFFER_SIZE <= buffer_size <= MAX_BUFFER_SIZE:
        raise errors.ClientError(
            f"buffer size must be between {MIN_BUFFER_SIZE} and {MAX_BUFFER_SIZE} bytes")


def _open_local(path, flags, mode=0o666):
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        raise errors.ClientError(f"cannot open {path}: {e.strerror}") from None


class _LocalImage:
    """
    A local image to upload: its guest-visible size, its extents and a
    reader per connection. Raw files are read directly; other formats
    through a local qemu-nbd (see imaged.client.formats).
    """

    def __init__(self, path, fmt, connections):
        self.path = path
        self.fd = _open_local(path, os.O_RDONLY)
        self.server = None
        self._mappings = []
        self._readers = []
        try:
            self.format, virtual_size = formats.detect(path, fmt)
            if self.format == "raw":
                self.size = local.file_size(self.fd)
                return
            log.info("%s is a %s image of %d bytes: sending its guest data "
                     "through qemu-nbd", path, self.format, virtual_size)
            # One connection per worker, one for extents.
            self.server = formats.QemuNBD(path, self.format, readonly=True,
                                          shared=connections + 2)
            self._meta = self.server.connect(["base:allocation"])
            self.size = self._meta.get_size()
            # Where the guest data lies as it is in the file, it is read
            # from the file itself (see formats.MappedReader).
            self._mappings = formats.direct_map(path, self.format)
            log.info("%s: %d bytes of guest data read straight from the file, "
                     "the rest through qemu-nbd", path,
                     sum(m.length for m in self._mappings))
        except BaseException:
            self.close()
            raise

    def extents(self, size=None):
        """Extents of [0, size) (default: the image), zero-padded past its end."""
        size = self.size if size is None else size
        if self.server is None:
            return local.padded_extents(self.fd, self.size, size)
        return self._padded(formats.nbd_extents(self._meta, self.size), size)

    def _padded(self, exts, size):
        yield from exts
        if size > self.size:
            yield Extent(self.size, size - self.size, True)

    def reader(self):
        """A new reader: readinto(view, offset), for one thread."""
        if self.server is None:
            return local.PaddedFileReader(self.fd, self.size)
        r = formats.NbdReader(self.server)
        self._readers.append(r)
        if self._mappings:
            return formats.MappedReader(self.fd, self._mappings, r)
        return r

    @classmethod
    @contextlib.contextmanager
    def opened(cls, path, fmt, connections=1):
        img = cls(path, fmt, connections)
        try:
            yield img
        finally:
            img.close()

    def close(self):
        for r in self._readers:
            r.close()
        if self.server is not None:
            if hasattr(self, "_meta"):
                formats.close_handle(self._meta)
            self.server.close()
        os.close(self.fd)


def upload(path, url, *, connections=None, verify=False, detect_zeroes=False,
           format=None, resume=False, retries=DEFAULT_RETRIES,
           retry_delay=DEFAULT_RETRY_DELAY, cafile=None, insecure=False,
           timeout=DEFAULT_TIMEOUT, use_unix_socket=True,
           buffer_size=DEFAULT_BUFFER_SIZE, progress=None):
    """
    Upload the local image `path` to the image at `url`.

    The format of `path` is detected (qcow2, vmdk, vhdx, vpc or raw;
    `format` names it and must agree, except "raw", which sends any file
    as its bytes): an image that is not raw is sent as its guest-visible
    data, read through a local qemu-nbd. Data extents are sent with PUT,
    holes with PATCH zero (or as zeroes if the server cannot zero); with
    `detect_zeroes`, all-zero chunks inside data extents are zeroed too.
    `connections` (default min(4, what the server allows)) work on disjoint
    ranges; one flush ends the upload. The image may be smaller than the
    session: the rest is left as it is. With `resume`, the per-block
    digests of the image and of the server are compared first and only the
    blocks that differ are sent (an interrupted upload goes on, also
    against another host). Transient failures are retried `retries` times
    per request, waiting `retry_delay` seconds, doubled each time. With
    `verify`, the server's checksum is compared with the local image's
    (taken as zero-padded to the session size); a mismatch raises
    VerifyError. `progress`: a progress.Progress. Returns a Result.
    """
    _check_buffer_size(buffer_size)
    progress = progress or Progress()
    if connections is not None and connections < 1:
        raise errors.ClientError("connections must be at least 1")
    src = _LocalImage(path, format, connections or DEFAULT_CONNECTIONS)
    target = None
    workers = []
    try:
        size = src.size
        target = _Target(url, cafile, insecure, timeout, use_unix_socket,
                         retries, retry_delay)
        opts = target.options
        image_size = target.writable_size()
        if size > image_size:
            raise errors.OutOfRangeError(
                f"{path} is larger than the image: {size} > {image_size} bytes")
        if size < image_size:
            log.info("%s is smaller than the image: bytes %d-%d of the image are "
                     "left unchanged", path, size, image_size - 1)
        if not opts.has("zero"):
            log.info("the server cannot zero: sending holes as zeroes")
        if src.format in formats.DETECT_ZEROES_FORMATS:
            detect_zeroes = True
        count = _connections(connections, opts, "writer", size, buffer_size)
        request_size = _request_size(size, count, buffer_size, detect_zeroes)

        started = time.monotonic()
        plan = None
        if resume:
            _require_blocks(opts)
            plan = resume_mod.Plan(
                src.extents(), _server_extents(target, size), size, RESUME_BLOCK_SIZE,
                _request_size(size, count, buffer_size), progress)
            workers = [resume_mod.UploadWorker(
                image, src.reader(), buffer_size, progress, opts, resume_mod.algorithm(),
                RESUME_BLOCK_SIZE) for image in _images(target, count)]
        else:
            workers = [transfer.UploadWorker(
                image, src.reader(), buffer_size, progress, opts, detect_zeroes)
                for image in _images(target, count)]

        progress.start("upload", size)
        try:
            transfer.run(plan or transfer.plan(src.extents(), request_size), workers)
            if opts.has("flush"):
                workers[0].image.flush()
        finally:
            progress.end()
        result = Result.of("upload", size, workers, started, target,
                           skipped_bytes=_skipped(plan, workers), format=src.format)
        if verify:
            result.checksum = _verify(target, src.reader(), src.extents(image_size),
                                      path, image_size, progress)
        return result
    finally:
        if target is not None:
            target.close()
        src.close()


def _images(target, count):
    """`count` ImageClients of `target`: its first one, then new ones."""
    return [target.image if i == 0 else target.new_image() for i in range(count)]


def _require_blocks(options):
    if not options.has("checksum"):
        raise errors.UnsupportedError(
            "the server does not offer checksums, needed by --resume")


def _server_extents(target, size):
    """The image's Extents of [0, size); all data if the server has no extents."""
    if target.options.has("extents"):
        return list(target.image.extents(size))
    log.info("the server does not report extents: reading the whole image")
    return [Extent(0, size, False)] if size else []


def _skipped(plan, workers):
    """Bytes a resumed transfer found in place (0 without resume)."""
    if plan is None:
        return 0
    return plan.same_bytes + sum(w.skipped_bytes for w in workers)


def upload_stream(stream, url, *, retries=DEFAULT_RETRIES,
                  retry_delay=DEFAULT_RETRY_DELAY, cafile=None, insecure=False,
                  timeout=DEFAULT_TIMEOUT, use_unix_socket=True,
                  buffer_size=DEFAULT_BUFFER_SIZE, progress=None):
    """
    Upload raw bytes read from `stream` (a binary file object, e.g.
    sys.stdin.buffer) until its end, to the start of the image at `url`:
    sequentially, one buffer, one connection. All-zero buffers are sent as
    zero requests. A stream shorter than the image leaves the rest of the
    image as it was; one longer than the image is an error (what fits was
    written). Returns a Result.
    """
    _check_buffer_size(buffer_size)
    progress = progress or Progress()
    with _Target.opened(url, cafile, insecure, timeout, use_unix_socket, retries,
                        retry_delay) as target:
        opts = target.options
        image_size = target.writable_size()
        image = target.image
        flush = False if opts.has("flush") else None
        can_zero = opts.has("zero")
        view = memoryview(bytearray(buffer_size))
        pos = data = zeroes = 0
        started = time.monotonic()
        progress.start("upload", None)
        try:
            while True:
                n = _fill(stream, view)
                if n == 0:
                    break
                if pos + n > image_size:
                    raise errors.OutOfRangeError(
                        f"the input is larger than the image ({image_size} bytes): "
                        f"the image holds its first {pos} bytes")
                chunk = view[:n]
                if can_zero and util.is_zero(chunk):
                    image.zero(pos, n)
                    zeroes += n
                else:
                    image.write(pos, chunk, flush)
                    data += n
                pos += n
                progress.update(n)
                if n < len(view):
                    break
            if pos == image_size and _fill(stream, view[:1]):
                raise errors.OutOfRangeError(
                    f"the input is larger than the image ({image_size} bytes): "
                    "the image holds its first bytes")
            if opts.has("flush"):
                image.flush()
        finally:
            progress.end()
        if pos < image_size:
            log.info("the input ended at %d: the rest of the image is left unchanged", pos)
        return Result("upload", pos, data, zeroes, time.monotonic() - started, 1,
                      target.transport, retries=target.retry.count)


def _fill(stream, view):
    """Read from `stream` until `view` is full or the stream ends."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def download_stream(url, stream, *, retries=DEFAULT_RETRIES,
                    retry_delay=DEFAULT_RETRY_DELAY, cafile=None, insecure=False,
                    timeout=DEFAULT_TIMEOUT, use_unix_socket=True,
                    buffer_size=DEFAULT_BUFFER_SIZE, progress=None):
    """
    Write the image at `url` as raw bytes to `stream` (a binary file object
    or a file descriptor, e.g. sys.stdout), sequentially, with one buffer
    and one connection; zero extents are written as zeroes without being
    read. Returns a Result.
    """
    _check_buffer_size(buffer_size)
    progress = progress or Progress()
    fd = stream if isinstance(stream, int) else stream.fileno()
    with _Target.opened(url, cafile, insecure, timeout, use_unix_socket, retries,
                        retry_delay) as target:
        opts = target.options
        size = target.image.size()
        if opts.has("extents"):
            exts = target.image.extents(size)
        else:
            exts = [Extent(0, size, False)] if size else []
        view = memoryview(bytearray(buffer_size))
        zeroes = None
        data = zero = 0
        started = time.monotonic()
        progress.start("download", size)
        try:
            for item in transfer.plan(exts, buffer_size, zero_step=buffer_size):
                if item.zero:
                    if zeroes is None:
                        zeroes = memoryview(bytes(buffer_size))
                    local.write_all(fd, zeroes[:item.length])
                    zero += item.length
                else:
                    chunk = view[:item.length]
                    target.image.read_into(item.start, chunk)
                    local.write_all(fd, chunk)
                    data += item.length
                progress.update(item.length)
        finally:
            progress.end()
        return Result("download", size, data, zero, time.monotonic() - started, 1,
                      target.transport, retries=target.retry.count)


def download(url, path, *, connections=None, verify=False, detect_zeroes=False,
             format=None, backing_file=None, incremental=False, resume=False,
             retries=DEFAULT_RETRIES, retry_delay=DEFAULT_RETRY_DELAY,
             cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT,
             use_unix_socket=True, buffer_size=DEFAULT_BUFFER_SIZE, progress=None):
    """
    Download the image at `url` into the local file `path`.

    `format` "raw" (default, unless `backing_file` or `incremental`): the file is created or truncated, then sized
    to the image: it starts as one hole, and only the data extents the
    server reports are fetched and written, so zero areas stay holes (with
    `detect_zeroes`, so do all-zero chunks of data extents). Servers
    without extents get a full read. The file is fsync()ed at the end.

    `format` "qcow2": a new qcow2 (made with qemu-img, written through a
    local qemu-nbd) whose unallocated clusters are the image's zero
    extents; on top of `backing_file` if given (zero extents are then
    written as zero clusters). With `incremental` (needs `backing_file`,
    the previous backup, and a session with dirty extents), only the
    extents the server reports dirty are written: the qcow2 holds what
    changed since the previous backup, and the chain reads as the image.

    With `resume` (raw only), an existing `path` is kept: the per-block
    digests of the file and of the server are compared, and only the blocks
    that differ are fetched. With `verify`, the server's checksum is
    compared with the file's (VerifyError on mismatch). Regular files only.
    Returns a Result.
    """
    _check_buffer_size(buffer_size)
    progress = progress or Progress()
    if format is None:
        format = "qcow2" if (backing_file or incremental) else "raw"
    if format not in formats.DOWNLOAD_FORMATS:
        raise errors.ClientError(
            f"cannot download to {format!r}: expected one of "
            f"{', '.join(formats.DOWNLOAD_FORMATS)}")
    if incremental and backing_file is None:
        raise errors.ClientError(
            "an incremental download needs --backing-file: the previous backup")
    if format == "raw" and (backing_file or incremental):
        raise errors.ClientError("--backing-file and --incremental need --format qcow2")
    if resume and format != "raw":
        raise errors.UnsupportedError("--resume works with raw downloads only")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise errors.ClientError(f"cannot use {path}: {e.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise errors.UnsupportedError(f"{path} is not a regular file")
    if backing_file is not None and not os.path.isfile(backing_file):
        raise errors.ClientError(f"backing file {backing_file} does not exist")

    target = _Target(url, cafile, insecure, timeout, use_unix_socket, retries,
                     retry_delay)
    fd = None
    server = None
    sinks = []
    try:
        opts = target.options
        size = target.image.size()
        if incremental:
            exts = [Extent(e.start, e.length, e.zero)
                    for e in target.image.dirty_extents(size) if e.dirty]
        else:
            exts = _server_extents(target, size)
        data = sum(e.length for e in exts if not e.zero)
        count = _connections(connections, opts, "reader", data, buffer_size)

        started = time.monotonic()
        plan = None
        write_zeroes = backing_file is not None
        if format == "qcow2":
            formats.create_qcow2(path, size, backing_file)
            server = formats.QemuNBD(path, "qcow2", readonly=False, shared=count + 1)
            sinks = [formats.NbdWriter(server) for _ in range(count)]
            items = transfer.plan(exts, _request_size(data, count, buffer_size))
        elif resume:
            _require_blocks(opts)
            fd = _open_local(path, os.O_RDWR | os.O_CREAT)
            if local.file_size(fd) != size:
                os.ftruncate(fd, size)
            # Windows as large as an upload's requests: a window's differing
            # blocks are fetched a buffer at a time.
            items = plan = resume_mod.Plan(
                exts, local.extents(fd, size), size, RESUME_BLOCK_SIZE,
                _request_size(size, count, buffer_size), progress)
            sinks = [local.FileSink(fd) for _ in range(count)]
        else:
            fd = _open_local(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            # Truncating to 0 first dropped the old content: the file is now
            # one hole of the image size.
            os.ftruncate(fd, size)
            sinks = [local.FileSink(fd) for _ in range(count)]
            items = transfer.plan(exts, _request_size(data, count, buffer_size))
        if plan is not None:
            workers = [resume_mod.DownloadWorker(
                image, sinks[i], local.FileReader(fd), buffer_size, progress,
                resume_mod.algorithm(), RESUME_BLOCK_SIZE)
                for i, image in enumerate(_images(target, count))]
        else:
            workers = [transfer.DownloadWorker(
                image, sinks[i], buffer_size, progress, detect_zeroes, write_zeroes)
                for i, image in enumerate(_images(target, count))]

        progress.start("download", size)
        try:
            transfer.run(items, workers)
            if server is not None:
                sinks[0].flush()
            else:
                os.fsync(fd)
        finally:
            progress.end()
        if server is not None:
            for s in sinks:
                s.close()
            sinks = []
            server.close()
            server = None
        if fd is not None:
            os.close(fd)
            fd = None
        result = Result.of("download", size, workers, started, target,
                           skipped_bytes=_skipped(plan, workers), format=format)
        if verify:
            with _LocalImage.opened(path, format) as img:
                result.checksum = _verify(target, img.reader(), img.extents(size),
                                          path, size, progress)
        return result
    finally:
        for s in sinks:
            s.close()
        if server is not None:
            server.close()
        if fd is not None:
            os.close(fd)
        target.close()


def checksum(url, *, algorithm=blkhash.ALGORITHM, block_size=blkhash.BLOCK_SIZE,
             cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT, use_unix_socket=True,
             retries=DEFAULT_RETRIES, retry_delay=DEFAULT_RETRY_DELAY):
    """
    The server's block checksum of the image:
    {"algorithm": ..., "block_size": ..., "checksum": ...}.
    """
    local.validate_checksum_args(algorithm, block_size)
    with _Target.opened(url, cafile, insecure, timeout, use_unix_socket, retries,
                        retry_delay) as target:
        _require_checksum(target.options)
        return target.image.checksum(algorithm, block_size)


def verify(path, url, *, algorithm=blkhash.ALGORITHM, block_size=blkhash.BLOCK_SIZE,
           format=None, cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT,
           use_unix_socket=True, retries=DEFAULT_RETRIES, retry_delay=DEFAULT_RETRY_DELAY,
           progress=None):
    """
    Compare the checksum of the local image `path` (its guest data when it
    is not raw; see upload) with the server's.

    The image is taken as zero-padded to the session size. Returns the
    checksum dict; raises VerifyError on mismatch.
    """
    local.validate_checksum_args(algorithm, block_size)
    progress = progress or Progress()
    with _LocalImage.opened(path, format) as img, \
            _Target.opened(url, cafile, insecure, timeout, use_unix_socket, retries,
                           retry_delay) as target:
        size = target.image.size()
        return _verify(target, img.reader(), img.extents(size), path, size,
                       progress, algorithm, block_size)


def info(url, *, cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT,
         use_unix_socket=True, retries=DEFAULT_RETRIES, retry_delay=DEFAULT_RETRY_DELAY):
    """
    What the server says about the image: size, writable, transport, and
    the OPTIONS answer (allow, features, max_readers, max_writers,
    unix_socket).
    """
    with _Target.opened(url, cafile, insecure, timeout, use_unix_socket, retries,
                        retry_delay) as target:
        result = {"size": target.image.size(),
                  "writable": target.options.writable,
                  "transport": target.transport}
        result.update(target.options.to_dict())
        return result


def _require_checksum(options):
    if options.supported and not options.has("checksum"):
        raise errors.UnsupportedError("the server does not support checksums")


def _verify(target, reader, extents, path, size, progress, algorithm=blkhash.ALGORITHM,
            block_size=blkhash.BLOCK_SIZE):
    """
    Compare checksums of the image and of the local image read by `reader`
    with `extents`; VerifyError if they differ.
    """
    _require_checksum(target.options)
    progress.start("verify", size)
    try:
        # The server hashes its image while we hash the local one.
        remote = {}

        def server_checksum():
            try:
                remote["result"] = target.image.checksum(algorithm, block_size)
            except BaseException as e:
                remote["error"] = e

        thread = threading.Thread(target=server_checksum, daemon=True,
                                  name="imaged-client-checksum")
        thread.start()
        try:
            mine = local.checksum_of(reader, extents, size, algorithm, block_size,
                                     progress)
            while thread.is_alive():
                thread.join(0.2)
        except BaseException:
            target.image.abort()
            thread.join(transfer.STOP_TIMEOUT_S)
            raise
    finally:
        progress.end()
    if "error" in remote:
        raise remote["error"]
    theirs = remote["result"]
    if theirs.get("checksum") != mine["checksum"]:
        raise errors.VerifyError(
            f"checksum mismatch: the image has {theirs.get('algorithm')} "
            f"{theirs.get('checksum')}, {path} has {mine['algorithm']} {mine['checksum']}",
            local=mine, remote=theirs)
    return mine
