"""
The images API handlers under webtest: statuses, headers, bodies and bad
input, on real files, without a server.

The app is built exactly as the daemon builds it (imaged.apps.images.make_app
over an imaged.sessions.Registry and a validated config); sessions are added
to the registry directly.
"""

import json
import os
import uuid

import pytest
import webtest

from imaged import blkhash
from imaged import config
from imaged import sessions
from imaged.apps import images as images_app

from tests.images_helpers import KiB, MiB, local_checksum, make_sparse, read_file

UNIX_SOCKET = "/run/imaged/test-images.sock"

SIZE = 1 * MiB + 3000   # Not a multiple of 4096: the last block is partial.
DATA_AT = 256 * KiB     # Data in the sparse image: [DATA_AT, DATA_AT + 64 KiB)
DATA = bytes(range(256)) * 256


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def registry(clock):
    return sessions.Registry(clock=clock)


@pytest.fixture
def cfg():
    return config.validate({
        "listeners": [{"name": "test", "kind": "tcp", "host": "127.0.0.1",
                       "port": 0, "apps": ["images"]}],
        "images": {"buffer_size_bytes": 64 * KiB},
        "sessions": {"max_body_bytes": 1024},
    })


@pytest.fixture
def app(registry, cfg):
    return webtest.TestApp(
        images_app.make_app(registry, cfg, unix_socket=UNIX_SOCKET))


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "disk.raw")
    content = make_sparse(path, SIZE, [(DATA_AT, DATA)])
    return path, content


def add(registry, path, size=None, ops=("read", "write"), timeout=300, **extra):
    sid = str(uuid.uuid4())
    body = {"url": f"file://{path}",
            "size": os.path.getsize(path) if size is None else size,
            "ops": list(ops), "timeout": timeout}
    body.update(extra)
    registry.add(sessions.parse_spec(sid, body))
    return sid


def assert_error(res, status, *words):
    """An error answer: status, short plain text, never the session id."""
    assert res.status_int == status, res
    assert res.content_type == "text/plain"
    text = res.text
    assert text.endswith("\n") and len(text) < 300, text
    for w in words:
        assert w in text.lower(), text
    return text


# OPTIONS

def test_options_read_write(app, registry, image):
    sid = add(registry, image[0])
    res = app.options(f"/images/{sid}")
    assert res.status_int == 200
    assert res.headers["Allow"].split(",") == ["OPTIONS", "GET", "PUT", "PATCH"]
    assert res.content_type == "application/json"
    assert res.json == {
        "features": ["checksum", "extents", "flush", "zero"],
        "max_readers": 8,
        "max_writers": 8,
        "unix_socket": UNIX_SOCKET,
    }


def test_options_read_only(app, registry, image):
    sid = add(registry, image[0], ops=["read"])
    res = app.options(f"/images/{sid}")
    assert res.headers["Allow"].split(",") == ["OPTIONS", "GET"]
    assert res.json["features"] == ["checksum", "extents"]
    assert res.json["max_writers"] == 0
    assert res.json["max_readers"] == 8


def test_options_write_only_session_may_read(app, registry, image):
    # As in ovirt-imageio, a write session may also read.
    sid = add(registry, image[0], ops=["write"])
    res = app.options(f"/images/{sid}")
    assert "GET" in res.headers["Allow"] and "PUT" in res.headers["Allow"]
    assert app.get(f"/images/{sid}").body == bytes(image[1])


def test_options_star(app):
    res = app.options("/images/*")
    assert res.status_int == 200
    assert "PUT" in res.headers["Allow"].split(",")
    assert res.json == {"features": ["checksum", "extents", "flush", "zero"],
                        "unix_socket": UNIX_SOCKET}


def test_options_without_unix_socket(registry, cfg, image):
    app = webtest.TestApp(images_app.make_app(registry, cfg))
    sid = add(registry, image[0])
    assert "unix_socket" not in app.options(f"/images/{sid}").json
    assert "unix_socket" not in app.options("/images/*").json


def test_options_unknown_session(app):
    assert_error(app.options("/images/no-such-session", status="*"), 403)


