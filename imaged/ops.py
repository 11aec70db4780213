"""
Operations: the chunk loops that move image data.

Every blocking disk syscall runs in gevent's threadpool through a `Runner`,
which also bounds how many pool threads one session may hold. Reads overlap
the disk read of the next chunk with the sending of the current one; writes
overlap the disk write of a chunk with receiving the next. Two buffers per
connection make that possible without a copy or an allocation per chunk.

Each loop calls `op.check()` between chunks, so a canceled session stops a
transfer within one chunk, and reports progress through `op.progress()`.
"""

import gevent

from . import blkhash
from . import errors
from . import util
from .backends import Extent

# Zero requests are split so that cancellation and progress stay responsive
# even when the file system zeroes gigabytes in one call.
ZERO_STEP_BYTES = 1024**3

# Reads are handed to the server in pieces of this size (see read()).
SEND_SLICE_BYTES = 1024**2


class Runner:
    """Runs blocking calls in the threadpool, at most `slots` at once."""

    def __init__(self, slots):
        self._slots = slots
        self._pool = gevent.get_hub().threadpool

    def run(self, func, *args):
        """Run func(*args) in a pool thread and wait for it."""
        with self._slots:
            return self._pool.apply(func, args)

    def submit(self, func, *args):
        """Start func(*args) in a pool thread; returns an AsyncResult."""
        self._slots.acquire()
        try:
            result = self._pool.spawn(func, *args)
        except BaseException:
            self._slots.release()
            raise
        result.rawlink(lambda _: self._slots.release())
        return result


def _wait_quietly(result):
    # A pool thread may still be using a buffer: wait before the buffer is
    # reused or released, whatever happened to the request.
    if result is not None:
        try:
            result.get()
        except BaseException:
            pass


def read(backend, runner, op, offset, length, buffers):
    """
    Yield the image bytes of [offset, offset + length) as memoryviews.

    A yielded view is valid until the next iteration. The next chunk is read
    while the caller sends the current one.
    """
    chunk = len(buffers[0])
    end = offset + length

    def submit(i, pos):
        view = buffers[i][:min(chunk, end - pos)]
        return runner.submit(backend.readinto, pos, view), view

    def read_first(view):
        # An image shorter than the range would end the response after its
        # headers: find out with the first chunk, while an error status can
        # still be sent. A backend on another daemon asks it for the range,
        # and the daemon answers 416 itself.
        if getattr(backend, "checks_ranges", False):
            return backend.readinto(offset, view)
        size = backend.size()
        if size < end:
            raise errors.StorageError(
                f"image ends at {size}, before the requested range")
        return backend.readinto(offset, view)

    pending = None
    if length:
        view = buffers[0][:min(chunk, length)]
        pending = runner.submit(read_first, view), view
    pos, i = offset, 0
    try:
        while pending is not None:
            result, view = pending
            pending = None
            count = result.get()
            if count < len(view):
                raise errors.StorageError(
                    f"image ends at {pos + count}, before the session size")
            op.check()
            pos += count
            i = 1 - i
            if pos < end:
                pending = submit(i, pos)
            # Smaller pieces for the server to send: the socket timeout
            # bounds each send, and a slow but steady client must not be
            # taken for an idle one.
            for start in range(0, count, SEND_SLICE_BYTES):
                yield view[start:start + SEND_SLICE_BYTES]
            op.progress(count)
    finally:
        if pending is not None:
            _wait_quietly(pending[0])


def read_exactly(reader, view):
    """Fill `view` from `reader`; raises BadRequest if it ends first."""
    got = 0
    while got < len(view):
        count = reader.readinto(view[got:])
        if not count:
            raise errors.BadRequest(
                f"request body ended early: expected {len(view) - got} more bytes")
        got += count


def write(backend, runner, op, offset, length, reader, buffers, flush):
    """
    Write `length` bytes from `reader` (anything with readinto) at `offset`.

    The next chunk is received while the previous one is written. Returns
    only when every byte is written, and flushed if `flush`.
    """
    chunk = len(buffers[0])
    pending = None
    pos, remaining, i = offset, length, 0
    try:
        while remaining:
            view = buffers[i][:min(chunk, remaining)]
            read_exactly(reader, view)
            op.check()
            if pending is not None:
                done = pending.get()
                pending = None
                op.progress(done)
            pending = runner.submit(backend.write, pos, view)
            pos += len(view)
            remaining -= len(view)
            i = 1 - i
        if pending is not None:
            done = pending.get()
            pending = None
            op.progress(done)
        op.check()
        if flush:
            runner.run(backend.flush)
    finally:
        _wait_quietly(pending)


