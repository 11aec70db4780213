"""
Resume: finish an interrupted transfer by moving only the blocks that differ.

The image is cut into the blocks of the block checksum (imaged.blkhash,
4 MiB by default), and the extents of both sides sort each block before
anything is read:

    source  destination  the block
    zero    zero         is in place: nothing is read, hashed or moved
    zero    data         is zeroed on the destination ("zero")
    data    zero         is moved ("fill"), without hashing either side
    data    data         is compared ("compare"): the server's digests
                         (GET .../checksum/blocks) against the local ones,
                         and only the blocks that differ move

Only where both sides hold data must both sides read and hash: an upload
killed at half of it has its second half unwritten on the server, which
the server's extents report as zero, so that half is sent at once and only
the first half is hashed (on both sides, at the same time).

Runs of blocks of one kind become Windows of at most `window_bytes`, the
work items of the transfer workers (imaged.client.transfer.run): a worker
compares a window, the server hashing its side while the worker's I/O
thread hashes ours, then sends the blocks of that window that differ,
adjacent ones in one request, while the other workers compare and send
theirs. The windows to move and the windows to compare are handed out
interleaved (Plan.__iter__): moving starts at once, beside the hashing,
instead of after it. So hashing (CPU), reading and sending overlap across
the workers.
"""

import functools
import time
from typing import NamedTuple

from .. import blkhash
from .. import util
from . import errors
from . import transfer
from .images import Extent

ZERO = "zero"
FILL = "fill"
COMPARE = "compare"

# Bytes looked at first in a block the destination has as zeroes: data
# shows in its first bytes (nearly always), so the whole block is read only
# when they are zeroes too.
PROBE_BYTES = 4096


# Digest algorithms a resume may use; the cheapest on this CPU is chosen
# (algorithm()). Where both sides hold data both must hash it, and over a
# local unix socket hashing costs more than moving the bytes. One core of
# the 2-core test VM (AMD EPYC with SHA-NI, OpenSSL 3.0, 2026-11-30):
# sha256 1.77 GB/s, blake2b 0.94, sha512 0.86, md5 0.76, sha3_256 0.51;
# without SHA instructions sha256 runs at ~0.4 GB/s and blake2b wins.
# sha1 (1.91 GB/s) would save 8% of the hashing, not worth a digest with
# known collisions deciding what is left out. So comparing a GiB costs
# both sides together at least 1.2 s of CPU (measured with the reads and
# the requests: 1.5-1.7 s), while moving it over the unix socket costs
# about 0.9 s. Hosts of one cluster usually share a CPU generation; a
# wrong guess costs time on the server, never correctness.
ALGORITHMS = ("sha256", "blake2b")
_PROBE_HASH_BYTES = 1024**2


