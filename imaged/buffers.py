"""
Transfer buffers, shared by all connections.

A transfer needs two aligned buffers (one is filled while the other is sent
or written). Allocating and faulting in 16 MiB per request costs real
throughput, so buffers are reused; but a buffer held by an idle keep-alive
connection would cost memory per connection. So a connection borrows its
buffers for one request and gives them back to this pool, which keeps a
few free ones for the next request.
"""

from . import util


class BufferPool:
    """Aligned buffers of one size; keeps at most `max_free` free ones."""

    def __init__(self, size, max_free=2):
        self.size = size
        self.max_free = max_free
        self._free = []

    def get(self):
        """A buffer of `size` bytes (an mmap): reused if one is free."""
        if self._free:
            return self._free.pop()
        return util.aligned_buffer(self.size)

    def put(self, buf):
        """Give a buffer back; beyond max_free it is unmapped."""
        if len(self._free) < self.max_free:
            self._free.append(buf)
            return
        try:
            buf.close()
        except BufferError:
            # A view of it is still alive somewhere (a response being torn
            # down); the memory goes when the last view does.
            pass

    @property
    def free(self):
        return len(self._free)


_pools = {}


def pool(size):
    """The daemon-wide pool of buffers of `size` bytes."""
    p = _pools.get(size)
    if p is None:
        p = _pools[size] = BufferPool(size)
    return p
