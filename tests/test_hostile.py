"""
Hostile input: whatever a client or a confused host agent sends, the answer
is a 4xx (or a 2xx for input that is in fact valid), never a 500 or a crash,
and a refused request changes nothing: not the image, not the sessions.

Property-based tests (hypothesis) run against the apps in process (webtest,
built exactly as the daemon builds them) for speed, and a smaller number of
examples against a real daemon over raw sockets, for what only a real
server sees: NUL and non-UTF-8 bytes in the request line, encoded slashes,
very long request lines.

Also here: session urls and image confinement (allowed_dirs, symlinks),
session ids kept out of error bodies and logs, and the control socket's
permissions.
"""

import json
import os
import random
import stat
import string
import urllib.parse
import uuid

import pytest
import webtest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imaged import config
from imaged import sessions
from imaged.apps import images as images_app
from imaged.apps import progress as progress_app
from imaged.apps import sessions as sessions_app
from imaged.server import Dispatcher

from tests.hardening_helpers import (
    KiB, MiB, alive, connect, control_connect, control_request, digest, progress,
    raw_request, registry_state, request, response_or_none, sparse_file, wait_for)

SIZE = 192 * KiB + 1000     # Not a multiple of 4096: a partial last block.

FIELDS = ("uuid", "url", "size", "ops", "timeout", "sparse",
          "inactivity_timeout", "transfer_id", "dirty", "filename")

# Derandomized: the same examples on every run, so CI is not a lottery;
# change the seed (or run with derandomize=False) to explore further.
HYPOTHESIS = dict(deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.filter_too_much,
                                         HealthCheck.function_scoped_fixture])


# In-process apps.

class Env:
    """The images and control apps over one registry, and a model image."""

    def __init__(self, tmp):
        self.cfg = config.validate({
            "listeners": [{"name": "t", "kind": "tcp", "host": "127.0.0.1",
                           "port": 0, "apps": ["images"]}],
            "images": {"buffer_size_bytes": 64 * KiB},
            "sessions": {"max_body_bytes": 4096},
        })
        self.registry = sessions.Registry(remove_timeout_s=1)
        self.images = webtest.TestApp(
            images_app.make_app(self.registry, self.cfg, unix_socket="/run/x.sock"))
        self.control = webtest.TestApp(Dispatcher({
            "/sessions/": sessions_app.make_app(self.registry, self.cfg),
            "/tickets/": sessions_app.make_app(self.registry, self.cfg),
            "/progress/": progress_app.make_app(self.registry, self.cfg),
        }))
        self.path = str(tmp / "disk.raw")
        self.content = bytearray(random.Random(1).randbytes(SIZE))
        with open(self.path, "wb") as f:
            f.write(self.content)
        self.sid = self.add(ops=["read", "write"])
        self.ro_sid = self.add(ops=["read"])

    def add(self, **kw):
        sid = str(uuid.uuid4())
        body = {"url": f"file://{self.path}", "size": SIZE, "timeout": 3600}
        body.update(kw)
        self.registry.add(sessions.parse_spec(sid, body))
        return sid

    def file_content(self):
        with open(self.path, "rb") as f:
            return f.read()

    def check_image(self):
        """The image holds exactly what the model says, and its size."""
        assert self.file_content() == bytes(self.content)

    def snapshot(self):
        return {s.id: (dict(s.spec), s.expires, s.canceled)
                for s in self.registry.sessions()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("hostile"))


def no_server_error(res):
    assert res.status_int < 500, (res.status, res.body[:200])
    if res.status_int >= 400:
        assert res.content_type == "text/plain", res
        assert len(res.body) < 400, res.body


# Strategies.

# Header values a client can send: printable latin-1, no CR/LF.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                           blacklist_characters="\x7f"),
    max_size=60)

numbers = st.one_of(
    st.integers(0, SIZE + 10),
    st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 4096, 2**63 - 1, 2**64,
                     10**19, 10**20, 10**30]),
    st.integers(-(10**6), -1),
)
number_text = st.one_of(
    numbers.map(str),
    st.sampled_from(["", " ", "+1", "0x10", "1e3", "\u00b2", "1.5", "-0",
                     "00000000000000000000001", "9" * 30]),
)


def range_header():
    sep = st.sampled_from(["-", " - ", "--", "\u2013", ""])
    return st.one_of(
        st.builds(lambda u, a, s, b: f"{u}{a}{s}{b}",
                  st.sampled_from(["bytes=", "bytes = ", "Bytes=", "items=", "bytes", ""]),
                  number_text, sep, number_text),
        st.builds(lambda a, b, c, d: f"bytes={a}-{b},{c}-{d}",
                  number_text, number_text, number_text, number_text),
        header_text,
    )


