"""
NbdBackend against real qemu-nbd exports of qcow2 (and raw) images: data,
holes, a backing chain, a dirty bitmap, and servers that die or hang.
"""

import os
import signal
import time

import gevent
import gevent.lock
import pytest

from imaged import errors
from imaged import ops
from imaged import sessions
from imaged.backends import Extent, OpenOptions, open_backend
from imaged.backends import nbd as nbd_backend

from tests.nbd_helpers import (  # noqa: F401 (qemu_nbd is a fixture)
    CHAIN_EXTENTS, CHAIN_SIZE, TOP_ONLY_EXTENTS, GiB, KiB, MiB, guest_bytes,
    make_chain, make_dirty, make_qcow2, needs_nbd, qemu_img, qemu_nbd,
    short_dir)

pytestmark = needs_nbd


@pytest.fixture
def chain(tmp_path):
    return make_chain(str(tmp_path))


def open_nbd(url, mode="r", **options):
    """Open an NBD url as the images service does (through the registry)."""
    return open_backend(url, mode, OpenOptions(**options))


def read_all(backend, size, chunk=3 * MiB + 7):
    out = bytearray()
    buf = bytearray(chunk)
    pos = 0
    while pos < size:
        n = backend.readinto(pos, buf)
        assert n > 0
        out += buf[:n]
        pos += n
    return bytes(out)


def as_tuples(extents):
    return [(e.start, e.length, e.zero, e.hole) for e in extents]


# Connecting through every URL form.

@pytest.mark.parametrize("tcp,export,form", [
    (False, None, "qemu-unix"),
    (False, "vol-1", "qemu-unix"),
    (False, "vol-1", "uri-unix"),
    (False, None, "uri-unix"),
    (True, None, "qemu-tcp"),
    (True, "vol-1", "qemu-tcp"),
    (True, "vol-1", "uri-tcp"),
])
def test_url_forms(qemu_nbd, chain, tcp, export, form):
    top, _, content = chain
    server = qemu_nbd(top, tcp=tcp, export=export)
    with open_nbd(server.url(form), "r") as b:
        assert b.size() == CHAIN_SIZE
        assert read_all(b, CHAIN_SIZE) == bytes(content)


def test_wrong_export_name(qemu_nbd, chain):
    server = qemu_nbd(chain[0], export="vol-1")
    with pytest.raises(errors.StorageError) as e:
        open_nbd(f"nbd:unix:{server.socket}:exportname=other", "r")
    assert "Cannot connect to NBD server" in e.value.message


# Reading and writing.

def test_read_unaligned(qemu_nbd, chain):
    top, _, content = chain
    with open_nbd(qemu_nbd(top).url(), "r") as b:
        for offset, length in [(0, 1), (MiB - 3, 7), (65535, 2 * MiB + 11),
                               (CHAIN_SIZE - 5, 5)]:
            buf = bytearray(length)
            assert b.readinto(offset, buf) == length
            assert buf == content[offset:offset + length]
        # At the end of the export: short, then nothing.
        buf = bytearray(10)
        assert b.readinto(CHAIN_SIZE - 4, buf) == 4
        assert b.readinto(CHAIN_SIZE, buf) == 0


def test_write_zero_flush(qemu_nbd, chain):
    top, base, content = chain
    base_before = guest_bytes(base)
    server = qemu_nbd(top)
    with open_nbd(server.url(), "rw") as b:
        data = os.urandom(3 * MiB + 5)
        assert b.write(MiB + 1, data) == len(data)
        content[MiB + 1:MiB + 1 + len(data)] = data
        # Memoryviews of larger buffers, as the daemon passes them.
        view = memoryview(bytearray(b"\x5a" * 100))[10:60]
        b.write(7 * MiB + 3, view)
        content[7 * MiB + 3:7 * MiB + 53] = bytes(view)
        b.zero(4 * MiB + 100, 300 * KiB)
        content[4 * MiB + 100:4 * MiB + 100 + 300 * KiB] = bytes(300 * KiB)
        b.flush()
        assert read_all(b, CHAIN_SIZE) == bytes(content)
    server.stop()
    assert guest_bytes(top) == bytes(content)
    # Writes go to the top layer only.
    assert guest_bytes(base) == base_before