# GET

def test_get_whole_image(app, registry, image):
    path, content = image
    sid = add(registry, path)
    res = app.get(f"/images/{sid}")
    assert res.status_int == 200
    assert res.content_type == "application/octet-stream"
    assert res.headers["Content-Length"] == str(SIZE)
    assert "Content-Range" not in res.headers
    assert res.body == bytes(content)


@pytest.mark.parametrize("header,offset,length", [
    ("bytes=0-0", 0, 1),
    ("bytes=0-99", 0, 100),
    (f"bytes={DATA_AT - 10}-{DATA_AT + 9}", DATA_AT - 10, 20),
    ("bytes=1000-", 1000, SIZE - 1000),
    ("bytes=-100", SIZE - 100, 100),
    (f"bytes=-{SIZE + 10}", 0, SIZE),     # Suffix longer than the image.
    (f"bytes=0-{SIZE - 1}", 0, SIZE),
    (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, 1),
])
def test_get_range(app, registry, image, header, offset, length):
    path, content = image
    sid = add(registry, path)
    res = app.get(f"/images/{sid}", headers={"Range": header})
    assert res.status_int == 206
    assert res.headers["Content-Range"] == \
        f"bytes {offset}-{offset + length - 1}/{SIZE}"
    assert res.headers["Content-Length"] == str(length)
    assert res.body == bytes(content[offset:offset + length])


@pytest.mark.parametrize("header", [
    "bytes=0-1,4-5",            # Multiple ranges.
    "bytes=0-1, 4-5",
    "bytes=",                   # Malformed.
    "bytes=-",
    "bytes=a-b",
    "items=0-1",
    "bytes=5-2",
    "bytes=-0",
    f"bytes={SIZE}-",           # Outside [0, size).
    f"bytes={SIZE}-{SIZE}",
    f"bytes=0-{SIZE}",
    f"bytes={10**30}-",
])
def test_get_range_not_satisfiable(app, registry, image, header):
    sid = add(registry, image[0])
    res = app.get(f"/images/{sid}", headers={"Range": header}, status="*")
    assert_error(res, 416)
    assert res.headers["Content-Range"] == f"bytes */{SIZE}"


def test_get_session_smaller_than_image(app, registry, image):
    path, content = image
    sid = add(registry, path, size=DATA_AT + 10)
    res = app.get(f"/images/{sid}")
    assert res.body == bytes(content[:DATA_AT + 10])
    res = app.get(f"/images/{sid}", headers={"Range": f"bytes={DATA_AT + 10}-"},
                  status="*")
    assert_error(res, 416)
    assert res.headers["Content-Range"] == f"bytes */{DATA_AT + 10}"


def test_get_session_larger_than_image(app, registry, image):
    # The image is shorter than the session: an error before any byte,
    # never a short 200.
    sid = add(registry, image[0], size=SIZE + 4096)
    res = app.get(f"/images/{sid}", status="*")
    assert_error(res, 500)


def test_get_missing_image(app, registry, tmp_path):
    path = str(tmp_path / "missing.raw")
    sid = add(registry, path, size=4096)
    res = app.get(f"/images/{sid}", status="*")
    assert res.status_int >= 400
    assert sid not in res.text


def test_get_empty_image(app, registry, tmp_path):
    path = str(tmp_path / "empty.raw")
    open(path, "wb").close()
    sid = add(registry, path)
    res = app.get(f"/images/{sid}")
    assert res.status_int == 200
    assert res.body == b""
    res = app.get(f"/images/{sid}", headers={"Range": "bytes=0-"}, status="*")
    assert_error(res, 416)
    assert res.headers["Content-Range"] == "bytes */0"


# PUT

def test_put_whole_image(app, registry, image):
    path, _ = image
    sid = add(registry, path)
    data = os.urandom(SIZE)
    res = app.put(f"/images/{sid}", data,
                  headers={"Content-Type": "application/octet-stream"})
    assert res.status_int == 200
    assert res.body == b""
    assert read_file(path) == data