def content_range_header():
    return st.one_of(
        st.builds(lambda u, a, b, t: f"{u}{a}-{b}/{t}",
                  st.sampled_from(["bytes ", "bytes=", "bytes  ", "items ", ""]),
                  number_text, st.one_of(number_text, st.just("*")),
                  st.one_of(number_text, st.just("*"))),
        header_text,
    )


json_scalars = st.one_of(
    st.none(), st.booleans(), numbers, st.floats(allow_nan=True),
    st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


def dump(obj):
    # allow_nan: NaN and Infinity are what a hostile client may send too.
    return json.dumps(obj).encode()


# Range and Content-Range.

def expected_range(header, size):
    """The (offset, length) a correct server serves for `header`, or None."""
    import re
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    a, b = m.group(1), m.group(2)
    if not a:
        n = int(b)
        if n == 0 or size == 0:
            return None
        n = min(n, size)
        return size - n, n
    a = int(a)
    if a >= size:
        return None
    if not b:
        return a, size - a
    b = int(b)
    if b < a or b >= size:
        return None
    return a, b - a + 1


@settings(max_examples=300, **HYPOTHESIS)
@given(header=range_header())
def test_range_header(env, header):
    res = env.images.get(f"/images/{env.sid}", headers={"Range": header},
                         status="*", expect_errors=True)
    no_server_error(res)
    want = expected_range(header, SIZE)
    if header == "":
        # No range at all: the whole image.
        assert res.status_int == 200 and res.body == bytes(env.content)
    elif want is None:
        assert res.status_int == 416, (header, res.status)
        assert res.headers["Content-Range"] == f"bytes */{SIZE}"
    else:
        offset, length = want
        assert res.status_int == 206, (header, res.status)
        assert res.headers["Content-Range"] == \
            f"bytes {offset}-{offset + length - 1}/{SIZE}"
        assert res.body == bytes(env.content[offset:offset + length])


@settings(max_examples=300, **HYPOTHESIS)
@given(header=content_range_header(), length=st.integers(0, 3000),
       flush=st.sampled_from(["y", "n", None, "yes", ""]))
def test_content_range_header(env, header, length, flush):
    body = os.urandom(length)
    url = f"/images/{env.sid}" + ("" if flush is None else f"?flush={flush}")
    res = env.images.put(url, body, headers={"Content-Range": header},
                         status="*", expect_errors=True)
    no_server_error(res)
    if res.status_int == 200:
        assert flush in ("y", "n", None)
        offset, last = _content_range(header)
        assert last is None or last == offset + length - 1
        assert offset + length <= SIZE
        env.content[offset:offset + length] = body
    else:
        assert res.status_int in (400, 416), (header, res.status)
    env.check_image()


def _content_range(header):
    import re
    if header == "":
        return 0, None
    m = re.fullmatch(r"\s*bytes\s+(\d+)\s*-\s*(\d+|\*)\s*/\s*(\d+|\*)\s*", header)
    assert m, f"accepted a malformed Content-Range: {header!r}"
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


# JSON bodies of the images API.

patch_bodies = st.one_of(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["zero", "flush", "Zero", "", "write", None, 1])},
        optional={"offset": st.one_of(numbers, json_values),
                  "size": st.one_of(numbers, json_values),
                  "flush": st.one_of(st.booleans(), json_values),
                  "extra": json_values}),
    json_values,
).map(dump) | st.binary(max_size=200) | st.just(b"{" * 5000) | st.integers(
    1, 300).map(lambda n: b"[" * n + b"]" * n)


@settings(max_examples=300, **HYPOTHESIS)
@given(body=patch_bodies, read_only=st.booleans())
def test_patch_body(env, body, read_only):
    sid = env.ro_sid if read_only else env.sid
    res = env.images.patch(f"/images/{sid}", body, status="*", expect_errors=True,
                           content_type="application/json")
    no_server_error(res)
    if res.status_int == 200:
        msg = json.loads(body)
        assert not read_only
        if msg["op"] == "zero":
            offset, size = msg.get("offset", 0), msg["size"]
            for v in (offset, size):
                assert isinstance(v, int) and not isinstance(v, bool) and v >= 0
            assert offset + size <= SIZE
            env.content[offset:offset + size] = bytes(size)
        else:
            assert msg["op"] == "flush"
    else:
        assert res.status_int in (400, 403, 413, 416), res.status
    env.check_image()


@pytest.mark.parametrize("app", ["images", "control"])
def test_deeply_nested_json(env, app):
    body = b"[" * 2000 + b"]" * 2000
    if app == "images":
        res = env.images.patch(f"/images/{env.sid}", body, status="*",
                               expect_errors=True)
    else:
        res = env.control.put("/sessions/nested", body, status="*",
                              expect_errors=True)
    assert res.status_int == 400, res.status


@settings(max_examples=100, **HYPOTHESIS)
@given(query=st.dictionaries(
    st.sampled_from(["start", "length", "context", "algorithm", "block_size", "x"]),
    st.one_of(number_text, header_text), max_size=3),
    what=st.sampled_from(["extents", "checksum"]))
