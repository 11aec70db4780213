"""
NBD sessions end to end: a real imaged daemon serving qemu-nbd exports of
qcow2 images (data, holes, a backing chain, a dirty bitmap) to requests,
curl and ovirt-imageio's client library, and what happens when the NBD
server is missing, dies or hangs.
"""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid

import pytest
import requests

from tests.images_helpers import (  # noqa: F401 (close_clients: autouse)
    KiB, MiB, TRANSPORTS, Transport, close_clients, control, curl,
    local_checksum, make_sparse, progress, start_daemon, wait_for)
from tests.nbd_helpers import (  # noqa: F401 (qemu_nbd is a fixture)
    CHAIN_EXTENTS, CHAIN_SIZE, TOP_ONLY_EXTENTS, guest_bytes, make_chain,
    make_dirty, make_qcow2, nbdkit, needs_nbd, needs_nbdkit, qemu_img, qemu_io,
    qemu_map, qemu_nbd, short_dir)

try:
    from ovirt_imageio import client as imageio_client
    from ovirt_imageio._internal import errors as imageio_errors
except ImportError:  # pragma: no cover - requirements-test.txt has it
    imageio_client = None

pytestmark = needs_nbd

needs_imageio = pytest.mark.skipif(
    imageio_client is None, reason="ovirt-imageio is not installed (make venv)")

# NBD requests time out after the session's inactivity timeout: short in
# the hang tests.
NBD_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tls_files):
    d = start_daemon(tmp_path_factory.mktemp("daemon"), tls_files)
    yield d
    d.stop()


@pytest.fixture
def chain(tmp_path):
    return make_chain(str(tmp_path))


def add_session(daemon, url, size, ops=("read", "write"), **extra):
    sid = str(uuid.uuid4())
    body = {"url": url, "size": size, "ops": list(ops), "timeout": 300}
    body.update(extra)
    r = control(daemon).put(daemon.control_url + sid, data=json.dumps(body))
    assert r.status_code == 200, r.text
    return sid


def extents(tr, sid, query=""):
    r = tr.session().get(tr.url(sid, "/extents" + query))
    assert r.status_code == 200, r.text
    return r.json()


def as_dicts(exts):
    return [{"start": s, "length": n, "zero": z, "hole": h} for s, n, z, h in exts]


# Sessions.

@pytest.mark.parametrize("tcp,export,form", [
    (False, None, "qemu-unix"), (False, "vol", "qemu-unix"),
    (False, "vol", "uri-unix"), (True, None, "qemu-tcp"),
    (True, "vol", "qemu-tcp"), (True, "vol", "uri-tcp"),
])
def test_url_forms(daemon, qemu_nbd, chain, tcp, export, form):
    top, _, content = chain
    server = qemu_nbd(top, tcp=tcp, export=export)
    url = server.url(form)
    sid = add_session(daemon, url, CHAIN_SIZE, dirty=False)
    info = control(daemon).get(daemon.control_url + sid).json()
    assert info["url"] == url and info["dirty"] is False
    tr = Transport(daemon, "unix")
    r = tr.session().get(tr.url(sid))
    assert r.status_code == 200
    assert r.content == bytes(content)


@pytest.mark.parametrize("url", [
    "nbd:unix:relative.sock", "nbd:host:port", "nbd://host:99999/x",
    "nbd+unix:///x", "nbd+unix:///x?socket=/a&tls=on", "nbd:unix:/a\nb",
])
def test_invalid_url(daemon, url):
    body = {"url": url, "size": MiB, "ops": ["read"], "timeout": 60}
    r = control(daemon).put(daemon.control_url + str(uuid.uuid4()),
                            data=json.dumps(body))
    assert r.status_code == 400
    assert r.text.startswith("invalid url")


def test_invalid_dirty(daemon):
    body = {"url": "nbd:unix:/run/x.sock", "size": MiB, "ops": ["read"],
            "timeout": 60, "dirty": "yes"}
    r = control(daemon).put(daemon.control_url + str(uuid.uuid4()),
                            data=json.dumps(body))
    assert r.status_code == 400
    assert "dirty" in r.text


