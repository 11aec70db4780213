from imaged import buffers

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
    again = pool.get(8 * MiB)
    assert set(map(id, again)) == set(map(id, bufs))


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
