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

import itertools
import json

import gevent

from . import blkhash
from . import errors
from . import util
from .backends import Extent

# Zero requests are split so that cancellation and progress stay responsive
# even when the file system zeroes gigabytes in one call.
ZERO_STEP_BYTES = 1024**3

# A run of zero blocks of a checksum is hashed in pool calls of this many
# blocks (blkhash.Hash.zero_blocks): 2**18 digests are 8 MiB of input to
# the outer hash, 10-90 ms of blake2b on the 2-core test VM, hashed with
# the GIL released. Between calls the loop checks for cancellation, so even
# a session of 2**63 bytes (2**43 blocks of 1 MiB, days of hashing) never
# holds the event loop and stops when it is removed. Measured: a checksum
# of a 512 GiB sparse image in 1 MiB blocks took 0.62-0.99 s and held
# every other client as long (a 4 KiB read waited up to 989 ms), hashing
# block by block in the event loop; now it takes 0.02-0.05 s and that
# read waits at most 7-19 ms.
ZERO_RUN_STEP_BLOCKS = 2**18

# Extents are listed and JSON-encoded in pool calls of this many (see
# extents_json()): a file with millions of extents holds neither the event
# loop nor memory for the whole list. Measured on the 2-core VM, listing
# 524288 extents (35 MB of JSON) next to a client reading 4 KiB every
# 10 ms: built whole in the event loop, that client waited up to 846 ms;
# in batches of 4096, up to 109 ms; of 1024, 35-90 ms, within the noise of
# the loaded machine (97 ms with no heavy request at all), for a listing
# 0.3 s longer (2.7-3.7 s).
EXTENTS_BATCH = 1024


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


class _Ready:
    """A result already there, in place of a pool call's AsyncResult."""

    def __init__(self, value):
        self._value = value

    def get(self):
        return self._value


def _wait_quietly(result):
    # A pool thread may still be using a buffer: wait before the buffer is
    # reused or released, whatever happened to the request.
    if result is not None:
        try:
            result.get()
        except BaseException:
            pass


def read(backend, runner, op, offset, length, lease):
    """
    Yield the image bytes of [offset, offset + length) as memoryviews.

    A yielded view is valid until the next iteration. The next chunk is read
    while the caller sends the current one. `lease(n)` returns the two
    transfer buffers; it is called only if the range is not all in what
    the backend read ahead, with the bytes left to read.
    """
    end = offset + length

    def submit(i, pos):
        view = buffers[i][:min(chunk, end - pos)]
        return runner.submit(backend.readinto, pos, view), view

    def check_end():
        # An image shorter than the range would end the response after its
        # headers: find out before the first chunk is sent, while an error
        # status can still be sent.
        size = backend.size()
        if size < end:
            raise errors.StorageError(
                f"image ends at {size}, before the requested range")

    def read_first(view):
        # A backend on another daemon asks it for the range, and the daemon
        # answers 416 itself.
        if not getattr(backend, "checks_ranges", False):
            check_end()
        return backend.readinto(offset, view)

    read_ahead = getattr(backend, "read_ahead", None)
    if length and read_ahead is not None:
        # What the backend read ahead at `offset`, sent from its own
        # buffer (no copy), then the rest as usual.
        ahead = backend.read_ahead_view(offset, length)
        if ahead is not None:
            try:
                check_end()
                op.check()
                if len(ahead) == length:
                    read_ahead(end)
                yield ahead
                op.progress(len(ahead))
                offset += len(ahead)
                length -= len(ahead)
            finally:
                backend.release_ahead()
    pending = None
    if length and hasattr(backend, "will_read"):
        # A proxied image asks its host for the whole range at once.
        backend.will_read(offset, length)
    if length:
        # Only now: a request answered from what the backend read ahead
        # (most of the NBD sparse download's) needs no transfer buffers,
        # and leasing them cost ~26 us a request (BufferPool.get + put).
        buffers = lease(length)
        chunk = len(buffers[0])
        view = buffers[0][:min(chunk, length)]
        if getattr(backend, "cooperative", False):
            # The first chunk is waited for at once, with nothing to
            # overlap: a backend that waits by yielding to the event loop
            # reads it here, without a hand-off to a pool thread and back.
            pending = _Ready(read_first(view)), view
        else:
            pending = runner.submit(read_first, view), view
    settle = getattr(backend, "settle", None)
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
                if settle is not None:
                    # The next chunks are read in pool threads: work the
                    # backend left on the event loop ends first.
                    settle()
                    settle = None
                pending = submit(i, pos)
            elif read_ahead is not None:
                # The backend may read what the client is likely to ask
                # for next while this chunk is sent (an NBD backend: the
                # next data extent; see imaged.backends.nbd).
                read_ahead(end)
            # The whole chunk at once (count == len(view), checked above):
            # the transport's send loop bounds each wait for the client,
            # not the whole send (transport.send_all).
            yield view
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
    if length and hasattr(backend, "will_write"):
        # A proxied image sends the whole range to its host in one request.
        backend.will_write(offset, length)
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


