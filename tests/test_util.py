import array
import mmap
import os
import time

import pytest

from imaged import util

MiB = 1024**2


THP = "/sys/kernel/mm/transparent_hugepage/enabled"

needs_thp = pytest.mark.skipif(
    not os.path.exists(THP) or "[never]" in open(THP).read(),
    reason="transparent huge pages are not available")


def mapping_of(addr):
    """The /proc/self/smaps fields of the mapping that holds `addr`."""
    found = None
    with open("/proc/self/smaps") as f:
        current = None
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                current = {} if start <= addr < end else None
                if current is not None:
                    found = current
            elif current is not None:
                key, _, value = line.partition(":")
                current[key] = value.strip()
    assert found is not None, f"no mapping holds {addr:#x}"
    return found


@pytest.mark.parametrize("size", [4096, 1, 8 * MiB + 1])
def test_aligned_buffer(size):
    buf = util.aligned_buffer(size)
    try:
        assert len(buf) == size
        assert util.address(buf) % mmap.PAGESIZE == 0
        assert util.is_zero(buf)
        with memoryview(buf) as view:
            view[-1:] = b"x"
        assert buf[-1:] == b"x"
    finally:
        buf.close()


def test_aligned_buffer_is_private():
    # A shared anonymous mapping is shmem, which gets no huge pages.
    buf = util.aligned_buffer(4 * MiB)
    try:
        flags = mapping_of(util.address(buf))["VmFlags"].split()
        assert "sh" not in flags
    finally:
        buf.close()


@needs_thp
def test_large_aligned_buffer_asks_for_huge_pages():
    small = util.aligned_buffer(MiB)
    large = util.aligned_buffer(util.HUGE_PAGE_BYTES)
    try:
        assert "hg" not in mapping_of(util.address(small))["VmFlags"].split()
        assert "hg" in mapping_of(util.address(large))["VmFlags"].split()
    finally:
        small.close()
        large.close()


@needs_thp
@pytest.mark.parametrize("size", [util.HUGE_PAGE_BYTES, 16 * MiB, 16 * MiB + 4096])
def test_huge_page_area(size):
    area = util.huge_page_area(size)
    assert len(area) == size
    assert not area.readonly
    addr = util.address(area)
    assert addr % util.HUGE_PAGE_BYTES == 0
    assert util.is_zero(area)
    area[:] = b"\x01" * size
    assert area[-1] == 1
    # Whether the kernel finds free huge pages depends on the machine's
    # memory; it may fall back to small pages. Report what happened.
    info = mapping_of(addr)
    assert "hg" in info["VmFlags"].split()
    print(f"huge_page_area({size}): AnonHugePages {info['AnonHugePages']}")


@pytest.mark.parametrize("size", [0, 1, 4095, MiB - 1, MiB, MiB + 1, 8 * MiB])
def test_is_zero_true(size):
    assert util.is_zero(bytes(size))
    assert util.is_zero(bytearray(size))
    assert util.is_zero(memoryview(bytes(size + 1))[1:])


@pytest.mark.parametrize("size,pos", [
    (1, 0),
    (4096, 4095),
    (MiB + 1, MiB),
    (MiB + 1, MiB - 1),
    (8 * MiB, 0),
    (8 * MiB, 5 * MiB + 7),
    (8 * MiB, 8 * MiB - 1),
])
def test_is_zero_false(size, pos):
    buf = bytearray(size)
    buf[pos] = 1
    assert not util.is_zero(buf)
    assert not util.is_zero(memoryview(buf))
    assert not util.is_zero(bytes(buf))


def test_is_zero_mmap_and_other_formats():
    buf = util.aligned_buffer(4 * MiB)
    try:
        assert util.is_zero(buf)
        buf[4 * MiB - 1] = 7
        assert not util.is_zero(buf)
    finally:
        buf.close()
    assert util.is_zero(array.array("I", [0] * 1000))
    assert not util.is_zero(array.array("I", [0] * 999 + [1 << 24]))


def test_is_zero_speed():
    buf = util.aligned_buffer(8 * MiB)
    try:
        start = time.monotonic()
        for _ in range(10):
            assert util.is_zero(buf)
        elapsed = (time.monotonic() - start) / 10
    finally:
        buf.close()
    print(f"is_zero(8 MiB): {elapsed * 1000:.3f} ms")
    # memcmp needs about 1 ms here; a loose bound to stay reliable on
    # loaded machines, still catching per-byte Python loops (~1 s).
    assert elapsed < 0.1


@pytest.mark.parametrize("n,size,down,up", [
    (0, 4096, 0, 0),
    (1, 4096, 0, 4096),
    (4096, 4096, 4096, 4096),
    (4097, 512, 4096, 4608),
])
def test_round(n, size, down, up):
    assert util.round_down(n, size) == down
    assert util.round_up(n, size) == up
