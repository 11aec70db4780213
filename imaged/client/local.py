"""
The local side of a transfer: file size, extents and the block checksum.

Extents come from SEEK_DATA/SEEK_HOLE, so holes are neither read nor sent,
and the checksum of a sparse file hashes its holes without reading them,
with the same block hash as the server (imaged.blkhash).
"""

import errno
import os

from .. import blkhash
from .. import errors as daemon_errors
from .. import util
from . import errors
from .images import Extent

# SEEK_DATA/SEEK_HOLE unsupported by the file system: all of it is data.
_NO_SEEK_DATA = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def file_size(fd):
    """Size of an open regular file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def extents(fd, size):
    """
    Yield the data and zero Extents of [0, size) of the open file `fd`.

    Holes are zero extents; everything else is data (it may still contain
    zeroes). File systems without SEEK_DATA give one data extent.
    """
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                # No data after pos: the rest is a hole.
                data = size
            elif e.errno in _NO_SEEK_DATA:
                yield Extent(pos, size - pos, False)
                return
            else:
                raise
        data = min(data, size)
        if data > pos:
            yield Extent(pos, data - pos, True)
            pos = data
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            hole = size
        # A file growing or shrinking under us must not loop forever.
        hole = size if hole <= pos else min(hole, size)
        yield Extent(pos, hole - pos, False)
        pos = hole


def pread_exactly(fd, view, offset):
    """Fill `view` from `fd` at `offset`; fails if the file ends first."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise errors.ClientError(
                f"local file ended at {offset + got} while reading: "
                "was it truncated during the transfer?")
        got += n


def pwrite_all(fd, view, offset):
    """Write all of `view` to `fd` at `offset`."""
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def validate_checksum_args(algorithm, block_size):
    """Raise ClientError unless the server would accept these arguments."""
    try:
        blkhash.validate(algorithm, block_size)
    except daemon_errors.Error as e:
        raise errors.ClientError(e.message) from None


def checksum(path, size=None, algorithm=blkhash.ALGORITHM,
             block_size=blkhash.BLOCK_SIZE, progress=None):
    """
    The block checksum of a local file, as the server computes it.

    `size`: checksum this many bytes; past the end of the file the image
    is taken as zeroes (a file uploaded into a larger image). Holes are
    hashed without reading them. Returns {"algorithm", "block_size",
    "checksum"}.
    """
    validate_checksum_args(algorithm, block_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.ClientError(f"cannot open {path}: {e.strerror}") from None
    try:
        fsize = file_size(fd)
        if size is None:
            size = fsize

        def all_extents():
            yield from extents(fd, min(fsize, size))
            if size > fsize:
                yield Extent(fsize, size - fsize, True)

        h = blkhash.Hash(block_size, algorithm)
        buf = bytearray(block_size)
        with memoryview(buf) as mv:
            for block in blkhash.split(all_extents(), block_size):
                if block.zero:
                    h.zero(block.length)
                else:
                    view = mv[:block.length]
                    # A block may cross the end of a file smaller than the
                    # image: the rest of it is zeroes.
                    inside = max(0, min(block.length, fsize - block.start))
                    pread_exactly(fd, view[:inside], block.start)
                    view[inside:] = bytes(block.length - inside)
                    # Comparing is much cheaper than hashing, and the zero
                    # digest is precomputed: same result, less CPU.
                    if util.is_zero(view):
                        h.zero(block.length)
                    else:
                        h.update(view)
                if progress is not None:
                    progress.update(block.length)
    finally:
        os.close(fd)
    return {"algorithm": algorithm, "block_size": block_size,
            "checksum": h.hexdigest()}
