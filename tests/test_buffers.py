import random

from imaged import buffers
from imaged import util

MiB = 1024**2


def sizes(bufs):
    return [len(b) for b in bufs]


def test_lone_transfer_gets_full_size_buffers():
    pool = buffers.BufferPool(24 * MiB)
    bufs = pool.get(8 * MiB)
    assert sizes(bufs) == [8 * MiB, 8 * MiB]
    assert pool.in_use_bytes == 16 * MiB
    pool.put(bufs)
    assert pool.in_use_bytes == 0
    # Reused, not mapped again.
    pool.get(8 * MiB)
    assert pool.allocations == 1


def test_buffers_start_on_huge_pages():
    # Direct I/O into huge pages makes few large requests (imaged.util).
    pool = buffers.BufferPool(16 * MiB)
    for size in (8 * MiB, 4 * MiB, 2 * MiB):
        bufs = pool.get(size)
        assert sizes(bufs) == [size, size]
        assert all(util.address(b) % util.HUGE_PAGE_BYTES == 0 for b in bufs)
        pool.put(bufs)


def test_concurrent_transfers_share_the_budget():
    pool = buffers.BufferPool(24 * MiB)
    taken = [pool.get(8 * MiB) for _ in range(4)]
    assert [len(b[0]) for b in taken] == [8 * MiB, 4 * MiB, 1 * MiB, 1 * MiB]
    # Over the budget only by the minimum a transfer needs to progress.
    assert pool.in_use_bytes == 28 * MiB
    for bufs in taken:
        pool.put(bufs)
    assert pool.in_use_bytes == 0
    assert pool.free_bytes <= 24 * MiB


def test_busy_connections_reuse_buffers():
    # Four connections, each sending request after request (a client with
    # four connections), their requests ending in any order and now and
    # then a pause between two requests of a connection. Buffers come from
    # the shared area: hardly any request maps memory of its own (with a
    # mapping per buffer, about one request in seven did).
    rnd = random.Random(7)
    pool = buffers.BufferPool(16 * MiB)
    held = [pool.get(8 * MiB) for _ in range(4)]
    requests = 0
    for _ in range(3000):
        i = rnd.randrange(4)
        if held[i] is not None:
            pool.put(held[i])
            held[i] = None
            if rnd.random() < 0.05:
                continue
        held[i] = pool.get(8 * MiB)
        requests += 1
    assert pool.allocations < requests // 50
    # When the others are done, a lone transfer gets full size again.
    for bufs in held:
        if bufs is not None:
            pool.put(bufs)
    assert pool.in_use_bytes == 0 and pool.free_bytes == 16 * MiB
    assert sizes(pool.get(8 * MiB)) == [8 * MiB, 8 * MiB]


def test_buffers_do_not_overlap():
    pool = buffers.BufferPool(16 * MiB)
    taken = [pool.get(8 * MiB) for _ in range(5)]
    views = [v for bufs in taken for v in bufs]
    for n, v in enumerate(views):
        v[:] = bytes([n]) * len(v)
    for n, v in enumerate(views):
        assert v.tobytes() == bytes([n]) * len(v)


def test_small_max_size_is_honoured():
    pool = buffers.BufferPool(24 * MiB)
    assert sizes(pool.get(64 * 1024)) == [64 * 1024, 64 * 1024]


def test_put_with_live_view_does_not_fail():
    pool = buffers.BufferPool(2 * MiB)
    bufs = pool.get(1 * MiB)
    view = memoryview(bufs[0])
    more = pool.get(1 * MiB)
    pool.put(bufs)
    pool.put(more)
    view[0] = 1
    view.release()


def test_spare_buffers_only_while_half_the_area_is_free():
    # Work worth doing only with memory to spare (the NBD read-ahead)
    # borrows from the area, never beyond it, and never the memory a
    # transfer would need: at most half the area.
    pool = buffers.BufferPool(16 * MiB)
    spare = [pool.get_spare(2 * MiB) for _ in range(5)]
    assert sizes(spare[:4]) == [2 * MiB] * 4 and spare[4] is None
    assert pool.allocations == 1 and pool.borrowers == 0
    # A transfer still gets its buffers in the area, of the size that fits.
    bufs = pool.get(8 * MiB)
    assert sizes(bufs) == [4 * MiB, 4 * MiB] and pool.allocations == 1
    pool.put(bufs)
    for buf in spare[:4]:
        pool.put_spare(buf)
    assert pool.free_bytes == 16 * MiB and pool.in_use_bytes == 0
    # A transfer using the area leaves nothing to spare.
    bufs = pool.get(8 * MiB)
    assert pool.get_spare(2 * MiB) is None
    pool.put(bufs)
