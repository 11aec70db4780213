"""
HTTP/1.1 message framing: where a request ends (RFC 9112 §2, §3, §6).

A server and anything in front of it (a proxy, a load balancer) must agree
on where one request ends and the next begins; where they could disagree,
a hidden request can be smuggled inside another's body. gevent's parser is
lenient: it reads Content-Length with Python's int() (which takes "+3" and
"0_3"), keeps the first of two Content-Length headers, and ignores a
Transfer-Encoding that is not exactly "chunked". So imaged parses the
request head itself, strictly, before any app sees the request.

Pure functions on strings; imaged.transport calls them.
"""

import re

from . import errors

# RFC 9110 §5.6.2: a header name is a token.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# RFC 9110 §5.5: field values hold visible characters, spaces and tabs, and
# (obsolete, but harmless in a value) bytes 0x80-0xff. CR, LF and NUL never.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A request line: method SP target SP version, single spaces only. pywsgi
# splits on any Unicode white space, so bytes like \x1e or \x85 would end the
# path early and change its meaning. A target is visible ASCII: anything
# else must be percent-encoded (RFC 3986).
_REQUEST_LINE = re.compile(
    r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/1\.[01])$")
# Content-Length is 1*DIGIT; 19 digits hold any length we can seek to.
_DIGITS = re.compile(r"^[0-9]{1,19}$")

MAX_CONTENT_LENGTH = 2**63 - 1


class FramingError(errors.Error):
    """
    The request cannot be framed safely: answered with `status` and the
    connection closed, since where the next request starts is unknown.
    """

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Framing:
    """How the body of a request is delimited."""

    __slots__ = ("content_length", "chunked", "must_close")

    def __init__(self, content_length=None, chunked=False, must_close=False):
        # Bytes of body (None with chunked coding or no body).
        self.content_length = content_length
        self.chunked = chunked
        # The connection may not carry another request after this one.
        self.must_close = must_close


def parse_request_line(line):
    """
    Split a request line (str, without CRLF) into (method, target, version).

    Raises FramingError for anything but `METHOD SP TARGET SP HTTP/1.x`.
    """
    m = _REQUEST_LINE.match(line)
    if m is None:
        raise FramingError("invalid request line")
    return m.groups()


def check_headers(items):
    """
    Raise FramingError for a header name or value that is not valid HTTP.

    `items` are (name, value) pairs as received. A header name with white
    space before its colon ("Content-Length : 3") is one such case: some
    parsers would skip it, others would honour it.
    """
    for name, value in items:
        if not _TOKEN.match(name):
            raise FramingError("invalid header name")
        if _BAD_VALUE.search(value):
            # Also refuses obsolete line folding, which the header parser
            # keeps as CR LF inside the value.
            raise FramingError("invalid header value")


def message_framing(version, content_lengths, transfer_encodings):
    """
    The framing of a request from its Content-Length and Transfer-Encoding
    headers (every occurrence, in order). RFC 9112 §6:

    - chunked not the final coding, or given twice, or on HTTP/1.0: 400;
    - another coding before chunked: 501 (we decode none);
    - Content-Length together with Transfer-Encoding: 400 (RFC 9112 §6.1
      allows refusing it, and a server must close after it anyway);
    - a Content-Length that is not 1*DIGIT, or several that differ: 400.
    """
    codings = [c.strip().lower() for value in transfer_encodings
               for c in value.split(",")]
    if codings:
        if codings[-1] != "chunked":
            # RFC 9112 §6.3: the body length cannot be known.
            raise FramingError("invalid Transfer-Encoding: chunked must be the final coding")
        unknown = [c for c in codings[:-1] if c != "chunked"]
        if unknown:
            raise FramingError(
                f"unsupported transfer coding: {unknown[0]!r:.40}", status=501)
        if len(codings) > 1:
            raise FramingError("invalid Transfer-Encoding: chunked more than once")
        if version != "HTTP/1.1":
            raise FramingError("Transfer-Encoding requires HTTP/1.1")
        if content_lengths:
            raise FramingError(
                "both Content-Length and Transfer-Encoding: the request is ambiguous")
        return Framing(chunked=True)

    values = {v.strip() for value in content_lengths for v in value.split(",")}
    if not values:
        return Framing()
    if len(values) > 1:
        raise FramingError("conflicting Content-Length values")
    value = values.pop()
    if not _DIGITS.match(value) or int(value) > MAX_CONTENT_LENGTH:
        raise FramingError("invalid Content-Length")
    return Framing(content_length=int(value))
