"""
FileBackend: raw images stored in regular files or block devices (Linux).

Direct I/O
----------
By default the image is opened with O_DIRECT, so transfers do not pollute
the host page cache. O_DIRECT requires the file offset, the length and the
memory address of each transfer to be aligned to `block_size`. Callers may
use any offset and length, so:

- Aligned parts of a request go straight to preadv()/pwritev().
- Unaligned parts go through a small aligned bounce buffer owned by the
  backend. Writing part of a block means reading the block, modifying it
  and writing it back (read-modify-write). This is done while holding
  `rmw_lock`, shared by all backends writing the same image, so two
  writers updating different bytes of the same block never lose an update.
- The last block of a file whose size is not a multiple of `block_size`
  cannot be written with O_DIRECT without extending the file, and shrinking
  it back afterwards would let concurrent readers see a wrong size. Writes
  to this block use a second, buffered file descriptor, opened lazily. The
  kernel keeps buffered and direct I/O on the same file coherent.

If the file system does not support O_DIRECT (open fails with EINVAL, e.g.
ramfs), the backend silently uses buffered I/O and `direct` is False.
"""

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
import urllib.parse

from .. import errors
from .. import util
from . import Capabilities
from . import Extent
from . import byte_view
from . import check_range
from . import check_writable
from . import merged

# fallocate(2) modes from <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Block device ioctls from <linux/fs.h>.
BLKSSZGET = 0x1268
BLKZEROOUT = 0x127F

# Alignment used for regular files. The real requirement is usually the
# logical sector size of the underlying disk (512 or 4096); 4096 is always
# enough and costs nothing when the callers use large aligned buffers.
FILE_BLOCK_SIZE = 4096

# Bounce buffer for unaligned I/O, and zero buffer for writing zeroes when
# the storage cannot zero a range by itself.
BOUNCE_SIZE = 1024**2
ZERO_BUFFER_SIZE = 1024**2

# errno values meaning "this way of zeroing is not supported here".
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS}


