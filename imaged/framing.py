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

# Limits of a request head, as Python's http.client (which pywsgi used to
# parse headers) has them: a header line of at most 64 KiB, 100 headers.
MAX_HEADER_LINE_BYTES = 65536
MAX_HEADERS = 100


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


class Headers:
    """
    A request's header fields, in the order received, looked up by name
    without regard to case. Takes the place of the email-parser message
    pywsgi makes (the attributes it reads: get, getheader, headers,
    typeheader, status). pywsgi parses heads with the email package:
    29 us for imaged-client's 6-header GET head, against 8 us here
    (timeit on the 2-core VM); it was the largest single item of imaged's
    Python per request in a py-spy profile of 3,000 small GETs.
    """

    __slots__ = ("_items",)
    # pywsgi reads these after parsing: a head we parsed has no status.
    status = ""
    defects = ()

    def __init__(self, items):
        self._items = items

    def items(self):
        """The (name, value) pairs, in the order received."""
        return list(self._items)

    def get_all(self, name, failobj=None):
        """Every value of `name`, in order; `failobj` if there is none."""
        name = name.lower()
        values = [v for k, v in self._items if k.lower() == name]
        return values or failobj

    def get(self, name, default=None):
        """The first value of `name`, or `default`."""
        name = name.lower()
        for k, v in self._items:
            if k.lower() == name:
                return v
        return default

    getheader = get

    @property
    def headers(self):
        """The fields as header lines (pywsgi builds the WSGI environ from them)."""
        return [f"{k}: {v}\r\n" for k, v in self._items]

    @property
    def typeheader(self):
        return self.get("content-type")


def parse_header_lines(lines):
    """
    Headers from the lines of a request head after the request line (str,
    decoded as Latin-1, each without its line ending).

    Raises FramingError for a line that is not `name: value` (an obsolete
    folded continuation line is one: a server that joined it and one that
    did not would see different headers) or for more than MAX_HEADERS
    fields. Names and values are checked by check_headers().
    """
    if len(lines) > MAX_HEADERS:
        raise FramingError("too many headers")
    items = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or line[:1] in (" ", "\t"):
            raise FramingError("invalid headers")
        items.append((name, value.strip(" \t")))
    check_headers(items)
    return Headers(items)


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