def test_query_parameters(env, query, what):
    if any(v and v in "\u00b2\u00b3\u00b9" for v in query.values()):
        # Found by this test, see test_superscript_digits_in_query below.
        return
    url = f"/images/{env.sid}/{what}?" + urllib.parse.urlencode(query)
    res = env.images.get(url, status="*", expect_errors=True)
    no_server_error(res)
    assert res.status_int in (200, 400, 404, 416), res.status


@pytest.mark.parametrize("query", ["extents?start=%B2", "extents?length=%B3",
                                   "checksum?block_size=%B9"])
def test_superscript_digits_in_query(env, query):
    res = env.images.get(f"/images/{env.sid}/{query}", status="*", expect_errors=True)
    assert res.status_int == 400, res.status


# JSON bodies of the control API.

def session_bodies(path):
    good_url = f"file://{path}"
    urls = st.one_of(st.just(good_url), st.sampled_from([
        "file:///no/such/image", "file://relative/x", "file:relative", "/abs/path",
        "http://example.com/x", "file:///tmp/%00x", "file://localhost" + path,
        good_url + "?x=1", good_url + "#f", "FILE://" + path, "file:" + path,
        "file:////" + path.lstrip("/"), "", "file://", "file:///"]), json_values)
    values = {
        "url": urls,
        "size": st.one_of(numbers, json_values),
        "ops": st.one_of(st.lists(st.sampled_from(["read", "write", "delete", ""]),
                                  max_size=3), json_values),
        "timeout": st.one_of(numbers, json_values),
        "sparse": st.one_of(st.booleans(), json_values),
        "inactivity_timeout": st.one_of(numbers, json_values),
        "transfer_id": st.one_of(st.text(max_size=300), json_values),
        "uuid": st.one_of(st.text(max_size=10), json_values),
        "dirty": st.one_of(st.booleans(), json_values),
        "filename": st.one_of(st.text(max_size=300), json_values),
        "bogus": json_values,
    }
    required = {"url": st.just(good_url), "size": st.just(SIZE),
                "ops": st.just(["read"]), "timeout": st.just(60)}
    mostly_valid = st.fixed_dictionaries(required).flatmap(
        lambda base: st.dictionaries(st.sampled_from(sorted(values)), st.none(),
                                     max_size=2).flatmap(
            lambda keys: st.fixed_dictionaries(
                {k: values[k] for k in keys}).map(lambda v: {**base, **v})))
    return st.one_of(mostly_valid,
                     st.dictionaries(st.sampled_from(sorted(values)), json_values),
                     json_values)


def check_spec(sid, body, info):
    """An accepted session is what was asked, with sane values."""
    assert isinstance(body, dict)
    # Unknown keys are ignored (a newer engine keeps working): never stored.
    assert set(info) & (set(body) - set(FIELDS)) == set()
    url = urllib.parse.urlsplit(body["url"])
    assert url.scheme == "file" and url.path.startswith("/")
    assert not url.query and not url.fragment
    assert info["uuid"] == sid
    for key in ("size", "timeout"):
        assert type(body[key]) is int and body[key] >= 0
    assert body["ops"] and set(body["ops"]) <= {"read", "write"}


@settings(max_examples=300, **HYPOTHESIS)
@given(data=st.data())
def test_session_body(env, data):
    body = data.draw(session_bodies(env.path))
    sid = "h-" + uuid.uuid4().hex
    before = env.snapshot()
    res = env.control.put(f"/sessions/{sid}", dump(body), status="*",
                          expect_errors=True, content_type="application/json")
    no_server_error(res)
    if res.status_int == 200:
        info = env.control.get(f"/sessions/{sid}").json
        check_spec(sid, body, info)
        env.control.delete(f"/sessions/{sid}")
    else:
        assert res.status_int in (400, 413), res.status
    assert env.snapshot() == before
    # The images of the test sessions are untouched.
    env.check_image()


@settings(max_examples=150, **HYPOTHESIS)
@given(body=st.one_of(st.fixed_dictionaries({}, optional={
    "timeout": st.one_of(numbers, json_values), "size": json_values}),
    json_values).map(dump) | st.binary(max_size=100))
def test_extend_body(env, body):
    before = env.snapshot()
    res = env.control.patch(f"/sessions/{env.ro_sid}", body, status="*",
                            expect_errors=True, content_type="application/json")
    no_server_error(res)
    after = env.snapshot()
    if res.status_int == 200:
        msg = json.loads(body)
        assert set(msg) == {"timeout"} and type(msg["timeout"]) is int
        # Only the expiry changed; put it back.
        assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
        env.registry.get(env.ro_sid).expires = before[env.ro_sid][1]
    else:
        assert res.status_int in (400, 413), res.status
        assert after == before