def extents(backend, runner, size, start, length, context="zero", limit=None):
    """
    Extents of [start, start + length), clipped to the session `size`, as
    JSON-ready dicts; in the "dirty" context with a `dirty` key instead of
    `hole`. With `limit`, at most that many: a prefix of the window.

    A part of the session beyond the end of the file reads as zeroes in no
    format we know, but listing must cover the window: it is reported as a
    zero extent, and reading it fails.
    """
    return runner.run(lambda: list(
        _extent_dicts(backend, size, start, length, context, limit)))


def extents_json(backend, runner, op, size, start, length, context="zero",
                 limit=None):
    """
    Yield the JSON list of extents() as pieces of bytes.

    Each piece is listed and encoded in a pool thread, EXTENTS_BATCH
    extents at a time, so neither the event loop nor the memory holds the
    whole list of a file with millions of extents. op.check() runs between
    pieces: removing the session stops the listing.
    """
    items = _extent_dicts(backend, size, start, length, context, limit)

    def batch():
        chunk = list(itertools.islice(items, EXTENTS_BATCH))
        # One C call for the batch; its brackets go.
        return json.dumps(chunk)[1:-1].encode("ascii") if chunk else b""

    first = True
    while True:
        op.check()
        data = runner.run(batch)
        if not data:
            break
        yield (b"[" if first else b", ") + data
        first = False
    yield b"[]\n" if first else b"]\n"


def _extent_dicts(backend, size, start, length, context, limit):
    """The merged extent dicts of the window (see extents()); blocking."""
    end = min(start + length, size)

    def listed():
        covered = start
        if start < end:
            for ext in backend.extents(start, end - start, context):
                if ext.start >= end:
                    break
                ext_end = min(ext.start + ext.length, end)
                yield _extent(ext.start, ext_end - ext.start, ext, context)
                covered = ext_end
        if covered < end:
            yield _extent(covered, end - covered,
                          Extent(covered, end - covered, True), context)

    pending = None
    count = 0
    for ext in listed():
        if pending is not None and _mergeable(pending, ext):
            pending["length"] += ext["length"]
            continue
        if pending is not None:
            yield pending
            count += 1
            if limit is not None and count >= limit:
                # The answer ends here; the client asks for the rest.
                return
        pending = ext
    if pending is not None:
        yield pending


def _extent(start, length, ext, context):
    if context == "dirty":
        return {"start": start, "length": length, "dirty": ext.dirty, "zero": ext.zero}
    return {"start": start, "length": length, "zero": ext.zero, "hole": ext.hole}


def _mergeable(last, ext):
    # Same flags (zero, hole; or dirty, zero), and adjacent.
    return last["start"] + last["length"] == ext["start"] \
        and last["zero"] == ext["zero"] \
        and last.get("hole") == ext.get("hole") \
        and last.get("dirty") == ext.get("dirty")


def _block_extents(backend, runner, size, start, end):
    """Extents of [start, end) (end <= size), covering all of it."""
    exts = runner.run(lambda: [e for e in backend.extents(start, end - start)
                               if e.start < end])
    # Past the end of the file the image has no data to read: see extents().
    covered = min(exts[-1].start + exts[-1].length, end) if exts else start
    if covered < end:
        exts.append(Extent(covered, end - covered, True, False))
    return exts


