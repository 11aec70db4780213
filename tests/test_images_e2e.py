"""
The images API end to end: a real imaged daemon, reached over TLS, plain TCP
and the local unix socket with requests, http.client and curl.

Most tests share one daemon (module scope) and use their own session and
image; tests needing other settings start their own daemon.
"""

import concurrent.futures
import http.client
import json
import os
import random
import socket
import ssl
import subprocess
import time

import pytest
import requests

from imaged import blkhash

from tests.conftest import needs_tool
from tests.images_helpers import (  # noqa: F401 (close_clients: autouse)
    GiB, KiB, MiB, TRANSPORTS, WAIT_S, Transport,
    close_clients, control, curl, delete_session, local_checksum,
    make_allocated, make_sparse, progress, read_file, session_status,
    start_daemon, wait_for)


# Fixtures

@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tls_files):
    """One daemon for the module (overrides conftest's per-test daemon)."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"), tls_files)
    yield d
    d.stop()


@pytest.fixture(params=TRANSPORTS)
def transport(request, daemon):
    return Transport(daemon, request.param)


@pytest.fixture
def sparse_image(tmp_path):
    """A 10 MiB + 1000 bytes sparse image with two data areas."""
    path = str(tmp_path / "sparse.raw")
    size = 10 * MiB + 1000
    content = make_sparse(path, size, [
        (MiB, os.urandom(64 * KiB)),
        (5 * MiB + 123, os.urandom(10000)),
    ])
    return path, content


@pytest.fixture
def allocated_image(tmp_path):
    """A fully allocated 20 MiB + 512 bytes image of random data."""
    path = str(tmp_path / "allocated.raw")
    return path, make_allocated(path, 20 * MiB + 512, seed=1)


@pytest.fixture(params=["sparse", "allocated"])
def image(request):
    return request.getfixturevalue(request.param + "_image")


def extents_of(content, block=4096):
    """Expected extents of an image written with make_sparse (4 KiB blocks)."""
    result = []
    size = len(content)
    for start in range(0, size, block):
        length = min(block, size - start)
        zero = not any(content[start:start + length])
        if result and result[-1]["zero"] == zero:
            result[-1]["length"] += length
        else:
            result.append({"start": start, "length": length, "zero": zero,
                           "hole": False})
    return result


# OPTIONS

def test_options(transport, daemon, sparse_image):
    sid = daemon.add_session(sparse_image[0])
    r = transport.session().options(transport.url(sid))
    assert r.status_code == 200
    assert r.headers["Allow"].split(",") == ["OPTIONS", "GET", "PUT", "PATCH"]
    assert r.json() == {
        "features": ["checksum", "extents", "flush", "zero"],
        "max_readers": 8,
        "max_writers": 8,
        "unix_socket": daemon.local_path,
    }


def test_options_read_only(transport, daemon, sparse_image):
    sid = daemon.add_session(sparse_image[0], ops=["read"])
    r = transport.session().options(transport.url(sid))
    assert r.status_code == 200
    assert r.headers["Allow"].split(",") == ["OPTIONS", "GET"]
    assert r.json()["features"] == ["checksum", "extents"]
    assert r.json()["max_writers"] == 0


def test_options_star(transport, daemon):
    r = transport.session().options(transport.url("*"))
    assert r.status_code == 200
    assert r.json() == {"features": ["checksum", "extents", "flush", "zero"],
                        "unix_socket": daemon.local_path}


# GET

def test_download(transport, daemon, image):
    path, content = image
    sid = daemon.add_session(path, ops=["read"])
    r = transport.session().get(transport.url(sid))
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(len(content))
    assert r.content == bytes(content)


def test_download_ranges(transport, daemon, image):
    path, content = image
    size = len(content)
    sid = daemon.add_session(path, ops=["read"])
    s = transport.session()
    for header, start, length in [
            ("bytes=0-0", 0, 1),
            (f"bytes={MiB - 7}-{MiB + 70000}", MiB - 7, 70008),
            (f"bytes={5 * MiB}-", 5 * MiB, size - 5 * MiB),
            ("bytes=-1000", size - 1000, 1000),
            (f"bytes=0-{size - 1}", 0, size)]:
        r = s.get(transport.url(sid), headers={"Range": header})
        assert r.status_code == 206, header
        assert r.headers["Content-Range"] == \
            f"bytes {start}-{start + length - 1}/{size}"
        assert r.content == bytes(content[start:start + length]), header


def test_download_tail_not_held_back(transport, daemon, image):
    # Responses longer than config.SMALL_BODY_BYTES are sent corked (full
    # TCP segments); the tail of each must still leave at once when the
    # body ends, not after the kernel's 200 ms cork timeout: 20 keep-alive
    # reads would then take 4 s or more. Small ones go whole, uncorked.
    path, content = image
    sid = daemon.add_session(path, ops=["read"])
    s = transport.session()
    s.get(transport.url(sid), headers={"Range": "bytes=0-0"})   # connected
    start = time.monotonic()
    for i in range(20):
        first, length = i * 70001, 1 + i * (3333 if i % 2 else 33333)
        r = s.get(transport.url(sid),
                  headers={"Range": f"bytes={first}-{first + length - 1}"})
        assert r.content == bytes(content[first:first + length])
    assert time.monotonic() - start < 2.0


def test_download_range_not_satisfiable(transport, daemon, sparse_image):
    path, content = sparse_image
    size = len(content)
    sid = daemon.add_session(path, ops=["read"])
    s = transport.session()
    for header in ["bytes=0-1,5-6", "bytes=abc", "bytes=5-1",
                   f"bytes={size}-", f"bytes=0-{size}"]:
        r = s.get(transport.url(sid), headers={"Range": header})
        assert r.status_code == 416, header
        assert r.headers["Content-Range"] == f"bytes */{size}"
        assert r.headers["Content-Type"].startswith("text/plain")
    # The connection is still usable after the errors.
    assert s.get(transport.url(sid), headers={"Range": "bytes=0-9"}).status_code == 206


# PUT and PATCH

def test_upload(transport, daemon, image):
    path, content = image
    sid = daemon.add_session(path)
    data = os.urandom(len(content))
    r = transport.session().put(transport.url(sid), data=data)
    assert r.status_code == 200, r.text
    assert read_file(path) == data
    assert os.path.getsize(path) == len(content)


def test_uploads_of_many_sizes_on_one_connection(transport, daemon, tmp_path):
    # Large bodies on plain sockets are read past the connection's stream
    # buffer (in a pool thread): bodies just below, at and above the sizes
    # where that starts, one after another on one keep-alive connection,
    # must each land whole and leave the next request intact.
    path = str(tmp_path / "image.raw")
    size = 17 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
    sid = daemon.add_session(path)
    s = transport.session()
    expected = bytearray(size)
    for length in [1, 64 * KiB - 1, 64 * KiB, 256 * KiB - 1, 256 * KiB,
                   256 * KiB + 1, 8 * MiB - 1, 8 * MiB + 100 * KiB, 17 * MiB]:
        data = os.urandom(length)
        r = s.put(transport.url(sid), data=data, timeout=WAIT_S,
                  headers={"Content-Range": f"bytes 0-{length - 1}/*"})
        assert r.status_code == 200, (length, r.text)
        expected[:length] = data
        r = s.get(transport.url(sid), headers={"Range": f"bytes=0-{length - 1}"},
                  timeout=WAIT_S)
        assert r.content == bytes(expected[:length]), length
    assert read_file(path) == bytes(expected)


def test_upload_ranges_and_flush(transport, daemon, sparse_image):
    path, content = sparse_image
    sid = daemon.add_session(path)
    s = transport.session()
    chunk = 3 * MiB + 17
    for offset in range(0, len(content), chunk):
        data = os.urandom(min(chunk, len(content) - offset))
        r = s.put(transport.url(sid) + "?flush=n", data=data, headers={
            "Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"})
        assert r.status_code == 200, r.text
        content[offset:offset + len(data)] = data
    r = s.patch(transport.url(sid), json={"op": "flush"})
    assert r.status_code == 200, r.text
    assert read_file(path) == bytes(content)


def test_upload_chunked(transport, daemon, sparse_image):
    # requests sends a generator body with chunked transfer encoding.
    path, content = sparse_image
    sid = daemon.add_session(path)
    data = os.urandom(3 * MiB + 5)
    offset = 4096 + 7

    def body():
        for i in range(0, len(data), 100 * KiB + 3):
            yield data[i:i + 100 * KiB + 3]

    r = transport.session().put(transport.url(sid), data=body(), headers={
        "Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"})
    assert r.status_code == 200, r.text
    content[offset:offset + len(data)] = data
    assert read_file(path) == bytes(content)


def test_upload_chunked_past_end(transport, daemon, sparse_image):
    path, content = sparse_image
    size = len(content)
    sid = daemon.add_session(path)

    def body():
        for _ in range(4):
            yield b"x" * MiB

    offset = size - MiB
    try:
        r = transport.session().put(
            transport.url(sid), data=body(),
            headers={"Content-Range": f"bytes {offset}-{offset + 4 * MiB - 1}/*"})
    except requests.ConnectionError:
        pass    # The server may close before reading the whole body.
    else:
        assert r.status_code == 416, r.text
        assert r.headers["Content-Range"] == f"bytes */{size}"
    assert os.path.getsize(path) == size


def test_upload_outside_image(transport, daemon, sparse_image):
    path, content = sparse_image
    size = len(content)
    sid = daemon.add_session(path)
    s = transport.session()
    r = s.put(transport.url(sid), data=b"x" * 100,
              headers={"Content-Range": f"bytes {size - 50}-{size + 49}/*"})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{size}"
    r = s.put(transport.url(sid), data=b"x" * (size + 1))
    assert r.status_code == 416
    r = s.patch(transport.url(sid), json={"op": "zero", "offset": size - 1, "size": 2})
    assert r.status_code == 416
    assert os.path.getsize(path) == size
    assert read_file(path) == bytes(content)


def test_upload_refused_early(transport, daemon, tmp_path):
    # A refused 64 MiB upload is answered at once and the body is not read:
    # the server closes the connection instead.
    path = str(tmp_path / "small.raw")
    make_sparse(path, MiB)
    ro = daemon.add_session(path, ops=["read"])
    rw = daemon.add_session(path)
    for sid, status, range_header in [
            (ro, 403, None),
            ("no-such-session", 403, None),
            (rw, 416, f"bytes 0-{64 * MiB - 1}/*")]:
        con = transport.connection()
        try:
            con.putrequest("PUT", transport.path(sid))
            con.putheader("Content-Length", str(64 * MiB))
            if range_header:
                con.putheader("Content-Range", range_header)
            con.endheaders()
            con.send(b"x" * 64 * KiB)
            start = time.monotonic()
            res = con.getresponse()
            assert res.status == status
            assert res.getheader("Connection") == "close"
            res.read()
            assert time.monotonic() - start < WAIT_S
        finally:
            con.close()
    assert read_file(path) == bytes(MiB)


def test_zero(transport, daemon, allocated_image):
    path, content = allocated_image
    sid = daemon.add_session(path)
    s = transport.session()
    r = s.patch(transport.url(sid), json={"op": "zero", "offset": 4096 + 1,
                                          "size": 3 * MiB, "flush": True})
    assert r.status_code == 200, r.text
    content[4097:4097 + 3 * MiB] = bytes(3 * MiB)
    # offset defaults to 0.
    r = s.patch(transport.url(sid), json={"op": "zero", "size": 100})
    assert r.status_code == 200, r.text
    content[:100] = bytes(100)
    assert read_file(path) == bytes(content)


def test_zero_sparse_session(transport, daemon, allocated_image):
    path, content = allocated_image
    sid = daemon.add_session(path, sparse=True)
    before = os.stat(path).st_blocks
    r = transport.session().patch(
        transport.url(sid), json={"op": "zero", "offset": MiB, "size": 8 * MiB})
    assert r.status_code == 200, r.text
    content[MiB:9 * MiB] = bytes(8 * MiB)
    assert read_file(path) == bytes(content)
    assert os.stat(path).st_blocks < before


def test_read_only_session(transport, daemon, sparse_image):
    path, content = sparse_image
    sid = daemon.add_session(path, ops=["read"])
    s = transport.session()
    url = transport.url(sid)
    assert s.get(url, headers={"Range": "bytes=0-99"}).status_code == 206
    for method, kwargs in [
            ("PUT", {"data": b"x" * 100}),
            ("PATCH", {"json": {"op": "zero", "size": 100}}),
            ("PATCH", {"json": {"op": "flush"}})]:
        r = s.request(method, url, **kwargs)
        assert r.status_code == 403, (method, r.text)
        assert "write" in r.text
    assert read_file(path) == bytes(content)


def test_body_too_large(transport, daemon, sparse_image):
    sid = daemon.add_session(sparse_image[0])
    body = json.dumps({"op": "zero", "size": 1, "pad": "x" * (128 * KiB)})
    r = transport.session().patch(transport.url(sid), data=body,
                                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413


# Extents and checksum

def test_extents(transport, daemon, sparse_image):
    path, content = sparse_image
    sid = daemon.add_session(path, ops=["read"])
    s = transport.session()
    r = s.get(transport.url(sid, "/extents"))
    assert r.status_code == 200
    assert r.json() == extents_of(content)
    window = s.get(transport.url(sid, f"/extents?start={MiB}&length={MiB}")).json()
    assert window == [
        {"start": MiB, "length": 64 * KiB, "zero": False, "hole": False},
        {"start": MiB + 64 * KiB, "length": MiB - 64 * KiB, "zero": True,
         "hole": False}]


def test_extents_allocated(transport, daemon, allocated_image):
    path, content = allocated_image
    sid = daemon.add_session(path)
    r = transport.session().get(transport.url(sid, "/extents"))
    assert r.json() == [{"start": 0, "length": len(content), "zero": False,
                         "hole": False}]


def test_checksum(transport, daemon, image):
    path, content = image
    sid = daemon.add_session(path, ops=["read"])
    s = transport.session()
    r = s.get(transport.url(sid, "/checksum"))
    assert r.status_code == 200
    expected = local_checksum(content)
    assert r.json() == {"algorithm": "blake2b", "block_size": 4 * MiB,
                        "checksum": expected}
    assert blkhash.checksum_file(path)["checksum"] == expected
    r = s.get(transport.url(sid, f"/checksum?algorithm=sha256&block_size={MiB}"))
    assert r.json()["checksum"] == local_checksum(content, MiB, "sha256")
    r = s.get(transport.url(sid, "/checksum/algorithms"))
    assert "blake2b" in r.json()["algorithms"]


# Authorization

def test_unknown_expired_deleted_sessions(transport, daemon, sparse_image):
    path, content = sparse_image
    s = transport.session()
    expired = daemon.add_session(path, timeout=0)
    deleted = daemon.add_session(path)
    assert delete_session(daemon, deleted)[0] == 204
    for sid in ("no-such-session", expired, deleted):
        for method, suffix, kwargs in [
                ("OPTIONS", "", {}), ("GET", "", {}),
                ("PUT", "", {"data": b"x"}),
                ("PATCH", "", {"json": {"op": "flush"}}),
                ("GET", "/extents", {}), ("GET", "/checksum", {})]:
            r = s.request(method, transport.url(sid, suffix), **kwargs)
            assert r.status_code == 403, (sid, method, suffix)
            assert r.headers["Content-Type"].startswith("text/plain")
            assert sid not in r.text
    assert read_file(path) == bytes(content)


def test_session_id_not_logged(daemon, sparse_image):
    sid = daemon.add_session(sparse_image[0], transfer_id="transfer-1")
    tr = Transport(daemon, "tls")
    tr.session().get(tr.url(sid), headers={"Range": "bytes=0-9"})
    tr.session().get(tr.url(sid + "x"))
    assert sid not in daemon.log()


# Concurrency and integrity

def test_concurrent_readers_and_writers(daemon, tmp_path):
    path = str(tmp_path / "shared.raw")
    size = 64 * MiB
    initial = make_allocated(path, size, seed=2)
    expected = bytearray(initial)
    sid = daemon.add_session(path)
    region = size // 8
    errors = []

    def writer(i):
        tr = Transport(daemon, TRANSPORTS[i % 3])
        s = tr.session()
        rnd = random.Random(i)
        start = i * region
        pos = start
        while pos < start + region:
            n = min(rnd.randint(1, 3 * MiB), start + region - pos)
            data = rnd.randbytes(n)
            r = s.put(tr.url(sid) + "?flush=n", data=data, headers={
                "Content-Range": f"bytes {pos}-{pos + n - 1}/*"})
            assert r.status_code == 200, r.text
            expected[pos:pos + n] = data
            pos += n

    def reader(i):
        tr = Transport(daemon, TRANSPORTS[i % 3])
        s = tr.session()
        start = (4 + i) * region
        for _ in range(3):
            r = s.get(tr.url(sid), headers={
                "Range": f"bytes={start}-{start + region - 1}"})
            assert r.status_code == 206
            assert r.content == initial[start:start + region]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(writer, i) for i in range(4)]
        futures += [pool.submit(reader, i) for i in range(4)]
        for f in futures:
            try:
                f.result(timeout=60)
            except Exception as e:
                errors.append(e)
    assert not errors, errors
    r = Transport(daemon, "unix").session().patch(
        daemon.local_url + sid, json={"op": "flush"})
    assert r.status_code == 200
    assert read_file(path) == bytes(expected)
    assert os.path.getsize(path) == size


def test_integrity_after_random_writes(transport, daemon, tmp_path):
    path = str(tmp_path / "random.raw")
    size = 8 * MiB + 333
    mirror = make_sparse(path, size)
    sid = daemon.add_session(path)
    s = transport.session()
    rnd = random.Random(3)
    for i in range(150):
        offset = rnd.randrange(size)
        n = min(rnd.choice([1, 511, 4096, 5000, 65536, 300 * KiB]), size - offset)
        if i % 10 == 9:
            r = s.patch(transport.url(sid), json={
                "op": "zero", "offset": offset, "size": n})
            mirror[offset:offset + n] = bytes(n)
        else:
            data = rnd.randbytes(n)
            r = s.put(transport.url(sid) + "?flush=n", data=data, headers={
                "Content-Range": f"bytes {offset}-{offset + n - 1}/*"})
            mirror[offset:offset + n] = data
        assert r.status_code == 200, r.text
    assert s.patch(transport.url(sid), json={"op": "flush"}).status_code == 200
    expected = local_checksum(mirror)
    assert blkhash.checksum_file(path)["checksum"] == expected
    assert s.get(transport.url(sid, "/checksum")).json()["checksum"] == expected
    assert s.get(transport.url(sid)).content == bytes(mirror)
    assert os.path.getsize(path) == size


# Aborting transfers: DELETE and expiry.

def big_sparse(tmp_path, size=GiB):
    path = str(tmp_path / "big.raw")
    make_sparse(path, size)
    return path


def start_get(transport, sid, first=MiB):
    """Start a GET of the whole image, read only `first` bytes."""
    r = transport.session().get(transport.url(sid), stream=True, timeout=WAIT_S)
    assert r.status_code == 200
    got = len(r.raw.read(first))
    assert got == first
    return r, got


def finish_get(r, got):
    """Read the rest of a GET; returns (bytes read in all, error or None)."""
    try:
        while True:
            data = r.raw.read(MiB)
            if not data:
                return got, None
            got += len(data)
    except Exception as e:
        return got, e
    finally:
        r.close()


def start_put(transport, sid, length, first=16 * MiB, chunked=False):
    """Start a PUT of `length` bytes; send only `first` bytes."""
    con = transport.connection()
    con.putrequest("PUT", transport.path(sid))
    if chunked:
        con.putheader("Transfer-Encoding", "chunked")
    else:
        con.putheader("Content-Length", str(length))
    con.endheaders()
    send_body(con, first, chunked)
    return con


def send_body(con, count, chunked=False):
    chunk = b"\xab" * MiB
    for _ in range(count // MiB):
        if chunked:
            con.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        else:
            con.send(chunk)


def finish_put(con, rest, chunked=False):
    """Send the rest of a PUT; returns the response status, None if the
    connection failed."""
    try:
        send_body(con, rest, chunked)
        if chunked:
            con.send(b"0\r\n\r\n")
        res = con.getresponse()
        res.read()
        return res.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        con.close()


def wait_active(daemon, sid, transferred=1):
    return wait_for(
        lambda: (lambda p: p["active"] and p["transferred"] >= transferred)(
            progress(daemon, sid)),
        message="an active transfer")


def test_delete_aborts_get(transport, daemon, tmp_path):
    path = big_sparse(tmp_path)
    sid = daemon.add_session(path, ops=["read"])
    r, got = start_get(transport, sid)
    wait_active(daemon, sid, transferred=0)
    status, took = delete_session(daemon, sid)
    assert status == 204
    assert took < 5
    got, error = finish_get(r, got)
    # A truncated body with an error, never the whole image.
    assert got < GiB
    assert error is not None
    # The session is gone.
    assert session_status(daemon, sid) == 404
    assert transport.session().options(transport.url(sid)).status_code == 403


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_delete_aborts_put(transport, daemon, tmp_path, chunked):
    size = 256 * MiB
    path = big_sparse(tmp_path, size)
    sid = daemon.add_session(path)
    con = start_put(transport, sid, size, chunked=chunked)
    wait_active(daemon, sid, transferred=MiB)
    status, took = delete_session(daemon, sid)
    assert status == 204
    assert took < 5
    # The upload fails: a broken connection or an error, never 200.
    assert finish_put(con, size - 16 * MiB, chunked) != 200
    assert os.path.getsize(path) == size


def test_expiry_aborts_get(transport, daemon, tmp_path):
    path = big_sparse(tmp_path)
    sid = daemon.add_session(path, ops=["read"], timeout=2)
    r, got = start_get(transport, sid)
    start = time.monotonic()
    wait_for(lambda: session_status(daemon, sid) == 404,
             message="session expired and removed")
    assert time.monotonic() - start < 5
    got, error = finish_get(r, got)
    assert got < GiB
    assert error is not None


def test_expiry_aborts_put(transport, daemon, tmp_path):
    size = 256 * MiB
    path = big_sparse(tmp_path, size)
    sid = daemon.add_session(path, timeout=2)
    con = start_put(transport, sid, size)
    wait_for(lambda: session_status(daemon, sid) == 404,
             message="session expired and removed")
    assert finish_put(con, size - 16 * MiB) != 200


def test_delete_waits_for_slow_client(daemon, tmp_path):
    # A client that stopped reading does not hold DELETE: the connection is
    # torn down, the operation ends, DELETE answers at once.
    path = big_sparse(tmp_path)
    sid = daemon.add_session(path, ops=["read"])
    tr = Transport(daemon, "tls")
    readers = [start_get(tr, sid) for _ in range(3)]
    wait_for(lambda: len(progress(daemon, sid)["operations"]) == 3,
             message="three readers")
    status, took = delete_session(daemon, sid)
    assert status == 204 and took < 5
    for r, got in readers:
        got, error = finish_get(r, got)
        assert got < GiB and error is not None


# Progress

def test_progress_during_get(daemon, tmp_path):
    path = str(tmp_path / "progress.raw")
    size = 64 * MiB
    make_sparse(path, size)
    sid = daemon.add_session(path, ops=["read"], transfer_id="get-progress")
    tr = Transport(daemon, "unix")
    r = tr.session().get(tr.url(sid), stream=True, timeout=WAIT_S)
    seen = []
    got = 0
    while True:
        data = r.raw.read(MiB)
        if not data:
            break
        got += len(data)
        p = progress(daemon, sid)
        if p["active"]:
            seen.append(p["transferred"])
            assert p["size"] == size
            assert p["transfer_id"] == "get-progress"
            [op] = p["operations"]
            assert op["kind"] == "read" and op["offset"] == 0 and op["length"] == size
            assert op["done"] == p["transferred"]
    r.close()
    assert got == size
    # Several distinct, growing figures while active.
    assert len(set(seen)) >= 3, seen
    assert seen == sorted(seen)
    assert 0 < seen[-1] <= size
    p = wait_for(lambda: (lambda p: not p["active"] and p)(progress(daemon, sid)),
                 message="transfer done")
    assert p["transferred"] == size
    assert p["operations"] == []
    assert sid in [x["id"] for x in progress(daemon)]
    info = control(daemon).get(daemon.control_url + sid).json()
    assert info["transferred"] == size and info["active"] is False


def test_progress_during_put(daemon, tmp_path):
    size = 64 * MiB
    path = big_sparse(tmp_path, size)
    sid = daemon.add_session(path)
    tr = Transport(daemon, "tcp")
    con = start_put(tr, sid, size, first=0)
    seen = []
    for _ in range(size // MiB):
        send_body(con, MiB)
        p = progress(daemon, sid)
        if p["active"] and p["transferred"]:
            seen.append(p["transferred"])
            assert p["operations"][0]["kind"] == "write"
    res = con.getresponse()
    res.read()
    con.close()
    assert res.status == 200
    assert len(set(seen)) >= 3, seen
    assert seen == sorted(seen) and seen[-1] < size
    p = progress(daemon, sid)
    assert p["active"] is False and p["transferred"] == size
    assert p["throughput_bps"] > 0
    assert p["expires"] > time.monotonic()


def test_progress_unknown(daemon):
    r = control(daemon).get("http+unix://imaged/progress/no-such-session")
    assert r.status_code == 404


# Limits and timeouts (their own daemons).

def test_max_readers_and_writers(make_daemon, tmp_path):
    d = make_daemon({"images": {"max_readers": 2, "max_writers": 1}})
    path = big_sparse(tmp_path)
    sid = d.add_session(path)
    tr = Transport(d, "tls")
    assert tr.session().options(tr.url(sid)).json()["max_readers"] == 2
    assert tr.session().options(tr.url(sid)).json()["max_writers"] == 1
    readers = [start_get(tr, sid) for _ in range(2)]
    r = tr.session().get(tr.url(sid), headers={"Range": "bytes=0-99"})
    assert r.status_code == 503
    r = tr.session().get(tr.url(sid, "/checksum"))
    assert r.status_code == 503
    assert "readers" in r.text
    # The limits are per session: another session of the image is free.
    other = d.add_session(path)
    r = tr.session().get(tr.url(other), headers={"Range": "bytes=0-99"})
    assert r.status_code == 206
    # Writers are counted apart from readers.
    con = start_put(tr, sid, 256 * MiB)
    wait_for(lambda: len(progress(d, sid)["operations"]) == 3, message="a writer")
    s = tr.session()
    assert s.put(tr.url(sid), data=b"x", headers={
        "Content-Range": "bytes 0-0/*"}).status_code == 503
    assert s.patch(tr.url(sid), json={"op": "zero", "size": 1}).status_code == 503
    # Finishing a reader frees its place.
    r0, got = readers.pop()
    r0.close()
    wait_for(lambda: len(progress(d, sid)["operations"]) == 2, message="reader gone")
    r = tr.session().get(tr.url(sid), headers={"Range": "bytes=0-99"})
    assert r.status_code == 206
    assert finish_put(con, 256 * MiB - 16 * MiB) == 200
    for r, got in readers:
        r.close()


def raw_connection(daemon, kind):
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT_S)
        sock.connect(daemon.local_path)
        return sock
    port = daemon.tls_port if kind == "tls" else daemon.tcp_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    if kind == "tls":
        ctx = ssl.create_default_context(cafile=daemon.cert)
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    return sock


def wait_closed(sock, timeout=WAIT_S):
    """Seconds until the peer closes `sock` (reading and dropping data)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    return time.monotonic() - start


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_inactivity_timeout_config(make_daemon, kind):
    d = make_daemon({"images": {"inactivity_timeout_s": 1}})
    # A client that connects and says nothing.
    with raw_connection(d, kind) as sock:
        assert wait_closed(sock) < 4
    if kind == "tls":
        # A client that does not even start the TLS handshake.
        with socket.create_connection(("127.0.0.1", d.tls_port)) as sock:
            assert wait_closed(sock) < 4
    # An idle keep-alive connection.
    with raw_connection(d, kind) as sock:
        sock.sendall(b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_closed(sock) < 4


def test_inactivity_timeout_session(daemon, tmp_path):
    path = str(tmp_path / "idle.raw")
    make_sparse(path, MiB)
    sid = daemon.add_session(path, inactivity_timeout=1)
    with raw_connection(daemon, "tls") as sock:
        sock.sendall(f"OPTIONS /images/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        start = time.monotonic()
        assert wait_closed(sock) < 4
        assert time.monotonic() - start >= 0.5


def test_inactivity_timeout_stalled_upload(transport, daemon, tmp_path):
    # A client that stops sending mid-body is dropped; the upload fails.
    size = 64 * MiB
    path = big_sparse(tmp_path, size)
    sid = daemon.add_session(path, inactivity_timeout=1)
    con = start_put(transport, sid, size, first=2 * MiB)
    wait_for(lambda: progress(daemon, sid)["active"], message="upload started")
    wait_for(lambda: not progress(daemon, sid)["active"], message="upload dropped")
    assert finish_put(con, size - 2 * MiB) != 200


# curl, a real client of the API.

@needs_tool("curl")
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_curl(daemon, tmp_path, kind):
    tr = Transport(daemon, kind)
    path, content = str(tmp_path / "curl.raw"), None
    content = make_sparse(path, 6 * MiB + 100)
    sid = daemon.add_session(path)

    # OPTIONS.
    status, body = curl("-X", "OPTIONS", *tr.curl_args(sid))
    assert status == 200
    assert json.loads(body)["unix_socket"] == daemon.local_path

    # Upload a whole image (large enough for Expect: 100-continue).
    src = str(tmp_path / "src.raw")
    data = make_allocated(src, len(content), seed=4)
    status, body = curl("-T", src, *tr.curl_args(sid))
    assert status == 200, body
    assert read_file(path) == bytes(data)

    # Upload a range, without flush.
    part = str(tmp_path / "part.raw")
    with open(part, "wb") as f:
        f.write(b"P" * 5000)
    status, _ = curl("-T", part, "-H", "Content-Range: bytes 4000-8999/*",
                     *tr.curl_args(sid, "?flush=n"))
    assert status == 200
    data[4000:9000] = b"P" * 5000

    # Download ranges.
    status, body = curl("--range", "3990-9009", *tr.curl_args(sid))
    assert status == 206
    assert body == bytes(data[3990:9010])
    status, body = curl("--range", "-100", *tr.curl_args(sid))
    assert status == 206 and body == bytes(data[-100:])
    status, body = curl("--range", f"{len(data)}-", *tr.curl_args(sid))
    assert status == 416

    # Zero and flush.
    status, _ = curl("-X", "PATCH", "-H", "Content-Type: application/json",
                     "--data-binary", '{"op": "zero", "offset": 100, "size": 5000}',
                     *tr.curl_args(sid))
    assert status == 200
    data[100:5100] = bytes(5000)
    status, _ = curl("-X", "PATCH", "--data-binary", '{"op": "flush"}',
                     *tr.curl_args(sid))
    assert status == 200

    # Download all of it, and compare checksums.
    out = str(tmp_path / "out.raw")
    status, _ = curl("-o", out, *tr.curl_args(sid))
    assert status == 200
    assert read_file(out) == bytes(data) == read_file(path)
    status, body = curl(*tr.curl_args(sid, "/checksum"))
    assert json.loads(body) == blkhash.checksum_file(out)

    # Chunked upload from a pipe (no length known in advance), at an offset.
    proc = subprocess.run(
        ["curl", "-sS", "--fail", "-T", "-", "-H", "Content-Range: bytes 10-*/*",
         *tr.curl_args(sid)],
        input=b"C" * 3 * MiB, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data[10:10 + 3 * MiB] = b"C" * 3 * MiB
    assert read_file(path) == bytes(data)


@needs_tool("curl")
def test_curl_errors(daemon, tmp_path):
    tr = Transport(daemon, "tls")
    path = str(tmp_path / "ro.raw")
    content = make_sparse(path, 2 * MiB)
    sid = daemon.add_session(path, ops=["read"])
    src = str(tmp_path / "src.raw")
    make_allocated(src, 2 * MiB)
    status, body = curl("-T", src, *tr.curl_args(sid), check=False)
    assert status == 403
    assert b"write" in body
    status, body = curl(*tr.curl_args("no-such-session"), check=False)
    assert status == 403
    p = subprocess.run(["curl", "-sS", "--fail", *tr.curl_args("nope")],
                       capture_output=True, timeout=60)
    assert p.returncode == 22
    assert read_file(path) == bytes(content)


def test_close_query_closes_the_connection(daemon, sparse_image):
    path, _ = sparse_image
    sid = daemon.add_session(path)
    with socket.create_connection(("127.0.0.1", daemon.tcp_port), timeout=10) as s:
        s.sendall(f"GET /images/{sid}?close=y HTTP/1.1\r\nHost: x\r\n"
                  f"Range: bytes=0-9\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206")
    assert b"Connection: close" in head
    assert len(body) == 10