@pytest.mark.parametrize("flush", [None, "y", "n"])
def test_put_content_range(app, registry, image, flush):
    path, content = image
    sid = add(registry, path)
    offset = DATA_AT + 1000
    data = b"x" * 5000
    url = f"/images/{sid}" + (f"?flush={flush}" if flush else "")
    res = app.put(url, data, headers={
        "Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"})
    assert res.status_int == 200
    content[offset:offset + len(data)] = data
    assert read_file(path) == bytes(content)


def test_put_content_range_total(app, registry, image):
    # ovirt-imageio clients send "/*"; a total size is accepted too.
    path, content = image
    sid = add(registry, path)
    res = app.put(f"/images/{sid}", b"abc",
                  headers={"Content-Range": f"bytes 10-12/{SIZE}"})
    assert res.status_int == 200
    content[10:13] = b"abc"
    assert read_file(path) == bytes(content)


def test_put_last_byte(app, registry, image):
    path, content = image
    sid = add(registry, path)
    app.put(f"/images/{sid}", b"Z",
            headers={"Content-Range": f"bytes {SIZE - 1}-{SIZE - 1}/*"})
    content[-1:] = b"Z"
    assert read_file(path) == bytes(content)


@pytest.mark.parametrize("offset,length", [
    (SIZE - 10, 20),        # Crosses the end.
    (SIZE, 1),              # Starts at the end.
    (SIZE + 4096, 100),     # Starts after the end.
])
def test_put_outside_image_never_extends(app, registry, image, offset, length):
    path, content = image
    sid = add(registry, path)
    res = app.put(f"/images/{sid}", b"x" * length, status="*", headers={
        "Content-Range": f"bytes {offset}-{offset + length - 1}/*"})
    assert_error(res, 416)
    assert res.headers["Content-Range"] == f"bytes */{SIZE}"
    # The body is not read: the connection is closed after the answer.
    assert res.headers["Connection"] == "close"
    assert os.path.getsize(path) == SIZE
    assert read_file(path) == bytes(content)


def test_put_outside_session_smaller_than_image(app, registry, image):
    path, content = image
    sid = add(registry, path, size=8192)
    res = app.put(f"/images/{sid}", b"x" * 100, status="*",
                  headers={"Content-Range": "bytes 8150-8249/*"})
    assert_error(res, 416)
    assert res.headers["Content-Range"] == "bytes */8192"
    assert read_file(path) == bytes(content)


def test_put_whole_body_larger_than_image(app, registry, image):
    path, content = image
    sid = add(registry, path)
    res = app.put(f"/images/{sid}", b"x" * (SIZE + 1), status="*")
    assert_error(res, 416)
    assert read_file(path) == bytes(content)


@pytest.mark.parametrize("header", [
    "bytes 10-5/*",
    "bytes a-b/*",
    "bytes=0-9",
    "items 0-9/*",
    "bytes 0-9",
])
def test_put_invalid_content_range(app, registry, image, header):
    path, content = image
    sid = add(registry, path)
    res = app.put(f"/images/{sid}", b"x" * 10, status="*",
                  headers={"Content-Range": header})
    assert_error(res, 400, "content-range")
    assert res.headers["Connection"] == "close"
    assert read_file(path) == bytes(content)


def test_put_content_range_does_not_match_length(app, registry, image):
    path, content = image
    sid = add(registry, path)
    res = app.put(f"/images/{sid}", b"x" * 10, status="*",
                  headers={"Content-Range": "bytes 0-19/*"})
    assert_error(res, 400, "content-range")
    assert read_file(path) == bytes(content)


def test_put_invalid_flush(app, registry, image):
    sid = add(registry, image[0])
    res = app.put(f"/images/{sid}?flush=yes", b"x", status="*")
    assert_error(res, 400, "flush")


def test_put_without_content_length(app, registry, image):
    path, content = image
    sid = add(registry, path)
    req = webtest.TestRequest.blank(f"/images/{sid}", method="PUT")
    req.environ.pop("CONTENT_LENGTH", None)
    res = app.do_request(req, status="*")
    assert_error(res, 400, "content-length")
    assert read_file(path) == bytes(content)


