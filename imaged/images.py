"""
The images service: what a client may do with a session's image.

`Images` authorizes each request against its session, enforces the
session's limits (size, readers, writers, connections), opens the backend
and runs the operation under the session so that it is counted and can be
canceled. It knows nothing of HTTP: the handlers in imaged.apps.images
parse requests and call it with plain objects:

- a `Client`, the service's state for one client connection (the buffers
  it borrows during an operation, the backend it keeps open between
  requests, the sessions it counts in), made with two hooks from whatever
  carries the connection: `cancel()` tears the connection down, and
  `set_idle_timeout(s)` applies a session's inactivity timeout;
- a body reader with `readinto(view)` for writes.
"""

import contextlib
import logging
import ssl
import time
import urllib.parse

from . import allowed
from . import backends
from . import buffers
from . import config
from . import errors
from . import ops
from . import sessions
from . import tokens
from . import util

log = logging.getLogger("images")

BASE_FEATURES = ("checksum", "extents")
WRITE_FEATURES = ("flush", "zero")

# Operation kinds limited by max_readers / max_writers.
READ_KINDS = ("read", "checksum")
WRITE_KINDS = ("write", "zero", "flush")


class Client:
    """
    The images service's state for one client connection, shared by its
    requests. Create it with Images.client() and close() it when the
    connection ends.
    """

    def __init__(self, service, cancel, set_idle_timeout):
        self._service = service
        # Tears the client's connection down (wakes a blocked transfer).
        self.cancel = cancel
        self._set_idle_timeout = set_idle_timeout
        self._buffers = None
        self._sessions = set()
        # (session, mode, backend) of the image this client keeps open.
        self._open = None
        # Operations running for this client.
        self.running = 0

    # Sessions.

    def use_session(self, session):
        """
        Count this client as one of `session`'s connections and apply the
        session's inactivity timeout. Raises ServiceUnavailable if the
        session has too many connections.
        """
        limit = self._service.max_connections
        if session not in self._sessions:
            if session.connections >= limit:
                raise errors.ServiceUnavailable(
                    f"too many connections for this session (max {limit})")
            session.connections += 1
            self._sessions.add(session)
        self._set_idle_timeout(
            session.inactivity_timeout or self._service.inactivity_timeout_s)

    # Buffers, borrowed for one operation.

    def buffers(self, count=2, need_bytes=None):
        """
        `count` aligned transfer buffers for the running operation, from
        the service's budget, no larger than `need_bytes` (if given) needs;
        given back when the operation ends, so an idle keep-alive
        connection holds no buffer memory.
        """
        pool = self._service.buffer_pool
        if self._buffers is None or len(self._buffers) < count:
            self.release_buffers()
            size = self._service.buffer_size
            if need_bytes is not None:
                # A short read leaves the rest of the budget to others (and
                # to the NBD read-ahead, which borrows idle buffers). A
                # power of two, as the buffer size is: chunks after the
                # first start aligned for O_DIRECT.
                need = max(need_bytes, buffers.MIN_SIZE_BYTES)
                size = min(size, 1 << (need - 1).bit_length())
                if pool.size_for(size, 1) >= need_bytes:
                    # The range fits in one buffer: a second, to take the
                    # next chunk while this one is sent, would never be
                    # used, only kept from other transfers and from the
                    # NBD read-ahead.
                    count = 1
            self._buffers = pool.get(size, count)
        return [memoryview(b) for b in self._buffers[:count]]

    def release_buffers(self):
        """Give the buffers back to the pool."""
        if self._buffers is not None:
            self._service.buffer_pool.put(self._buffers)
            self._buffers = None

    # The backend kept open between requests.

    def backend(self, session, mode):
        """The open backend of `session` usable in `mode`, or None."""
        if self._open is None:
            return None
        open_session, open_mode, backend = self._open
        if open_session is session and not session.canceled \
                and (open_mode == mode or open_mode == "rw"):
            return backend
        self.close_backend()
        return None

    def keep_backend(self, session, mode, backend):
        """Keep `backend` open for the next requests of this client."""
        self.close_backend()
        self._open = (session, mode, backend)
        # A removed or expired session must not keep its image open (the
        # host agent may deactivate the volume next).
        session.add_closer(self._session_canceled)

    def _session_canceled(self, session):
        if self._open is not None and self._open[0] is session and not self.running:
            self.close_backend()
        # A running operation closes it when it ends (see Images.operation).

    def close_backend(self):
        """Close the image this client keeps open, if any."""
        if self._open is None:
            return
        session, _, backend = self._open
        self._open = None
        session.remove_closer(self._session_canceled)
        try:
            if hasattr(backend, "settle"):
                backend.settle()
            # Closing may flush to storage: never in the event loop.
            ops.Runner(session.thread_slots).run(backend.close)
        except Exception:
            log.exception("session %s: closing the image failed", session.name)

    def close(self):
        """The connection ended: release everything."""
        for session in self._sessions:
            session.connections -= 1
        self._sessions.clear()
        self.release_buffers()
        self.close_backend()


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
        self.inactivity_timeout_s = images["inactivity_timeout_s"]
        self.direct_io = images["direct_io"]
        self.allowed_dirs = images["allowed_dirs"]
        # The proxy role (imaged.backends.http) and signed tokens.
        self.proxy = cfg.get("proxy", config.DEFAULTS["proxy"])
        self.tokens = tokens.Verifier(cfg.get("tokens", config.DEFAULTS["tokens"]), registry)
        self.max_extents = images["max_extents"]

    def client(self, cancel, set_idle_timeout):
        """State for a new client connection (see Client)."""
        return Client(self, cancel, set_idle_timeout)

    # Authorization and limits.

    def session(self, session_id, op, client, token=None):
        """
        The session for `op`, counting `client` as one of its connections.
        With a `token` (imaged.tokens), the session the token grants.
        """
        if token is not None:
            session = self.tokens.authorize(token, session_id, op)
        else:
            session = self.registry.authorize(session_id, op)
        client.use_session(session)
        return session

    def options(self, session_id, client, token=None):
        """(allowed methods, options dict); for `*`, the server-wide ones."""
        result = {}
        if session_id == "*":
            allow = ["OPTIONS", "GET", "PUT", "PATCH"]
            result["features"] = list(BASE_FEATURES + WRITE_FEATURES)
        else:
            session = self.session(session_id, "read", client, token)
            caps = self.capabilities(session, client)
            allow = ["OPTIONS", "GET"]
            features = list(BASE_FEATURES)
            writable = session.may("write")
            if writable:
                allow += ["PUT", "PATCH"]
                features += [f for f in WRITE_FEATURES if getattr(caps, f)]
            if "dirty" in caps.extents:
                features.append("dirty")
            result["features"] = features
            result["max_readers"] = self._max_readers(caps)
            result["max_writers"] = self._max_writers(caps) if writable else 0
        if self.unix_socket:
            result["unix_socket"] = self.unix_socket
        return allow, result

    def capabilities(self, session, client):
        """What the session's backend supports; opens it if it must."""
        caps = backends.static_capabilities(session.url)
        if caps is not None:
            return caps
        mode = "rw" if session.may("write") else "r"
        backend = self._backend(session, mode, client,
                                ops.Runner(session.thread_slots))
        return backend.capabilities

    def _max_readers(self, caps):
        if caps.max_readers is None:
            return self.max_readers
        return min(self.max_readers, caps.max_readers)

    def _max_writers(self, caps):
        if caps.max_writers is None:
            return self.max_writers
        return min(self.max_writers, caps.max_writers)

    def _check_limits(self, session, kind, caps):
        max_readers = self._max_readers(caps)
        if kind in READ_KINDS and \
                session.count_operations(READ_KINDS) >= max_readers:
            raise errors.ServiceUnavailable(
                f"too many concurrent readers (max {max_readers})")
        max_writers = self._max_writers(caps)
        if kind in WRITE_KINDS and max_writers == 0:
            # A proxied image whose host session is read-only.
            raise errors.Forbidden("the image is read-only")
        if kind in WRITE_KINDS and \
                session.count_operations(WRITE_KINDS) >= max_writers:
            raise errors.ServiceUnavailable(
                f"too many concurrent writers (max {max_writers})")

    @staticmethod
    def check_range(session, offset, length):
        if offset < 0 or length < 0 or offset + length > session.size:
            raise errors.RangeNotSatisfiable(
                f"range [{offset}, {offset + length}) is outside the image "
                f"[0, {session.size})", session.size)

    # Backend and operation lifecycle.

    def _open(self, session, mode):
        options = backends.OpenOptions(
            sparse=session.sparse, direct=self.direct_io,
            rmw_lock=session.rmw_lock,
            dirty=session.spec.get("dirty", False),
            timeout_s=session.inactivity_timeout or self.inactivity_timeout_s,
            proxy=self.proxy, spare_buffers=self.buffer_pool)
        backend = backends.open_backend(session.url, mode, options)
        if backend.capabilities.fixed_size and backend.size() < session.size:
            size = backend.size()
            backend.close()
            raise errors.BadRequest(
                f"session size {session.size} exceeds the image size {size}")
        if self.allowed_dirs and hasattr(backend, "fileno"):
            # Check what was opened, not the name: no symlink, "..", or
            # rename between a check and the open can lead elsewhere.
            try:
                allowed.check_opened(backend.fileno(),
                                     urllib.parse.urlsplit(session.url).path,
                                     self.allowed_dirs)
            except errors.Forbidden:
                backend.close()
                log.warning("session %s: image outside allowed_dirs refused",
                            session.name)
                raise
        return backend

    def _backend(self, session, mode, client, runner):
        # The client keeps the image open for its next request: a client
        # reading extent after extent pays one open, not one per request.
        backend = client.backend(session, mode)
        if backend is None:
            backend = runner.run(self._open, session, mode)
            client.keep_backend(session, mode, backend)
        return backend

    @contextlib.contextmanager
    def operation(self, session, kind, offset, length, client, mode="r"):
        """
        Run an operation on `session`: yields (backend, runner, op).

        Registers the operation (it counts as active and transferring, and
        canceling the session cancels the client) and opens the image, or
        reuses the one the client has open. When the operation ends its
        buffers go back to the pool, and one log line and the metrics say
        how it went.
        """
        op = sessions.Operation(kind, offset, length, on_cancel=client.cancel)
        client.running += 1
        result = None
        try:
            runner = ops.Runner(session.thread_slots)
            backend = self._backend(session, mode, client, runner)
            if kind != "read" and hasattr(backend, "settle"):
                # Work the backend left on the event loop (an NBD
                # read-ahead) ends here, before calls in a pool thread.
                backend.settle()
            self._check_limits(session, kind, backend.capabilities)
            session.add_operation(op)
            result = "ok"
            yield backend, runner, op
        except BaseException as e:
            if result is not None:
                result = outcome(e, session)
            raise
        finally:
            client.running -= 1
            client.release_buffers()
            if session.canceled:
                # Closed before the operation counts as stopped: once a
                # DELETE returns, imaged has the image closed.
                client.close_backend()
            session.remove_operation(op)
            if result is not None:
                self._finished(session, op, result)

    def _finished(self, session, op, result):
        seconds = time.monotonic() - op.started
        end = op.offset + max(op.length, op.done)
        span = f"{op.offset}-{end - 1}" if end > op.offset else "-"
        rate = op.done / seconds / 1e6 if seconds > 0 else 0.0
        # session.name: the transfer id or a shortened id, never the secret.
        log.info("%s %s range=%s bytes=%d seconds=%.3f MB/s=%.1f result=%s",
                 op.kind.upper(), session.name, span, op.done, seconds, rate,
                 result)
        self.registry.metrics.operation(op.kind, result)

    # The operations.

    def read(self, session, offset, length, client):
        """
        The image bytes in [offset, offset + length), as an iterator of
        buffers with close(). Each buffer is valid until the next one.

        Registration and the first read happen now, so that errors (a
        missing image) are raised before any response byte is sent.
        """
        self.check_range(session, offset, length)
        cm = self.operation(session, "read", offset, length, client)
        backend, runner, op = cm.__enter__()
        log.debug("session %s: READ offset=%d length=%d", session.name, offset, length)
        try:
            gen = ops.read(backend, runner, op, offset, length,
                           lambda need: client.buffers(need_bytes=need))
            first = next(gen, None)
        except BaseException as e:
            cm.__exit__(type(e), e, e.__traceback__)
            raise
        return _Chunks(first, gen, cm)

    def write(self, session, offset, length, reader, client, flush):
        """Write `length` bytes from `reader` at `offset`."""
        self.check_range(session, offset, length)
        log.debug("session %s: WRITE offset=%d length=%d flush=%s",
                  session.name, offset, length, flush)
        with self.operation(session, "write", offset, length, client, "rw") as (b, r, op):
            ops.write(b, r, op, offset, length, reader, client.buffers(), flush)

    def write_stream(self, session, offset, reader, client, flush, end=None):
        """
        Write a body of unknown length (chunked); returns bytes written.

        With `end` (from a Content-Range) the body must fill exactly
        [offset, end), and nothing outside it is written; without, nothing
        past the session size is.
        """
        declared = end is not None
        if not declared:
            end = session.size
        self.check_range(session, offset, end - offset if declared else 0)
        with self.operation(session, "write", offset, end - offset if declared else 0,
                            client, "rw") as (b, r, op):
            return ops.write_stream(b, r, op, offset, end, reader, client.buffers(),
                                    flush, declared=declared)

    def zero(self, session, offset, length, client, flush):
        self.check_range(session, offset, length)
        log.debug("session %s: ZERO offset=%d length=%d flush=%s",
                  session.name, offset, length, flush)
        with self.operation(session, "zero", offset, length, client, "rw") as (b, r, op):
            _require(b.capabilities.zero, "zero")
            ops.zero(b, r, op, offset, length, flush)

    def flush(self, session, client):
        log.debug("session %s: FLUSH", session.name)
        with self.operation(session, "flush", 0, 0, client, "rw") as (b, r, op):
            _require(b.capabilities.flush, "flush")
            ops.flush(b, r, op)

    def extents(self, session, client, start=0, length=None, context="zero"):
        """
        The extents of [start, start + length) (default: to the end) as a
        JSON list, streamed: an iterator of bytes with close(), like read().

        A window asked for (a `start` or a `length`) gets at most
        `images.max_extents` extents, a prefix of the window: the client
        asks for the rest from where the answer ends (imaged-client does).
        The whole list, asked without a window, is complete however long:
        ovirt-imageio's client asks for it once and takes the image size
        from its last extent. Either way it is listed and encoded off the
        event loop in bounded batches (ops.extents_json).
        """
        limit = self.max_extents if start or length is not None else None
        if length is None:
            length = max(session.size - start, 0)
        if start >= session.size and session.size:
            raise errors.RangeNotSatisfiable(
                f"start {start} is beyond the image size {session.size}",
                session.size)
        self.check_range(session, start, min(length, session.size - start))
        cm = self.operation(session, "extents", start, 0, client)
        b, r, op = cm.__enter__()
        try:
            if context not in b.capabilities.extents:
                if context == "dirty" and not session.spec.get("dirty"):
                    raise errors.NotFound(
                        "dirty extents are not available: the session was not "
                        "added with dirty=true")
                raise errors.NotFound(
                    f"{context} extents are not available for this session")
            gen = ops.extents_json(b, r, op, session.size, start, length, context,
                                   limit)
            # The first piece now: an error still gets its status.
            first = next(gen)
        except BaseException as e:
            # Ends the operation with its result (see operation()).
            cm.__exit__(type(e), e, e.__traceback__)
            raise
        return _Chunks(first, gen, cm)

    def checksum(self, session, client, algorithm, block_size):
        """The block checksum of the session's image (see imaged.blkhash)."""
        log.debug("session %s: CHECKSUM algorithm=%s block_size=%d",
                  session.name, algorithm, block_size)
        with self._hashing(session, client, 0, session.size, block_size) as (b, r, op, bufs):
            if hasattr(b, "checksum"):
                # A proxied image: its host hashes its own disk.
                return r.run(b.checksum, algorithm, block_size)
            return ops.checksum(b, r, op, session.size, algorithm, block_size, bufs[0])

    def checksum_blocks(self, session, client, algorithm, block_size, start, length=None):
        """
        The block digests of [start, start + length) (default: to the end),
        at most config.CHECKSUM_BLOCKS_WINDOW_BYTES of the image per answer.
        """
        if start > session.size:
            raise errors.BadRequest(
                f"Invalid start {start}, beyond the image size {session.size}")
        if length is None:
            length = session.size - start
        window = max(block_size, config.CHECKSUM_BLOCKS_WINDOW_BYTES // block_size * block_size)
        length = min(length, session.size - start, window)
        log.debug("session %s: CHECKSUM BLOCKS algorithm=%s block_size=%d start=%d "
                  "length=%d", session.name, algorithm, block_size, start, length)
        with self._hashing(session, client, start, length, block_size) as (b, r, op, bufs):
            if hasattr(b, "checksum_blocks"):
                return r.run(b.checksum_blocks, algorithm, block_size, start, length)
            return ops.checksum_blocks(b, r, op, session.size, algorithm, block_size,
                                       bufs, start, length)

    @contextlib.contextmanager
    def _hashing(self, session, client, start, length, block_size):
        """
        A checksum operation: yields (backend, runner, op, buffers of a
        block each): the connection's two transfer buffers, or one of its
        own for blocks larger than those.
        """
        with self.operation(session, "checksum", start, length, client) as (b, r, op):
            bufs = client.buffers()
            if block_size <= len(bufs[0]):
                yield b, r, op, bufs
                return
            # Blocks larger than the transfer buffers get a buffer of their
            # own, for this request only.
            for view in bufs:
                view.release()
            client.release_buffers()
            with util.aligned_buffer(block_size) as mem:
                with memoryview(mem) as buf:
                    yield b, r, op, [buf]


def _require(supported, what):
    if not supported:
        raise errors.Unsupported(f"this image does not support {what}")


def outcome(e, session):
    """How an operation that raised `e` ended, for logs and metrics."""
    if isinstance(e, errors.Canceled) or session.canceled:
        return "canceled"
    if isinstance(e, (errors.ClientGone, ConnectionError, TimeoutError,
                      ssl.SSLEOFError, GeneratorExit)):
        return "client gone"
    return "error"


class _Chunks:
    """
    The data of a read: iterates the chunks, and ends the operation when
    closed (also when the client went away midway).
    """

    def __init__(self, first, gen, cm):
        self._first = first
        self._gen = gen
        self._cm = cm
        self._ended = False
        self._error = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            return next(self._gen)
        except StopIteration:
            self._ended = True
            raise
        except BaseException as e:
            self._error = e
            raise

    def close(self):
        try:
            self._gen.close()
        finally:
            cm, self._cm = self._cm, None
            if cm is not None:
                if self._ended:
                    cm.__exit__(None, None, None)
                else:
                    # Closed before the end: the generator failed, or
                    # sending did (the client went away).
                    e = self._error or errors.ClientGone("client stopped reading")
                    cm.__exit__(type(e), e, e.__traceback__)

