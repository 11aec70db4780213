"""
Transfer buffers, shared by all connections under one memory budget.

A transfer needs two aligned buffers (one is filled while the other is sent
or written). Allocating and faulting in 16 MiB per request costs real
throughput, so buffers are reused; but a buffer held by an idle keep-alive
connection would cost memory per connection. So a connection borrows its
buffers for one request and gives them back to the pool.

The pool keeps the daemon's buffer memory within a budget whatever the
number of concurrent transfers: a lone transfer gets full-size buffers,
and transfers starting while others run get smaller ones (down to
MIN_SIZE_BYTES), which costs them little throughput and keeps the host's
memory predictable.
"""

from . import util

MiB = 1024**2

# Buffers never get smaller than this, even over the budget: a transfer
# must make progress.
MIN_SIZE_BYTES = 1 * MiB


class BufferPool:
    """Aligned buffers within `budget_bytes`, borrowed by requests."""

    def __init__(self, budget_bytes):
        self.budget_bytes = budget_bytes
        self.in_use_bytes = 0
        self._free = {}          # size -> [mmap]
        self._free_bytes = 0

    def get(self, max_size, count=2):
        """
        `count` buffers (mmaps) of one size, at most `max_size` bytes each:
        the largest power-of-two fraction of it that fits in the budget.
        """
        size = max_size
        while size > MIN_SIZE_BYTES and \
                self.in_use_bytes + count * size > self.budget_bytes:
            size //= 2
        size = max(size, min(max_size, MIN_SIZE_BYTES))
        bufs = [self._take(size) for _ in range(count)]
        self.in_use_bytes += count * size
        return bufs

    def _take(self, size):
        free = self._free.get(size)
        if free:
            self._free_bytes -= size
            return free.pop()
        # Make room for a new buffer by unmapping free ones of other sizes.
        self._trim(self.budget_bytes - self.in_use_bytes - size)
        return util.aligned_buffer(size)

    def put(self, bufs):
        """Give buffers back; free ones beyond the budget are unmapped."""
        for buf in bufs:
            self.in_use_bytes -= len(buf)
            self._free.setdefault(len(buf), []).append(buf)
            self._free_bytes += len(buf)
        self._trim(self.budget_bytes - self.in_use_bytes)

    def _trim(self, keep_bytes):
        # Smallest first: full-size buffers serve the common lone transfer.
        for size in sorted(self._free):
            free = self._free[size]
            while free and self._free_bytes > max(keep_bytes, 0):
                _unmap(free.pop())
                self._free_bytes -= size

    @property
    def free_bytes(self):
        return self._free_bytes


def _unmap(buf):
    try:
        buf.close()
    except BufferError:
        # A view of it is still alive somewhere (a response being torn
        # down); the memory goes when the last view does.
        pass