# Session ids and URL paths.

hostile_ids = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(alphabet=string.ascii_letters + string.digits + "._~-", min_size=129,
            max_size=2000),
    st.sampled_from(["..", ".", "../..", "../sessions/x", "%2e%2e", "a/b", "a%2Fb",
                     "%00", "\x00", "x\x00y", "*", " ", "%", "%%", "%zz", "\u202e",
                     "\ud7ff", "\U0001f600", "a" * 129, "a" * 100000]),
)


def quoted(text, rnd):
    """`text` percent-encoded, with a random choice of what stays raw."""
    safe = rnd.choice(["", "/", ".", "/.%", string.ascii_letters])
    return urllib.parse.quote(text, safe=safe)


@settings(max_examples=300, **HYPOTHESIS)
@given(sid=hostile_ids, suffix=st.sampled_from(["", "/extents", "/checksum", "/x", "/"]),
       method=st.sampled_from(["GET", "PUT", "PATCH", "OPTIONS", "DELETE", "POST"]),
       seed=st.integers(0, 1000))
def test_images_paths(env, sid, suffix, method, seed):
    path = "/images/" + quoted(sid, random.Random(seed)) + suffix
    before = env.snapshot()
    body = b'{"op": "zero", "size": 4096}' if method in ("PUT", "PATCH") else b""
    res = env.images.request(path, method=method, body=body, status="*",
                             expect_errors=True)
    no_server_error(res)
    if res.status_int < 400:
        # Only the server-wide OPTIONS answers without a session.
        assert method == "OPTIONS" and urllib.parse.unquote(path) == "/images/*", \
            (path, res.status)
    assert env.snapshot() == before
    env.check_image()
    assert env.sid not in res.text and env.ro_sid not in res.text


@settings(max_examples=300, **HYPOTHESIS)
@given(sid=hostile_ids, prefix=st.sampled_from(["/sessions/", "/tickets/", "/progress/"]),
       method=st.sampled_from(["GET", "PUT", "PATCH", "DELETE"]),
       seed=st.integers(0, 1000))
def test_control_paths(env, sid, prefix, method, seed):
    path = prefix + quoted(sid, random.Random(seed))
    body = {"PUT": dump({"url": f"file://{env.path}", "size": 1, "ops": ["read"],
                         "timeout": 60}),
            "PATCH": dump({"timeout": 3600})}.get(method, b"")
    before = env.snapshot()
    res = env.control.request(path, method=method, body=body, status="*",
                              expect_errors=True)
    no_server_error(res)
    if res.status_int < 400:
        # Only a valid id can be added, and only with PUT.
        if method == "PUT":
            added = set(env.snapshot()) - set(before)
            assert len(added) == 1
            [new] = added
            assert new == urllib.parse.unquote(path[len(prefix):])
            sessions.check_id(new)
            env.registry.remove(new)
        elif method == "PATCH":
            # An extend of a real session (the ids of env's sessions are
            # never drawn: uuids do not match the strategies).
            raise AssertionError(f"extended an unknown session: {path!r}")
    assert env.snapshot() == before


# The same against a real daemon, over raw sockets.

@pytest.fixture(scope="module")
def real(tmp_path_factory, tls_files):
    """One daemon for the module, with a read-write session on a 1 MiB image."""
    from tests.conftest import Daemon
    d = Daemon(tmp_path_factory.mktemp("real"), tls_files)
    d.start()
    path = sparse_file(d.dir / "disk.raw", MiB, [(0, os.urandom(64 * KiB))])
    d.image = path
    d.sid = d.add_session(path)
    d.ro_sid = d.add_session(path, ops=["read"])
    yield d
    d.stop()


def assert_harmless(d, response, before_image, before_registry):
    if response is not None:
        assert response.status < 500, response
        assert d.sid.encode() not in response.body
    assert alive(d)
    assert digest(d.image) == before_image
    assert registry_state(d) == before_registry


REQUEST_LINES = [
    b"GET /images/../../../../etc/passwd HTTP/1.1",
    b"GET /images/%2e%2e/%2e%2e/etc/passwd HTTP/1.1",
    b"GET /images/%2e%2e%2f%2e%2e%2fetc%2fpasswd HTTP/1.1",
    b"GET /images/{sid}%2F.. HTTP/1.1",
    b"GET /images/{sid}/../{sid} HTTP/1.1",
    b"PUT /images/{sid}/.. HTTP/1.1",
    b"GET /images/{sid}%00 HTTP/1.1",
    b"GET /images/{sid}\x00 HTTP/1.1",
    b"GET /images/\x00\x00 HTTP/1.1",
    b"GET /images/\xff\xfe\xfd HTTP/1.1",
    b"GET /images/%ff%fe%fd HTTP/1.1",
    b"GET /images/%c0%af HTTP/1.1",
    b"GET /images/%ed%a0%80 HTTP/1.1",
    b"GET /images/" + b"A" * 129 + b" HTTP/1.1",
    b"GET /images/" + b"A" * 9000 + b" HTTP/1.1",
    b"GET /images/" + b"A" * 200000 + b" HTTP/1.1",
    b"GET /images/{sid}?" + b"x" * 70000 + b" HTTP/1.1",
    b"GET //images/{sid}/..%2F..%2Fsessions HTTP/1.1",
    b"PUT /sessions/x HTTP/1.1",
    b"DELETE /sessions/ HTTP/1.1",
    b"GET /progress HTTP/1.1",
    b"GET /images/{sid} HTTP/9.9",
    b"GET /images/{sid} HTTP/1.1 trailing",
    b"G\x00T /images/{sid} HTTP/1.1",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"",
]


