import array
import ctypes
import mmap
import time

import pytest

from imaged import util

MiB = 1024**2


def address(buf):
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.mark.parametrize("size", [4096, 1, 8 * MiB + 1])
def test_aligned_buffer(size):
    buf = util.aligned_buffer(size)
    try:
        assert len(buf) == size
        assert address(buf) % mmap.PAGESIZE == 0
        assert util.is_zero(buf)
        with memoryview(buf) as view:
            view[-1:] = b"x"
        assert buf[-1:] == b"x"
    finally:
        buf.close()


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