def _load_fallocate():
    # Python exposes only posix_fallocate(), which cannot punch holes.
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("fallocate64", "fallocate"):
        func = getattr(libc, name, None)
        if func is not None:
            func.argtypes = (
                ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
            func.restype = ctypes.c_int
            return func
    return None


_libc_fallocate = _load_fallocate()


def _fallocate(fd, mode, offset, length):
    if _libc_fallocate is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend:
    """
    Access a raw image in a regular file or a block device.

    See the imaged.backends module for the interface. Not safe for
    concurrent calls from several threads; open one backend per user and
    share `rmw_lock` between them.
    """

    # Raw files list zero extents only; any number of writers may share
    # an image (rmw_lock keeps partial blocks consistent).
    capabilities = Capabilities(extents=("zero",), max_writers=None,
                                zero=True, flush=True, sparse=True)

    @classmethod
    def check_url(cls, url):
        """Accept file:///absolute/path urls only."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "file" or parsed.netloc or parsed.query \
                or parsed.fragment or not parsed.path.startswith("/") \
                or "\0" in parsed.path:
            raise errors.BadRequest("invalid url: expected file:///absolute/path")
        if "%" in parsed.path:
            # Paths are used as written, like ovirt-imageio: an escape would
            # mean one thing to a reader and another to the file system.
            raise errors.BadRequest(
                "invalid url: percent-encoded paths are not supported")

    @classmethod
    def check_image(cls, url):
        """
        Refuse at session add a url naming an existing path that is not a
        regular file or a block device (see check_path); a path that does
        not exist yet is fine. Blocking: a stat().
        """
        try:
            check_path(urllib.parse.urlsplit(url).path)
        except errors.BadRequest:
            raise errors.BadRequest(
                "invalid url: not a regular file or block device") from None

    @classmethod
    def open(cls, url, mode, options):
        """Open the file or block device of a file:/// url."""
        cls.check_url(url)
        return cls(urllib.parse.urlsplit(url).path, mode, sparse=options.sparse,
                   direct=options.direct, rmw_lock=options.rmw_lock)

    def __init__(self, path, mode="r", *, sparse=False, direct=True,
                 rmw_lock=None):
        if mode not in ("r", "rw"):
            raise errors.BadRequest(
                f"Invalid mode {mode!r}, expected 'r' or 'rw'")
        self._path = path
        self._writable = mode == "rw"
        self._sparse = sparse
        self._rmw_lock = (contextlib.nullcontext() if rmw_lock is None
                          else rmw_lock)
        self._fd = -1
        self._buffered_fd = -1
        self._bounce_map = self._bounce = None
        self._zero_map = self._zero_buf = None
        # Zeroing methods the storage rejected, not to retry on every call.
        self._unsupported = set()

        # Refused before it is opened: opening a FIFO for reading blocks
        # until a writer comes, and opening a device may have side effects.
        check_path(path)
        self._fd, self._direct = self._open(direct)
        try:
            # What was opened decides (the path may have changed meanwhile).
            st_mode = _check_type(os.fstat(self._fd).st_mode, path)
            # Opened non-blocking (see _open); I/O on the image blocks.
            fcntl.fcntl(self._fd, fcntl.F_SETFL,
                        fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if stat.S_ISBLK(st_mode):
                self._is_device = True
                self._block_size = _logical_block_size(self._fd)
            else:
                self._is_device = False
                self._block_size = FILE_BLOCK_SIZE
        except BaseException:
            self.close()
            raise

    def _open(self, direct):
        # O_NONBLOCK: if the path became a FIFO after check_path(), the open
        # returns at once instead of holding a pool thread until a writer
        # appears (issue 14 item 7); the type is checked on the open fd.
        # O_NOCTTY: a terminal never becomes the daemon's.
        flags = (os.O_RDWR if self._writable else os.O_RDONLY) | os.O_CLOEXEC \
            | os.O_NONBLOCK | os.O_NOCTTY
        try:
            if direct:
                try:
                    return os.open(self._path, flags | os.O_DIRECT), True
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
            return os.open(self._path, flags), False
        except FileNotFoundError as e:
            raise errors.NotFound(f"No such file: {self._path}") from e
        except PermissionError as e:
            raise errors.Forbidden(f"Permission denied: {self._path}") from e
        except OSError as e:
            raise errors.StorageError(
                f"Cannot open {self._path}: {_describe(e)}") from e

    # Properties

    @property
    def block_size(self):
        """Alignment in bytes of offsets, lengths and buffers for O_DIRECT."""
        return self._block_size

    @property
    def direct(self):
        """True if the image is accessed with O_DIRECT."""
        return self._direct

    @property
    def sparse(self):
        """True if zero() deallocates space."""
        return self._sparse

    # Backend interface

    def size(self):
        """Return the current size of the image in bytes."""
        with _reporting("size", 0):
            if self._is_device:
                return os.lseek(self._fd, 0, os.SEEK_END)
            return os.fstat(self._fd).st_size

    def readinto(self, offset, buf):
        """
        Read len(buf) bytes at `offset` into the writable buffer `buf`.

        Returns the number of bytes read, less than len(buf) only when
        reaching the end of the image.
        """
        if offset < 0:
            raise errors.BadRequest(f"Invalid offset {offset}")
        mv = byte_view(buf)
        with _reporting("read", offset):
            if self._direct:
                return self._read_direct(offset, mv)
            return _pread_full(self._fd, offset, mv)

    def write(self, offset, buf):
        """
        Write all of `buf` at `offset` and return len(buf).

        Raises errors.RangeNotSatisfiable, writing nothing, if the range
        ends after the end of the image.
        """
        check_writable(self._writable)
        mv = byte_view(buf)
        size = self._checked_size(offset, len(mv))
        with _reporting("write", offset):
            self._write(offset, mv, size)
        return len(mv)

    def zero(self, offset, length):
        """
        Make the range [offset, offset + length) read as zeroes.

        With sparse=True the space is deallocated when the storage can do
        it, otherwise it stays allocated. Raises errors.RangeNotSatisfiable
        if the range ends after the end of the image.
        """
        check_writable(self._writable)
        size = self._checked_size(offset, length)
        if length == 0:
            return
        # Only whole blocks are zeroed by the storage. Partial blocks are
        # written through write(), so they take part in read-modify-write
        # locking and respect the alignment O_DIRECT and block devices need.
        bs = self._block_size
        end = offset + length
        start = min(util.round_up(offset, bs), end)
        stop = max(util.round_down(end, bs), start)
        with _reporting("zero", offset):
            if start > offset:
                self._write_zeroes(offset, start - offset, size)
            if stop > start:
                self._zero_blocks(start, stop - start, size)
            if end > stop:
                self._write_zeroes(stop, end - stop, size)

    def flush(self):
        """Make all data written so far durable."""
        with _reporting("flush", 0):
            # fsync() applies to the file, so it also covers writes done
            # through the buffered file descriptor.
            os.fsync(self._fd)

    def extents(self, start=0, length=None, context="zero"):
        """
        Return an iterator of Extent describing [start, start + length).

        The range is clipped to the image size; length=None means up to the
        end of the image. Holes of regular files are reported as zero
        extents (zero=True, hole=False), the rest as data. A block device is
        reported as a single data extent.
        """
        if context != "zero":
            raise errors.NotFound(f"{context} extents are not available for this image")
        if start < 0 or (length is not None and length < 0):
            raise errors.BadRequest(
                f"Invalid extents range: start={start} length={length}")
        size = self.size()
        end = size if length is None else min(start + length, size)
        if start >= end:
            return iter(())
        if self._is_device:
            return iter((Extent(start, end - start, False),))
        return merged(self._seek_extents(start, end))

    def fileno(self):
        """The file descriptor of the open image."""
        return self._fd

    def close(self):
        """Close the image and free buffers. Safe to call more than once."""
        for name in ("_fd", "_buffered_fd"):
            fd = getattr(self, name)
            if fd != -1:
                setattr(self, name, -1)
                os.close(fd)
        for view, mapping in (("_bounce", "_bounce_map"),
                              ("_zero_buf", "_zero_map")):
            if getattr(self, view) is not None:
                mem = getattr(self, mapping)
                setattr(self, view, None)
                setattr(self, mapping, None)
                try:
                    mem.close()
                except BufferError:
                    # A slice of the buffer is still referenced, e.g. from
                    # the traceback of a failed I/O call: the mapping goes
                    # away with the last reference.
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Checks

    def _checked_size(self, offset, length):
        """Validate a write or zero range and return the image size."""
        size = self.size()
        check_range(offset, length, size)
        return size

    # Reading

    def _read_direct(self, offset, mv):
        bs = self._block_size
        done = 0
        while done < len(mv):
            pos = offset + done
            rest = mv[done:]
            if pos % bs == 0 and len(rest) >= bs and _is_aligned(rest, bs):
                n = os.preadv(
                    self._fd, [rest[:util.round_down(len(rest), bs)]], pos)
            else:
                n = self._read_bounced(pos, rest)
            if n == 0:
                break
            done += n
        return done

    def _read_bounced(self, pos, dst):
        """Read up to len(dst) bytes at `pos` via the bounce buffer."""
        bs = self._block_size
        bounce = self._bounce_buffer()
        head = pos % bs
        want = min(len(dst), len(bounce) - head)
        n = os.preadv(
            self._fd, [bounce[:util.round_up(head + want, bs)]], pos - head)
        got = max(0, min(want, n - head))
        dst[:got] = bounce[head:head + got]
        return got

    # Writing

    def _write(self, offset, mv, size):
        if not self._direct:
            _pwrite_full(self._fd, offset, mv)
            return
        bs = self._block_size
        done = 0
        while done < len(mv):
            pos = offset + done
            rest = mv[done:]
            head = pos % bs
            if head == 0 and len(rest) >= bs:
                whole = rest[:util.round_down(len(rest), bs)]
                if _is_aligned(whole, bs):
                    n = os.pwritev(self._fd, [whole], pos)
                else:
                    n = self._write_bounced(pos, whole)
            elif pos - head + bs > size:
                # Partial last block of the file, see the module docstring.
                n = _pwrite_full(self._buffered(), pos, rest)
            else:
                n = self._read_modify_write(pos, rest[:bs - head])
            if n == 0:
                raise OSError(errno.EIO, "Write made no progress")
            done += n

    def _write_bounced(self, pos, src):
        """Write whole blocks from unaligned memory via the bounce buffer."""
        bounce = self._bounce_buffer()
        n = min(len(src), len(bounce))
        bounce[:n] = src[:n]
        return os.pwritev(self._fd, [bounce[:n]], pos)

    def _read_modify_write(self, pos, src):
        """Write `src`, which does not cross a block boundary, at `pos`."""
        bs = self._block_size
        start = pos - pos % bs
        head = pos - start
        block = self._bounce_buffer()[:bs]
        with self._rmw_lock:
            if os.preadv(self._fd, [block], start) != bs:
                raise OSError(errno.EIO, f"Short read of block at {start}")
            block[head:head + len(src)] = src
            if os.pwritev(self._fd, [block], start) != bs:
                raise OSError(errno.EIO, f"Short write of block at {start}")
        return len(src)

    # Zeroing

    def _zero_blocks(self, offset, length, size):
        """Zero an aligned range, letting the storage do it if it can."""
        for method in self._zero_methods():
            if method.__name__ in self._unsupported:
                continue
            try:
                method(offset, length)
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._unsupported.add(method.__name__)
        self._write_zeroes(offset, length, size)

    def _zero_methods(self):
        if self._is_device:
            # On a block device PUNCH_HOLE discards only if the device
            # guarantees reading zeroes afterwards, and fails otherwise.
            # BLKZEROOUT never discards.
            return ([self._punch_hole, self._blkzeroout] if self._sparse
                    else [self._blkzeroout])
        return ([self._punch_hole, self._zero_range] if self._sparse
                else [self._zero_range])

    def _punch_hole(self, offset, length):
        _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   offset, length)

    def _zero_range(self, offset, length):
        _fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                   offset, length)

    def _blkzeroout(self, offset, length):
        fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("=QQ", offset, length))

    def _write_zeroes(self, offset, length, size):
        zeroes = self._zero_buffer()
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self._write(offset, zeroes[:n], size)
            offset += n

    # Extents

    def _seek_extents(self, start, end):
        """Yield data and zero extents of [start, end) using SEEK_DATA."""
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    data = end  # No data after pos.
                elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    # Cannot tell holes from data; data is always correct.
                    yield Extent(pos, end - pos, False)
                    return
                else:
                    raise _storage_error("extents", pos, e) from e
            data = min(data, end)
            if data > pos:
                yield Extent(pos, data - pos, True)
            if data == end:
                return
            try:
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
            except OSError as e:
                raise _storage_error("extents", data, e) from e
            # hole <= data only if the file changed under us; look again.
            if hole > data:
                yield Extent(data, hole - data, False)
            pos = max(hole, data)

    # Buffers and file descriptors

    def _bounce_buffer(self):
        if self._bounce is None:
            self._bounce_map = util.aligned_buffer(BOUNCE_SIZE)
            self._bounce = memoryview(self._bounce_map)
        return self._bounce

    def _zero_buffer(self):
        # Never written to: an anonymous mmap stays zero.
        if self._zero_buf is None:
            self._zero_map = util.aligned_buffer(ZERO_BUFFER_SIZE)
            self._zero_buf = memoryview(self._zero_map)
        return self._zero_buf

    def _buffered(self):
        """Return a buffered (non O_DIRECT) fd of the same file."""
        if self._buffered_fd == -1:
            flags = os.O_RDWR | os.O_CLOEXEC
            try:
                # Reopens the very same inode, even if the path was renamed.
                self._buffered_fd = os.open(f"/proc/self/fd/{self._fd}", flags)
            except FileNotFoundError:
                self._buffered_fd = os.open(self._path, flags)
        return self._buffered_fd