def test_write_past_end(qemu_nbd, chain):
    top, _, content = chain
    with open_nbd(qemu_nbd(top).url(), "rw") as b:
        with pytest.raises(errors.RangeNotSatisfiable):
            b.write(CHAIN_SIZE - 10, b"x" * 11)
        with pytest.raises(errors.RangeNotSatisfiable):
            b.zero(CHAIN_SIZE - 10, 11)
        assert read_all(b, CHAIN_SIZE) == bytes(content)


def test_read_only(qemu_nbd, chain):
    top, _, content = chain
    server = qemu_nbd(top)
    with open_nbd(server.url(), "r") as b:
        with pytest.raises(errors.Forbidden):
            b.write(0, b"x")
        with pytest.raises(errors.Forbidden):
            b.zero(0, 1)
    server.stop()
    # A read-only export refuses a writer at once.
    ro = qemu_nbd(top, read_only=True)
    with pytest.raises(errors.Forbidden):
        open_nbd(ro.url(), "rw")
    ro.stop()
    assert guest_bytes(top) == bytes(content)


@pytest.mark.parametrize("sparse", [False, True])
def test_zero_sparse(qemu_nbd, tmp_path, sparse):
    # A raw file shows what the server did: NO_HOLE keeps blocks allocated,
    # a sparse zero punches a hole.
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.write(b"\xee" * (8 * MiB))
        os.fsync(f.fileno())
    before = os.stat(path).st_blocks
    server = qemu_nbd(path, fmt="raw")
    with open_nbd(server.url(), "rw", sparse=sparse) as b:
        assert b.sparse is sparse
        b.zero(MiB, 4 * MiB)
        b.flush()
        buf = bytearray(6 * MiB)
        b.readinto(0, buf)
    assert buf[:MiB] == b"\xee" * MiB
    assert buf[MiB:5 * MiB] == bytes(4 * MiB)
    assert buf[5 * MiB:] == b"\xee" * MiB
    after = os.stat(path).st_blocks
    if sparse:
        assert after <= before - 4 * MiB // 512
    else:
        assert after == before


def test_zero_large_range(qemu_nbd, tmp_path):
    # Zero requests are split below the server's limit (2 GiB - 512 for
    # qemu-nbd); 5 GiB at an odd offset takes several.
    path = str(tmp_path / "big.qcow2")
    make_qcow2(path, 6 * GiB, [(GiB, MiB, 0x11), (5 * GiB + 5, 10, 0x12)])
    with open_nbd(qemu_nbd(path).url(), "rw") as b:
        b.zero(3, 5 * GiB + 4)
        b.flush()
        buf = bytearray(16)
        b.readinto(5 * GiB, buf)
        assert buf == bytes(7) + b"\x12" * 8 + bytes(1)
        b.readinto(GiB, buf)
        assert buf == bytes(16)


# Extents.

def test_extents_backing_chain(qemu_nbd, chain):
    top, _, _ = chain
    with open_nbd(qemu_nbd(top).url(), "r") as b:
        assert as_tuples(b.extents()) == CHAIN_EXTENTS
        assert b.capabilities.extents == ("zero",)


def test_extents_without_backing_file(qemu_nbd, chain):
    # How a backup reads one layer: hole wherever this layer has nothing.
    top, _, _ = chain
    with open_nbd(qemu_nbd(top, backing=False).url(), "r") as b:
        assert as_tuples(b.extents()) == TOP_ONLY_EXTENTS


def test_extents_without_allocation_depth(qemu_nbd, chain):
    # Without qemu:allocation-depth nothing is known to be a hole.
    top, _, _ = chain
    with open_nbd(qemu_nbd(top, depth=False).url(), "r") as b:
        exts = as_tuples(b.extents())
    assert all(not hole for _, _, _, hole in exts)
    assert exts == [(0, 64 * KiB, True, False), (64 * KiB, 2 * MiB - 64 * KiB, False, False),
                    (2 * MiB, 2 * MiB, True, False), (4 * MiB, MiB, False, False),
                    (5 * MiB, 3 * MiB, True, False)]