def test_put_read_only_session(app, registry, image):
    path, content = image
    sid = add(registry, path, ops=["read"])
    res = app.put(f"/images/{sid}", b"x" * 10, status="*")
    assert_error(res, 403, "write")
    # A refused upload is not read to its end: the connection is closed.
    assert res.headers["Connection"] == "close"
    assert read_file(path) == bytes(content)


# PATCH

def patch(app, sid, msg, status=200):
    return app.patch(f"/images/{sid}", json.dumps(msg).encode(),
                     headers={"Content-Type": "application/json"}, status=status)


def test_patch_zero(app, registry, image):
    path, content = image
    sid = add(registry, path)
    res = patch(app, sid, {"op": "zero", "offset": DATA_AT + 100, "size": 1000,
                           "flush": True})
    assert res.status_int == 200 and res.body == b""
    content[DATA_AT + 100:DATA_AT + 1100] = bytes(1000)
    assert read_file(path) == bytes(content)


def test_patch_zero_defaults(app, registry, tmp_path):
    # offset defaults to 0, flush to false.
    path = str(tmp_path / "full.raw")
    with open(path, "wb") as f:
        f.write(b"\xff" * 3 * 4096)
    sid = add(registry, path)
    patch(app, sid, {"op": "zero", "size": 5000})
    assert read_file(path) == bytes(5000) + b"\xff" * (3 * 4096 - 5000)


def test_patch_zero_sparse_session_punches_holes(app, registry, tmp_path):
    path = str(tmp_path / "full.raw")
    with open(path, "wb") as f:
        f.write(b"\xff" * 4 * MiB)
        os.fsync(f.fileno())
    sid = add(registry, path, sparse=True)
    before = os.stat(path).st_blocks
    patch(app, sid, {"op": "zero", "size": 4 * MiB, "flush": True})
    assert read_file(path) == bytes(4 * MiB)
    assert os.stat(path).st_blocks < before
    assert os.path.getsize(path) == 4 * MiB


def test_patch_flush(app, registry, image):
    sid = add(registry, image[0])
    assert patch(app, sid, {"op": "flush"}).status_int == 200


@pytest.mark.parametrize("offset,size", [
    (SIZE - 10, 11),
    (SIZE, 1),
    (0, SIZE + 1),
])
def test_patch_zero_outside_image(app, registry, image, offset, size):
    path, content = image
    sid = add(registry, path)
    res = patch(app, sid, {"op": "zero", "offset": offset, "size": size},
                status="*")
    assert_error(res, 416)
    assert res.headers["Content-Range"] == f"bytes */{SIZE}"
    assert os.path.getsize(path) == SIZE
    assert read_file(path) == bytes(content)


@pytest.mark.parametrize("msg,word", [
    ({"op": "zero"}, "size"),
    ({"op": "zero", "size": -1}, "size"),
    ({"op": "zero", "size": "10"}, "size"),
    ({"op": "zero", "size": True}, "size"),
    ({"op": "zero", "size": 1.5}, "size"),
    ({"op": "zero", "size": 10, "offset": -1}, "offset"),
    ({"op": "zero", "size": 10, "offset": None}, "offset"),
    ({"op": "zero", "size": 10, "flush": "yes"}, "flush"),
    ({"op": "punch"}, "op"),
    ({"size": 10}, "op"),
    ([], "object"),
    ("zero", "object"),
])
def test_patch_invalid(app, registry, image, msg, word):
    path, content = image
    sid = add(registry, path)
    res = patch(app, sid, msg, status="*")
    assert_error(res, 400, word)
    assert read_file(path) == bytes(content)


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"nan"])
def test_patch_invalid_json(app, registry, image, body):
    sid = add(registry, image[0])
    res = app.patch(f"/images/{sid}", body, status="*",
                    headers={"Content-Type": "application/json"})
    assert_error(res, 400, "json")


def test_patch_body_too_large(app, registry, image):
    sid = add(registry, image[0])
    msg = {"op": "zero", "size": 10, "pad": "x" * 2000}
    res = patch(app, sid, msg, status="*")
    assert_error(res, 413, "too large")