# The images API.

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_read_write(daemon, qemu_nbd, chain, transport):
    top, base, content = chain
    server = qemu_nbd(top)
    sid = add_session(daemon, server.url(), CHAIN_SIZE)
    tr = Transport(daemon, transport)
    s = tr.session()

    r = s.get(tr.url(sid))
    assert r.status_code == 200 and r.content == bytes(content)
    r = s.get(tr.url(sid), headers={"Range": f"bytes={MiB - 5}-{2 * MiB + 6}"})
    assert r.status_code == 206
    assert r.content == content[MiB - 5:2 * MiB + 7]
    assert r.headers["Content-Range"] == f"bytes {MiB - 5}-{2 * MiB + 6}/{CHAIN_SIZE}"

    # PUT at an unaligned offset, without flush, then with.
    data = os.urandom(MiB + 3)
    r = s.put(tr.url(sid) + "?flush=n", data=data,
              headers={"Content-Range": f"bytes {3 * MiB + 1}-{4 * MiB + 3}/*"})
    assert r.status_code == 200, r.text
    content[3 * MiB + 1:4 * MiB + 4] = data
    # A chunked body (no Content-Length).
    chunked = os.urandom(200 * KiB)
    r = s.put(tr.url(sid), data=iter([chunked[:1000], chunked[1000:]]),
              headers={"Content-Range": f"bytes {6 * MiB}-{6 * MiB + len(chunked) - 1}/*"})
    assert r.status_code == 200, r.text
    content[6 * MiB:6 * MiB + len(chunked)] = chunked
    # Zero and flush.
    r = s.patch(tr.url(sid), json={"op": "zero", "offset": 5, "size": 2 * MiB,
                                   "flush": True})
    assert r.status_code == 200, r.text
    content[5:5 + 2 * MiB] = bytes(2 * MiB)
    r = s.patch(tr.url(sid), json={"op": "flush"})
    assert r.status_code == 200
    # Outside the image: refused, nothing written.
    r = s.put(tr.url(sid), data=b"x" * 10,
              headers={"Content-Range": f"bytes {CHAIN_SIZE - 5}-{CHAIN_SIZE + 4}/*"})
    assert r.status_code == 416

    r = s.get(tr.url(sid))
    assert r.content == bytes(content)
    server.stop()
    assert guest_bytes(top) == bytes(content)


def libnbd_mapped(pid):
    with open(f"/proc/{pid}/maps") as f:
        return "libnbd.so" in f.read()


