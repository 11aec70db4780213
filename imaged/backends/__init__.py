"""
Backends: synchronous access to the bytes of an image, chosen by URL scheme.

A backend is opened per user of an image (e.g. per client connection) with
open_backend(), and is not safe for concurrent calls from several threads.
Several backends of the same image may be used concurrently if they share
the same `rmw_lock`.

Every call blocks; the daemon runs them in a thread pool. A backend with
`cooperative = True` also takes calls in a greenlet of the event loop's
thread, where it waits by yielding to the loop instead of blocking it
(NBD); the images service then makes the calls it would wait for at once
there (imaged.ops.read). Offsets and lengths are in bytes and may have any
alignment.

Adding a backend
----------------
Write a class with the interface below and register it for its URL
schemes with `register(schemes, cls)` at the end of this module. The class
provides two class methods used before anything is opened:

    check_url(url) -> None
        Raise errors.BadRequest (naming `url`) unless this backend can
        open `url`. Called when a session is added, so a malformed url is
        refused at once instead of on first use. Must not block.

    check_image(url) -> None (optional)
        Raise errors.BadRequest (naming `url`) if what `url` names already
        exists and cannot be an image (the file backend: a FIFO, socket,
        character device or directory). May block; called at session add
        in a pool thread.

    open(url, mode, options) -> backend
        Open the image. `mode` is "r" or "rw"; `options` is an
        OpenOptions (sparse, direct, rmw_lock, dirty, timeout_s).

Backend interface
-----------------
    capabilities -> Capabilities
        What this open image supports (see Capabilities); may depend on
        what the storage told the backend when it was opened.

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

    extents(start=0, length=None, context="zero") -> iterator of Extent
        Describe [start, start + length), clipped to size(). Extents are
        contiguous and adjacent extents never have the same flags.
        `context` is one of capabilities.extents.

    close()
        Release the backend; also usable as a context manager.

    read_ahead(offset), settle() (optional, cooperative backends)
        read_ahead: a hint, in the event loop's thread, that the client
        will likely read the data after `offset` next; the backend may
        start reading it and leave that running on the loop. settle: end
        such work; the service calls it in the loop's thread before any
        call in a pool thread (see imaged.backends.nbd).

I/O errors are reported as errors.StorageError.
"""

import urllib.parse
from typing import NamedTuple, Optional, Tuple

from .. import errors


class Extent(NamedTuple):
    """
    A range of the image with uniform allocation.

    `zero` is True if the range reads as zeroes. `hole` is True if no layer
    of the image holds the range, so that reading it would expose a backing
    image (never for raw files, where holes read as zeroes and are reported
    with zero=True, hole=False). `dirty` is True in the "dirty" context for
    ranges changed since the backup bitmap was made.
    """

    start: int
    length: int
    zero: bool
    hole: bool = False
    dirty: bool = False


def merged(extents):
    """
    Merge adjacent extents with the same flags (zero, hole, dirty) and drop
    empty ones: what every backend's extents() promises.
    """
    current = None
    for ext in extents:
        if ext.length == 0:
            continue
        if current is not None and (current.zero, current.hole, current.dirty) \
                == (ext.zero, ext.hole, ext.dirty):
            current = current._replace(length=current.length + ext.length)
        else:
            if current is not None:
                yield current
            current = ext
    if current is not None:
        yield current


def check_writable(writable):
    """Raise Forbidden for a write or zero on an image opened read-only."""
    if not writable:
        raise errors.Forbidden("Image is opened read-only")


def check_range(offset, length, size):
    """
    Validate the range of a write or zero on an image of `size` bytes:
    BadRequest for a negative offset or length, RangeNotSatisfiable (with
    the size) for a range ending after the image: backends never extend
    an image.
    """
    if offset < 0 or length < 0:
        raise errors.BadRequest(
            f"Invalid range: offset={offset} length={length}")
    if offset + length > size:
        raise errors.RangeNotSatisfiable(
            f"Range {offset}-{offset + length} is after the end of "
            f"the image ({size} bytes)", size=size)


