"""
imaged.ops: the chunk loops, on a real file backend and gevent's threadpool,
with plain readers and operations (no HTTP).
"""

import io
import os

import gevent.lock
import pytest

from imaged import errors
from imaged import ops
from imaged import sessions
from imaged.backends import Extent
from imaged.backends.file import FileBackend

KiB = 1024
MiB = 1024**2


class Reader:
    def __init__(self, data, piece=5000):
        self._f = io.BytesIO(data)
        self._piece = piece

    def readinto(self, view):
        return self._f.readinto(view[:self._piece])


@pytest.fixture
def runner():
    return ops.Runner(gevent.lock.BoundedSemaphore(2))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    data = os.urandom(MiB)
    path.write_bytes(data)
    return str(path), data


def buffers(size=64 * KiB):
    return [memoryview(bytearray(size)), memoryview(bytearray(size))]


def lease(need):
    """ops.read's lease: 64 KiB buffers whatever is left, to test chunking."""
    return buffers()


def test_read_yields_the_range(runner, image):
    path, data = image
    op = sessions.Operation("read", 3, MiB - 10)
    with FileBackend(path, "r", direct=False) as b:
        got = b"".join(bytes(v) for v in ops.read(b, runner, op, 3, MiB - 10, lease))
    assert got == data[3:MiB - 7]
    assert op.done == MiB - 10


def test_read_of_a_short_image_fails_before_the_first_chunk(runner, image):
    path, _ = image
    op = sessions.Operation("read")
    with FileBackend(path, "r", direct=False) as b:
        gen = ops.read(b, runner, op, 0, 2 * MiB, lease)
        with pytest.raises(errors.StorageError, match="image ends"):
            next(gen)


def test_read_stops_when_canceled(runner, image):
    path, _ = image
    op = sessions.Operation("read", 0, MiB)
    with FileBackend(path, "r", direct=False) as b:
        gen = ops.read(b, runner, op, 0, MiB, lease)
        next(gen)
        op.cancel()
        with pytest.raises(errors.Canceled):
            list(gen)


def test_write_and_flush(runner, image):
    path, data = image
    new = os.urandom(200 * KiB + 1)
    op = sessions.Operation("write", 10, len(new))
    with FileBackend(path, "rw", direct=False) as b:
        ops.write(b, runner, op, 10, len(new), Reader(new), buffers(), flush=True)
    with open(path, "rb") as f:
        assert f.read() == data[:10] + new + data[10 + len(new):]
    assert op.done == len(new)


def test_write_stream_refuses_to_pass_its_limit(runner, image):
    path, data = image
    op = sessions.Operation("write")
    with FileBackend(path, "rw", direct=False) as b:
        with pytest.raises(errors.Error):
            ops.write_stream(b, runner, op, 0, 4096, Reader(b"y" * 8192),
                             buffers(), flush=True)
    with open(path, "rb") as f:
        assert f.read()[4096:] == data[4096:]


def test_zero_in_steps(runner, image, monkeypatch):
    path, data = image
    monkeypatch.setattr(ops, "ZERO_STEP_BYTES", 64 * KiB)
    op = sessions.Operation("zero", 100, 300 * KiB)
    with FileBackend(path, "rw", direct=False) as b:
        ops.zero(b, runner, op, 100, 300 * KiB, flush=True)
    with open(path, "rb") as f:
        got = f.read()
    assert got[100:100 + 300 * KiB] == bytes(300 * KiB)
    assert got[:100] == data[:100] and got[100 + 300 * KiB:] == data[100 + 300 * KiB:]
    assert op.done == 300 * KiB


def test_extents_cover_the_window_past_the_end_of_the_file(runner, tmp_path):
    path = tmp_path / "short.raw"
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(MiB)
    with FileBackend(str(path), "r", direct=False) as b:
        # The session is larger than the file: the rest is listed as zero.
        result = ops.extents(b, runner, 2 * MiB, 0, 2 * MiB)
    assert result == [
        {"start": 0, "length": 4096, "zero": False, "hole": False},
        {"start": 4096, "length": 2 * MiB - 4096, "zero": True, "hole": False},
    ]


class DirtyBackend:
    """A backend listing dirty extents, as an NBD export with a bitmap does."""

    def extents(self, start, length, context):
        assert context == "dirty"
        yield Extent(0, 4096, zero=False, dirty=True)
        yield Extent(4096, 8192, zero=True, dirty=False)


def test_dirty_extents_are_reported_with_dirty_and_zero(runner):
    assert ops.extents(DirtyBackend(), runner, 3 * 4096, 0, 3 * 4096, "dirty") == [
        {"start": 0, "length": 4096, "dirty": True, "zero": False},
        {"start": 4096, "length": 8192, "dirty": False, "zero": True},
    ]


def fragmented(path, blocks):
    """A file of `blocks` 4 KiB data extents 8 KiB apart: 2 x blocks extents."""
    with open(path, "wb") as f:
        f.truncate(blocks * 8 * KiB)
        for i in range(blocks):
            f.seek(i * 8 * KiB)
            f.write(b"d" * 4 * KiB)
    return str(path)


def test_extents_json_is_listed_in_batches(runner, tmp_path, monkeypatch):
    import json
    monkeypatch.setattr(ops, "EXTENTS_BATCH", 3)
    path = fragmented(tmp_path / "frag.raw", 5)
    size = 5 * 8 * KiB
    with FileBackend(path, "r", direct=False) as b:
        full = ops.extents(b, runner, size, 0, size)
        op = sessions.Operation("extents")
        pieces = list(ops.extents_json(b, runner, op, size, 0, size))
        limited = b"".join(ops.extents_json(b, runner, op, size, 0, size, limit=4))
        empty = list(ops.extents_json(b, runner, op, size, size, 0))
    assert len(full) == 10
    # 10 extents, 3 per batch: 4 pieces, then the closing bracket.
    assert len(pieces) == 5
    assert json.loads(b"".join(pieces)) == full
    assert json.loads(limited) == full[:4]
    assert empty == [b"[]\n"]


def test_extents_json_stops_when_canceled(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "EXTENTS_BATCH", 2)
    path = fragmented(tmp_path / "frag.raw", 5)
    op = sessions.Operation("extents")
    with FileBackend(path, "r", direct=False) as b:
        gen = ops.extents_json(b, runner, op, 5 * 8 * KiB, 0, 5 * 8 * KiB)
        next(gen)
        op.cancel()
        with pytest.raises(errors.Canceled):
            next(gen)


def test_checksum_of_a_2_63_byte_session_yields_and_stops_when_canceled(runner, tmp_path):
    import gevent
    path = tmp_path / "small.raw"
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(MiB)
    op = sessions.Operation("checksum")
    with FileBackend(str(path), "r", direct=False) as b:
        g = gevent.spawn(ops.checksum, b, runner, op, 2**63 - 1, "blake2b", MiB,
                         buffers(MiB)[0])
        # This loop runs only while the checksum gives the event loop back:
        # it sees the progress of step after step.
        seen = set()
        deadline = gevent.get_hub().loop.now() + 30
        while len(seen) < 4 and gevent.get_hub().loop.now() < deadline:
            if op.done:
                seen.add(op.done)
            gevent.sleep(0.005)
        op.cancel()
        g.join(10)
    assert len(seen) >= 4
    assert g.dead
    assert isinstance(g.exception, errors.Canceled)
    # The data block, then steps of whole zero runs, never a block at a time.
    assert all((done - MiB) % (ops.ZERO_RUN_STEP_BLOCKS * MiB) == 0 for done in seen)