@pytest.mark.parametrize("line", REQUEST_LINES, ids=range(len(REQUEST_LINES)))
def test_hostile_request_lines(real, line):
    before_image, before_registry = digest(real.image), registry_state(real)
    line = line.replace(b"{sid}", real.sid.encode())
    with connect(real, "tcp") as sock:
        r = raw_request(sock, line)
    assert_harmless(real, r, before_image, before_registry)
    # None of these names an image of the session with a clean path.
    if r is not None:
        assert r.status >= 400, (line[:80], r)


def test_http_0_9_style_request_line(real):
    # "GET /path" without a version: served as a plain request (the session
    # id is valid), or refused; nothing else.
    before_image, before_registry = digest(real.image), registry_state(real)
    with connect(real, "tcp") as sock:
        r = raw_request(sock, f"GET /images/{real.ro_sid}".encode())
    assert_harmless(real, r, before_image, before_registry)


@pytest.mark.parametrize("path", ["/images/{sid}%2Fextents", "/images/{sid}%2fchecksum"])
def test_encoded_slash_is_not_a_separator(real, path):
    r = request(real, "GET", path.replace("{sid}", real.sid))
    assert r.status >= 400, r


HEADER_CASES = [
    ("GET", [("Range", "bytes=0-1\x00")]),
    ("GET", [("Range", "bytes=\xff\xfe")]),
    ("GET", [("Range", "bytes=0-" + "9" * 5000)]),
    ("GET", [("Range", "bytes=0-1"), ("Range", "bytes=5-9")]),
    ("PUT", [("Content-Length", "-1")]),
    ("PUT", [("Content-Length", "1" * 40)]),
    ("PUT", [("Content-Length", "abc")]),
    ("PUT", [("Content-Length", "4"), ("Content-Length", "8")]),
    ("PUT", [("Content-Length", "4"), ("Transfer-Encoding", "chunked")]),
    ("PUT", [("Transfer-Encoding", "chunked, identity")]),
    ("PUT", [("Transfer-Encoding", "gzip")]),
    ("PUT", [("Content-Range", "bytes 0-3/*"), ("Content-Length", "4"),
             ("Expect", "100-continue-please")]),
    ("PUT", [("Content-Range", "bytes 1048575-1048578/*"), ("Content-Length", "4")]),
    ("PUT", [("Content-Range", "bytes 0-3/*\x00"), ("Content-Length", "4")]),
    ("PATCH", [("Content-Length", "70000")]),
    ("GET", [("X-" + "a" * 70000, "1")]),
    ("GET", [(f"X-H{i}", "1") for i in range(300)]),
]


@pytest.mark.parametrize("method,headers", HEADER_CASES, ids=range(len(HEADER_CASES)))
def test_hostile_headers(real, method, headers):
    before_image, before_registry = digest(real.image), registry_state(real)
    sid = real.sid if method != "PUT" else real.ro_sid
    with connect(real, "tcp") as sock:
        line = f"{method} /images/{sid} HTTP/1.1".encode()
        head = line + b"\r\nHost: x\r\n" + b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"
        try:
            sock.sendall(head + b"abcd")
        except OSError:
            pass
        r = response_or_none(sock, method)
    assert_harmless(real, r, before_image, before_registry)


def splits_request_line(segment):
    """
    True if pywsgi would cut the request line at a byte of `segment`: it
    splits on whatever str.split() calls whitespace (see
    test_control_characters_do_not_split_the_request_line).
    """
    return any(chr(b).isspace() for b in segment)


# Raw path segments: any bytes, and UTF-8 text with encoded variants.
raw_segments = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.text(min_size=1, max_size=60).map(lambda t: t.encode("utf-8")),
    st.text(min_size=1, max_size=60).map(
        lambda t: urllib.parse.quote(t, safe="/%").encode()),
)


@settings(max_examples=60, **HYPOTHESIS)
@given(segment=raw_segments,
       method=st.sampled_from([b"GET", b"PUT", b"OPTIONS", b"PATCH"]),
       suffix=st.sampled_from([b"", b"/extents", b"/checksum"]))