@pytest.mark.parametrize("start,length", [
    (0, 1), (100, MiB), (MiB - 1, 2), (3 * MiB, 3 * MiB + 5), (5 * MiB, None),
    (CHAIN_SIZE - 1, None), (CHAIN_SIZE, None), (0, 100 * MiB),
])
def test_extents_window(qemu_nbd, chain, start, length):
    top, _, _ = chain
    with open_nbd(qemu_nbd(top).url(), "r") as b:
        got = as_tuples(b.extents(start, length))
    end = CHAIN_SIZE if length is None else min(start + length, CHAIN_SIZE)
    want = []
    for s, n, zero, hole in CHAIN_EXTENTS:
        lo, hi = max(s, start), min(s + n, end)
        if lo < hi:
            want.append((lo, hi - lo, zero, hole))
    assert got == want


def test_extents_huge_sparse_export(qemu_nbd, tmp_path):
    # 8 TiB with data near both ends: many block status steps (each below
    # 4 GiB), all covered, the data found.
    path = str(tmp_path / "huge.qcow2")
    size = 8 * 1024 * GiB
    make_qcow2(path, size, [(MiB, MiB, 0x1), (size - 2 * MiB, 64 * KiB, 0x2)])
    with open_nbd(qemu_nbd(path).url(), "r") as b:
        exts = as_tuples(b.extents())
        assert exts == [
            (0, MiB, True, True), (MiB, MiB, False, False),
            (2 * MiB, size - 4 * MiB, True, True),
            (size - 2 * MiB, 64 * KiB, False, False),
            (size - 2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, True, True)]
        # A window in the middle, not aligned to the steps.
        window = as_tuples(b.extents(3 * GiB + 5, 5 * GiB))
        assert window == [(3 * GiB + 5, 5 * GiB, True, True)]


def test_dirty_extents(qemu_nbd, tmp_path):
    path, content, dirty = make_dirty(str(tmp_path))
    server = qemu_nbd(path, bitmap="b0")
    with open_nbd(server.url(), "r", dirty=True) as b:
        assert b.capabilities.extents == ("zero", "dirty")
        exts = list(b.extents(context="dirty"))
        assert exts[0].start == 0
        assert sum(e.length for e in exts) == b.size()
        got = [(e.start, e.length) for e in exts if e.dirty]
        assert got == dirty
        # zero comes from base:allocation: the zeroed dirty range reads as
        # zeroes, the other dirty ranges are data.
        zeros = {(e.start, e.length): e.zero for e in exts if e.dirty}
        assert zeros == {(MiB, 64 * KiB): False, (3 * MiB, 64 * KiB): False,
                         (6 * MiB + 128 * KiB, 128 * KiB): True}
        for e in exts:
            if e.zero:
                assert not any(content[e.start:e.start + e.length])
        # A window.
        window = list(b.extents(MiB + 32 * KiB, 2 * MiB, context="dirty"))
        assert [(e.start, e.length, e.dirty, e.zero) for e in window] == [
            (MiB + 32 * KiB, 32 * KiB, True, False),
            (MiB + 64 * KiB, MiB - 64 * KiB, False, False),
            (2 * MiB, MiB, False, True),
            (3 * MiB, 32 * KiB, True, False)]
        # Zero extents still work on the same connection.
        assert sum(e.length for e in b.extents()) == b.size()


def test_dirty_extents_unavailable(qemu_nbd, tmp_path, chain):
    path, _, _ = make_dirty(str(tmp_path))
    server = qemu_nbd(path, bitmap="b0")
    # Not asked for.
    with open_nbd(server.url(), "r") as b:
        assert b.capabilities.extents == ("zero",)
        with pytest.raises(errors.NotFound):
            list(b.extents(context="dirty"))
    # Asked for, but the export has no bitmap.
    with open_nbd(qemu_nbd(chain[0]).url(), "r", dirty=True) as b:
        assert b.capabilities.extents == ("zero",)
        with pytest.raises(errors.NotFound) as e:
            list(b.extents(context="dirty"))
        assert "no dirty bitmap" in e.value.message