def block_digests(backend, runner, op, size, algorithm, block_size, bufs,
                  start=0, length=None):
    """
    Yield the raw digest of each block of [start, start + length) of the
    image of `size` bytes (see imaged.blkhash): the digests the checksum is
    made of. `start` is a multiple of `block_size`; `bufs` are buffers of
    at least a block each.

    Zero extents get a precomputed digest and are never read; data blocks
    that turn out to be all zeroes get the same digest. With two buffers
    the next data block is read while the current one is hashed: hashing a
    4 MiB block (sha256, 2.3 ms here) and reading it with O_DIRECT (2-4 ms)
    took as long as each other, one after the other.
    """
    end = size if length is None else min(start + length, size)
    if start >= end:
        return
    exts = _block_extents(backend, runner, size, start, end)
    # A window: at most config.CHECKSUM_BLOCKS_WINDOW_BYTES of the image.
    blocks = list(blkhash.split(exts, block_size))
    data = [b for b in blocks if not b.zero]
    ahead = len(bufs) > 1
    reads = {}

    def read(j):
        # The j-th data block, into buffer j % len(bufs).
        if j < len(data):
            b = data[j]
            reads[j] = runner.submit(_read_block, backend, bufs[j % len(bufs)], b.start,
                                     b.length)

    try:
        read(0)
        j = 0
        for block in blocks:
            op.check()
            if block.zero:
                yield blkhash.zero_block_digest(block.length, algorithm)
            else:
                reads.pop(j).get()
                if ahead:
                    read(j + 1)
                digest = runner.run(_block_digest, bufs[j % len(bufs)], block.length,
                                    algorithm)
                j += 1
                if not ahead:
                    read(j)
                yield digest
            op.progress(block.length)
    finally:
        # No read may outlive the request: its buffer goes back to the pool.
        for pending in reads.values():
            _wait_quietly(pending)


# The pool calls below slice `buf` themselves and return no view of it: a
# view made in the event loop and passed to a pool thread lives on with the
# thread's last task, and a block's own buffer (larger than the transfer
# buffers) could not be unmapped while it does ("cannot close exported
# pointers exist").

def _read_block(backend, buf, start, length):
    """Read the block [start, start + length) into the start of `buf`."""
    count = backend.readinto(start, buf[:length])
    if count < length:
        raise errors.StorageError(
            f"image ends at {start + count}, before the session size")


def _block_digest(buf, length, algorithm):
    """The digest of the block in the first `length` bytes of `buf`."""
    view = buf[:length]
    # Comparing is much cheaper than hashing; the zero digest is cached.
    if util.is_zero(view):
        return blkhash.zero_block_digest(length, algorithm)
    return blkhash.block_digest(view, algorithm)


def _read_block_digest(backend, buf, algorithm, start, length):
    """The digest of the block [start, start + length), read into `buf`."""
    _read_block(backend, buf, start, length)
    return _block_digest(buf, length, algorithm)


def checksum(backend, runner, op, size, algorithm, block_size, buf):
    """
    The block checksum of [0, size) (see imaged.blkhash).

    The block digests of block_digests(), but a run of whole zero blocks
    is hashed in pool calls of ZERO_RUN_STEP_BLOCKS blocks (see
    blkhash.Hash.zero_blocks) instead of block by block in the event loop.
    """
    h = blkhash.Hash(block_size, algorithm)
    if size:
        # The first digest of a zero block hashes a whole block: not in the
        # event loop either (then it is cached).
        runner.run(blkhash.zero_block_digest, block_size, algorithm)
        exts = _block_extents(backend, runner, size, 0, size)
        for block in blkhash.runs(exts, block_size):
            op.check()
            if not block.zero:
                h.add_digest(runner.run(_read_block_digest, backend, buf,
                                        algorithm, block.start, block.length))
                op.progress(block.length)
            elif block.length < block_size:
                h.zero(block.length)    # The short last block.
                op.progress(block.length)
            else:
                count = block.length // block_size
                while count:
                    n = min(count, ZERO_RUN_STEP_BLOCKS)
                    runner.run(h.zero_blocks, n)
                    op.progress(n * block_size)
                    count -= n
                    op.check()
    return {"algorithm": algorithm, "block_size": block_size,
            "checksum": h.hexdigest()}


def checksum_blocks(backend, runner, op, size, algorithm, block_size, bufs,
                    start, length):
    """
    The hex digests of the blocks of [start, start + length), clipped to
    the image: {"algorithm", "block_size", "start", "blocks"}.
    """
    blocks = [d.hex() for d in block_digests(
        backend, runner, op, size, algorithm, block_size, bufs, start, length)]
    return {"algorithm": algorithm, "block_size": block_size,
            "start": start, "blocks": blocks}