def byte_view(buf):
    """A flat memoryview of bytes over any buffer (array, mmap, bytearray)."""
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class Capabilities(NamedTuple):
    """What an open backend supports; the images service reads it."""

    # Extents contexts it can list: "zero" always, "dirty" for an image
    # with a dirty bitmap.
    extents: Tuple[str, ...] = ("zero",)
    # Most concurrent writers of one image (None: no limit of its own).
    max_writers: Optional[int] = None
    # Most concurrent readers (None: no limit of its own); a proxied image
    # has its host's.
    max_readers: Optional[int] = None
    # zero() and flush() do what they say (else the service refuses them).
    zero: bool = True
    flush: bool = True
    # zero() can deallocate (a sparse session's zero punches holes).
    sparse: bool = True
    # The image's size is fixed while it is open, and a session larger
    # than it is refused when used (NBD exports). Files may grow or shrink
    # under a session: reading past their end fails when it happens.
    fixed_size: bool = False
    # While a local client uploads, the daemon may keep a core busy between
    # the client's pieces instead of sleeping (imaged.transport.Spin): that
    # pays where writing leaves the other core to the client (a file: 2.0-
    # 2.2 instead of 1.1 GB/s at less CPU), not where another process of
    # this host needs a core to write (an NBD server; docs/benchmarks.md).
    upload_spin: bool = True


class OpenOptions(NamedTuple):
    """How the images service opens a session's image."""

    # zero() deallocates space instead of keeping it allocated.
    sparse: bool = False
    # Use O_DIRECT where the storage supports it (file backend).
    direct: bool = True
    # Context manager serializing read-modify-write of partial blocks;
    # shared by all backends writing the same image.
    rmw_lock: object = None
    # The session may list dirty extents.
    dirty: bool = False
    # Bound on waiting for a remote server (nbd, http backends).
    timeout_s: Optional[float] = None
    # The config's `proxy` section, for the http backend.
    proxy: Optional[dict] = None
    # The daemon's transfer buffers (imaged.buffers.BufferPool), which a
    # backend may borrow from when they are idle (NBD read-ahead).
    spare_buffers: object = None


# URL scheme -> backend class.
_BACKENDS = {}


def register(schemes, cls):
    """Serve session urls of `schemes` with backend class `cls`."""
    for scheme in schemes:
        _BACKENDS[scheme] = cls


def schemes():
    """The URL schemes sessions may use."""
    return sorted(_BACKENDS)


def _backend_class(url):
    if not isinstance(url, str):
        raise errors.BadRequest("invalid url: expected a string")
    scheme = urllib.parse.urlsplit(url).scheme
    cls = _BACKENDS.get(scheme)
    if cls is None:
        raise errors.BadRequest(
            f"invalid url: unsupported scheme {scheme!r:.20}, expected one of "
            f"{', '.join(s + ':' for s in schemes())}")
    return cls


def check_url(url):
    """Raise BadRequest naming `url` unless a backend can open `url`."""
    _backend_class(url).check_url(url)


def check_image(url):
    """
    Check what can be checked of the image at `url` without opening it,
    when a session is added: BadRequest naming `url` if it cannot be one
    (a file url naming a FIFO). May block (a stat() on slow storage): run
    it in a pool thread.
    """
    check = getattr(_backend_class(url), "check_image", None)
    if check is not None:
        check(url)


def static_capabilities(url):
    """
    The capabilities of every image of `url`'s backend, when they are known
    without opening one (a raw file's are); None otherwise.
    """
    caps = getattr(_backend_class(url), "capabilities", None)
    return caps if isinstance(caps, Capabilities) else None


def open_backend(url, mode, options=OpenOptions()):
    """Open the image at the session `url` with the backend of its scheme."""
    if mode not in ("r", "rw"):
        raise errors.BadRequest(f"Invalid mode {mode!r}, expected 'r' or 'rw'")
    return _backend_class(url).open(url, mode, options)


# The backends. Imported here, at the end, because they import Extent and
# Capabilities from this module.
from . import file  # noqa: E402
from . import http  # noqa: E402
from . import nbd  # noqa: E402

register(("file",), file.FileBackend)
# nbd:unix:/sock, nbd:HOST:PORT, nbd://HOST:PORT/NAME; nbd+unix:///NAME?socket=
register(("nbd", "nbd+unix"), nbd.NbdBackend)
# The proxy role: an image on another imaged or ovirt-imageio.
register(("https", "http"), http.HttpBackend)
