"""
Transfer buffers, shared by all connections under one memory budget.

A transfer needs two aligned buffers (one is filled while the other is sent
or written). Allocating and faulting in 16 MiB per request costs real
throughput, so buffers are reused; but a buffer held by an idle keep-alive
connection would cost memory per connection. So a connection borrows its
buffers for one request and gives them back to the pool.

The pool keeps the daemon's buffer memory within a budget whatever the
number of concurrent transfers: a lone transfer gets full-size buffers,
and transfers beside others get a fair share of the budget (down to
MIN_SIZE_BYTES), which costs them little throughput and keeps the host's
memory predictable.

The budget is one memory area, mapped once and faulted in as it is first
used, cut into granules of MIN_SIZE_BYTES; a buffer is a run of
contiguous granules. Buffers of every size come from that one area, so
when the number of transfers changes the size they get, nothing is
unmapped and faulted in again: with a mapping per buffer, a client with
four connections sending 8 MiB requests made the daemon spend ~1.5 s of
CPU per 2 GiB mapping fresh memory. Only beyond the budget, when a
transfer must get its minimum, is a buffer mapped on its own, and unmapped
when given back.
"""

from . import util

MiB = 1024**2

# Buffers never get smaller than this, even over the budget: a transfer
# must make progress. Also the granule of the shared area.
MIN_SIZE_BYTES = 1 * MiB


class BufferPool:
    """Aligned buffers within `budget_bytes`, borrowed by requests."""

    def __init__(self, budget_bytes):
        self.budget_bytes = budget_bytes
        self.borrowers = 0
        # Mappings made since start: the area, plus buffers beyond the
        # budget. A number that keeps growing under steady load means churn.
        self.allocations = 0
        self._area = None
        self._free = [True] * max(1, budget_bytes // MIN_SIZE_BYTES)
        # id(buffer) -> (buffer, first granule, granules, None) for a buffer
        # in the area, (buffer, None, None, mmap) for one mapped on its own.
        self._lent = {}

    def get(self, max_size, count=2):
        """
        `count` buffers (memoryviews) of one size, at most `max_size` bytes
        each: the largest power-of-two fraction of it that is within this
        borrower's fair share of the budget and free in the area.
        """
        size = self.size_for(max_size, count)
        bufs = [self._take(size) for _ in range(count)]
        self.borrowers += 1
        return bufs

    def size_for(self, max_size, count=2):
        """The size of each buffer get(max_size, count) would give now."""
        share = self.budget_bytes // (self.borrowers + 1)
        size = max_size
        while size > MIN_SIZE_BYTES and (
                count * size > share or
                self._runs(_granules(size)) < count):
            size //= 2
        return max(size, min(max_size, MIN_SIZE_BYTES))

    def put(self, bufs):
        """Give back the buffers of one get()."""
        self.borrowers -= 1
        for buf in bufs:
            _, first, n, own = self._lent.pop(id(buf))
            if own is None:
                self._free[first:first + n] = [True] * n
            else:
                _unmap(buf)
                _unmap(own)

    def get_spare(self, size):
        """
        One buffer of `size` bytes from the area, or None unless that
        leaves at least half of the area free: for work worth doing only
        with memory to spare (an NBD read-ahead), which must never push a
        transfer out of the area. It is no borrower: the shares of the
        transfers stay the same. Given back with put_spare().
        """
        n = _granules(size)
        if (sum(self._free) - n) * 2 < len(self._free) or self._find(n) is None:
            return None
        return self._take(size)

    def put_spare(self, buf):
        """Give back a buffer of get_spare()."""
        _, first, n, _ = self._lent.pop(id(buf))
        self._free[first:first + n] = [True] * n

    @property
    def in_use_bytes(self):
        """Bytes of all buffers lent out, in the area or beyond it."""
        return sum(len(buf) for buf, *_ in self._lent.values())

    @property
    def free_bytes(self):
        """Bytes of the area that no buffer uses."""
        return sum(self._free) * MIN_SIZE_BYTES

    def _take(self, size):
        n = _granules(size)
        first = self._find(n)
        if first is None:
            # Over the budget: a mapping of its own, gone when given back.
            self.allocations += 1
            own = util.aligned_buffer(size)
            buf = memoryview(own)
            self._lent[id(buf)] = (buf, None, None, own)
            return buf
        if self._area is None:
            self.allocations += 1
            self._area = util.huge_page_area(len(self._free) * MIN_SIZE_BYTES)
        self._free[first:first + n] = [False] * n
        start = first * MIN_SIZE_BYTES
        buf = self._area[start:start + size]
        self._lent[id(buf)] = (buf, first, n, None)
        return buf

    def _find(self, n):
        """The first granule of the first free run of `n`, or None."""
        return next(self._free_runs(n), None)

    def _runs(self, n):
        """How many separate runs of `n` free granules the area has."""
        return sum(1 for _ in self._free_runs(n))

    def _free_runs(self, n):
        """The first granules of separate runs of `n` free granules."""
        run = 0
        for i, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == n:
                yield i - n + 1
                run = 0


def _granules(size):
    return max(1, -(-size // MIN_SIZE_BYTES))


def _unmap(buf):
    """Release a memoryview or close an mmap, if nothing else uses it."""
    try:
        buf.release() if isinstance(buf, memoryview) else buf.close()
    except BufferError:
        # A view of it is still alive somewhere (a response being torn
        # down); the memory goes when the last view does.
        pass