# Capabilities.

@pytest.mark.parametrize("shared,max_writers", [(1, 1), (4, None)])
def test_multi_conn(qemu_nbd, chain, shared, max_writers):
    # qemu-nbd offers multi-conn only when it serves several clients.
    with open_nbd(qemu_nbd(chain[0], shared=shared).url(), "rw") as b:
        assert b.capabilities.max_writers == max_writers
        assert b.capabilities.fixed_size is True


# Faults.

def test_unreachable_socket(tmp_path):
    sock = os.path.join(short_dir(), "missing.sock")
    start = time.monotonic()
    with pytest.raises(errors.StorageError) as e:
        open_nbd(f"nbd:unix:{sock}", "r")
    assert time.monotonic() - start < 5
    assert sock in e.value.message
    assert e.value.status == 500


def test_unreachable_tcp_port():
    from tests.nbd_helpers import free_port
    with pytest.raises(errors.StorageError) as e:
        open_nbd(f"nbd://127.0.0.1:{free_port()}/x", "r")
    assert "Cannot connect" in e.value.message


def test_server_killed(qemu_nbd, chain):
    top, _, content = chain
    server = qemu_nbd(top)
    b = open_nbd(server.url(), "rw")
    try:
        b.write(0, b"unflushed")
        server.kill(signal.SIGKILL)
        server.proc.wait()
        buf = bytearray(MiB)
        with pytest.raises(errors.StorageError) as e:
            b.readinto(0, buf)
        assert "NBD read failed" in e.value.message
        # The server is gone: connecting again fails too, with a message.
        with pytest.raises(errors.StorageError):
            b.readinto(0, buf)
        # Back again (the host agent restarted it): the next call connects,
        # but a flush must not claim the write on the dead connection is safe.
        again = qemu_nbd(top)
        b._address = b._address._replace(path=again.socket)
        with pytest.raises(errors.StorageError) as e:
            b.flush()
        assert "lost before a flush" in e.value.message
        assert b.readinto(MiB, buf) == MiB
        assert buf == content[MiB:2 * MiB]
        b.flush()
    finally:
        b.close()