@pytest.mark.parametrize("msg", [
    {"op": "zero", "size": 10},
    {"op": "flush"},
])
def test_patch_read_only_session(app, registry, image, msg):
    path, content = image
    sid = add(registry, path, ops=["read"])
    res = patch(app, sid, msg, status="*")
    assert_error(res, 403, "write")
    assert read_file(path) == bytes(content)


# Extents

def test_extents_sparse(app, registry, image):
    sid = add(registry, image[0])
    res = app.get(f"/images/{sid}/extents")
    assert res.status_int == 200
    assert res.content_type == "application/json"
    # Holes of a raw file are zero, never holes; data is 4 KiB aligned.
    assert res.json == [
        {"start": 0, "length": DATA_AT, "zero": True, "hole": False},
        {"start": DATA_AT, "length": len(DATA), "zero": False, "hole": False},
        {"start": DATA_AT + len(DATA), "length": SIZE - DATA_AT - len(DATA),
         "zero": True, "hole": False},
    ]
    assert app.get(f"/images/{sid}/extents?context=zero").json == res.json


def test_extents_cover_session_exactly(app, registry, image):
    sid = add(registry, image[0], size=DATA_AT + 100)
    assert app.get(f"/images/{sid}/extents").json == [
        {"start": 0, "length": DATA_AT, "zero": True, "hole": False},
        {"start": DATA_AT, "length": 100, "zero": False, "hole": False},
    ]


def test_extents_window(app, registry, image):
    sid = add(registry, image[0])
    res = app.get(f"/images/{sid}/extents?start={DATA_AT - 4096}&length=8192")
    assert res.json == [
        {"start": DATA_AT - 4096, "length": 4096, "zero": True, "hole": False},
        {"start": DATA_AT, "length": 4096, "zero": False, "hole": False},
    ]
    # A window past the end is clipped to the session.
    res = app.get(f"/images/{sid}/extents?start={SIZE - 100}&length={10**6}")
    assert res.json == [
        {"start": SIZE - 100, "length": 100, "zero": True, "hole": False}]
    # Only a start.
    res = app.get(f"/images/{sid}/extents?start={DATA_AT}")
    assert res.json[0]["start"] == DATA_AT
    assert sum(e["length"] for e in res.json) == SIZE - DATA_AT


def test_extents_read_only_session(app, registry, image):
    sid = add(registry, image[0], ops=["read"])
    assert app.get(f"/images/{sid}/extents").status_int == 200


def test_extents_empty_image(app, registry, tmp_path):
    path = str(tmp_path / "empty.raw")
    open(path, "wb").close()
    sid = add(registry, path)
    assert app.get(f"/images/{sid}/extents").json == []


@pytest.mark.parametrize("query,status", [
    ("context=dirty", 404),     # No dirty extents here, as in ovirt-imageio.
    ("context=bogus", 400),
    ("start=abc", 400),
    ("start=-1", 400),
    ("length=1.5", 400),
    (f"start={SIZE}", 416),
    (f"start={SIZE + 1}&length=10", 416),
])
def test_extents_invalid(app, registry, image, query, status):
    sid = add(registry, image[0])
    res = app.get(f"/images/{sid}/extents?{query}", status="*")
    assert_error(res, status)


# Checksum

def test_checksum_default(app, registry, image):
    path, content = image
    sid = add(registry, path)
    res = app.get(f"/images/{sid}/checksum")
    assert res.status_int == 200
    assert res.json == {
        "algorithm": "blake2b",
        "block_size": 4 * MiB,
        "checksum": local_checksum(content),
    }
    assert res.json == blkhash.checksum_file(path)


@pytest.mark.parametrize("algorithm,block_size", [
    ("blake2b", MiB),
    ("sha256", MiB),
    ("sha1", 2 * MiB),
    ("blake2s", 16 * MiB),
])
def test_checksum_options(app, registry, image, algorithm, block_size):
    path, content = image
    sid = add(registry, path)
    res = app.get(f"/images/{sid}/checksum?algorithm={algorithm}"
                  f"&block_size={block_size}")
    assert res.json == {
        "algorithm": algorithm,
        "block_size": block_size,
        "checksum": local_checksum(content, block_size, algorithm),
    }