def write_stream(backend, runner, op, offset, end, reader, buffers, flush,
                 declared=False):
    """
    Write a body of unknown length (chunked encoding) into [offset, end).

    `end` is the end of the request's Content-Range when it declared one
    (`declared`: the body must fill the range exactly), else the end of the
    image. Nothing past `end` ever reaches the image: each read asks for at
    most one byte more than fits before `end`, so a body that goes on is
    caught by the read that gets that byte, before any of it is written.
    A body shorter than its declared range is refused after writing only
    what it had (inside the range). Returns the number of bytes written.
    """
    chunk = len(buffers[0])
    pos = offset
    while True:
        view = buffers[0][:min(chunk, end - pos + 1)]
        count = reader.readinto(view)
        if not count:
            break
        if pos + count > end:
            if declared:
                raise errors.BadRequest(
                    f"request body is longer than its Content-Range "
                    f"({end - offset} bytes)")
            raise errors.RangeNotSatisfiable(
                f"body goes past the end of the image at {end}", end)
        op.check()
        done = runner.run(backend.write, pos, view[:count])
        op.progress(done)
        pos += count
    if declared and pos < end:
        raise errors.BadRequest(
            f"request body ended early: {pos - offset} bytes of the "
            f"{end - offset} its Content-Range declares")
    op.check()
    if flush:
        runner.run(backend.flush)
    return pos - offset


def zero(backend, runner, op, offset, length, flush):
    """Zero [offset, offset + length) in steps, then flush if asked."""
    pos, end = offset, offset + length
    while pos < end:
        op.check()
        step = min(ZERO_STEP_BYTES, end - pos)
        runner.run(backend.zero, pos, step)
        op.progress(step)
        pos += step
    if flush:
        runner.run(backend.flush)


def flush(backend, runner, op):
    op.check()
    runner.run(backend.flush)


def extents(backend, runner, size, start, length, context="zero"):
    """
    Extents of [start, start + length), clipped to the session `size`, as
    JSON-ready dicts; in the "dirty" context with a `dirty` key instead of
    `hole`.

    A part of the session beyond the end of the file reads as zeroes in no
    format we know, but listing must cover the window: it is reported as a
    zero extent, and reading it fails.
    """
    end = min(start + length, size)

    def collect():
        result = []
        covered = start
        for ext in backend.extents(start, end - start, context):
            if ext.start >= end:
                break
            ext_end = min(ext.start + ext.length, end)
            result.append(_extent(ext.start, ext_end - ext.start, ext, context))
            covered = ext_end
        if covered < end:
            _append(result, _extent(covered, end - covered,
                                    Extent(covered, end - covered, True), context))
        return result

    return runner.run(collect)


def _extent(start, length, ext, context):
    if context == "dirty":
        return {"start": start, "length": length, "dirty": ext.dirty, "zero": ext.zero}
    return {"start": start, "length": length, "zero": ext.zero, "hole": ext.hole}


def _append(result, ext):
    last = result[-1] if result else None
    if last and all(last[k] == ext[k] for k in ext if k not in ("start", "length")) \
            and last["start"] + last["length"] == ext["start"]:
        last["length"] += ext["length"]
    else:
        result.append(ext)


def _block_extents(backend, runner, size, start, end):
    """Extents of [start, end) (end <= size), covering all of it."""
    exts = runner.run(lambda: list(backend.extents(start, end - start)))
    exts = [e for e in exts if e.start < end]
    # Past the end of the file the image has no data to read: see extents().
    covered = min(exts[-1].start + exts[-1].length, end) if exts else start
    if covered < end:
        exts.append(Extent(covered, end - covered, True, False))
    return exts


def block_digests(backend, runner, op, size, algorithm, block_size, buf,
                  start=0, length=None):
    """
    Yield the raw digest of each block of [start, start + length) of the
    image of `size` bytes (see imaged.blkhash): the digests the checksum is
    made of. `start` is a multiple of `block_size`.

    Zero extents get a precomputed digest and are never read; data blocks
    that turn out to be all zeroes get the same digest.
    """
    end = size if length is None else min(start + length, size)
    if start >= end:
        return
    exts = _block_extents(backend, runner, size, start, end)

    def hash_block(start, length):
        view = buf[:length]
        count = backend.readinto(start, view)
        if count < length:
            raise errors.StorageError(
                f"image ends at {start + count}, before the session size")
        if util.is_zero(view):
            return blkhash.zero_block_digest(length, algorithm)
        return blkhash.block_digest(view, algorithm)

    for block_start, block_length, is_zero in blkhash.split(exts, block_size):
        op.check()
        if is_zero:
            yield blkhash.zero_block_digest(block_length, algorithm)
        else:
            yield runner.run(hash_block, block_start, block_length)
        op.progress(block_length)


def checksum(backend, runner, op, size, algorithm, block_size, buf):
    """The block checksum of [0, size) (see imaged.blkhash)."""
    h = blkhash.Hash(block_size, algorithm)
    for digest in block_digests(backend, runner, op, size, algorithm, block_size, buf):
        h.add_digest(digest)
    return {"algorithm": algorithm, "block_size": block_size,
            "checksum": h.hexdigest()}


def checksum_blocks(backend, runner, op, size, algorithm, block_size, buf,
                    start, length):
    """
    The hex digests of the blocks of [start, start + length), clipped to
    the image: {"algorithm", "block_size", "start", "blocks"}.
    """
    blocks = [d.hex() for d in block_digests(
        backend, runner, op, size, algorithm, block_size, buf, start, length)]
    return {"algorithm": algorithm, "block_size": block_size,
            "start": start, "blocks": blocks}
