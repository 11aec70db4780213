"""imaged.framing: where a request ends, decided strictly (RFC 9112 §6)."""

import pytest

from imaged import framing
from imaged.framing import FramingError


def frame(content_lengths=(), transfer_encodings=(), version="HTTP/1.1"):
    return framing.message_framing(version, list(content_lengths),
                                   list(transfer_encodings))


def test_no_body():
    f = frame()
    assert (f.content_length, f.chunked, f.must_close) == (None, False, False)


@pytest.mark.parametrize("values,length", [
    (["0"], 0),
    (["3"], 3),
    (["0003"], 3),
    (["3", "3"], 3),            # Identical duplicates are one value.
    (["3, 3"], 3),
    ([str(2**63 - 1)], 2**63 - 1),
])
def test_content_length(values, length):
    assert frame(values).content_length == length


@pytest.mark.parametrize("values", [
    ["+3"], ["0_3"], ["-1"], ["3 "[:-1] + "x"], [""], [" "], ["0x10"],
    ["3", "4"],                 # Conflicting duplicates.
    ["3, 4"],
    ["1" * 20],                 # More digits than any length we can seek to.
    [str(2**63)],
    ["٣"],                      # A digit to Python, not to HTTP.
])
def test_invalid_content_length(values):
    with pytest.raises(FramingError) as e:
        frame(values)
    assert e.value.status == 400


def test_chunked():
    f = frame(transfer_encodings=["chunked"])
    assert f.chunked and f.content_length is None


def test_chunked_is_case_insensitive():
    assert frame(transfer_encodings=["Chunked"]).chunked


@pytest.mark.parametrize("codings,status", [
    (["xchunked"], 400),            # chunked is not the final coding.
    (["chunked, identity"], 400),
    (["identity"], 400),
    (["gzip"], 400),
    (["chunked", "gzip"], 400),
    (["gzip, chunked"], 501),       # A coding we do not decode.
    (["gzip", "chunked"], 501),
    (["chunked, chunked"], 400),    # chunked applied twice.
    ([""], 400),
])
def test_invalid_transfer_encoding(codings, status):
    with pytest.raises(FramingError) as e:
        frame(transfer_encodings=codings)
    assert e.value.status == status


def test_transfer_encoding_with_content_length_is_refused():
    with pytest.raises(FramingError) as e:
        frame(["3"], ["chunked"])
    assert e.value.status == 400


def test_transfer_encoding_needs_http_1_1():
    with pytest.raises(FramingError):
        frame(transfer_encodings=["chunked"], version="HTTP/1.0")


@pytest.mark.parametrize("line,parts", [
    ("GET /images/abc HTTP/1.1", ("GET", "/images/abc", "HTTP/1.1")),
    ("OPTIONS * HTTP/1.0", ("OPTIONS", "*", "HTTP/1.0")),
    ("PUT /images/a?flush=n HTTP/1.1", ("PUT", "/images/a?flush=n", "HTTP/1.1")),
])
def test_request_line(line, parts):
    assert framing.parse_request_line(line) == parts


@pytest.mark.parametrize("line", [
    "GET /images/abc",                  # HTTP/0.9
    "GET  /images/abc HTTP/1.1",        # Two spaces.
    "GET /images/a\x1eb HTTP/1.1",      # str.split() would cut here.
    "GET /images/a\x85b HTTP/1.1",
    "GET /images/a\xa0b HTTP/1.1",
    "GET /images/a\x00b HTTP/1.1",
    "GET /images/\x80 HTTP/1.1",        # Raw non-ASCII: must be encoded.
    "GET /images/abc HTTP/2.0",
    "GET /images/abc HTTP/1.1 extra",
    "G(T /images/abc HTTP/1.1",
    "GET\t/images/abc HTTP/1.1",
])
def test_invalid_request_line(line):
    with pytest.raises(FramingError):
        framing.parse_request_line(line)


@pytest.mark.parametrize("items", [
    [("Content-Length ", "3")],         # White space before the colon.
    [("Host\x00", "x")],
    [("", "x")],
    [("X-A", "a\r\n b")],               # Obsolete line folding.
    [("X-A", "a\x00b")],
    [("X-A", "a\nb")],
])
def test_invalid_headers(items):
    with pytest.raises(FramingError):
        framing.check_headers(items)


def test_valid_headers():
    framing.check_headers([("Host", "localhost:54322"), ("X-Tab", "a\tb"),
                           ("Content-Range", "bytes 0-3/*"), ("X-Latin", "caf\xe9")])


def test_header_lines_parsed_in_order():
    h = framing.parse_header_lines([
        "Host: localhost:54322", "range:  bytes=0-3 ", "X-A: 1", "x-a: 2",
        "Content-Type: application/json", "X-Empty:"])
    assert h.items() == [("Host", "localhost:54322"), ("range", "bytes=0-3"),
                         ("X-A", "1"), ("x-a", "2"),
                         ("Content-Type", "application/json"), ("X-Empty", "")]
    # Looked up without regard to case, as pywsgi and the framing do.
    assert h.get("Range") == "bytes=0-3"
    assert h.getheader("X-A") == "1"
    assert h.get_all("X-A") == ["1", "2"]
    assert h.get_all("Content-Length") is None
    assert h.get("Missing", "d") == "d"
    assert h.typeheader == "application/json"
    assert h.headers[0] == "Host: localhost:54322\r\n"
    assert not h.status and not h.defects


@pytest.mark.parametrize("lines", [
    ["Content-Length : 3"],             # White space before the colon.
    ["X-A: a", " b"],                   # Obsolete line folding.
    ["X-A: a", "\tb"],
    ["NoColon"],
    [": x"],
    ["X-A: a\rb"],                      # A stray CR.
    ["X-A: a\x00"],
    [f"X-H{i}: 1" for i in range(framing.MAX_HEADERS + 1)],
])
def test_invalid_header_lines(lines):
    with pytest.raises(FramingError):
        framing.parse_header_lines(lines)
