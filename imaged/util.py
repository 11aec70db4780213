"""
Small helpers shared by the I/O code.
"""

import ctypes
import mmap

# The transparent huge page size of x86_64 (and of most arm64 kernels).
HUGE_PAGE_BYTES = 2 * 1024**2

# Compared against in chunks by is_zero(). 1 MiB keeps the constant memory
# small while the per-chunk Python overhead stays negligible next to memcmp.
_ZERO_CHUNK = bytes(1024**2)


def aligned_buffer(size):
    """
    Return a writable, page-aligned buffer of `size` bytes, filled with zeroes.

    The buffer is a private anonymous mmap, so its address is aligned to the
    page size, which satisfies the memory alignment O_DIRECT needs. Callers
    usually wrap it in a memoryview and must call close() on it when done,
    after releasing every memoryview of it (mmap refuses to close while
    views exist).

    Buffers of a huge page or more ask for transparent huge pages. A direct
    I/O request carries one segment per physically contiguous run of the
    buffer and devices cap the segments of a request (254 on virtio-blk),
    so an 8 MiB read into scattered 4 KiB pages became nine or more ~1 MiB
    requests; with huge pages it is two of 4 MiB. O_DIRECT reads went from
    0.7-1.2 to 2.7-3.5 GB/s on the benchmark machine (docs/benchmarks.md).
    The mapping is private: a shared one is shmem, which gets no huge pages.
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE_BYTES:
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass  # No THP in this kernel or Python: 4 KiB pages still work.
    return buf


def huge_page_area(size):
    """
    Return a writable memoryview of `size` zero bytes that starts on a huge
    page boundary (see aligned_buffer), for memory kept for the process's
    life. Newer kernels align large mappings themselves; older ones (EL8,
    EL9) do not, and an unaligned area would lose a huge page at each end.
    The unused slack before and after the area is never touched, so it
    costs address space, not memory.
    """
    mem = aligned_buffer(size + HUGE_PAGE_BYTES)
    start = -address(mem) % HUGE_PAGE_BYTES
    return memoryview(mem)[start:start + size]


def address(buf):
    """The memory address of a writable buffer (an mmap, a bytearray)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


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