@functools.lru_cache(maxsize=1)
def algorithm():
    """The cheapest of ALGORITHMS on this CPU (a few ms of hashing)."""
    data = bytes(range(256)) * (_PROBE_HASH_BYTES // 256)
    costs = {}
    for name in ALGORITHMS:
        best = None
        for _ in range(3):
            started = time.thread_time()
            blkhash.block_digest(data, name)
            spent = time.thread_time() - started
            best = spent if best is None else min(best, spent)
        costs[name] = best
    return min(ALGORITHMS, key=lambda name: costs[name])


class Window(NamedTuple):
    """Whole blocks of one kind: ZERO, FILL or COMPARE."""

    start: int
    length: int
    kind: str


class Plan:
    """
    The Windows of [0, size), from the extents of the source and of the
    destination (each covering [0, size) in order), as an iterator for
    transfer.run. Blocks in place by their extents alone are counted in
    `same_bytes` (and as progress) as the iteration passes them.

    The windows to move (FILL, ZERO) and the windows to compare (COMPARE)
    come interleaved, not in offset order: see __iter__.
    """

    def __init__(self, source, destination, size, block_size, window_bytes,
                 progress, zero_step=transfer.ZERO_STEP):
        # Both lists are walked twice, once per kind of window.
        self.source = list(source)
        self.destination = list(destination)
        self.size = size
        self.block_size = block_size
        self.window_bytes = max(window_bytes, block_size)
        self.zero_step = max(zero_step, block_size)
        self.progress = progress
        self.same_bytes = 0

    def _blocks(self):
        mine = blkhash.split(self.source, self.block_size)
        theirs = blkhash.split(self.destination, self.block_size)
        end = 0
        for a, b in zip(mine, theirs):
            if (a.start, a.length) != (b.start, b.length):
                raise errors.ClientError("extents of the two images do not match")
            end = a.start + a.length
            if a.zero:
                yield a.start, a.length, None if b.zero else ZERO
            else:
                yield a.start, a.length, FILL if b.zero else COMPARE
        if end != self.size:
            raise errors.ClientError(f"extents end at {end}, not at the size {self.size}")

    def _windows(self, compare):
        """
        The COMPARE windows (`compare`) or the others, in offset order;
        the pass over the others counts the blocks in place.
        """
        run = None
        for start, length, kind in self._blocks():
            if kind is None:
                if not compare:
                    self.same_bytes += length
                    self.progress.update(length)
                continue
            if (kind == COMPARE) != compare:
                continue
            limit = self.zero_step if kind == ZERO else self.window_bytes
            if (run is not None and run.kind == kind
                    and run.start + run.length == start and run.length + length <= limit):
                run = run._replace(length=run.length + length)
                continue
            if run is not None:
                yield run
            run = Window(start, length, kind)
        if run is not None:
            yield run

    def __iter__(self):
        """
        The moves and the comparisons interleaved, whichever has handed
        out fewer bytes to move or to hash next (ZERO windows weigh
        nothing: one request each), so that neither waits for the other.
        In offset order an upload killed at half compared first, then
        moved: measured on the 2-core VM, 1.0 s of comparing 1 GiB with
        both cores hashing and the socket idle, then 0.44 s of moving the
        other GiB on ~1.5 cores. Over a network the link is idle while
        both sides hash; interleaved, bytes flow from the start.
        """
        streams = [self._windows(compare=False), self._windows(compare=True)]
        handed = [0, 0]
        while streams:
            i = min(range(len(streams)), key=handed.__getitem__)
            window = next(streams[i], None)
            if window is None:
                del streams[i], handed[i]
                continue
            if window.kind != ZERO:
                handed[i] += window.length
            yield window


def _blocks_of(window, block_size):
    """(start, length) of each block of `window`."""
    pos, end = window.start, window.start + window.length
    while pos < end:
        n = min(block_size, end - pos)
        yield pos, n
        pos += n


def _runs(blocks):
    """Adjacent (start, length) ranges merged into one."""
    run = None
    for start, length in blocks:
        if run is not None and run[0] + run[1] == start:
            run = (run[0], run[1] + length)
            continue
        if run is not None:
            yield run
        run = (start, length)
    if run is not None:
        yield run


def _pieces(start, length, size):
    pos, end = start, start + length
    while pos < end:
        n = min(size, end - pos)
        yield pos, n
        pos += n


def local_digests(reader, buf, window, block_size, algorithm):
    """
    The raw digests of the blocks of `window` of the local image read by
    `reader` (readinto(view, offset)) into `buf` (a block or less).
    """
    digests = []
    for start, length in _blocks_of(window, block_size):
        if length <= len(buf):
            view = buf[:length]
            reader.readinto(view, start)
            # Comparing is much cheaper than hashing, and the zero digest
            # is cached: same result, less CPU.
            if util.is_zero(view):
                digests.append(blkhash.zero_block_digest(length, algorithm))
            else:
                digests.append(blkhash.block_digest(view, algorithm))
            continue
        h = blkhash.BlockHash(algorithm)
        for pos, n in _pieces(start, length, len(buf)):
            view = buf[:n]
            reader.readinto(view, pos)
            h.update(view)
        digests.append(h.digest())
    return digests


class _Comparing:
    """What the resume workers of both directions share."""

    def _init_resume(self, algorithm, block_size):
        self.algorithm = algorithm
        self.block_size = block_size
        self.skipped_bytes = 0

    def _skip(self, length):
        self.skipped_bytes += length
        self.progress.update(length)

    def _differing(self, window, reader):
        """
        Compare the blocks of `window`: yields (start, length, mine, theirs)
        of each block whose digests differ. Our digests are computed in the
        I/O thread (buffer 0) while the server computes its own.
        """
        self.finish()
        pending = self._submit(0, local_digests, reader,
                               self._view(min(self.chunk_size, self.block_size), 0),
                               window, self.block_size, self.algorithm)
        try:
            theirs = list(self.image.blocks(self.algorithm, self.block_size,
                                            window.start, window.length))
        except errors.HTTPError as e:
            if e.status in (400, 404, 405):
                raise errors.UnsupportedError(
                    f"the server cannot list block checksums, needed by --resume: {e}") \
                    from None
            raise
        finally:
            pending.exception()
        mine = self._wait(0)
        blocks = list(_blocks_of(window, self.block_size))
        if len(theirs) != len(blocks):
            raise errors.ClientError("server sent checksum blocks not covering the window")
        for (start, length), d_mine, (pos, d_theirs) in zip(blocks, mine, theirs):
            if pos != start:
                raise errors.ClientError("server sent checksum blocks of another window")
            if d_mine == d_theirs:
                self._skip(length)
            else:
                yield start, length, d_mine, d_theirs

    def _compare(self, window, reader, local_source):
        """
        Compare the blocks of `window`: returns (zero, move), the blocks
        that differ and are zero on the source side (local or not), and
        the others: (start, length) each.
        """
        zero, move = [], []
        for start, length, mine, theirs in self._differing(window, reader):
            source = mine if local_source else theirs
            if source == blkhash.zero_block_digest(length, self.algorithm):
                zero.append((start, length))
            else:
                move.append((start, length))
        return zero, move

    def _is_zero_block(self, reader, start, length):
        """Whether the local block reads as zeroes (main thread, buffer 0)."""
        self.finish()
        probe = self._view(min(PROBE_BYTES, length), 0)
        reader.readinto(probe, start)
        if not util.is_zero(probe):
            return False
        for pos, n in _pieces(start, length, self.chunk_size):
            view = self._view(n, 0)
            reader.readinto(view, pos)
            if not util.is_zero(view):
                return False
        return True


class UploadWorker(_Comparing, transfer.UploadWorker):
    """
    Handles the Windows of an upload: zeroes ZERO ones on the server,
    sends FILL blocks (but not all-zero ones: the server has zeroes
    there), and sends the COMPARE blocks that differ (zeroes them when
    they are zero here).
    """

    def __init__(self, image, source, chunk_size, progress, options, algorithm,
                 block_size):
        super().__init__(image, source, chunk_size, progress, options)
        self._init_resume(algorithm, block_size)

    def handle(self, window):
        if window.kind == ZERO:
            self._zero(window.start, window.length)
            return
        if window.kind == FILL:
            send = []
            for start, length in _blocks_of(window, self.block_size):
                if self._is_zero_block(self, start, length):
                    self._skip(length)
                else:
                    send.append((start, length))
            zero = []
        else:
            zero, send = self._compare(window, self, local_source=True)
        for start, length in _runs(zero):
            self._zero(start, length)
        for start, length in _runs(send):
            self._send(start, length)

    def readinto(self, view, offset):
        """The local image, as a reader for the comparisons."""
        self._read(view, offset)


class DownloadWorker(_Comparing, transfer.DownloadWorker):
    """
    Handles the Windows of a download into a local file read by `reader`:
    zeroes ZERO blocks here (unless they are zeroes already), fetches FILL
    ones, and fetches the COMPARE blocks that differ (zeroes them here when
    they are zero on the server).
    """

    def __init__(self, image, sink, reader, chunk_size, progress, algorithm, block_size):
        super().__init__(image, sink, chunk_size, progress)
        self.reader = reader
        self._init_resume(algorithm, block_size)

    def handle(self, window):
        if window.kind == ZERO:
            zero = []
            for start, length in _blocks_of(window, self.block_size):
                if self._is_zero_block(self.reader, start, length):
                    self._skip(length)
                else:
                    zero.append((start, length))
            fetch = []
        elif window.kind == FILL:
            zero, fetch = [], [(window.start, window.length)]
        else:
            zero, fetch = self._compare(window, self.reader, local_source=False)
        for start, length in _runs(zero):
            self._zero_here(start, length)
        for start, length in _runs(fetch):
            for item in transfer.plan([Extent(start, length, False)], self.chunk_size):
                super().handle(item)

    def _zero_here(self, start, length):
        # The I/O thread may still write a fetched buffer: the sink is used
        # by one thread at a time.
        self.finish()
        self.sink.zero(start, length)
        self.zero_bytes += length
        self.progress.update(length)