def test_checksum_session_smaller_than_image(app, registry, image):
    path, content = image
    sid = add(registry, path, size=DATA_AT + 10)
    assert app.get(f"/images/{sid}/checksum").json["checksum"] == \
        local_checksum(content[:DATA_AT + 10])


def test_checksum_read_only_session(app, registry, image):
    sid = add(registry, image[0], ops=["read"])
    assert app.get(f"/images/{sid}/checksum").status_int == 200


@pytest.mark.parametrize("query", [
    "algorithm=md55",
    "block_size=4095",
    "block_size=1000000",       # Not a multiple of 4096.
    f"block_size={512 * KiB}",  # Below 1 MiB.
    f"block_size={32 * MiB}",   # Above 16 MiB.
    "block_size=abc",
])
def test_checksum_invalid(app, registry, image, query):
    sid = add(registry, image[0])
    assert_error(app.get(f"/images/{sid}/checksum?{query}", status="*"), 400)


def test_checksum_algorithms(app, registry, image):
    # Any id works, as in ovirt-imageio.
    for sid in ("*", "no-such-session", add(registry, image[0])):
        res = app.get(f"/images/{sid}/checksum/algorithms")
        assert res.status_int == 200
        algorithms = res.json["algorithms"]
        assert "blake2b" in algorithms and "sha256" in algorithms
        assert algorithms == sorted(algorithms)


# Sessions that are unknown, expired, canceled; ops not allowed.

REQUESTS = [
    ("OPTIONS", "", None),
    ("GET", "", None),
    ("PUT", "", b"data"),
    ("PATCH", "", json.dumps({"op": "flush"}).encode()),
    ("GET", "/extents", None),
    ("GET", "/checksum", None),
]


def request(app, method, url, body):
    headers = {"Content-Type": "application/json"} if method == "PATCH" else {}
    return app.request(url, method=method, body=body or b"", headers=headers,
                       expect_errors=True)


@pytest.mark.parametrize("method,suffix,body", REQUESTS)
def test_unknown_session(app, method, suffix, body):
    sid = "c2e36b9c-0b6f-4b1e-a9e6-0a6a4f7c2d11"
    res = request(app, method, f"/images/{sid}{suffix}", body)
    text = assert_error(res, 403)
    assert sid not in text and sid[:8] not in text


@pytest.mark.parametrize("method,suffix,body", REQUESTS)
def test_expired_session(app, registry, clock, image, method, suffix, body):
    path, content = image
    sid = add(registry, path, timeout=10)
    clock.now += 10
    res = request(app, method, f"/images/{sid}{suffix}", body)
    assert_error(res, 403, "expired")
    assert read_file(path) == bytes(content)


@pytest.mark.parametrize("method,suffix,body", REQUESTS)
def test_canceled_session(app, registry, image, method, suffix, body):
    path, content = image
    sid = add(registry, path)
    registry.get(sid).cancel()
    res = request(app, method, f"/images/{sid}{suffix}", body)
    assert_error(res, 403, "canceled")
    assert read_file(path) == bytes(content)


@pytest.mark.parametrize("method,suffix,body", REQUESTS)
def test_removed_session(app, registry, image, method, suffix, body):
    sid = add(registry, image[0])
    registry.remove(sid)
    assert_error(request(app, method, f"/images/{sid}{suffix}", body), 403)


def test_renewed_session(app, registry, clock, image):
    sid = add(registry, image[0], timeout=10)
    clock.now += 9
    registry.extend(sid, 10)
    clock.now += 9
    assert app.options(f"/images/{sid}").status_int == 200


def test_many_requests_on_one_session(app, registry, image):
    # Requests without a server connection must not accumulate state in the
    # session (connections, operations).
    path, content = image
    sid = add(registry, path)
    for _ in range(50):
        assert app.get(f"/images/{sid}",
                       headers={"Range": "bytes=0-99"}).status_int == 206
    session = registry.get(sid)
    assert session.operations() == []
    assert not session.active


