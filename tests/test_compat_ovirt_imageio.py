"""
Compatibility with a real client of ovirt-imageio's images API: the
ovirt-imageio package itself (PyPI, listed in requirements-test.txt).

- Its HTTP backend (ovirt_imageio._internal.backends.http), which every
  ovirt-imageio client uses, over TLS and over the unix socket that it
  switches to by itself when the server is local (OPTIONS "unix_socket").
- Its public client API (ovirt_imageio.client): ImageioClient, and upload()
  and download() of whole images, which run qemu-nbd and copy with several
  connections at once.
- Its block checksum, computed locally, against the server's checksum.
"""

import os
import random
import shutil
import subprocess
import urllib.parse

import pytest

from imaged import blkhash

from tests.images_helpers import (  # noqa: F401 (close_clients: autouse)
    KiB, MiB, Transport, close_clients, local_checksum, make_sparse,
    progress, read_file, start_daemon)

try:
    from ovirt_imageio import client as imageio_client
    from ovirt_imageio._internal import blkhash as imageio_blkhash
    from ovirt_imageio._internal import http as imageio_http
    from ovirt_imageio._internal.backends import http as imageio_backend
except ImportError as e:
    pytest.skip(f"ovirt-imageio is not installed ({e}); "
                "`make venv` installs it from requirements-test.txt",
                allow_module_level=True)

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="qemu-img and qemu-nbd are not installed "
           "(make sysdeps installs qemu-utils)")

SIZE = 64 * MiB + 4096


# Fixtures

