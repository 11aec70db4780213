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
from . import http
from . import local
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

    @classmethod
    def of(cls, operation, size, workers, started, transport):
        """What `workers` (transfer workers) did since `started`."""
        return cls(operation, size,
                   sum(w.data_bytes for w in workers),
                   sum(w.zero_bytes for w in workers),
                   time.monotonic() - started, len(workers), transport)

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

    def __init__(self, url, cafile, insecure, timeout, use_unix_socket):
        self._args = {"cafile": cafile, "insecure": insecure, "timeout": timeout}
        self.url = url
        self.unix_socket = None
        conn = http.Connection(url, **self._args)
        if insecure and conn.transport == "https":
            log.warning("TLS certificate verification is disabled (--insecure): "
                        "the server is not authenticated")
        self.image = ImageClient(conn)
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
                                            timeout=self._args["timeout"]))
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

    @property
    def transport(self):
        return self.image.transport

    def new_image(self):
        """Another ImageClient on the same transport (closed by close())."""
        image = ImageClient(http.Connection(
            self.url, unix_socket=self.unix_socket, **self._args))
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


def _upload_request_size(size, connections, buffer_size, detect_zeroes):
    """
    Bytes per upload request: up to transfer.UPLOAD_REQUEST_BYTES, sent a
    buffer at a time, but no more than an even share of the image for each
    connection; a single buffer when each must be looked at for zeroes
    before it is sent.
    """
    if detect_zeroes:
        return buffer_size
    share = util.round_up(-(-size // connections), buffer_size)
    return max(buffer_size, min(transfer.UPLOAD_REQUEST_BYTES, share))


def _check_buffer_size(buffer_size):
    if not MIN_BUFFER_SIZE <= buffer_size <= MAX_BUFFER_SIZE:
        raise errors.ClientError(
            f"buffer size must be between {MIN_BUFFER_SIZE} and {MAX_BUFFER_SIZE} bytes")


def _open_local(path, flags, mode=0o666):
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        raise errors.ClientError(f"cannot open {path}: {e.strerror}") from None


def upload(path, url, *, connections=None, verify=False, detect_zeroes=False,
           cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT,
           use_unix_socket=True, buffer_size=DEFAULT_BUFFER_SIZE, progress=None):
    """
    Upload the local file (or block device) `path` to the image at `url`.

    Data extents are sent with PUT, holes with PATCH zero (or as zeroes if
    the server cannot zero); with `detect_zeroes`, all-zero chunks inside
    data extents are zeroed too. `connections` (default min(4, what the
    server allows)) work on disjoint ranges; one flush ends the upload.
    The file may be smaller than the image: the rest of the image is left
    as it is. With `verify`, the server's checksum is compared with the
    file's (the file taken as zero-padded to the image size); a mismatch
    raises VerifyError. `progress`: a progress.Progress. Returns a Result.
    """
    _check_buffer_size(buffer_size)
    progress = progress or Progress()
    fd = _open_local(path, os.O_RDONLY)
    target = None
    workers = []
    try:
        size = local.file_size(fd)
        target = _Target(url, cafile, insecure, timeout, use_unix_socket)
        opts = target.options
        if not opts.writable:
            raise errors.ForbiddenError(
                "the session is read-only: upload needs a session allowing 'write'")
        image_size = target.image.size()
        if size > image_size:
            raise errors.OutOfRangeError(
                f"{path} is larger than the image: {size} > {image_size} bytes")
        if size < image_size:
            log.info("%s is smaller than the image: bytes %d-%d of the image are "
                     "left unchanged", path, size, image_size - 1)
        if not opts.has("zero"):
            log.info("the server cannot zero: sending holes as zeroes")
        count = _connections(connections, opts, "writer", size, buffer_size)
        request_size = _upload_request_size(size, count, buffer_size, detect_zeroes)
        workers = [transfer.UploadWorker(
            target.image if i == 0 else target.new_image(), fd, buffer_size,
            progress, opts, detect_zeroes) for i in range(count)]

        started = time.monotonic()
        progress.start("upload", size)
        try:
            transfer.run(transfer.plan(local.extents(fd, size), request_size), workers)
            if opts.has("flush"):
                workers[0].image.flush()
        finally:
            progress.end()
        result = Result.of("upload", size, workers, started, target.transport)
        if verify:
            result.checksum = _verify(target, path, image_size, progress)
        return result
    finally:
        if target is not None:
            target.close()
        os.close(fd)


def download(url, path, *, connections=None, verify=False, detect_zeroes=False,
             cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT,
             use_unix_socket=True, buffer_size=DEFAULT_BUFFER_SIZE, progress=None):
    """
    Download the image at `url` into the local file `path`.

    The file is created or truncated, then sized to the image: it starts
    as one hole, and only the data extents the server reports are fetched
    and written, so zero areas stay holes (with `detect_zeroes`, so do
    all-zero chunks of data extents). Servers without extents get a full
    read. The file is fsync()ed at the end. With `verify`, the server's
    checksum is compared with the file's (VerifyError on mismatch).
    Regular files only. Returns a Result.
    """
    _check_buffer_size(buffer_size)
    progress = progress or Progress()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise errors.ClientError(f"cannot use {path}: {e.strerror}") from None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise errors.UnsupportedError(f"{path} is not a regular file")

    target = _Target(url, cafile, insecure, timeout, use_unix_socket)
    fd = None
    try:
        opts = target.options
        size = target.image.size()
        if opts.has("extents"):
            exts = list(target.image.extents(size))
        else:
            log.info("the server does not report extents: reading the whole image")
            exts = [Extent(0, size, False)] if size else []
        data = sum(e.length for e in exts if not e.zero)
        count = _connections(connections, opts, "reader", data, buffer_size)

        fd = _open_local(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        # Truncating to 0 first dropped the old content: the file is now one
        # hole of the image size.
        os.ftruncate(fd, size)
        workers = [transfer.DownloadWorker(
            target.image if i == 0 else target.new_image(), fd, buffer_size,
            progress, detect_zeroes) for i in range(count)]

        started = time.monotonic()
        progress.start("download", size)
        try:
            transfer.run(transfer.plan(exts, buffer_size), workers)
            os.fsync(fd)
        finally:
            progress.end()
        os.close(fd)
        fd = None
        result = Result.of("download", size, workers, started, target.transport)
        if verify:
            result.checksum = _verify(target, path, size, progress)
        return result
    finally:
        if fd is not None:
            os.close(fd)
        target.close()


def checksum(url, *, algorithm=blkhash.ALGORITHM, block_size=blkhash.BLOCK_SIZE,
             cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT, use_unix_socket=True):
    """
    The server's block checksum of the image:
    {"algorithm": ..., "block_size": ..., "checksum": ...}.
    """
    local.validate_checksum_args(algorithm, block_size)
    target = _Target(url, cafile, insecure, timeout, use_unix_socket)
    try:
        _require_checksum(target.options)
        return target.image.checksum(algorithm, block_size)
    finally:
        target.close()


def verify(path, url, *, algorithm=blkhash.ALGORITHM, block_size=blkhash.BLOCK_SIZE,
           cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT,
           use_unix_socket=True, progress=None):
    """
    Compare the checksum of the local file `path` with the server's.

    The file is taken as zero-padded to the image size. Returns the
    checksum dict; raises VerifyError on mismatch.
    """
    local.validate_checksum_args(algorithm, block_size)
    progress = progress or Progress()
    target = _Target(url, cafile, insecure, timeout, use_unix_socket)
    try:
        size = target.image.size()
        return _verify(target, path, size, progress, algorithm, block_size)
    finally:
        target.close()


def info(url, *, cafile=None, insecure=False, timeout=DEFAULT_TIMEOUT,
         use_unix_socket=True):
    """
    What the server says about the image: size, writable, transport, and
    the OPTIONS answer (allow, features, max_readers, max_writers,
    unix_socket).
    """
    target = _Target(url, cafile, insecure, timeout, use_unix_socket)
    try:
        result = {"size": target.image.size(),
                  "writable": target.options.writable,
                  "transport": target.transport}
        result.update(target.options.to_dict())
        return result
    finally:
        target.close()


def _require_checksum(options):
    if options.supported and not options.has("checksum"):
        raise errors.UnsupportedError("the server does not support checksums")


def _verify(target, path, size, progress, algorithm=blkhash.ALGORITHM,
            block_size=blkhash.BLOCK_SIZE):
    """Compare checksums of the image and of `path`; VerifyError if they differ."""
    _require_checksum(target.options)
    progress.start("verify", size)
    try:
        # The server hashes its image while we hash the local file.
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
            mine = local.checksum(path, size, algorithm, block_size, progress)
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
