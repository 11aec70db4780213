"""
Backends: synchronous access to the bytes of an image.

A backend is opened per user of an image (e.g. per connection) with
open_backend(), and is not safe for concurrent calls from several threads:
it owns a bounce buffer used for unaligned I/O. Several backends of the same
image may be used concurrently if they share the same `rmw_lock`.

Every call blocks; the daemon runs them in a thread pool. Offsets and
lengths are in bytes and may have any alignment.

Backend interface:

    size() -> int
        Current size of the image in bytes.

    readinto(offset, buf) -> int
        Read len(buf) bytes at `offset` into the writable buffer `buf`.
        Returns the number of bytes read, less than len(buf) only at the
        end of the image.

    write(offset, buf) -> int
        Write all of `buf` at `offset` and return len(buf). Never extends
        the image: a range past size() raises errors.RangeNotSatisfiable.

    zero(offset, length)
        Make a range read as zeroes, deallocating it if the backend was
        opened with sparse=True.

    flush()
        Make written data durable.

    extents(start=0, length=None) -> iterator of Extent
        Describe the data and zero areas of [start, start + length),
        clipped to size(). Extents are contiguous and adjacent extents
        never have the same flags.

    close()
        Release the backend; also usable as a context manager.

    Properties: block_size (alignment of direct I/O), direct (O_DIRECT is
    used), sparse (zero() deallocates).

I/O errors are reported as errors.StorageError.
"""

import urllib.parse
from typing import NamedTuple

from .. import errors


class Extent(NamedTuple):
    """
    A range of the image with uniform allocation.

    `zero` is True if the range reads as zeroes. `hole` is True if reading
    it would expose a backing image (never for raw files, where holes read
    as zeroes and are reported with zero=True, hole=False).
    """

    start: int
    length: int
    zero: bool
    hole: bool = False

    def to_dict(self):
        """The extent as sent to clients in the extents API."""
        return {
            "start": self.start,
            "length": self.length,
            "zero": self.zero,
            "hole": self.hole,
        }


def open_backend(url, mode, *, sparse=False, direct=True, rmw_lock=None):
    """
    Open the image at the session `url` and return a backend.

    Only "file:///absolute/path" urls are supported; the path may be a
    regular file or a block device. `mode` is "r" or "rw". The path is used
    as is, without percent-decoding, like ovirt-imageio.

    sparse: zero() deallocates space instead of keeping it allocated.
    direct: use O_DIRECT when the file system supports it.
    rmw_lock: context manager serializing read-modify-write of partial
        blocks; share it between all backends writing the same image.
    """
    if mode not in ("r", "rw"):
        raise errors.BadRequest(f"Invalid mode {mode!r}, expected 'r' or 'rw'")

    if not isinstance(url, str):
        raise errors.BadRequest("Image url must be a string")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "file":
        raise errors.Unsupported(
            f"Unsupported image url scheme {parsed.scheme!r}, "
            "only 'file' is supported")
    if parsed.netloc or parsed.query or parsed.fragment \
            or not parsed.path.startswith("/"):
        raise errors.BadRequest(
            "Invalid image url, expected file:///absolute/path")

    # Imported late because file.py imports Extent from this module.
    from .file import FileBackend
    return FileBackend(
        parsed.path, mode, sparse=sparse, direct=direct, rmw_lock=rmw_lock)
