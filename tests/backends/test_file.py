"""
Tests for imaged.backends.file, using real files on real file systems:

- ext4 (tmp_path) with O_DIRECT and with buffered I/O,
- tmpfs (/dev/shm), which supports O_DIRECT on recent kernels but not
  FALLOC_FL_ZERO_RANGE, so non-sparse zero() writes zeroes,
- ramfs (mounted for the test, needs root), which rejects O_DIRECT and
  fallocate, testing both fallbacks,
- a loop block device (needs root and losetup).
"""

import errno
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from imaged import errors
from imaged import util
from imaged.backends import Extent, OpenOptions, open_backend
from imaged.backends.file import FileBackend

KiB = 1024
MiB = 1024**2
GiB = 1024**3

# Not a multiple of 4096, so the last block is partial.
ODD_SIZE = 3 * 4096 + 1000


# Storage fixtures

def _mount(fstype, path, options=None):
    if os.geteuid() != 0:
        pytest.skip(f"mounting {fstype} requires root")
    cmd = ["mount", "-t", fstype]
    if options:
        cmd += ["-o", options]
    cmd += [fstype, str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount {fstype}: {res.stderr.strip()}")


def _umount(path):
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def ramfs(tmp_path_factory):
    path = tmp_path_factory.mktemp("ramfs")
    _mount("ramfs", path)
    yield path
    _umount(path)


@pytest.fixture
def shm():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("/dev/shm is not available")
    path = tempfile.mkdtemp(dir="/dev/shm", prefix="imaged-test-")
    yield path
    shutil.rmtree(path)


STORAGE = ["ext4-direct", "ext4-buffered", "tmpfs-direct", "ramfs"]


class Storage:
    """A directory on some file system and how to open backends there."""

    def __init__(self, name, dir, direct):
        self.name = name
        self.dir = str(dir)
        self.direct = direct

    def create(self, data=b"", size=None, name="image"):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
            if size is not None:
                f.truncate(size)
        return path

    def open(self, path, mode="rw", **kw):
        kw.setdefault("direct", self.direct)
        return FileBackend(path, mode, **kw)

    def __repr__(self):
        return self.name


@pytest.fixture(params=STORAGE)
def storage(request, tmp_path):
    name = request.param
    if name == "ext4-direct":
        return Storage(name, tmp_path, True)
    if name == "ext4-buffered":
        return Storage(name, tmp_path, False)
    if name == "tmpfs-direct":
        return Storage(name, request.getfixturevalue("shm"), True)
    return Storage(name, request.getfixturevalue("ramfs"), True)


def supports_direct(dir):
    path = os.path.join(dir, "probe")
    open(path, "wb").close()
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError as e:
        assert e.errno == errno.EINVAL
        return False
    finally:
        os.unlink(path)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def random_bytes(rnd, n):
    return rnd.randbytes(n) if hasattr(rnd, "randbytes") else \
        bytes(rnd.getrandbits(8) for _ in range(n))


def apply_op(b, model, rnd, op, offset, length, step):
    """Do one write, zero or read on backend `b` and on its bytearray model;
    a read must match the model."""
    if op == "write":
        data = random_bytes(rnd, length)
        b.write(offset, data)
        model[offset:offset + length] = data
    elif op == "zero":
        b.zero(offset, length)
        model[offset:offset + length] = bytes(length)
    else:
        buf = bytearray(length)
        assert b.readinto(offset, buf) == length
        assert buf == model[offset:offset + length], (step, offset)


# Opening

def test_open_missing(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(errors.NotFound) as e:
        open_backend(f"file://{missing}", "r")
    assert str(missing) in str(e.value)


@pytest.mark.parametrize("url,error", [
    ("gopher://localhost/export", errors.BadRequest),
    ("ftp://host/image", errors.BadRequest),
    ("/var/tmp/image", errors.BadRequest),
    ("file://host/var/tmp/image", errors.BadRequest),
    ("file:relative/image", errors.BadRequest),
    ("file:///var/tmp/image?x=1", errors.BadRequest),
])
def test_open_invalid_url(url, error):
    with pytest.raises(error):
        open_backend(url, "r")


def test_open_invalid_mode(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x")
    with pytest.raises(errors.BadRequest):
        open_backend(f"file://{path}", "w")


def test_open_directory(tmp_path):
    with pytest.raises(errors.BadRequest):
        open_backend(f"file://{tmp_path}", "r")


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "swapped-in"])
@pytest.mark.parametrize("mode", ["r", "rw"])
def test_open_fifo_never_blocks(tmp_path, monkeypatch, checked, mode):
    # Opening a FIFO for reading blocks until a writer comes. It is refused
    # before the open; and if it replaced the image after that check
    # ("swapped-in": the check does not see it), the open does not block
    # and the type of what was opened is refused.
    from imaged.backends import file as file_backend
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if not checked:
        monkeypatch.setattr(file_backend, "check_path", lambda path: None)
    result = {}

    def open_it():
        try:
            FileBackend(str(fifo), mode).close()
            result["opened"] = True
        except errors.BadRequest as e:
            result["error"] = str(e)

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(5)
    blocked = t.is_alive()
    if blocked:
        # Let it go: a writer (O_RDWR never blocks on a FIFO).
        os.close(os.open(fifo, os.O_RDWR))
        t.join(5)
    assert not blocked, "opening a FIFO blocked"
    assert "Not a regular file or block device" in result.get("error", ""), result


def test_opened_image_is_blocking(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x" * 8192)
    import fcntl
    with FileBackend(str(path), "rw") as b:
        assert not fcntl.fcntl(b.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_open_backend(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x" * 5000)
    with open_backend(f"file://{path}", "rw", OpenOptions(sparse=True)) as b:
        assert isinstance(b, FileBackend)
        assert b.size() == 5000
        assert b.sparse
        assert b.block_size == 4096
        assert b.direct == supports_direct(tmp_path)


def test_direct_fallback(storage):
    path = storage.create(b"x" * 100)
    with storage.open(path) as b:
        assert b.direct == (storage.direct and supports_direct(storage.dir))


def test_ramfs_has_no_direct_io(ramfs):
    # Make sure the fallback is really tested.
    path = Storage("ramfs", ramfs, True).create(b"x")
    with FileBackend(path, "rw") as b:
        assert not b.direct


def test_close_twice(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x")
    b = FileBackend(str(path), "r")
    b.close()
    b.close()


# Reading

OFFSETS = [0, 1, 511, 4095, 4096, 4097, 8191, ODD_SIZE - 1000, ODD_SIZE - 1]
LENGTHS = [1, 511, 4096, 4097, 8193, ODD_SIZE]


def test_read_odd_ranges(storage):
    data = random_bytes(random.Random(1), ODD_SIZE)
    path = storage.create(data)
    with storage.open(path, "r") as b:
        for offset in OFFSETS:
            for length in LENGTHS:
                buf = bytearray(length)
                n = b.readinto(offset, buf)
                expected = data[offset:offset + length]
                assert n == len(expected), (offset, length)
                assert buf[:n] == expected, (offset, length)


def test_read_unaligned_memory(storage):
    data = random_bytes(random.Random(2), 3 * MiB + 4096)
    path = storage.create(data)
    mem = util.aligned_buffer(3 * MiB + 4096)
    try:
        with storage.open(path, "r") as b, memoryview(mem) as view:
            # Aligned offset and length, unaligned memory, larger than the
            # bounce buffer.
            assert b.readinto(4096, view[1:3 * MiB + 1]) == 3 * MiB
            assert view[1:3 * MiB + 1] == data[4096:3 * MiB + 4096]
            # Everything aligned.
            assert b.readinto(0, view) == len(data)
            assert view == data
    finally:
        mem.close()


def test_read_at_end(storage):
    path = storage.create(b"x" * ODD_SIZE)
    with storage.open(path, "r") as b:
        buf = bytearray(8192)
        assert b.readinto(ODD_SIZE, buf) == 0
        assert b.readinto(ODD_SIZE + 10000, buf) == 0
        assert b.readinto(ODD_SIZE - 1, buf) == 1


def test_read_negative_offset(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x")
    with FileBackend(str(path), "r") as b:
        with pytest.raises(errors.BadRequest):
            b.readinto(-1, bytearray(1))


# Writing

def test_write_odd_ranges(storage):
    rnd = random.Random(3)
    model = bytearray(random_bytes(rnd, ODD_SIZE))
    path = storage.create(model)
    with storage.open(path) as b:
        for offset in OFFSETS:
            for length in LENGTHS:
                length = min(length, ODD_SIZE - offset)
                data = random_bytes(rnd, length)
                assert b.write(offset, data) == length
                model[offset:offset + length] = data
        b.flush()
        assert b.size() == ODD_SIZE
    assert read_file(path) == model


def test_write_tail(storage):
    model = bytearray(b"a" * ODD_SIZE)
    path = storage.create(model)
    with storage.open(path) as b:
        # Last byte, last partial block, and a range crossing into it.
        for offset, data in [(ODD_SIZE - 1, b"B"), (3 * 4096, b"C" * 1000),
                             (3 * 4096 - 10, b"D" * 20),
                             (4095, b"E" * (ODD_SIZE - 4095))]:
            b.write(offset, data)
            model[offset:offset + len(data)] = data
            buf = bytearray(ODD_SIZE)
            assert b.readinto(0, buf) == ODD_SIZE
            assert buf == model
    assert read_file(path) == model


@pytest.mark.parametrize("offset,length", [
    (ODD_SIZE, 1),
    (ODD_SIZE - 1, 2),
    (0, ODD_SIZE + 1),
    (ODD_SIZE + 4096, 4096),
])
def test_write_past_end(storage, offset, length):
    data = b"x" * ODD_SIZE
    path = storage.create(data)
    with storage.open(path) as b:
        with pytest.raises(errors.RangeNotSatisfiable) as e:
            b.write(offset, b"y" * length)
        assert e.value.size == ODD_SIZE
        assert b.size() == ODD_SIZE
    assert read_file(path) == data


def test_write_large_unaligned(storage):
    rnd = random.Random(4)
    size = 4 * MiB
    model = bytearray(size)
    path = storage.create(size=size)
    mem = util.aligned_buffer(3 * MiB + 4096)
    try:
        with storage.open(path) as b, memoryview(mem) as view:
            view[:] = random_bytes(rnd, len(view))
            cases = [
                (0, view[:3 * MiB]),                # aligned
                (4096, view[1:3 * MiB + 1]),        # unaligned memory
                (4097, view[:3 * MiB + 5]),         # unaligned offset
                (1, bytes(view[:3 * MiB])),         # read-only buffer
                (8192, bytes(view[:2 * MiB])),      # read-only, aligned
            ]
            for offset, buf in cases:
                b.write(offset, buf)
                model[offset:offset + len(buf)] = buf
            del cases, buf  # Release the views, so mem can be closed.
            b.flush()
    finally:
        mem.close()
    assert read_file(path) == model


def test_write_readonly(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x" * 4096)
    with FileBackend(str(path), "r") as b:
        with pytest.raises(errors.Forbidden):
            b.write(0, b"y")
        with pytest.raises(errors.Forbidden):
            b.zero(0, 1)
    assert path.read_bytes() == b"x" * 4096


def test_flush(storage):
    path = storage.create(size=8192)
    with storage.open(path) as b:
        b.write(1, b"data")
        b.flush()
    with storage.open(path, "r") as b:
        b.flush()
    assert read_file(path)[:5] == b"\0data"


def test_write_no_space(tmp_path):
    # A tiny tmpfs produces a real ENOSPC.
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount("tmpfs", mnt, "size=256k")
    try:
        path = Storage("small", mnt, True).create(size=4 * MiB)
        with FileBackend(path, "rw") as b:
            with pytest.raises(errors.StorageError) as e:
                b.write(0, b"x" * (2 * MiB))
        message = str(e.value)
        assert "write failed at offset" in message
        assert "ENOSPC" in message
        assert isinstance(e.value.__cause__, OSError)
        assert e.value.__cause__.errno == errno.ENOSPC
    finally:
        _umount(mnt)


# Zeroing

@pytest.mark.parametrize("sparse", [True, False])
def test_zero_odd_ranges(storage, sparse):
    rnd = random.Random(5)
    model = bytearray(random_bytes(rnd, ODD_SIZE))
    path = storage.create(model)
    ranges = [(1, 1), (4095, 2), (100, 8193), (4096, 4096), (0, 4096),
              (ODD_SIZE - 1, 1), (ODD_SIZE - 5000, 5000), (0, ODD_SIZE)]
    with storage.open(path, sparse=sparse) as b:
        for offset, length in ranges:
            b.zero(offset, length)
            model[offset:offset + length] = bytes(length)
            assert b.size() == ODD_SIZE
            buf = bytearray(ODD_SIZE)
            assert b.readinto(0, buf) == ODD_SIZE
            assert buf == model, (offset, length)
            # Put back data for the next range.
            data = random_bytes(rnd, ODD_SIZE)
            b.write(0, data)
            model[:] = data
    assert read_file(path) == model


def _allocated(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("sparse", [True, False])
def test_zero_allocation(storage, sparse):
    if storage.name == "ramfs":
        pytest.skip("ramfs does not track allocation")
    size = 8 * MiB
    path = storage.create(b"x" * size)
    with storage.open(path, sparse=sparse) as b:
        b.flush()
        before = _allocated(path)
        b.zero(MiB, 4 * MiB)
        b.flush()
        after = _allocated(path)
        buf = bytearray(size)
        assert b.readinto(0, buf) == size
    assert buf == b"x" * MiB + bytes(4 * MiB) + b"x" * (3 * MiB)
    if sparse:
        assert after == before - 4 * MiB
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
            assert os.lseek(fd, MiB, os.SEEK_DATA) == 5 * MiB
        finally:
            os.close(fd)
    else:
        assert after == before


def test_zero_large(storage):
    # Larger than the zero buffer used when the storage cannot zero.
    size = 5 * MiB + 1000
    path = storage.create(b"x" * size)
    with storage.open(path) as b:
        b.zero(3, size - 3)
    assert read_file(path) == b"xxx" + bytes(size - 3)


@pytest.mark.parametrize("offset,length", [
    (ODD_SIZE, 1),
    (ODD_SIZE - 1, 2),
    (0, ODD_SIZE + 1),
])
def test_zero_past_end(storage, offset, length):
    data = b"x" * ODD_SIZE
    path = storage.create(data)
    with storage.open(path) as b:
        with pytest.raises(errors.RangeNotSatisfiable):
            b.zero(offset, length)
        assert b.size() == ODD_SIZE
    assert read_file(path) == data


def test_zero_nothing(storage):
    path = storage.create(b"x" * 100)
    with storage.open(path) as b:
        b.zero(100, 0)
        b.zero(5, 0)
    assert read_file(path) == b"x" * 100


# Extents

def clip(extents, start, end):
    """Clip the extents of a whole file to [start, end)."""
    result = []
    for e in extents:
        s = max(e.start, start)
        t = min(e.start + e.length, end)
        if s < t:
            result.append(Extent(s, t - s, e.zero, e.hole))
    return result


def check_extents(extents, start, end):
    pos = start
    for i, e in enumerate(extents):
        assert e.start == pos and e.length > 0
        assert e.hole is False
        if i:
            assert e.zero != extents[i - 1].zero
        pos += e.length
    assert pos == end


@pytest.fixture(params=["ext4", "tmpfs"])
def sparse_image(request, tmp_path):
    """A 10 MiB sparse file with holes and data, and its extents."""
    dir = tmp_path if request.param == "ext4" else \
        request.getfixturevalue("shm")
    path = os.path.join(dir, "sparse")
    with open(path, "wb") as f:
        f.truncate(10 * MiB)
        for offset, length in [(MiB, 8192), (3 * MiB, 4096),
                               (9 * MiB, MiB)]:
            f.seek(offset)
            f.write(b"d" * length)
    expected = [
        Extent(0, MiB, True),
        Extent(MiB, 8192, False),
        Extent(MiB + 8192, 2 * MiB - 8192, True),
        Extent(3 * MiB, 4096, False),
        Extent(3 * MiB + 4096, 6 * MiB - 4096, True),
        Extent(9 * MiB, MiB, False),
    ]
    return path, expected


def test_extents_whole(sparse_image):
    path, expected = sparse_image
    with FileBackend(path, "r") as b:
        assert list(b.extents()) == expected
        assert list(b.extents(0, None)) == expected
        assert list(b.extents(0, 100 * MiB)) == expected


@pytest.mark.parametrize("start,length", [
    (0, 1),
    (0, MiB),
    (1, MiB),
    (MiB - 1, 2),
    (MiB + 4096, 4096),
    (MiB + 100, 3 * MiB),
    (5 * MiB, 5 * MiB),
    (9 * MiB + 1, 10 * MiB),
    (10 * MiB - 1, 1),
])
def test_extents_window(sparse_image, start, length):
    path, expected = sparse_image
    end = min(start + length, 10 * MiB)
    with FileBackend(path, "r") as b:
        extents = list(b.extents(start, length))
    assert extents == clip(expected, start, end)
    check_extents(extents, start, end)


def test_extents_outside(sparse_image):
    path, _ = sparse_image
    with FileBackend(path, "r") as b:
        assert list(b.extents(10 * MiB)) == []
        assert list(b.extents(20 * MiB, MiB)) == []
        assert list(b.extents(0, 0)) == []
        with pytest.raises(errors.BadRequest):
            b.extents(-1)
        with pytest.raises(errors.BadRequest):
            b.extents(0, -1)


def test_extents_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with FileBackend(str(path), "r") as b:
        assert list(b.extents()) == []


def test_extents_hole_at_end(tmp_path):
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(MiB + 10)
    with FileBackend(str(path), "r") as b:
        assert list(b.extents()) == [
            Extent(0, 4096, False), Extent(4096, MiB + 10 - 4096, True)]
        assert list(b.extents(4000, 200)) == [
            Extent(4000, 96, zero=False, hole=False),
            Extent(4096, 104, zero=True, hole=False),
        ]


def test_extents_no_seek_data(ramfs):
    # ramfs reports everything as data.
    path = Storage("ramfs", ramfs, True).create(size=MiB)
    with FileBackend(path, "r") as b:
        assert list(b.extents()) == [Extent(0, MiB, False)]


def test_extents_after_zero(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x" * (4 * MiB))
    with FileBackend(str(path), "rw", sparse=True) as b:
        b.zero(MiB, MiB)
        assert list(b.extents()) == [
            Extent(0, MiB, False),
            Extent(MiB, MiB, True),
            Extent(2 * MiB, 2 * MiB, False),
        ]


def test_extents_fragmented(tmp_path):
    count = 10000
    size = GiB
    stride = util.round_down(size // count, 4096)
    path = str(tmp_path / "fragmented")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
        for i in range(count):
            os.pwrite(fd, b"d" * 4096, i * stride + stride // 2 // 4096 * 4096)
    finally:
        os.close(fd)

    with FileBackend(path, "r") as b:
        start = time.monotonic()
        extents = list(b.extents())
        elapsed = time.monotonic() - start
    print(f"extents of {count} data extents: {elapsed:.3f} s")

    check_extents(extents, 0, size)
    data = [e for e in extents if not e.zero]
    assert len(data) == count
    for i, e in enumerate(data):
        assert e.start == i * stride + stride // 2 // 4096 * 4096
        assert e.length == 4096
    assert len(extents) == 2 * count + 1


# Concurrency

def test_concurrent_rmw(storage):
    """
    Writers with their own backends update adjacent unaligned ranges sharing
    blocks; with a shared lock no update may be lost.
    """
    threads = 8
    rounds = 40
    segment = 37
    size = 4 * 4096
    segments = size // segment
    path = storage.create(size=size)
    lock = threading.Lock()
    failures = []

    def value(t, r):
        return (t * 31 + r) % 251 + 1

    def writer(t):
        try:
            with storage.open(path, rmw_lock=lock) as b:
                for r in range(rounds):
                    data = bytes([value(t, r)]) * segment
                    for s in range(t, segments, threads):
                        b.write(s * segment, data)
        except Exception as e:
            failures.append(e)

    workers = [threading.Thread(target=writer, args=(t,))
               for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures

    content = read_file(path)
    for s in range(segments):
        expected = bytes([value(s % threads, rounds - 1)]) * segment
        assert content[s * segment:(s + 1) * segment] == expected, s


@pytest.mark.parametrize("sparse", [True, False])
def test_random_operations(storage, sparse):
    rnd = random.Random(f"{storage.name}-{sparse}")
    size = MiB + 1234
    model = bytearray(random_bytes(rnd, size))
    path = storage.create(model)
    with storage.open(path, sparse=sparse) as b:
        for i in range(300):
            op = rnd.choice(["write", "write", "zero", "read"])
            offset = rnd.randrange(size)
            length = min(rnd.choice([1, 100, 4096, 40000, 300000]),
                         size - offset)
            if rnd.random() < 0.5:
                length = rnd.randint(1, length)
            apply_op(b, model, rnd, op, offset, length, step=i)
        b.flush()
    assert read_file(path) == model


# Block devices

@pytest.fixture
def loop_device(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("loop devices require root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB + 3 * 512)
    res = subprocess.run(["losetup", "--find", "--show", str(backing)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot create a loop device: {res.stderr.strip()}")
    device = res.stdout.strip()
    yield device, str(backing)
    subprocess.run(["losetup", "--detach", device], check=True)


def test_device_properties(loop_device):
    device, backing = loop_device
    with open_backend(f"file://{device}", "r") as b:
        assert b.size() == 8 * MiB + 3 * 512
        assert b.block_size in (512, 4096)
        assert b.direct
        assert list(b.extents()) == [Extent(0, 8 * MiB + 3 * 512, False)]
        assert list(b.extents(100, 1000)) == [Extent(100, 1000, False)]


@pytest.mark.parametrize("sparse", [True, False])
def test_device_random_operations(loop_device, sparse):
    device, backing = loop_device
    rnd = random.Random(f"device-{sparse}")
    size = 8 * MiB + 3 * 512
    model = bytearray(size)
    with FileBackend(device, "rw", sparse=sparse) as b:
        data = random_bytes(rnd, size)
        b.write(0, data)
        model[:] = data
        for i in range(200):
            op = rnd.choice(["write", "zero", "read"])
            offset = rnd.randrange(size)
            length = min(rnd.choice([1, 513, 4096, 40000, 2 * MiB]),
                         size - offset)
            apply_op(b, model, rnd, op, offset, length, step=i)
        b.zero(0, 4 * MiB)
        model[:4 * MiB] = bytes(4 * MiB)
        b.flush()
        with pytest.raises(errors.RangeNotSatisfiable):
            b.write(size - 1, b"xx")
        buf = bytearray(size)
        assert b.readinto(0, buf) == size
        assert buf == model
    assert read_file(backing) == model