def test_raw_bytes_in_the_path(real, segment, method, suffix):
    assume(not splits_request_line(segment))
    before_image, before_registry = digest(real.image), registry_state(real)
    line = method + b" /images/" + segment + suffix + b" HTTP/1.1"
    with connect(real, "tcp") as sock:
        r = raw_request(sock, line, body=b'{"op": "zero", "size": 10}'
                        if method in (b"PUT", b"PATCH") else b"")
    assert_harmless(real, r, before_image, before_registry)
    if r is not None and r.status < 400:
        assert method == b"OPTIONS" and segment == b"*" and not suffix


@settings(max_examples=40, **HYPOTHESIS)
@given(segment=raw_segments, method=st.sampled_from([b"GET", b"PUT", b"PATCH", b"DELETE"]))
def test_raw_bytes_in_control_paths(real, segment, method):
    assume(not splits_request_line(segment))
    before_image, before_registry = digest(real.image), registry_state(real)
    body = {b"PUT": dump({"url": f"file://{real.image}", "size": 1, "ops": ["read"],
                          "timeout": 60}),
            b"PATCH": dump({"timeout": 10})}.get(method, b"")
    if method == b"DELETE" and segment[:1] in (b"?", b"#"):
        # DELETE /sessions/?... is the real "remove all sessions".
        return
    # Invalid UTF-8 is test_invalid_utf8_is_not_dropped's business.
    assume(utf8_path(segment))
    line = method + b" /sessions/" + segment + b" HTTP/1.1"
    with control_connect(real) as sock:
        r = raw_request(sock, line, body=body)
    if r is not None and r.status == 200 and method == b"PUT":
        # A valid new id: it was added; remove it again.
        [sid] = set(registry_state(real)) - set(before_registry)
        sessions.check_id(sid)
        assert sid.encode() in segment
        assert control_request(real, "DELETE", "/sessions/" + sid).status == 204
        r = None
    if r is not None and r.status == 200:
        assert method == b"GET" or method == b"PATCH"
        raise AssertionError(f"{method} of an unknown session answered 200")
    assert_harmless(real, r, before_image, before_registry)


def utf8_path(segment):
    """True if the path part of `segment` is UTF-8 once percent-decoded."""
    path = segment.split(b"?")[0].split(b"#")[0]
    try:
        urllib.parse.unquote_to_bytes(path).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("where", ["images-raw", "images-encoded", "control"])
def test_invalid_utf8_is_not_dropped(real, where):
    before_image, before_registry = digest(real.image), registry_state(real)
    if where == "control":
        body = dump({"url": f"file://{real.image}", "size": 1, "ops": ["read"],
                     "timeout": 60})
        r = control_request(real, "PUT", "/sessions/utf8-test%80", body)
        control_request(real, "DELETE", "/sessions/utf8-test")
    else:
        tail = b"\x80" if where == "images-raw" else b"%80"
        with connect(real, "tcp") as sock:
            r = raw_request(sock, b"GET /images/" + real.ro_sid.encode() + tail
                            + b" HTTP/1.1", [("Range", "bytes=0-9")])
    assert r.status == 400, r
    assert_harmless(real, r, before_image, before_registry)


@pytest.mark.parametrize("byte", [b"\x1e", b"\x0b", b"\xa0"], ids=["x1e", "x0b", "xa0"])
def test_control_characters_do_not_split_the_request_line(make_daemon, tmp_path, byte):
    d = make_daemon()
    path = sparse_file(tmp_path / "disk.raw", MiB)
    sid = d.add_session(path)
    with control_connect(d) as sock:
        r = raw_request(sock, b"DELETE /sessions/" + byte + b" HTTP/1.1")
    assert r is None or r.status >= 400, r
    # The session is still there.
    assert control_request(d, "GET", f"/sessions/{sid}").status == 200


# Session urls and confinement.

@pytest.mark.parametrize("url", [
    "http://example.com/disk.raw",
    "https://localhost/disk.raw",
    "nbd:unix:relative/disk.sock",
    "nbd://localhost:99999/disk",
    "file:relative/disk.raw",
    "file://relative/disk.raw",
    "file://otherhost/var/tmp/disk.raw",
    "file:///var/tmp/disk.raw?x=1",
    "file:///var/tmp/disk.raw#frag",
    "file:///var/tmp/%00disk.raw",
    "/var/tmp/disk.raw",
    "disk.raw",
    "",
    "file://",
])
def test_only_absolute_file_urls(real, url):
    before = registry_state(real)
    r = control_request(real, "PUT", "/sessions/url-test", {
        "url": url, "size": 1, "ops": ["read"], "timeout": 60})
    assert r.status == 400, r
    assert "url" in r.text
    assert registry_state(real) == before