def test_server_hangs(qemu_nbd, chain):
    # A stopped server never answers: the call fails after the timeout.
    top, _, _ = chain
    server = qemu_nbd(top)
    b = open_nbd(server.url(), "r", timeout_s=0.5)
    try:
        server.kill(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(errors.StorageError) as e:
            b.readinto(0, bytearray(MiB))
        assert 0.4 < time.monotonic() - start < 5
        assert "within 0.5 s" in e.value.message
        with pytest.raises(errors.StorageError):
            list(b.extents())
        server.kill(signal.SIGCONT)
        # The stuck connection was dropped; a new one works.
        assert b.readinto(0, bytearray(10)) == 10
    finally:
        b.close()


def test_reads_on_the_event_loop(qemu_nbd, chain):
    # In a greenlet of the thread running gevent's hub, a read waits by
    # yielding to the loop: other greenlets run while it waits, the data is
    # the same, and a stopped server still fails it after the timeout.
    top, _, _ = chain
    content = guest_bytes(top)
    server = qemu_nbd(top)
    b = open_nbd(server.url(), "r", timeout_s=0.5)
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.02)

    t = gevent.spawn(ticker)
    try:
        assert gevent.spawn(read_all, b, CHAIN_SIZE).get() == content
        server.kill(signal.SIGSTOP)
        before = len(ticks)
        start = time.monotonic()
        with pytest.raises(errors.StorageError) as e:
            gevent.spawn(b.readinto, 0, bytearray(MiB)).get()
        assert 0.4 < time.monotonic() - start < 5
        assert "within 0.5 s" in e.value.message
        # The loop ran all along (a tick every 20 ms for 0.5 s).
        assert len(ticks) - before >= 10
        server.kill(signal.SIGCONT)
        buf = bytearray(10)
        assert gevent.spawn(b.readinto, 0, buf).get() == 10
        assert buf == content[:10]
        # The request deadline is armed again after it fired.
        server.kill(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(errors.StorageError) as e:
            gevent.spawn(b.readinto, MiB, bytearray(MiB)).get()
        assert 0.4 < time.monotonic() - start < 5
        assert "no answer to request within 0.5 s" in e.value.message
    finally:
        server.kill(signal.SIGCONT)
        t.kill()
        b.close()


def test_connect_hangs(qemu_nbd, chain):
    server = qemu_nbd(chain[0])
    server.kill(signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(errors.StorageError) as e:
        open_nbd(server.url(), "r", timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert "within 0.5 s" in e.value.message


def test_pipelined_requests(qemu_nbd, chain, monkeypatch):
    # A read larger than a request is split into several in flight; the
    # result is the same whatever the split.
    top, _, content = chain
    monkeypatch.setattr(nbd_backend, "REQUEST_BYTES", 64 * KiB + 512)
    with open_nbd(qemu_nbd(top).url(), "rw") as b:
        assert read_all(b, CHAIN_SIZE, chunk=CHAIN_SIZE) == bytes(content)
        data = os.urandom(3 * MiB)
        b.write(100, data)
        buf = bytearray(3 * MiB)
        b.readinto(100, buf)
        assert buf == data


# Read-ahead: on a read-only export, called on the event loop, the next
# data extent is read while the caller does other things.

def on_loop(fn, *args):
    """Call fn(*args) in a greenlet of the event loop, as the service does."""
    return gevent.spawn(fn, *args).get()


@pytest.fixture
def ahead_buffers(monkeypatch):
    """One read-ahead buffer of 256 KiB for the whole test (as the daemon's)."""
    pool = nbd_backend._AheadBuffers(1, 256 * KiB)
    monkeypatch.setattr(nbd_backend, "_ahead_buffers", pool)
    return pool


def test_read_ahead(qemu_nbd, chain, ahead_buffers):
    top, _, _ = chain
    content = guest_bytes(top)
    server = qemu_nbd(top, read_only=True)
    b = open_nbd(server.url(), "r")
    other = open_nbd(server.url(), "r")
    try:
        # After [64 KiB, 2 MiB) the next data is at 4 MiB (CHAIN_EXTENTS):
        # its first 256 KiB (the buffer) are read ahead.
        on_loop(b.read_ahead, 2 * MiB)
        assert b._ahead[0][:2] == [4 * MiB, 256 * KiB]
        # The loop takes the replies in while this greenlet does other
        # things (a watcher, no call into the backend).
        deadline = time.monotonic() + 5
        while b._h.aio_in_flight() and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert not b._h.aio_in_flight()
        # The daemon's only buffer is taken: no read-ahead for another.
        on_loop(other.read_ahead, 2 * MiB)
        assert not other._ahead
        # A read of the whole extent: the read-ahead, then the rest.
        buf = bytearray(MiB)
        assert on_loop(b.readinto, 4 * MiB, buf) == MiB
        assert buf == content[4 * MiB:5 * MiB]
        assert not b._ahead and len(ahead_buffers._free) == 1
        # Inside a data extent, the read-ahead starts where the read ended.
        on_loop(b.read_ahead, 4 * MiB + 100)
        assert b._ahead[0][:2] == [4 * MiB + 100, 256 * KiB]
        buf = bytearray(10)
        assert on_loop(b.readinto, 4 * MiB + 100, buf) == 10
        assert buf == content[4 * MiB + 100:4 * MiB + 110]
        # Nothing after 5 MiB but holes: nothing to read ahead.
        on_loop(b.read_ahead, 5 * MiB)
        assert not b._ahead and len(ahead_buffers._free) == 1
    finally:
        b.close()
        other.close()


def test_read_ahead_not_asked_for(qemu_nbd, chain, ahead_buffers):
    # A read elsewhere, extents, or closing take the read-ahead in and
    # give its buffer back; the data read is the data asked for.
    top, _, _ = chain
    content = guest_bytes(top)
    b = open_nbd(qemu_nbd(top, read_only=True).url(), "r")
    try:
        on_loop(b.read_ahead, 0)
        assert b._ahead[0][:2] == [64 * KiB, 256 * KiB]
        # A read elsewhere on the loop leaves it in flight.
        buf = bytearray(100 * KiB)
        assert on_loop(b.readinto, 64 * KiB + 1, buf) == len(buf)
        assert buf == content[64 * KiB + 1:164 * KiB + 1]
        assert b._ahead[0][:2] == [64 * KiB, 256 * KiB]
        # Off the loop (after settle(), as the service calls it) too.
        on_loop(b.settle)
        assert gevent.get_hub().threadpool.apply(b.readinto, (64 * KiB + 1, buf)) == len(buf)
        assert buf == content[64 * KiB + 1:164 * KiB + 1]
        assert not b._ahead and len(ahead_buffers._free) == 1
        on_loop(b.read_ahead, 0)
        assert as_tuples(on_loop(lambda: list(b.extents()))) == CHAIN_EXTENTS
        assert not b._ahead
        on_loop(b.read_ahead, 0)
    finally:
        b.close()
    assert not b._ahead and len(ahead_buffers._free) == 1


def test_no_read_ahead(qemu_nbd, chain, ahead_buffers):
    # A writable export can change between two requests: no read-ahead;
    # nor off the event loop (a pool thread cannot leave reads in flight
    # for the loop to take in).
    top, _, _ = chain
    server = qemu_nbd(top)
    with open_nbd(server.url(), "r") as b:
        on_loop(b.read_ahead, 0)
        assert not b._ahead
    server.stop()   # It holds the image's write lock.
    with open_nbd(qemu_nbd(top, read_only=True).url(), "r") as b:
        gevent.get_hub().threadpool.apply(b.read_ahead, (0,))
        assert not b._ahead
    assert len(ahead_buffers._free) <= 1


def test_read_ahead_server_killed(qemu_nbd, chain, ahead_buffers):
    top, _, _ = chain
    server = qemu_nbd(top, read_only=True)
    b = open_nbd(server.url(), "r", timeout_s=2)
    try:
        on_loop(b.read_ahead, 0)
        server.kill(signal.SIGKILL)
        server.proc.wait()
        start = time.monotonic()
        with pytest.raises(errors.StorageError):
            on_loop(b.readinto, 64 * KiB, bytearray(MiB))
        assert time.monotonic() - start < 2
        assert not b._ahead and len(ahead_buffers._free) == 1
    finally:
        b.close()


def test_read_ahead_server_hangs(qemu_nbd, chain, ahead_buffers):
    # The read-ahead's reads time out, then the read's own connecting:
    # the read fails within two timeouts, and works once the server does.
    top, _, _ = chain
    content = guest_bytes(top)
    server = qemu_nbd(top, read_only=True)
    b = open_nbd(server.url(), "r", timeout_s=0.5)
    try:
        server.kill(signal.SIGSTOP)
        on_loop(b.read_ahead, 4 * MiB + 512 * KiB)
        start = time.monotonic()
        with pytest.raises(errors.StorageError) as e:
            on_loop(b.readinto, 4 * MiB + 512 * KiB, bytearray(MiB // 2))
        assert time.monotonic() - start < 3
        assert "within 0.5 s" in e.value.message
        assert not b._ahead and len(ahead_buffers._free) == 1
        server.kill(signal.SIGCONT)
        buf = bytearray(MiB // 2)
        assert on_loop(b.readinto, 4 * MiB + 512 * KiB, buf) == len(buf)
        assert buf == content[4 * MiB + 512 * KiB:5 * MiB]
    finally:
        server.kill(signal.SIGCONT)
        b.close()


def test_read_aheads_end_with_their_connection(qemu_nbd, chain, monkeypatch):
    # A read elsewhere leaves the read-aheads in flight; if it then loses
    # the connection, they go with it: their buffers come back, and the
    # next connection reads afresh (never waiting for, or sending, what was
    # asked on the lost one).
    pool = nbd_backend._AheadBuffers(3, 256 * KiB)
    monkeypatch.setattr(nbd_backend, "_ahead_buffers", pool)
    top, _, _ = chain
    content = guest_bytes(top)
    server = qemu_nbd(top, read_only=True)
    b = open_nbd(server.url(), "r", timeout_s=0.5)
    try:
        on_loop(b.read_ahead, 0)
        assert [e[0] for e in b._ahead] == [64 * KiB, 4 * MiB]
        deadline = time.monotonic() + 5
        while b._h.aio_in_flight() and time.monotonic() < deadline:
            gevent.sleep(0.01)
        server.kill(signal.SIGSTOP)
        with pytest.raises(errors.StorageError):
            on_loop(b.readinto, MiB, bytearray(100 * KiB))
        assert b._h is None and not b._ahead and b._drain is None
        assert len(pool._free) == pool._made
        server.kill(signal.SIGCONT)
        assert on_loop(b.read_ahead_view, 64 * KiB, 100) is None
        buf = bytearray(100 * KiB)
        assert on_loop(b.readinto, 64 * KiB, buf) == len(buf)
        assert buf == content[64 * KiB:164 * KiB]
    finally:
        server.kill(signal.SIGCONT)
        b.close()


def test_read_aheads_met_off_the_loop(qemu_nbd, chain, monkeypatch):
    # A call in a pool thread with read-aheads in flight (the service
    # calls settle() first; this is the fallback): the connection goes
    # with them, their buffers come back through the loop, and the call
    # reads on a new connection.
    pool, content, b = read_only_backend(monkeypatch, qemu_nbd, chain, 3)
    try:
        on_loop(b.read_ahead, 0)
        assert len(b._ahead) == 2
        buf = bytearray(100 * KiB)
        assert gevent.get_hub().threadpool.apply(b.readinto, (64 * KiB, buf)) == len(buf)
        assert buf == content[64 * KiB:164 * KiB]
        assert not b._ahead and b._drain is None
        deadline = time.monotonic() + 5
        while len(pool._free) < pool._made and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert len(pool._free) == pool._made
    finally:
        b.close()


def test_read_from_read_ahead_leases_no_buffers(qemu_nbd, chain, ahead_buffers):
    # ops.read of a range all in what was read ahead sends it from the
    # read-ahead buffer and leases no transfer buffers; a range going past
    # it leases them for the rest.
    top, _, _ = chain
    content = guest_bytes(top)
    b = open_nbd(qemu_nbd(top, read_only=True).url(), "r")
    leases = []

    def lease(need):
        leases.append(need)
        return [memoryview(bytearray(MiB)), memoryview(bytearray(MiB))]

    def read(offset, length):
        op = sessions.Operation("read", offset, length)
        runner = ops.Runner(gevent.lock.BoundedSemaphore(2))
        return on_loop(lambda: b"".join(
            bytes(v) for v in ops.read(b, runner, op, offset, length, lease)))

    try:
        on_loop(b.read_ahead, 2 * MiB)
        assert read(4 * MiB, 100 * KiB) == content[4 * MiB:4 * MiB + 100 * KiB]
        assert leases == []
        # Nothing read ahead here (the only buffer was lent to the read
        # before): the buffers are leased.
        assert read(4 * MiB + 100 * KiB, 300 * KiB) == \
            content[4 * MiB + 100 * KiB:4 * MiB + 400 * KiB]
        assert leases == [300 * KiB]
    finally:
        b.close()


def read_only_backend(monkeypatch, qemu_nbd, chain, buffers):
    """(the backend's read-ahead buffers, the chain's guest bytes, a
    backend of a read-only export of the chain): `buffers` of 256 KiB."""
    pool = nbd_backend._AheadBuffers(buffers, 256 * KiB)
    monkeypatch.setattr(nbd_backend, "_ahead_buffers", pool)
    top, _, _ = chain
    return pool, guest_bytes(top), open_nbd(qemu_nbd(top, read_only=True).url(), "r")


def test_read_ahead_view(qemu_nbd, chain, monkeypatch):
    # What was read ahead, lent without a copy until given back; the next
    # read-ahead meanwhile takes another buffer.
    pool, content, b = read_only_backend(monkeypatch, qemu_nbd, chain, 2)
    try:
        on_loop(b.read_ahead, 2 * MiB)
        view = on_loop(b.read_ahead_view, 4 * MiB, 100 * KiB)
        assert bytes(view) == content[4 * MiB:4 * MiB + 100 * KiB]
        on_loop(b.read_ahead, 4 * MiB + 100 * KiB)
        assert b._ahead[0][:2] == [4 * MiB + 100 * KiB, 256 * KiB]
        # Still the same bytes: the second read-ahead has its own buffer.
        assert bytes(view) == content[4 * MiB:4 * MiB + 100 * KiB]
        b.release_ahead()
        buf = bytearray(300 * KiB)
        assert on_loop(b.readinto, 4 * MiB + 100 * KiB, buf) == len(buf)
        assert buf == content[4 * MiB + 100 * KiB:4 * MiB + 400 * KiB]
        assert len(pool._free) == 2
    finally:
        b.close()


def test_read_ahead_follows_the_client(qemu_nbd, chain, monkeypatch):
    # The next READ_AHEAD_DEPTH data extents are read ahead while the
    # client reads where expected; a GET elsewhere (random reads, or
    # several connections sharing the extents) ends it, and it starts
    # again once a GET starts where the backend would have read ahead.
    pool, content, b = read_only_backend(monkeypatch, qemu_nbd, chain, 3)
    try:
        # Data at [64 KiB, 2 MiB) and [4 MiB, 5 MiB) (CHAIN_EXTENTS).
        on_loop(b.read_ahead, 0)
        assert [e[:2] for e in b._ahead] == [[64 * KiB, 256 * KiB], [4 * MiB, 256 * KiB]]
        view = on_loop(b.read_ahead_view, 64 * KiB, 10)
        assert bytes(view) == content[64 * KiB:64 * KiB + 10]
        b.release_ahead()
        on_loop(b.read_ahead, 64 * KiB + 10)
        assert [e[:2] for e in b._ahead] == [[4 * MiB, 256 * KiB]]
        # A GET elsewhere: what was read ahead is dropped, and no more is.
        assert on_loop(b.read_ahead_view, 100 * KiB, 10) is None
        assert not b._ahead and len(pool._free) == 3
        on_loop(b.read_ahead, 100 * KiB + 10)
        assert not b._ahead
        # The next GET starts where a read-ahead would have: it starts again.
        assert on_loop(b.read_ahead_view, 100 * KiB + 10, 10) is None
        on_loop(b.read_ahead, 100 * KiB + 20)
        assert [e[:2] for e in b._ahead] == [[100 * KiB + 20, 256 * KiB],
                                             [4 * MiB, 256 * KiB]]
        # A GET from the first read-ahead on, longer than what it read and
        # than a transfer buffer: the rest is read in pool threads, after
        # the other read-ahead was taken in on the loop (the connection is
        # kept).
        h = b._h
        op = sessions.Operation("read", 100 * KiB + 20, MiB)
        runner = ops.Runner(gevent.lock.BoundedSemaphore(2))

        def lease(need):
            return [memoryview(bytearray(256 * KiB)), memoryview(bytearray(256 * KiB))]

        got = on_loop(lambda: b"".join(
            bytes(v) for v in ops.read(b, runner, op, 100 * KiB + 20, MiB, lease)))
        assert got == content[100 * KiB + 20:1124 * KiB + 20]
        assert b._h is h
        # And the next extents are read ahead again.
        assert [e[:2] for e in b._ahead] == [[1124 * KiB + 20, 256 * KiB],
                                             [4 * MiB, 256 * KiB]]
    finally:
        b.close()
