"""
The images service: what a client may do with a session's image.

`Images` authorizes each request against its session, enforces the
session's limits (size, readers, writers), opens the backend and runs the
operation under the session so that it is counted and can be canceled.
It knows nothing of HTTP: the thin handlers in imaged.apps.images call it.
"""

import contextlib
import logging
import os

from . import blkhash
from . import buffers
from . import config
from . import errors
from . import ops
from . import sessions
from . import util
from .backends import open_backend

log = logging.getLogger("images")

BASE_FEATURES = ("checksum", "extents")
WRITE_FEATURES = ("flush", "zero")

# Operation kinds limited by max_readers / max_writers.
READ_KINDS = ("read", "checksum")
WRITE_KINDS = ("write", "zero", "flush")


class Images:
    """Operations on session images, bound to a registry and config."""

    def __init__(self, registry, cfg, unix_socket=None):
        self.registry = registry
        self.unix_socket = unix_socket
        images = cfg["images"]
        self.buffer_size = images["buffer_size_bytes"]
        self.buffer_pool = buffers.BufferPool(images["buffer_budget_bytes"])
        self.max_readers = images["max_readers"]
        self.max_writers = images["max_writers"]
        self.max_connections = images["max_connections_per_session"]
        self.direct_io = images["direct_io"]
        self.allowed_dirs = images["allowed_dirs"]

    # Authorization and limits.

    def session(self, session_id, op, conn):
        """The session for `op`, counting `conn` as one of its connections."""
        session = self.registry.authorize(session_id, op)
        conn.use_session(session, self.max_connections)
        return session

    def options(self, session_id, conn):
        """Server options; for `*`, the server-wide features."""
        result = {}
        if session_id == "*":
            allow = ["OPTIONS", "GET", "PUT", "PATCH"]
            result["features"] = list(BASE_FEATURES + WRITE_FEATURES)
        else:
            session = self.session(session_id, "read", conn)
            allow = ["OPTIONS", "GET"]
            features = list(BASE_FEATURES)
            if session.may("write"):
                allow += ["PUT", "PATCH"]
                features += WRITE_FEATURES
            result["features"] = features
            result["max_readers"] = self.max_readers
            result["max_writers"] = self.max_writers if session.may("write") else 0
        if self.unix_socket:
            result["unix_socket"] = self.unix_socket
        return allow, result

    def _check_limits(self, session, kind):
        if kind in READ_KINDS and \
                session.count_operations(READ_KINDS) >= self.max_readers:
            raise errors.ServiceUnavailable(
                f"too many concurrent readers (max {self.max_readers})")
        if kind in WRITE_KINDS and \
                session.count_operations(WRITE_KINDS) >= self.max_writers:
            raise errors.ServiceUnavailable(
                f"too many concurrent writers (max {self.max_writers})")

    @staticmethod
    def check_range(session, offset, length):
        if offset < 0 or length < 0 or offset + length > session.size:
            raise errors.RangeNotSatisfiable(
                f"range [{offset}, {offset + length}) is outside the image "
                f"[0, {session.size})", session.size)

    # Backend and operation lifecycle.

    def _open(self, session, mode):
        backend = open_backend(session.url, mode, sparse=session.sparse,
                               direct=self.direct_io, rmw_lock=session.rmw_lock)
        if self.allowed_dirs:
            # Check what was opened, not the name: no symlink, "..", or
            # rename between a check and the open can lead elsewhere.
            real = os.path.realpath(f"/proc/self/fd/{backend.fileno()}")
            if not any(real == d or real.startswith(d.rstrip("/") + "/")
                       for d in self.allowed_dirs):
                backend.close()
                log.warning("session %s: image outside allowed_dirs refused",
                            session.name)
                raise errors.Forbidden("image is outside the allowed directories")
        return backend

    @contextlib.contextmanager
    def operation(self, session, kind, offset, length, conn, mode="r"):
        """
        Run an operation on `session`: yields (backend, runner, op).

        Registers the operation (it counts as active and transferring, and
        canceling the session aborts the client connection) and opens the
        image, or reuses the one the connection has open.
        """
        self._check_limits(session, kind)
        op = sessions.Operation(kind, offset, length, on_cancel=conn.abort)
        session.add_operation(op)
        try:
            runner = ops.Runner(session.thread_slots)
            # The connection keeps the image open for its next request:
            # a client reading extent after extent pays one open, not one
            # per request.
            backend = conn.backend(session, mode)
            if backend is None:
                backend = runner.run(self._open, session, mode)
                conn.keep_backend(session, mode, backend)
            yield backend, runner, op
        finally:
            if session.canceled:
                # Closed before the operation counts as stopped: once a
                # DELETE returns, imaged has the image closed.
                conn.close_backend()
            session.remove_operation(op)

    # The operations.

    def read(self, session, offset, length, conn):
        """
        A generator of the image bytes in [offset, offset + length).

        Registration happens before the first chunk so that errors (a
        missing image) are raised before any response byte is sent.
        """
        self.check_range(session, offset, length)
        cm = self.operation(session, "read", offset, length, conn)
        backend, runner, op = cm.__enter__()
        log.debug("session %s: READ offset=%d length=%d", session.name, offset, length)
        try:
            gen = ops.read(backend, runner, op, offset, length,
                           conn.buffers(self.buffer_pool, self.buffer_size))
            # Read the first chunk now: a failure here (a missing or short
            # image, a canceled session) still gets a proper error status.
            first = next(gen, None)
        except BaseException:
            cm.__exit__(None, None, None)
            raise
        return _Stream(first, gen, cm, conn)

    def write(self, session, offset, length, body, conn, flush):
        self.check_range(session, offset, length)
        log.debug("session %s: WRITE offset=%d length=%d flush=%s",
                  session.name, offset, length, flush)
        with self.operation(session, "write", offset, length, conn, "rw") as (b, r, op):
            ops.write(b, r, op, offset, length, body,
                      conn.buffers(self.buffer_pool, self.buffer_size), flush)

    def write_stream(self, session, offset, body, conn, flush):
        """Write a body of unknown length; returns bytes written."""
        self.check_range(session, offset, 0)
        with self.operation(session, "write", offset, 0, conn, "rw") as (b, r, op):
            return ops.write_stream(b, r, op, offset, session.size, body,
                                    conn.buffers(self.buffer_pool, self.buffer_size), flush)

    def zero(self, session, offset, length, conn, flush):
        self.check_range(session, offset, length)
        log.debug("session %s: ZERO offset=%d length=%d flush=%s",
                  session.name, offset, length, flush)
        with self.operation(session, "zero", offset, length, conn, "rw") as (b, r, op):
            ops.zero(b, r, op, offset, length, flush)

    def flush(self, session, conn):
        log.debug("session %s: FLUSH", session.name)
        with self.operation(session, "flush", 0, 0, conn, "rw") as (b, r, op):
            ops.flush(b, r, op)

    def extents(self, session, conn, start=0, length=None):
        if length is None:
            length = max(session.size - start, 0)
        if start >= session.size and session.size:
            raise errors.RangeNotSatisfiable(
                f"start {start} is beyond the image size {session.size}",
                session.size)
        self.check_range(session, start, min(length, session.size - start))
        with self.operation(session, "extents", start, 0, conn) as (b, r, op):
            return ops.extents(b, r, session.size, start, length)

    def checksum(self, session, conn, algorithm, block_size):
        blkhash.validate(algorithm, block_size)
        log.debug("session %s: CHECKSUM algorithm=%s block_size=%d",
                  session.name, algorithm, block_size)
        with self._hashing(session, conn, 0, session.size, block_size) as (b, r, op, buf):
            return ops.checksum(b, r, op, session.size, algorithm, block_size, buf)

    def checksum_blocks(self, session, conn, algorithm, block_size, start, length=None):
        """
        The block digests of [start, start + length) (default: to the end),
        at most config.CHECKSUM_BLOCKS_WINDOW_BYTES of the image per answer.
        """
        blkhash.validate(algorithm, block_size)
        blkhash.validate_window(start, block_size)
        if start > session.size:
            raise errors.BadRequest(
                f"Invalid start {start}, beyond the image size {session.size}")
        if length is None:
            length = session.size - start
        window = max(block_size, config.CHECKSUM_BLOCKS_WINDOW_BYTES // block_size * block_size)
        length = min(length, session.size - start, window)
        log.debug("session %s: CHECKSUM BLOCKS algorithm=%s block_size=%d start=%d "
                  "length=%d", session.name, algorithm, block_size, start, length)
        with self._hashing(session, conn, start, length, block_size) as (b, r, op, buf):
            return ops.checksum_blocks(b, r, op, session.size, algorithm, block_size,
                                       buf, start, length)

    @contextlib.contextmanager
    def _hashing(self, session, conn, start, length, block_size):
        """A checksum operation: yields (backend, runner, op, buffer of a block)."""
        with self.operation(session, "checksum", start, length, conn) as (b, r, op):
            bufs = conn.buffers(self.buffer_pool, self.buffer_size)
            if block_size <= len(bufs[0]):
                yield b, r, op, bufs[0]
                return
            # Blocks larger than the transfer buffers get a buffer of their
            # own, for this request only.
            for view in bufs:
                view.release()
            conn.release_buffers()
            with util.aligned_buffer(block_size) as mem:
                with memoryview(mem) as buf:
                    yield b, r, op, buf


class _Stream:
    """
    The response body of a read: iterates the chunks, and ends the
    operation when the server closes it (also when the client went away).

    The connection is corked while the body streams (see
    web.Connection.cork) and uncorked as soon as the last chunk is handed
    to the server, so the tail never waits.
    """

    def __init__(self, first, gen, cm, conn):
        self._first = first
        self._rest = None
        self._gen = gen
        self._cm = cm
        self._conn = conn
        # Our server sends each chunk before asking for the next, so it may
        # get views of the reused buffers. Any other WSGI server (a detached
        # connection) may keep chunks around and needs bytes (PEP 3333).
        self._copy = conn.sock is None
        self._corked = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._first is not None:
            # Bottle peeks at the first item and accepts only bytes; later
            # items go to the server as they are (memoryviews, no copy). So
            # the first item is one byte (not a copy of a whole piece, up to
            # 1 MiB per request) and the rest of the piece comes next.
            first, self._first = self._first, None
            self._rest = first[1:]
            self._conn.cork(True)
            self._corked = True
            return bytes(first[:1])
        if self._rest:
            rest, self._rest = self._rest, None
            return bytes(rest) if self._copy else rest
        try:
            chunk = next(self._gen)
        except StopIteration:
            self._uncork()
            raise
        return bytes(chunk) if self._copy else chunk

    def _uncork(self):
        if self._corked:
            self._corked = False
            self._conn.cork(False)

    def close(self):
        try:
            self._uncork()
            self._gen.close()
        finally:
            cm, self._cm = self._cm, None
            if cm is not None:
                cm.__exit__(None, None, None)