def test_accepted_url_is_usable(real):
    url = "file://localhost" + real.image
    r = control_request(real, "PUT", "/sessions/localhost-url", {
        "url": url, "size": MiB, "ops": ["read"], "timeout": 60})
    try:
        if r.status == 200:
            r = request(real, "GET", "/images/localhost-url",
                        headers=[("Range", "bytes=0-9")])
            assert r.status == 206, r
        else:
            assert r.status == 400
    finally:
        control_request(real, "DELETE", "/sessions/localhost-url")


@pytest.fixture
def confined(make_daemon, tmp_path):
    """A daemon whose images must be inside tmp_path/allowed."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    d = make_daemon({"images": {"allowed_dirs": [str(allowed)]}})
    d.allowed = allowed
    d.secret = sparse_file(tmp_path / "secret.raw", 64 * KiB,
                           [(0, b"SECRET" * 100)])
    return d


def refused(d, url, size=64 * KiB):
    """Add a session for `url` and use it: True if access was refused."""
    sid = "c-" + uuid.uuid4().hex
    r = control_request(d, "PUT", f"/sessions/{sid}",
                        {"url": url, "size": size, "ops": ["read", "write"],
                         "timeout": 60})
    if r.status == 400:
        return True
    if r.status == 403:
        # Refused when the session is added (SPEC §10).
        assert "outside the allowed directories" in r.text
        return True
    assert r.status == 200, r
    before = digest(d.secret)
    get = request(d, "GET", f"/images/{sid}")
    put = request(d, "PUT", f"/images/{sid}", body=b"x" * 4096)
    ext = request(d, "GET", f"/images/{sid}/extents")
    assert digest(d.secret) == before or put.status == 200
    statuses = {get.status, put.status, ext.status}
    if statuses == {403}:
        assert "outside the allowed directories" in get.text
        assert b"SECRET" not in get.body
        return True
    assert b"SECRET" in get.body or get.status == 200, (get, put, ext)
    return False


def test_allowed_dirs_inside_is_served(confined):
    inside = sparse_file(confined.allowed / "disk.raw", 64 * KiB, [(0, b"ok")])
    assert not refused(confined, f"file://{inside}")
    # A symlink inside pointing inside is fine.
    os.symlink(inside, confined.allowed / "link.raw")
    assert not refused(confined, f"file://{confined.allowed}/link.raw")


@pytest.mark.parametrize("how", ["direct", "dotdot", "symlink", "symlinked-dir",
                                 "prefix", "encoded-dots", "nested-symlink"])
def test_allowed_dirs_refuse_escapes(confined, tmp_path, how):
    a, secret = confined.allowed, confined.secret
    if how == "direct":
        url = f"file://{secret}"
    elif how == "dotdot":
        url = f"file://{a}/../secret.raw"
    elif how == "symlink":
        os.symlink(secret, a / "evil.raw")
        url = f"file://{a}/evil.raw"
    elif how == "symlinked-dir":
        os.symlink(tmp_path, a / "evil-dir")
        url = f"file://{a}/evil-dir/secret.raw"
    elif how == "prefix":
        # /x/allowed2 is not inside /x/allowed.
        other = tmp_path / (a.name + "2")
        other.mkdir()
        url = f"file://{sparse_file(other / 'disk.raw', 64 * KiB)}"
        confined.secret = str(other / "disk.raw")
    elif how == "encoded-dots":
        url = f"file://{a}/%2e%2e/secret.raw"
    else:
        (a / "sub").mkdir()
        os.symlink("../../secret.raw", a / "sub" / "evil.raw")
        url = f"file://{a}/sub/evil.raw"
    assert refused(confined, url)
    assert alive(confined)


def test_allowed_dirs_encoded_slash_escape(confined, tmp_path):
    a = confined.allowed
    depth = len(str(a).strip("/").split("/"))
    name = "%2F".join(["x"] * (depth + 2))
    (a / name).mkdir()
    url = (f"file://{a}/{name}/" + "../" * (depth + 1)
           + str(tmp_path).lstrip("/") + "/secret.raw")
    assert refused(confined, url)


# Secrets: ids in error bodies and logs.

def test_session_ids_never_in_bodies_or_logs(make_daemon, tmp_path):
    d = make_daemon({"images": {"max_readers": 1}})
    size = 64 * MiB
    path = sparse_file(tmp_path / "disk.raw", size)
    ids = {
        "rw": "rw-secret-" + uuid.uuid4().hex,
        "ro": "ro-secret-" + uuid.uuid4().hex,
        "short": "sh-secret-" + uuid.uuid4().hex,
        "gone": "gone-secret-" + uuid.uuid4().hex,
    }
    bodies = []

    def add(key, **kw):
        body = {"url": f"file://{path}", "size": size, "ops": ["read", "write"],
                "timeout": 300}
        body.update(kw)
        r = control_request(d, "PUT", f"/sessions/{ids[key]}", body)
        bodies.append(r)
        return r

    add("rw")
    add("ro", ops=["read"])
    add("short", timeout=1)
    add("gone")
    bodies.append(add("rw", size=1))                       # 409
    bodies.append(control_request(d, "PUT", f"/sessions/{ids['rw']}", b"{bad"))
    bodies.append(control_request(d, "PUT", f"/sessions/{ids['rw']}x",
                                  {"uuid": ids["rw"], "url": "x"}))
    bodies.append(control_request(d, "PATCH", f"/sessions/{ids['rw']}", {"timeout": -1}))
    bodies.append(control_request(d, "PATCH", f"/sessions/{ids['rw']}z", {"timeout": 1}))
    bodies.append(control_request(d, "DELETE", f"/sessions/{ids['gone']}"))
    bodies.append(control_request(d, "GET", f"/sessions/{ids['gone']}"))
    rw, ro = ids["rw"], ids["ro"]
    for method, sid, headers, body in [
        ("GET", rw, [("Range", "bytes=5-1")], b""),
        ("GET", rw, [("Range", f"bytes={size}-")], b""),
        ("PUT", ro, [], b"x"),
        ("PUT", rw, [("Content-Range", "bytes x")], b"x"),
        ("PUT", rw, [("Content-Range", f"bytes {size}-{size}/*")], b"x"),
        ("PATCH", rw, [], b"{"),
        ("PATCH", rw, [], b'{"op": "zero", "size": -1}'),
        ("PATCH", ro, [], b'{"op": "flush"}'),
        ("GET", rw + "/extents?context=dirty", [], b""),
        ("GET", rw + "/extents?start=x", [], b""),
        ("GET", rw + "/checksum?algorithm=md4", [], b""),
        ("GET", rw + "/nothing", [], b""),
        ("DELETE", rw, [], b""),
        ("GET", ids["gone"], [], b""),
        ("GET", rw + "x", [], b""),
        ("GET", rw[:-1], [], b""),
    ]:
        for kind in ("tcp", "tls", "unix"):
            bodies.append(request(d, method, f"/images/{sid}", headers, body, kind=kind))
    # Too many readers (503).
    with connect(d, "tcp", rcvbuf=4096) as reader:
        reader.sendall(f"GET /images/{rw} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_for(lambda: progress(d, rw)["active"], message="a reader")
        bodies.append(request(d, "GET", f"/images/{rw}", [("Range", "bytes=0-0")]))
        assert bodies[-1].status == 503
    # The short session expires; a client then gets 403.
    wait_for(lambda: control_request(d, "GET", f"/sessions/{ids['short']}").status == 404,
             message="expiry")
    bodies.append(request(d, "GET", f"/images/{ids['short']}"))
    bodies.append(control_request(d, "DELETE", "/sessions/"))
    d.stop()

    statuses = {r.status for r in bodies if r is not None}
    assert {400, 403, 404, 409, 416, 503} <= statuses, statuses
    for r in bodies:
        if r is None or r.status < 300:
            continue
        for sid in ids.values():
            assert sid.encode() not in r.body, r
            assert sid[:12].encode() not in r.body, r
    log = d.log() + d.output
    for sid in ids.values():
        assert sid not in log
        # At most the 8-character prefix is shown.
        assert sid[:9] not in log, [line for line in log.splitlines() if sid[:9] in line]


# The control socket.

def can_connect_as(uid, gid, groups, path):
    """
    Fork a child that becomes `uid`/`gid` with supplementary `groups` and
    asks the control socket at `path` for /progress. Returns "ok", "denied"
    or "failed".
    """
    import socket
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(path)
            except PermissionError:
                code = 13
            else:
                s.sendall(b"GET /progress HTTP/1.1\r\nHost: x\r\n\r\n")
                code = 0 if s.recv(12) == b"HTTP/1.1 200" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "ok", 13: "denied"}.get(os.waitstatus_to_exitcode(status), "failed")


def test_control_socket_permissions(make_daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    import grp
    group = "daemon"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        pytest.skip(f"no group {group!r} on this system")
    d = make_daemon({"listeners": {"control": {"group": group}}})
    st_ = os.stat(d.control_path)
    assert stat.S_IMODE(st_.st_mode) == 0o660
    assert st_.st_gid == gid
    # Let anyone reach the socket file: only its own mode protects it now.
    os.chmod(d.sock_dir, 0o755)
    nobody = 65534
    assert can_connect_as(nobody, nobody, [], d.control_path) == "denied"
    assert can_connect_as(nobody, nobody, [gid], d.control_path) == "ok"
    assert can_connect_as(nobody, gid, [], d.control_path) == "ok"
    # The images socket is for local clients of any user.
    assert stat.S_IMODE(os.stat(d.local_path).st_mode) == 0o660
