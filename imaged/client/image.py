"""
ImageClient: random access to one image, for scripts and backup tools.

Like ovirt-imageio's ImageioClient: open an image URL once, then read,
write, zero, flush, list extents and checksums at any offset, on one
keep-alive connection (over the daemon's unix socket when it runs on this
host), with transient failures retried (see imaged.client.retry).

    from imaged.client import ImageClient

    with ImageClient(url, cafile="ca.pem") as img:
        print(img.size, img.features)
        for e in img.extents():
            if not e.zero:
                data = img.read(e.start, min(e.length, 1024**2))
        img.write(0, b"x" * 4096)
        img.zero(1024**2, 1024**2)
        img.flush()

One ImageClient is used by one thread at a time; make one per thread for
parallel transfers (see imaged.client.upload for one that does).
"""

from .. import blkhash
from . import api
from . import errors
from . import local


class ImageClient:
    """
    An open image `url` (https://HOST:PORT/images/SESSION-ID).

    Connection options as for imaged.client.upload: `cafile`, `insecure`,
    `timeout` (seconds), `use_unix_socket`, `retries`, `retry_delay`.
    Failures raise imaged.client.ClientError subclasses.
    """

    def __init__(self, url, *, cafile=None, insecure=False, timeout=api.DEFAULT_TIMEOUT,
                 use_unix_socket=True, retries=api.DEFAULT_RETRIES,
                 retry_delay=api.DEFAULT_RETRY_DELAY):
        self._target = api._Target(url, cafile, insecure, timeout, use_unix_socket,
                                   retries, retry_delay)
        try:
            self.size = self._target.image.size()
        except BaseException:
            self._target.close()
            raise

    # What the server offers.

    @property
    def options(self):
        """The server's OPTIONS answer (images.Options)."""
        return self._target.options

    @property
    def features(self):
        """Features of the session: "extents", "zero", "flush", "checksum"."""
        return self._target.options.features

    @property
    def writable(self):
        return self._target.options.writable

    @property
    def transport(self):
        """"https", "http" or "unix"."""
        return self._target.transport

    @property
    def retries(self):
        """Requests retried so far."""
        return self._target.retry.count

    # Data.

    def read(self, offset, length):
        """The `length` bytes at `offset` (bytes)."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset, buf):
        """Fill the writable bytes-like `buf` with the bytes at `offset`."""
        self._check(offset, memoryview(buf).nbytes)
        with memoryview(buf).cast("B") as view:
            if len(view):
                self._target.image.read_into(offset, view)

    def write(self, offset, data, flush=False):
        """
        Write the bytes-like `data` at `offset`. With `flush`, the data is
        on stable storage when this returns.
        """
        with memoryview(data).cast("B") as view:
            self._check(offset, len(view))
            self._writable()
            if len(view):
                self._target.image.write(offset, view, self._flush_param(flush))

    def zero(self, offset, length, flush=False):
        """Make [offset, offset + length) read as zeroes."""
        self._check(offset, length)
        self._writable()
        if not self._target.options.has("zero"):
            raise errors.UnsupportedError("the server cannot zero")
        if length:
            self._target.image.zero(offset, length, flush)

    def flush(self):
        """Bring everything written so far to stable storage."""
        self._writable()
        if self._target.options.has("flush"):
            self._target.image.flush()

    # Metadata.

    def extents(self, context="zero"):
        """
        The image's extents, in order, covering [0, size): for "zero",
        images.Extent(start, length, zero); for "dirty" (a session with
        dirty extents, for incremental backup), images.DirtyExtent(start,
        length, dirty, zero).
        """
        if context == "zero":
            if not self._target.options.has("extents"):
                return [api.Extent(0, self.size, False)] if self.size else []
            return list(self._target.image.extents(self.size))
        if context == "dirty":
            return list(self._target.image.dirty_extents(self.size))
        raise errors.ClientError(f"unknown extents context {context!r}")

    def checksum(self, algorithm=blkhash.ALGORITHM, block_size=blkhash.BLOCK_SIZE):
        """The server's block checksum: {"algorithm", "block_size", "checksum"}."""
        local.validate_checksum_args(algorithm, block_size)
        return self._target.image.checksum(algorithm, block_size)

    def blocks(self, start=0, length=None, algorithm=blkhash.ALGORITHM,
               block_size=blkhash.BLOCK_SIZE):
        """
        The hex digests of the blocks of [start, start + length) (default:
        to the end) as [(offset, hex digest)]: the blocks the checksum is
        made of (GET .../checksum/blocks). `start` is a multiple of
        `block_size`.
        """
        local.validate_checksum_args(algorithm, block_size)
        if start % block_size:
            raise errors.ClientError("start must be a multiple of block_size")
        if length is None:
            length = self.size - start
        self._check(start, length)
        return [(offset, digest.hex()) for offset, digest in
                self._target.image.blocks(algorithm, block_size, start, length)]

    # Life cycle.

    def close(self):
        self._target.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.OutOfRangeError(
                f"range {offset}+{length} is outside the image of {self.size} bytes")

    def _writable(self):
        if not self._target.options.writable:
            raise errors.ForbiddenError("the session is read-only")

    def _flush_param(self, flush):
        # Servers without the flush feature get no flush parameter.
        return flush if self._target.options.has("flush") else None
