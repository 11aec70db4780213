"""
The random-access ImageClient against a real daemon: read, write, zero,
flush, extents, checksum and blocks at any offset, and its refusals.
"""

import hashlib

import pytest

from imaged import blkhash
from imaged import client
from tests.client.common import MiB, fill_random, make_sparse_image


@pytest.fixture
def image(server, tmp_path):
    path = str(tmp_path / "img.raw")
    make_sparse_image(path, 12 * MiB, regions=3, seed=21)
    sid = server.add_session(path, sparse=True)
    return path, server.tls_url + sid


def test_read_write_zero_flush(server, image):
    path, url = image
    with client.ImageClient(url, cafile=server.cert) as img:
        assert img.size == 12 * MiB
        assert img.transport == "unix"
        assert img.writable
        assert {"extents", "zero", "flush", "checksum"} <= set(img.features)
        with open(path, "rb") as f:
            f.seek(MiB + 5)
            assert img.read(MiB + 5, 100000) == f.read(100000)
        img.write(3 * MiB + 1, b"hello", flush=True)
        img.zero(8 * MiB, 2 * MiB)
        img.flush()
        buf = bytearray(7)
        img.readinto(3 * MiB, buf)
        assert bytes(buf)[1:6] == b"hello"
    with open(path, "rb") as f:
        f.seek(3 * MiB + 1)
        assert f.read(5) == b"hello"
        f.seek(8 * MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)


def test_extents_checksum_blocks(server, image):
    path, url = image
    with client.ImageClient(url, cafile=server.cert, use_unix_socket=False) as img:
        assert img.transport == "https"
        exts = img.extents()
        assert exts[0].start == 0
        assert sum(e.length for e in exts) == img.size
        assert any(e.zero for e in exts) and any(not e.zero for e in exts)
        assert img.checksum() == blkhash.checksum_file(path)
        blocks = img.blocks(block_size=MiB)
        with open(path, "rb") as f:
            data = f.read()
        assert blocks == [(i, hashlib.blake2b(data[i:i + MiB], digest_size=32).hexdigest())
                          for i in range(0, len(data), MiB)]
        assert img.blocks(start=4 * MiB, length=2 * MiB, block_size=MiB) == blocks[4:6]


def test_refusals(server, image, tmp_path):
    path, url = image
    with client.ImageClient(url, cafile=server.cert) as img:
        with pytest.raises(client.OutOfRangeError):
            img.read(12 * MiB - 10, 11)
        with pytest.raises(client.OutOfRangeError):
            img.write(12 * MiB, b"x")
        with pytest.raises(client.ClientError, match="multiple of block_size"):
            img.blocks(start=4096)
        with pytest.raises(client.UnsupportedError, match="no dirty extents"):
            img.extents("dirty")
    ro = str(tmp_path / "ro.raw")
    fill_random(ro, MiB)
    sid = server.add_session(ro, ops=["read"])
    with client.ImageClient(server.tls_url + sid, cafile=server.cert) as img:
        assert not img.writable
        with pytest.raises(client.ForbiddenError):
            img.write(0, b"x")
    with pytest.raises(client.ForbiddenError):
        client.ImageClient(server.tls_url + "no-such-session", cafile=server.cert)


def read_calls():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("syscr:")).split()[1])


def test_https_reads_take_what_the_socket_holds(server, tmp_path):
    # A buffer under the TLS connection (imaged.tls.ReadBuffer): without it
    # Python's ssl reads every 16 KiB record with two read() calls, ~1,000
    # for 8 MiB.
    path = str(tmp_path / "img.raw")
    fill_random(path, 8 * MiB, seed=5)
    url = server.tls_url + server.add_session(path)
    with client.ImageClient(url, cafile=server.cert, use_unix_socket=False) as img:
        img.read(0, 4096)
        before = read_calls()
        data = img.read(0, 8 * MiB)
        calls = read_calls() - before
    with open(path, "rb") as f:
        assert data == f.read()
    assert calls < 300
