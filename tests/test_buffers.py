from imaged import buffers


def test_pool_reuses_and_caps_free_buffers():
    pool = buffers.BufferPool(4096, max_free=2)
    a, b, c = pool.get(), pool.get(), pool.get()
    assert len(a) == 4096
    pool.put(a)
    pool.put(b)
    pool.put(c)
    assert pool.free == 2
    assert c.closed
    # Reused, not new.
    assert pool.get() in (a, b)


def test_put_with_live_view_does_not_fail():
    pool = buffers.BufferPool(4096, max_free=0)
    buf = pool.get()
    view = memoryview(buf)
    pool.put(buf)
    view[0] = 1
    view.release()