@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tls_files):
    """A daemon with TLS, TCP, local unix socket and control listeners."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"), tls_files)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def remote_daemon(tmp_path_factory, tls_files):
    """A daemon without a local images socket: clients must use TLS."""
    d = start_daemon(tmp_path_factory.mktemp("remote"), tls_files,
                     drop_listeners=("local",))
    yield d
    d.stop()


def source_data():
    """Scattered data and zeroes, some unaligned, in a SIZE image."""
    rnd = random.Random(7)
    data = [(0, rnd.randbytes(64 * KiB)),
            (MiB + 7, rnd.randbytes(3 * MiB + 5)),
            (20 * MiB, b"\xff" * MiB),
            (SIZE - 5000, rnd.randbytes(5000))]
    for _ in range(20):
        offset = rnd.randrange(SIZE - 300 * KiB)
        data.append((offset, rnd.randbytes(rnd.randrange(1, 300 * KiB))))
    return data


@pytest.fixture
def source(tmp_path):
    path = str(tmp_path / "source.raw")
    content = make_sparse(path, SIZE, source_data())
    return path, content


@pytest.fixture
def target(tmp_path):
    """An empty sparse image, as a host agent prepares for an upload."""
    path = str(tmp_path / "target.raw")
    make_sparse(path, SIZE)
    return path


def open_backend(url, cafile):
    return imageio_backend.open(urllib.parse.urlparse(url), cafile=cafile)


def server_checksum(daemon, sid):
    tr = Transport(daemon, "tcp")
    r = tr.session().get(tr.url(sid, "/checksum"))
    assert r.status_code == 200
    return r.json()


# The HTTP backend

def exercise_backend(backend, path, content):
    """Read, write, zero and flush through an ovirt-imageio backend."""
    assert backend.size() == len(content)
    assert backend.max_readers == 8
    assert backend.max_writers == 8

    # Extents: raw holes are zero, never holes.
    extents = list(backend.extents())
    assert extents[0].start == 0
    assert sum(e.length for e in extents) == len(content)
    for e in extents:
        assert e.hole is False
        if e.zero:
            assert not any(content[e.start:e.start + e.length])

    # Read at unaligned offsets.
    for offset, length in [(0, 4096), (MiB + 3, 2 * MiB), (len(content) - 10, 10)]:
        buf = bytearray(length)
        backend.seek(offset)
        assert backend.readinto(buf) == length
        assert buf == content[offset:offset + length]

    # Write and zero.
    data = os.urandom(1000)
    backend.seek(5 * MiB + 1)
    assert backend.write(data) == len(data)
    content[5 * MiB + 1:5 * MiB + 1001] = data
    backend.seek(MiB)
    assert backend.zero(2 * MiB) == 2 * MiB
    content[MiB:3 * MiB] = bytes(2 * MiB)
    backend.flush()
    assert read_file(path) == bytes(content)

    # A write past the end fails with the server's error, writing nothing.
    backend.seek(len(content) - 10)
    with pytest.raises(imageio_http.Error) as e:
        backend.write(b"x" * 20)
    assert e.value.code == 416
    assert os.path.getsize(path) == len(content)

    # Several connections at once, as its copy workers use them.
    clones = [backend.clone() for _ in range(3)]
    try:
        for i, clone in enumerate(clones):
            clone.seek(i * MiB)
            clone.write(bytes([i + 1]) * 4096)
            content[i * MiB:i * MiB + 4096] = bytes([i + 1]) * 4096
        for clone in clones:
            clone.flush()
    finally:
        for clone in clones:
            clone.close()
    assert read_file(path) == bytes(content)


def test_backend_over_tls(remote_daemon, source):
    path, content = source
    sid = remote_daemon.add_session(path)
    with open_backend(remote_daemon.tls_url + sid, remote_daemon.cert) as b:
        # No local socket offered: it stays on TLS.
        assert b.server_address == ("127.0.0.1", remote_daemon.tls_port)
        exercise_backend(b, path, content)


def test_backend_switches_to_unix_socket(daemon, source):
    path, content = source
    sid = daemon.add_session(path)
    with open_backend(daemon.tls_url + sid, daemon.cert) as b:
        # A local server: the client moved to the unix socket from OPTIONS.
        assert b.server_address == daemon.local_path
        exercise_backend(b, path, content)


def test_backend_plain_http(daemon, source):
    path, content = source
    sid = daemon.add_session(path)
    with open_backend(daemon.tcp_url + sid, None) as b:
        exercise_backend(b, path, content)


def test_backend_read_only_session(remote_daemon, source):
    path, content = source
    sid = remote_daemon.add_session(path, ops=["read"])
    with open_backend(remote_daemon.tls_url + sid, remote_daemon.cert) as b:
        assert b.max_writers == 0
        buf = bytearray(MiB)
        b.seek(MiB)
        b.readinto(buf)
        assert buf == content[MiB:2 * MiB]
        b.seek(0)
        with pytest.raises(imageio_http.Error) as e:
            b.write(b"x" * 100)
        assert e.value.code == 403
        # Without the zero feature the client emulates zero with PUT: refused.
        with pytest.raises(imageio_http.Error) as e:
            b.zero(4096)
        assert e.value.code == 403
    assert read_file(path) == bytes(content)


def test_backend_unknown_session(daemon):
    with pytest.raises(imageio_http.Error) as e:
        open_backend(daemon.tls_url + "no-such-session", daemon.cert)
    assert e.value.code == 403


# The public client API

def test_imageio_client(daemon, source):
    path, content = source
    sid = daemon.add_session(path)
    with imageio_client.ImageioClient(daemon.tls_url + sid,
                                      cafile=daemon.cert) as c:
        assert c.size() == SIZE
        assert c.max_readers == 8 and c.max_writers == 8
        assert sum(e.length for e in c.extents()) == SIZE
        buf = bytearray(100)
        c.read(MiB + 7, buf)
        assert buf == content[MiB + 7:MiB + 107]
        c.write(10, b"hello")
        content[10:15] = b"hello"
        c.zero(20 * MiB, MiB)
        content[20 * MiB:21 * MiB] = bytes(MiB)
        c.flush()
    assert read_file(path) == bytes(content)


class Progress:
    """The progress interface of ovirt_imageio.client."""

    def __init__(self):
        self.size = None
        self.done = 0

    def update(self, n):
        self.done += n


@needs_qemu
@pytest.mark.parametrize("local", [True, False], ids=["unix", "tls"])
def test_upload(daemon, remote_daemon, source, target, local):
    d = daemon if local else remote_daemon
    path, content = source
    sid = d.add_session(target, transfer_id="upload-test")
    pb = Progress()
    imageio_client.upload(path, d.tls_url + sid, d.cert, progress=pb)
    assert pb.size == SIZE and pb.done == SIZE
    assert read_file(target) == bytes(content)
    assert os.path.getsize(target) == SIZE
    expected = local_checksum(content)
    assert blkhash.checksum_file(target)["checksum"] == expected
    assert server_checksum(d, sid)["checksum"] == expected
    # ovirt-imageio's own block checksum of the source agrees.
    assert imageio_blkhash.checksum(path)["checksum"] == expected
    assert imageio_client.checksum(path)["checksum"] == expected
    # The upload was counted.
    p = progress(d, sid)
    assert p["active"] is False
    assert p["transferred"] > 0


@needs_qemu
def test_upload_qcow2(daemon, tmp_path, source, target):
    # The client converts a qcow2 image to the raw guest data on the way.
    path, content = source
    qcow2 = str(tmp_path / "source.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", path, qcow2],
                   check=True)
    sid = daemon.add_session(target)
    imageio_client.upload(qcow2, daemon.tls_url + sid, daemon.cert)
    assert read_file(target) == bytes(content)
    assert server_checksum(daemon, sid)["checksum"] == \
        imageio_client.checksum(qcow2)["checksum"]


@needs_qemu
@pytest.mark.parametrize("local", [True, False], ids=["unix", "tls"])
def test_download_raw(daemon, remote_daemon, source, tmp_path, local):
    d = daemon if local else remote_daemon
    path, content = source
    sid = d.add_session(path, ops=["read"])
    out = str(tmp_path / "download.raw")
    pb = Progress()
    imageio_client.download(d.tls_url + sid, out, d.cert, fmt="raw", progress=pb)
    assert pb.size == SIZE
    assert read_file(out) == bytes(content)
    assert blkhash.checksum_file(out) == server_checksum(d, sid)
    # Zero extents were not copied: the download is sparse.
    assert os.stat(out).st_blocks * 512 < SIZE


@needs_qemu
def test_download_qcow2(daemon, source, tmp_path):
    path, content = source
    sid = daemon.add_session(path, ops=["read"])
    out = str(tmp_path / "download.qcow2")
    imageio_client.download(daemon.tls_url + sid, out, daemon.cert)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
                    path, out], check=True)
    assert imageio_client.checksum(out)["checksum"] == \
        server_checksum(daemon, sid)["checksum"]


def test_imageio_client_read_only_session(daemon, source):
    # Note: ovirt_imageio.client.upload() to a read-only session would hang
    # in the client: it sizes its qemu-nbd for max_writers (0 here, as the
    # spec asks) + 1 connections and its single worker then waits for a
    # second one. Writing through ImageioClient fails as it should.
    path, content = source
    sid = daemon.add_session(path, ops=["read"])
    with imageio_client.ImageioClient(daemon.tls_url + sid,
                                      cafile=daemon.cert) as c:
        assert c.max_writers == 0
        with pytest.raises(imageio_http.Error) as e:
            c.write(0, b"x" * 4096)
        assert e.value.code == 403
    assert read_file(path) == bytes(content)