def test_libnbd_loaded_with_the_first_nbd_session(make_daemon, qemu_nbd, chain, tmp_path):
    # libnbd and the libraries it brings (4 MiB of RSS) wait for the
    # first NBD backend: a daemon serving files does without them.
    d = make_daemon()
    path = tmp_path / "file.raw"
    path.write_bytes(b"x" * MiB)
    tr = Transport(d, "tls")
    s = tr.session()
    sid = d.add_session(str(path), ops=["read"])
    assert s.get(tr.url(sid)).content == b"x" * MiB
    # An NBD URL is checked without it too.
    body = {"url": "nbd:unix:relative.sock", "size": MiB, "ops": ["read"], "timeout": 60}
    r = control(d).put(d.control_url + str(uuid.uuid4()), data=json.dumps(body))
    assert r.status_code == 400
    assert not libnbd_mapped(d.pid)
    top, _, content = chain
    server = qemu_nbd(top)
    sid = add_session(d, server.url(), CHAIN_SIZE)
    r = s.get(tr.url(sid), headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == content[:100]
    assert libnbd_mapped(d.pid)


def test_curl(daemon, qemu_nbd, chain, tmp_path):
    top, _, content = chain
    server = qemu_nbd(top)
    sid = add_session(daemon, server.url("uri-unix"), CHAIN_SIZE)
    tls = Transport(daemon, "tls")
    unix = Transport(daemon, "unix")
    status, body = curl(*tls.curl_args(sid))
    assert status == 200 and body == bytes(content)
    status, body = curl("-r", "100-199", *unix.curl_args(sid))
    assert status == 206 and body == content[100:200]
    src = tmp_path / "part"
    data = os.urandom(3 * MiB)
    src.write_bytes(data)
    status, _ = curl("-X", "PUT", "--upload-file", str(src),
                     "-H", f"Content-Range: bytes {MiB}-{4 * MiB - 1}/*",
                     *tls.curl_args(sid))
    assert status == 200
    content[MiB:4 * MiB] = data
    status, _ = curl("-X", "PATCH", "-H", "Content-Type: application/json",
                     "--data", json.dumps({"op": "zero", "offset": 0, "size": 4096,
                                           "flush": True}),
                     *unix.curl_args(sid))
    assert status == 200
    content[:4096] = bytes(4096)
    status, body = curl(*unix.curl_args(sid, "/extents"))
    assert status == 200 and sum(e["length"] for e in json.loads(body)) == CHAIN_SIZE
    server.stop()
    assert guest_bytes(top) == bytes(content)


@pytest.mark.parametrize("shared,max_writers", [(1, 1), (8, 8)])
def test_options(daemon, qemu_nbd, chain, shared, max_writers):
    server = qemu_nbd(chain[0], shared=shared)
    sid = add_session(daemon, server.url(), CHAIN_SIZE)
    tr = Transport(daemon, "tls")
    # One client connection: it keeps its NBD connection, and qemu-nbd
    # --shared=1 serves one at a time.
    s = tr.session()
    r = s.options(tr.url(sid))
    assert r.status_code == 200, r.text
    opts = r.json()
    assert set(opts["features"]) == {"checksum", "extents", "zero", "flush"}
    assert opts["max_readers"] == 8
    assert opts["max_writers"] == max_writers
    assert opts["unix_socket"] == daemon.local_path
    ro = add_session(daemon, server.url(), CHAIN_SIZE, ops=["read"])
    opts = s.options(tr.url(ro)).json()
    assert opts["max_writers"] == 0
    assert set(opts["features"]) == {"checksum", "extents"}


@needs_nbdkit
def test_one_writer_without_multi_conn(daemon, nbdkit, tmp_path):
    # An export without multi-conn (nbdkit's multi-conn filter turns it
    # off; writes take a second each): OPTIONS says one writer, and a
    # second concurrent writer gets 503 instead of a second NBD writer.
    server = nbdkit("--filter=multi-conn", "--filter=delay", "memory", "8M",
                    "multi-conn-mode=disable", "delay-write=1")
    sid = add_session(daemon, server.url(), 8 * MiB)
    tr = Transport(daemon, "tls")
    assert tr.session().options(tr.url(sid)).json()["max_writers"] == 1
    results = []

    def put():
        r = tr.session().put(tr.url(sid), data=b"\x01" * MiB)
        results.append(r.status_code)

    t = threading.Thread(target=put)
    t.start()
    try:
        wait_for_operation(daemon, sid, "write", "the first write running")
        r = tr.session().put(tr.url(sid), data=b"\x02" * MiB,
                             headers={"Content-Range": f"bytes {MiB}-{2 * MiB - 1}/*"})
        assert r.status_code == 503
        assert "writers" in r.text
    finally:
        t.join()
    assert results == [200]
    r = tr.session().get(tr.url(sid), headers={"Range": f"bytes=0-{2 * MiB - 1}"})
    assert r.content == b"\x01" * MiB + bytes(MiB)


def test_extents_backing_chain(daemon, qemu_nbd, chain):
    top, _, content = chain
    tr = Transport(daemon, "unix")
    # Read-only exports: two qemu-nbd may then open the same image.
    sid = add_session(daemon, qemu_nbd(top, read_only=True).url(), CHAIN_SIZE,
                      ops=["read"])
    assert extents(tr, sid) == as_dicts(CHAIN_EXTENTS)
    assert extents(tr, sid, "?context=zero") == as_dicts(CHAIN_EXTENTS)
    # A window.
    got = extents(tr, sid, f"?start={MiB + 5}&length={2 * MiB}")
    assert got == [{"start": MiB + 5, "length": MiB - 5, "zero": False, "hole": False},
                   {"start": 2 * MiB, "length": MiB + 5, "zero": True, "hole": True}]
    # One layer without its backing file, as a backup reads it.
    one = add_session(daemon, qemu_nbd(top, backing=False, read_only=True).url(),
                      CHAIN_SIZE, ops=["read"])
    assert extents(tr, one) == as_dicts(TOP_ONLY_EXTENTS)
    # Zero extents read as zeroes.
    for e in extents(tr, sid):
        if e["zero"]:
            assert not any(content[e["start"]:e["start"] + e["length"]])


def test_extents_huge_sparse_export(daemon, qemu_nbd, tmp_path):
    path = str(tmp_path / "huge.qcow2")
    size = 4 * 1024**4
    make_qcow2(path, size, [(size // 2, MiB, 0x1)])
    sid = add_session(daemon, qemu_nbd(path).url(), size, ops=["read"])
    tr = Transport(daemon, "tls")
    assert extents(tr, sid) == [
        {"start": 0, "length": size // 2, "zero": True, "hole": True},
        {"start": size // 2, "length": MiB, "zero": False, "hole": False},
        {"start": size // 2 + MiB, "length": size // 2 - MiB, "zero": True, "hole": True}]


def test_dirty_extents(daemon, qemu_nbd, tmp_path):
    path, content, dirty = make_dirty(str(tmp_path))
    server = qemu_nbd(path, bitmap="b0")
    size = len(content)
    tr = Transport(daemon, "tls")
    sid = add_session(daemon, server.url(), size, ops=["read"], dirty=True)
    got = extents(tr, sid, "?context=dirty")
    assert all(set(e) == {"start", "length", "dirty", "zero"} for e in got)
    assert got[0]["start"] == 0 and sum(e["length"] for e in got) == size
    assert [(e["start"], e["length"]) for e in got if e["dirty"]] == dirty
    # Zero extents of the same session.
    assert sum(e["length"] for e in extents(tr, sid)) == size
    # A session without dirty=true, on the same export: 404 with a message.
    plain = add_session(daemon, server.url(), size, ops=["read"])
    r = tr.session().get(tr.url(plain, "/extents?context=dirty"))
    assert r.status_code == 404 and "dirty" in r.text
    # An export without a bitmap: 404 too.
    other = qemu_nbd(make_chain(str(tmp_path))[0])
    nobitmap = add_session(daemon, other.url(), CHAIN_SIZE, ops=["read"], dirty=True)
    r = tr.session().get(tr.url(nobitmap, "/extents?context=dirty"))
    assert r.status_code == 404 and "dirty" in r.text
    r = tr.session().get(tr.url(sid, "/extents?context=bogus"))
    assert r.status_code == 400


def test_checksum(daemon, qemu_nbd, chain):
    top, _, content = chain
    sid = add_session(daemon, qemu_nbd(top, read_only=True).url(), CHAIN_SIZE,
                      ops=["read"])
    tr = Transport(daemon, "unix")
    r = tr.session().get(tr.url(sid, "/checksum"))
    assert r.status_code == 200
    assert r.json()["checksum"] == local_checksum(bytes(content))
    r = tr.session().get(tr.url(sid, "/checksum?algorithm=sha256&block_size=1048576"))
    assert r.json()["checksum"] == local_checksum(bytes(content), MiB, "sha256")
    if imageio_client is not None:
        # ovirt-imageio's client computes the same over the qcow2 file.
        assert imageio_client.checksum(top)["checksum"] == \
            local_checksum(bytes(content))


def test_session_larger_than_export(daemon, qemu_nbd, chain):
    server = qemu_nbd(chain[0])
    sid = add_session(daemon, server.url(), CHAIN_SIZE + 4096)
    tr = Transport(daemon, "tls")
    s = tr.session()
    for method, suffix in (("GET", ""), ("OPTIONS", ""), ("GET", "/extents"),
                           ("GET", "/checksum")):
        r = s.request(method, tr.url(sid, suffix))
        assert r.status_code == 400, (method, suffix, r.status_code)
        assert "exceeds the image size" in r.text
    # Smaller is fine: the session sees its part.
    small = add_session(daemon, server.url(), MiB)
    r = s.get(tr.url(small))
    assert r.status_code == 200 and r.content == chain[2][:MiB]


def read_calls(pid):
    """read() and readv() system calls process `pid` made so far."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("syscr")).split()[1])


def reads_per_piece(daemon, sid, requests=12, pieces=8, gap_s=0.001):
    """
    The daemon's read calls per 64 KiB piece of `requests` uploads over the
    unix socket, each of `pieces` pieces with a pause of `gap_s` after
    each: longer than a spin (transport.RequestBody.UNIX_SPIN_S), so a
    reader that spins makes several reads of the empty socket in a gap,
    one that does not about one read per piece at most. A new request has
    a new transport.Spin, which spins through its first gaps: short
    requests spin most. Measured on the 2-core development machine: 0.3-
    0.7 reads per piece into NBD without spins, 2.6-3.1 with, 11-16 into
    a file (with).
    """
    piece = os.urandom(64 * KiB)
    con = Transport(daemon, "unix").connection(timeout=30)
    # The backend is opened first, not while counting.
    con.request("OPTIONS", f"/images/{sid}")
    r = con.getresponse()
    r.read()
    assert r.status == 200
    before = read_calls(daemon.pid)
    for i in range(requests):
        con.putrequest("PUT", f"/images/{sid}")
        con.putheader("Content-Range",
                      f"bytes {i * pieces * 64 * KiB}-{(i + 1) * pieces * 64 * KiB - 1}/*")
        con.putheader("Content-Length", str(pieces * 64 * KiB))
        con.endheaders()
        for _ in range(pieces):
            con.send(piece)
            time.sleep(gap_s)
        r = con.getresponse()
        r.read()
        assert r.status == 200
    return (read_calls(daemon.pid) - before) / (requests * pieces)


def test_upload_does_not_spin(daemon, qemu_nbd, tmp_path):
    # The body of a local upload into NBD is received without spinning
    # (backends.Capabilities.upload_spin): qemu-nbd needs the core a spin
    # holds. Into a file, the same uploads spin, which the read calls show.
    path = str(tmp_path / "target.qcow2")
    size = 12 * 8 * 64 * KiB
    make_qcow2(path, size)
    nbd = reads_per_piece(daemon, add_session(daemon, qemu_nbd(path).url(), size))
    raw = str(tmp_path / "target.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    spinning = reads_per_piece(daemon, daemon.add_session(raw, size))
    assert nbd < 1.5, f"{nbd:.2f} reads per piece into NBD"
    assert spinning > nbd + 0.5, f"{spinning:.2f} reads per piece into a file, {nbd:.2f} into NBD"


# Faults.

def test_unreachable_server(daemon, tmp_path):
    sock = os.path.join(short_dir(), "gone.sock")
    sid = add_session(daemon, f"nbd:unix:{sock}", MiB, transfer_id="nbd-unreachable",
                      inactivity_timeout=NBD_TIMEOUT_S)
    tr = Transport(daemon, "tls")
    start = time.monotonic()
    r = tr.session().get(tr.url(sid))
    assert r.status_code == 500
    assert "Cannot connect to NBD server" in r.text
    assert time.monotonic() - start < NBD_TIMEOUT_S + 5
    assert any("Cannot connect to NBD server" in line and "ERROR" in line
               for line in daemon.log().splitlines())
    assert_serving(daemon, tmp_path)


def assert_serving(daemon, tmp_path):
    """The daemon still serves other sessions."""
    path = str(tmp_path / f"other-{uuid.uuid4()}.raw")
    content = make_sparse(path, MiB, [(10, b"still here")])
    sid = daemon.add_session(path)
    tr = Transport(daemon, "unix")
    r = tr.session().get(tr.url(sid))
    assert r.status_code == 200 and r.content == bytes(content)


# Over the unix socket too: its connections have a larger send buffer, and
# its uploads are received in pool threads (imaged.transport).
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_server_killed_mid_get(daemon, qemu_nbd, tmp_path, transport):
    path = str(tmp_path / "big.qcow2")
    size = 128 * MiB
    make_qcow2(path, size, [(0, size, 0x5a)])
    server = qemu_nbd(path)
    sid = add_session(daemon, server.url(), size, ops=["read"])
    tr = Transport(daemon, transport)
    r = tr.session().get(tr.url(sid), stream=True)
    assert r.status_code == 200
    got = len(next(r.iter_content(MiB)))
    server.kill(signal.SIGKILL)
    server.proc.wait()
    with pytest.raises(requests.exceptions.RequestException):
        for chunk in r.iter_content(MiB):
            got += len(chunk)
    # The body ended short of what the headers promised.
    assert got < size
    wait_for(lambda: "NBD read failed" in daemon.log() or
             "NBD connection" in daemon.log(), message="a log line")
    # A new request on the dead export: 500 with a message, at once.
    r = tr.session().get(tr.url(sid), headers={"Range": "bytes=0-99"})
    assert r.status_code == 500 and "NBD" in r.text
    assert_serving(daemon, tmp_path)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_server_killed_mid_put(daemon, qemu_nbd, tmp_path, transport):
    path = str(tmp_path / "target.qcow2")
    size = 256 * MiB
    make_qcow2(path, size)
    server = qemu_nbd(path)
    sid = add_session(daemon, server.url(), size)
    con = Transport(daemon, transport).connection(timeout=30)
    con.putrequest("PUT", f"/images/{sid}")
    con.putheader("Content-Length", str(size))
    con.endheaders()
    chunk = os.urandom(MiB)
    try:
        for i in range(size // MiB):
            if i == 16:
                server.kill(signal.SIGKILL)
                server.proc.wait()
            con.send(chunk)
    except OSError:
        pass    # The daemon answered and closed while we were sending.
    r = con.getresponse()
    assert r.status == 500
    assert b"NBD" in r.read()
    con.close()
    assert any("NBD write failed" in line and "ERROR" in line
               for line in daemon.log().splitlines())
    assert_serving(daemon, tmp_path)


def test_sparse_download_read_only_export(daemon, qemu_nbd, tmp_path):
    # A client reading data extent after extent on one connection, as
    # imaged-client and ovirt-imageio's client do: on a read-only export
    # the daemon reads the next extent ahead (imaged.backends.nbd). Every
    # range is byte-exact, in order or not; with the server killed after
    # a read-ahead was sent, the next GET fails at once with a message.
    path = str(tmp_path / "sparse.qcow2")
    size = 64 * MiB
    writes = [(i * 5 * MiB + (i % 3) * 64 * KiB, (1 + i * 7 % 40) * 64 * KiB, 0x10 + i)
              for i in range(12)]
    make_qcow2(path, size, writes)
    content = guest_bytes(path)
    server = qemu_nbd(path, read_only=True)
    sid = add_session(daemon, server.url(), size, ops=["read"])
    tr = Transport(daemon, "tcp")
    s = tr.session()
    data = [e for e in extents(tr, sid) if not e["zero"]]
    assert len(data) == len(writes)

    def get(start, length):
        r = s.get(tr.url(sid), headers={"Range": f"bytes={start}-{start + length - 1}"})
        assert r.status_code == 206, r.text
        assert r.content == content[start:start + length]

    for e in data:
        get(e["start"], e["length"])
    # Not the range read ahead: the last extent, the first, half of one.
    get(data[-1]["start"], data[-1]["length"])
    get(data[0]["start"], data[0]["length"])
    get(data[3]["start"] + 4096, data[3]["length"] // 2)
    # After a read-ahead, requests served in a pool thread (extents).
    get(data[5]["start"], data[5]["length"])
    assert [e for e in extents(tr, sid) if not e["zero"]] == data
    get(data[6]["start"], data[6]["length"])
    server.kill(signal.SIGKILL)
    server.proc.wait()
    start = time.monotonic()
    r = s.get(tr.url(sid), headers={"Range": f"bytes={data[4]['start']}-{data[4]['start'] + 99}"})
    assert r.status_code == 500 and "NBD" in r.text
    assert time.monotonic() - start < 5
    assert_serving(daemon, tmp_path)


def wait_for_operation(daemon, sid, kind, message):
    """Wait until the session has a running operation of `kind` (read, write...)."""
    wait_for(lambda: any(op["kind"] == kind for op in progress(daemon, sid)["operations"]),
             message=message)


@contextlib.contextmanager
def stopped_server(daemon, qemu_nbd, chain, transport):
    """
    A session on an NBD server that answers once, then stops (SIGSTOP)
    for the block: yields (Transport, its requests session, session id).
    Once the server answers again, the session must work again.
    """
    server = qemu_nbd(chain[0])
    sid = add_session(daemon, server.url(), CHAIN_SIZE,
                      inactivity_timeout=NBD_TIMEOUT_S)
    tr = Transport(daemon, transport)
    s = tr.session()
    assert s.get(tr.url(sid), headers={"Range": "bytes=0-9"}).status_code == 206
    server.kill(signal.SIGSTOP)
    try:
        yield tr, s, sid
    finally:
        server.kill(signal.SIGCONT)
    r = tr.session().get(tr.url(sid), headers={"Range": "bytes=0-9"})
    assert r.status_code == 206


def test_server_hangs(daemon, qemu_nbd, chain, tmp_path):
    with stopped_server(daemon, qemu_nbd, chain, "unix") as (tr, s, sid):
        start = time.monotonic()
        r = s.patch(tr.url(sid), json={"op": "flush"})
        assert r.status_code == 500
        assert f"within {NBD_TIMEOUT_S} s" in r.text
        assert time.monotonic() - start < NBD_TIMEOUT_S + 5
        assert_serving(daemon, tmp_path)


def test_server_hangs_during_a_get(daemon, qemu_nbd, chain, tmp_path):
    # The first chunk of a GET is read on the event loop (the NBD backend
    # waits by yielding to it): with the NBD server stopped, that GET fails
    # after the session's inactivity timeout, and the daemon serves other
    # sessions while it waits.
    with stopped_server(daemon, qemu_nbd, chain, "tcp") as (tr, s, sid):
        result = {}

        def get():
            start = time.monotonic()
            r = s.get(tr.url(sid), headers={"Range": f"bytes=0-{MiB - 1}"})
            result.update(status=r.status_code, text=r.text,
                          seconds=time.monotonic() - start)

        t = threading.Thread(target=get)
        t.start()
        try:
            wait_for_operation(daemon, sid, "read", "the GET waiting for the NBD server")
            start = time.monotonic()
            assert_serving(daemon, tmp_path)
            assert time.monotonic() - start < NBD_TIMEOUT_S
        finally:
            t.join(NBD_TIMEOUT_S + 10)
        assert result["status"] == 500, result
        assert f"within {NBD_TIMEOUT_S} s" in result["text"]
        assert result["seconds"] < NBD_TIMEOUT_S + 5


# ovirt-imageio's client library.

@needs_imageio
def test_imageio_upload(daemon, qemu_nbd, tmp_path):
    # A raw source with data and holes, into an empty qcow2 exported by
    # qemu-nbd; the client uses max_writers connections at once.
    size = 32 * MiB
    src = str(tmp_path / "src.raw")
    content = make_sparse(src, size, [(0, os.urandom(MiB)), (5 * MiB + 3, os.urandom(7 * MiB)),
                                      (size - 4096, b"\xff" * 4096)])
    dst = str(tmp_path / "dst.qcow2")
    make_qcow2(dst, size)
    server = qemu_nbd(dst)
    sid = add_session(daemon, server.url(), size)
    imageio_client.upload(src, daemon.tls_url + sid, daemon.cert)
    server.stop()
    assert guest_bytes(dst) == bytes(content)
    # Holes of the source stayed unallocated in the qcow2.
    allocated = sum(e["length"] for e in qemu_map(dst) if e["data"])
    assert allocated < 12 * MiB


@needs_imageio
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_imageio_download(daemon, qemu_nbd, chain, tmp_path, fmt):
    top, _, content = chain
    sid = add_session(daemon, qemu_nbd(top).url(), CHAIN_SIZE, ops=["read"])
    out = str(tmp_path / f"download.{fmt}")
    imageio_client.download(daemon.tls_url + sid, out, daemon.cert, fmt=fmt)
    assert guest_bytes(out, fmt) == bytes(content)


@needs_imageio
def test_imageio_client_api(daemon, qemu_nbd, tmp_path):
    path, content, dirty = make_dirty(str(tmp_path))
    server = qemu_nbd(path, bitmap="b0")
    sid = add_session(daemon, server.url(), len(content), dirty=True)
    with imageio_client.ImageioClient(daemon.tls_url + sid, cafile=daemon.cert) as c:
        assert c.size() == len(content)
        got = [(e.start, e.length) for e in c.extents("dirty") if e.dirty]
        assert got == dirty
        assert sum(e.length for e in c.extents()) == len(content)
        buf = bytearray(100)
        c.read(MiB - 50, buf)
        assert buf == content[MiB - 50:MiB + 50]
        c.write(10, b"hello")
        c.zero(2 * MiB, MiB)
        c.flush()
    content[10:15] = b"hello"
    content[2 * MiB:3 * MiB] = bytes(MiB)
    server.stop()
    assert guest_bytes(path) == bytes(content)


@needs_imageio
def test_imageio_incremental_backup(daemon, qemu_nbd, tmp_path):
    # A full backup, then changes, then an incremental backup of the
    # changed blocks only, on top of the full one: together they are the
    # disk as it was at the second backup.
    disk = str(tmp_path / "disk.qcow2")
    size = 16 * MiB
    make_qcow2(disk, size, [(0, 3 * MiB, 0x11), (8 * MiB, MiB, 0x12)])
    qemu_img("bitmap", "--add", "--enable", disk, "backup-1")

    server = qemu_nbd(disk, bitmap="backup-1", read_only=True)
    sid = add_session(daemon, server.url(), size, ops=["read"], dirty=True)
    full = str(tmp_path / "full.qcow2")
    imageio_client.download(daemon.tls_url + sid, full, daemon.cert)
    server.stop()

    # The guest writes: new data, overwritten data, zeroed data.
    qemu_io(disk, f"write -P 0x21 {MiB} 64k", f"write -P 0x22 {12 * MiB} {MiB}",
            f"write -z {8 * MiB} 128k")
    server = qemu_nbd(disk, bitmap="backup-1", read_only=True)
    sid = add_session(daemon, server.url(), size, ops=["read"], dirty=True)
    incr = str(tmp_path / "incr.qcow2")
    imageio_client.download(daemon.tls_url + sid, incr, daemon.cert,
                            incremental=True, backing_file=full,
                            backing_format="qcow2")
    server.stop()
    # The chain incr -> full is the disk.
    subprocess.run(["qemu-img", "compare", "-q", disk, incr], check=True)
    # And incr holds only the changed blocks.
    p = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=qcow2,file.driver=file,file.filename={incr},"
                        "backing.driver=null-co,backing.size=" + str(size)],
                       capture_output=True, text=True)
    if p.returncode == 0:
        own = [(e["start"], e["length"]) for e in json.loads(p.stdout)
               if e["depth"] == 0 and (e["data"] or e["zero"])]
        assert sum(n for _, n in own) <= 64 * KiB + MiB + 128 * KiB


@needs_imageio
def test_imageio_incremental_needs_dirty_session(daemon, qemu_nbd, tmp_path):
    path, _, _ = make_dirty(str(tmp_path))
    server = qemu_nbd(path, bitmap="b0")
    sid = add_session(daemon, server.url(), 8 * MiB, ops=["read"])
    # The server's 404 reaches the client, which stops and says why.
    with pytest.raises(imageio_errors.UnsupportedOperation) as e:
        imageio_client.download(daemon.tls_url + sid, str(tmp_path / "x.qcow2"),
                                daemon.cert, incremental=True)
    assert "dirty=true" in str(e.value)