# Routing and error bodies.

def test_unknown_resource(app, registry, image):
    sid = add(registry, image[0])
    res = app.get(f"/images/{sid}/nothing", status="*")
    assert_error(res, 404)


def test_method_not_allowed(app, registry, image):
    sid = add(registry, image[0])
    res = app.delete(f"/images/{sid}", status="*")
    assert_error(res, 405)
    res = app.post(f"/images/{sid}", b"x", status="*")
    assert_error(res, 405)


# Browsers: the engine's web UI talks to the images API directly.

def test_cors_preflight(app, registry, image):
    sid = add(registry, image[0])
    r = app.options(f"/images/{sid}", headers={
        "Origin": "https://engine.example.com:8443",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-range,content-type"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Allow-Methods"] == "OPTIONS,GET,PUT,PATCH"
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert r.headers["Access-Control-Max-Age"] == "86400"


def test_cors_on_get_and_put(app, registry, image):
    sid = add(registry, image[0])
    origin = {"Origin": "https://engine.example.com:8443"}
    r = app.get(f"/images/{sid}", headers=dict(origin, Range="bytes=0-9"), status=206)
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = app.put(f"/images/{sid}", b"x" * 10, headers=origin)
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    # Errors too, so the browser can show them.
    r = app.get("/images/no-such-session", headers=origin, status=403)
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_no_cors_headers_without_origin(app, registry, image):
    sid = add(registry, image[0])
    r = app.get(f"/images/{sid}", headers={"Range": "bytes=0-9"}, status=206)
    assert "Access-Control-Allow-Origin" not in r.headers


def test_close_query_closes_the_connection(app, registry, image):
    sid = add(registry, image[0])
    r = app.get(f"/images/{sid}?close=y", headers={"Range": "bytes=0-9"}, status=206)
    assert r.headers["Connection"] == "close"
    r = app.put(f"/images/{sid}?close=y", b"x" * 10)
    assert r.headers["Connection"] == "close"
    r = app.get(f"/images/{sid}", headers={"Range": "bytes=0-9"}, status=206)
    assert "Connection" not in r.headers


# Checksum blocks (SPEC §11): the block digests a checksum is made of.

def _block_hex(block, algorithm="blake2b"):
    import hashlib
    if algorithm.startswith("blake2"):
        return hashlib.new(algorithm, bytes(block), digest_size=32).hexdigest()
    return hashlib.new(algorithm, bytes(block)).hexdigest()


@pytest.fixture
def blocks_image(tmp_path):
    # 5 blocks of 1 MiB and a partial one: data in blocks 1 and 3 (3 also
    # crossing into 4), the rest holes.
    path = str(tmp_path / "blocks.raw")
    size = 5 * MiB + 3000
    content = make_sparse(path, size, [(MiB + 10, DATA), (4 * MiB - 100, DATA)])
    return path, content


def test_checksum_blocks_whole_image(app, registry, blocks_image):
    path, content = blocks_image
    sid = add(registry, path)
    res = app.get(f"/images/{sid}/checksum/blocks?block_size={MiB}")
    assert res.status_int == 200
    expected = [_block_hex(content[i:i + MiB]) for i in range(0, len(content), MiB)]
    assert res.json == {"algorithm": "blake2b", "block_size": MiB, "start": 0,
                        "blocks": expected}
    assert len(expected) == 6
    # The same digests the checksum is made of.
    import hashlib
    outer = hashlib.blake2b(b"".join(bytes.fromhex(d) for d in expected), digest_size=32)
    assert outer.hexdigest() == \
        app.get(f"/images/{sid}/checksum?block_size={MiB}").json["checksum"]


@pytest.mark.parametrize("algorithm", ["blake2b", "sha256"])
def test_checksum_blocks_window(app, registry, blocks_image, algorithm):
    path, content = blocks_image
    sid = add(registry, path)
    res = app.get(f"/images/{sid}/checksum/blocks?algorithm={algorithm}"
                  f"&block_size={MiB}&start={3 * MiB}&length={2 * MiB}")
    assert res.json == {
        "algorithm": algorithm, "block_size": MiB, "start": 3 * MiB,
        "blocks": [_block_hex(content[i:i + MiB], algorithm)
                   for i in (3 * MiB, 4 * MiB)]}
    # A window past the end is clipped to the image; the last block is short.
    res = app.get(f"/images/{sid}/checksum/blocks?block_size={MiB}"
                  f"&start={5 * MiB}&length={8 * MiB}")
    assert res.json["blocks"] == [_block_hex(content[5 * MiB:])]
    # An empty window: no blocks.
    res = app.get(f"/images/{sid}/checksum/blocks?block_size={MiB}&start={MiB}&length=0")
    assert res.json["blocks"] == []


@pytest.mark.parametrize("buffer_size", [64 * KiB, MiB, 4 * MiB])
def test_checksum_blocks_any_buffer_size(registry, tmp_path, buffer_size):
    # Blocks larger than the connection's buffers are read into a buffer of
    # their own, one at a time; blocks that fit are read into its two
    # buffers in turn, the next data block while the current one is hashed.
    # Data blocks 0, 2, 3 and 5 of 1 MiB, holes between them.
    path = str(tmp_path / "img.raw")
    content = make_sparse(path, 6 * MiB + 100, [
        (0, DATA), (2 * MiB + 7, DATA * 3), (3 * MiB, DATA), (5 * MiB + 9, DATA)])
    cfg = config.validate({
        "listeners": [{"name": "test", "kind": "tcp", "host": "127.0.0.1",
                       "port": 0, "apps": ["images"]}],
        "images": {"buffer_size_bytes": buffer_size}})
    app = webtest.TestApp(images_app.make_app(registry, cfg, unix_socket=UNIX_SOCKET))
    sid = add(registry, path)
    res = app.get(f"/images/{sid}/checksum/blocks?algorithm=sha256&block_size={MiB}")
    assert res.json["blocks"] == [_block_hex(content[i:i + MiB], "sha256")
                                  for i in range(0, len(content), MiB)]


def test_checksum_blocks_zero_blocks_not_read(app, registry, tmp_path):
    # The session is larger than the file: the part past the end has no
    # bytes to read (reading it fails), so its zero digests prove that zero
    # blocks are never read.
    path = str(tmp_path / "short.raw")
    content = make_sparse(path, 2 * MiB, [(10, DATA)])
    sid = add(registry, path, size=4 * MiB)
    res = app.get(f"/images/{sid}/checksum/blocks?block_size={MiB}")
    zero = _block_hex(bytes(MiB))
    assert res.json["blocks"] == [_block_hex(content[:MiB]), zero, zero, zero]


def test_checksum_blocks_fewer_than_asked(app, registry, blocks_image, monkeypatch):
    path, content = blocks_image
    sid = add(registry, path)
    monkeypatch.setattr(config, "CHECKSUM_BLOCKS_WINDOW_BYTES", 2 * MiB)
    res = app.get(f"/images/{sid}/checksum/blocks?block_size={MiB}&start={MiB}")
    assert res.json["start"] == MiB
    assert res.json["blocks"] == [_block_hex(content[i:i + MiB]) for i in (MiB, 2 * MiB)]


def test_checksum_blocks_read_only_session(app, registry, blocks_image):
    sid = add(registry, blocks_image[0], ops=["read"])
    assert app.get(f"/images/{sid}/checksum/blocks").status_int == 200


@pytest.mark.parametrize("query", [
    f"block_size={MiB}&start=4096",          # Not on a block boundary.
    f"block_size={MiB}&start={7 * MiB}",     # Past the end of the image.
    "start=-1",
    "start=x",
    "length=-5",
    "block_size=4095",
    f"block_size={32 * MiB}",
    "algorithm=md55",
])
def test_checksum_blocks_invalid(app, registry, blocks_image, query):
    sid = add(registry, blocks_image[0])
    assert_error(app.get(f"/images/{sid}/checksum/blocks?{query}", status="*"), 400)


def test_checksum_blocks_unknown_session(app):
    assert_error(app.get("/images/no-such-session/checksum/blocks", status="*"), 403)
