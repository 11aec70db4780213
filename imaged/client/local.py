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


class FileReader:
    """Reads of an open local file (see transfer.UploadWorker)."""

    def __init__(self, fd):
        self.fd = fd

    def readinto(self, view, offset):
        pread_exactly(self.fd, view, offset)

    def close(self):
        pass


class FileSink:
    """Writes into an open local file (see transfer.DownloadWorker)."""

    # Zeroes are written from one buffer of this size, made on first use.
    ZERO_CHUNK_BYTES = 1024**2

    def __init__(self, fd):
        self.fd = fd
        self._zeroes = None

    def pwrite(self, view, offset):
        pwrite_all(self.fd, view, offset)

    def zero(self, offset, length):
        if self._zeroes is None:
            self._zeroes = memoryview(bytes(self.ZERO_CHUNK_BYTES))
        end = offset + length
        while offset < end:
            n = min(len(self._zeroes), end - offset)
            pwrite_all(self.fd, self._zeroes[:n], offset)
            offset += n

    def close(self):
        pass


def write_all(fd, view):
    """Write all of `view` to `fd` (a pipe or a file) at its position."""
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def validate_checksum_args(algorithm, block_size):
    """Raise ClientError unless the server would accept these arguments."""
    try:
        blkhash.validate(algorithm, block_size)
    except daemon_errors.Error as e:
        raise errors.ClientError(e.message) from None


def block_digests(reader, extents, size, algorithm=blkhash.ALGORITHM,
                  block_size=blkhash.BLOCK_SIZE, progress=None):
    """
    Yield (start, length, zero, raw digest) for each checksum block of an
    image of `size` bytes read by `reader` (readinto(view, offset)) whose
    Extents are `extents`: the digests the server's checksum and checksum
    blocks are made of. Zero extents are not read.
    """
    buf = bytearray(block_size)
    with memoryview(buf) as mv:
        for block in blkhash.split(extents, block_size):
            if block.zero:
                zero = True
            else:
                view = mv[:block.length]
                reader.readinto(view, block.start)
                # Comparing is much cheaper than hashing, and the zero
                # digest is precomputed: same result, less CPU.
                zero = util.is_zero(view)
            if zero:
                digest = blkhash.zero_block_digest(block.length, algorithm)
            else:
                digest = blkhash.block_digest(view, algorithm)
            yield block.start, block.length, zero, digest
            if progress is not None:
                progress.update(block.length)


class PaddedFileReader(FileReader):
    """A file read as if it were zero-padded past its end to any size."""

    def __init__(self, fd, file_size):
        super().__init__(fd)
        self.file_size = file_size

    def readinto(self, view, offset):
        # A block may cross the end of a file smaller than the image: the
        # rest of it is zeroes.
        inside = max(0, min(len(view), self.file_size - offset))
        pread_exactly(self.fd, view[:inside], offset)
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)


def padded_extents(fd, file_size, size):
    """Extents of the file `fd` zero-padded (or cut) to `size`."""
    yield from extents(fd, min(file_size, size))
    if size > file_size:
        yield Extent(file_size, size - file_size, True)


def checksum_of(reader, extents, size, algorithm=blkhash.ALGORITHM,
                block_size=blkhash.BLOCK_SIZE, progress=None):
    """The block checksum {"algorithm", "block_size", "checksum"} of an image."""
    validate_checksum_args(algorithm, block_size)
    h = blkhash.Hash(block_size, algorithm)
    for _, _, _, digest in block_digests(reader, extents, size, algorithm,
                                         block_size, progress):
        h.add_digest(digest)
    return {"algorithm": algorithm, "block_size": block_size,
            "checksum": h.hexdigest()}


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
        return checksum_of(PaddedFileReader(fd, fsize), padded_extents(fd, fsize, size),
                           size, algorithm, block_size, progress)
    finally:
        os.close(fd)