# Helpers

def check_path(path):
    """
    Raise errors.BadRequest if `path` exists and is not a regular file or
    a block device (a FIFO, a socket, a character device, a directory).

    Follows symlinks (block volumes are symlinks to /dev/dm-N). A path that
    does not exist, or cannot be looked at, passes: opening it reports why.
    Never opens the path, so it never blocks on a FIFO.
    """
    try:
        st_mode = os.stat(path).st_mode
    except OSError:
        return
    _check_type(st_mode, path)


def _check_type(st_mode, path):
    if not (stat.S_ISREG(st_mode) or stat.S_ISBLK(st_mode)):
        raise errors.BadRequest(
            f"Not a regular file or block device: {path}")
    return st_mode


def _is_aligned(mv, align):
    """Return True if the memory of `mv` starts at a multiple of `align`."""
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mv))
    except TypeError:
        # Read-only buffers do not expose their address to ctypes; the data
        # will be copied to the bounce buffer.
        return False
    return address % align == 0


def _pread_full(fd, offset, mv):
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _pwrite_full(fd, offset, mv):
    done = 0
    while done < len(mv):
        n = os.pwritev(fd, [mv[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "Write made no progress")
        done += n
    return done


def _logical_block_size(fd):
    try:
        result = fcntl.ioctl(fd, BLKSSZGET, struct.pack("=i", 0))
        return struct.unpack("=i", result)[0]
    except OSError:
        return FILE_BLOCK_SIZE


def _describe(e):
    name = errno.errorcode.get(e.errno, "unknown")
    return f"{e.strerror or os.strerror(e.errno)} [{name}]"


def _storage_error(op, offset, e):
    return errors.StorageError(
        f"{op} failed at offset {offset}: {_describe(e)}")


@contextlib.contextmanager
def _reporting(op, offset):
    """Turn OSError into errors.StorageError naming the operation."""
    try:
        yield
    except OSError as e:
        raise _storage_error(op, offset, e) from e
