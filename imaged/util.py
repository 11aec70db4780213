"""
Small helpers shared by the I/O code.
"""

import mmap

# Compared against in chunks by is_zero(). 1 MiB keeps the constant memory
# small while the per-chunk Python overhead stays negligible next to memcmp.
_ZERO_CHUNK = bytes(1024**2)


def aligned_buffer(size):
    """
    Return a writable, page-aligned buffer of `size` bytes, filled with zeroes.

    The buffer is an anonymous mmap, so its address is aligned to the page
    size, which satisfies the memory alignment O_DIRECT needs. Callers
    usually wrap it in a memoryview and must call close() on it when done,
    after releasing every memoryview of it (mmap refuses to close while
    views exist).
    """
    return mmap.mmap(-1, size)


def is_zero(buf):
    """
    Return True if the bytes-like object `buf` contains only zero bytes.

    bytes.startswith() accepts any buffer and compares with memcmp, which
    is much faster than comparing memoryviews (per item) and needs no copy,
    so no memory is allocated however large `buf` is.
    """
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    step = len(_ZERO_CHUNK)
    with mv:
        for start in range(0, len(mv), step):
            if not _ZERO_CHUNK.startswith(mv[start:start + step]):
                return False
    return True


def round_down(n, size):
    """Round `n` down to a multiple of `size`."""
    return n - n % size


def round_up(n, size):
    """Round `n` up to a multiple of `size`."""
    return round_down(n + size - 1, size)
