"""
The images API (data plane), wire-compatible with ovirt-imageio's.

Handlers parse and validate the HTTP request, then call imaged.images.
The session id is the last URL component (before /extents or /checksum).
"""

import functools

import bottle

from .. import blkhash
from .. import errors
from .. import images
from .. import ranges
from .. import web

PREFIXES = ("/images/",)

# Browsers may cache a CORS preflight answer this long.
CORS_MAX_AGE_S = 24 * 3600


def browser_friendly(func):
    """
    Add what a browser needs to the handler's response.

    The engine's web UI uploads and downloads from the browser straight to
    the host: the answers carry CORS headers (any origin: the session id in
    the URL is the authorization, not the origin), and `?close=y` closes
    the connection after the answer, as ovirt-imageio does.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        response = func(*args, **kwargs)
        environ = bottle.request.environ
        cors = False
        if environ.get("HTTP_ORIGIN"):
            response.set_header("Access-Control-Allow-Origin", "*")
            cors = True
        if environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"):
            response.set_header("Access-Control-Allow-Headers", "*")
            cors = True
        if environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"):
            response.set_header("Access-Control-Allow-Methods", "OPTIONS,GET,PUT")
            cors = True
        if cors:
            response.set_header("Access-Control-Max-Age", str(CORS_MAX_AGE_S))
        if bottle.request.query.get("close") == "y":
            response.set_header("Connection", "close")
            web.connection(environ).close_after_response = True
        return response
    return wrapper


def make_app(registry, cfg, unix_socket=None):
    """The images app over `registry`; `unix_socket` is reported in OPTIONS."""
    app = web.make_app()
    service = images.Images(registry, cfg, unix_socket=unix_socket)
    max_body = cfg["sessions"]["max_body_bytes"]

    def conn():
        return web.connection(bottle.request.environ)

    @browser_friendly
    @web.handles_errors
    def options(session_id):
        allow, body = service.options(session_id, conn())
        response = web.json_response(body)
        response.set_header("Allow", ",".join(allow))
        return response

    @browser_friendly
    @web.handles_errors
    def get(session_id):
        session = service.session(session_id, "read", conn())
        header = bottle.request.environ.get("HTTP_RANGE")
        if header:
            offset, length = ranges.parse_range(header, session.size)
        else:
            offset, length = 0, session.size
        stream = service.read(session, offset, length, conn())
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Content-Disposition": "attachment",
        }
        status = 200
        if header:
            status = 206
            headers["Content-Range"] = \
                f"bytes {offset}-{offset + length - 1}/{session.size}"
        return bottle.HTTPResponse(stream, status=status, **headers)

    @browser_friendly
    @web.handles_errors
    def put(session_id):
        try:
            return _put(session_id)
        except errors.Error:
            # The rest of the body may still be on the wire, up to many GiB:
            # close the connection instead of reading it.
            conn().close_after_response = True
            raise

    def _put(session_id):
        environ = bottle.request.environ
        flush = _flush_param(bottle.request.query.get("flush", "y"))
        session = service.session(session_id, "write", conn())
        offset, last = 0, None
        header = environ.get("HTTP_CONTENT_RANGE")
        if header:
            offset, last = ranges.parse_content_range(header)
        body = web.BodyReader(environ)
        if body.chunked:
            written = service.write_stream(session, offset, body, conn(), flush)
            if last is not None and last != offset + written - 1:
                raise errors.BadRequest("body length does not match Content-Range")
            return bottle.HTTPResponse(status=200, **{"Content-Length": "0"})
        length = web.content_length(environ)
        if length is None:
            raise errors.BadRequest("Content-Length header is required")
        if last is not None and last - offset + 1 != length:
            raise errors.BadRequest(
                "Content-Range does not match Content-Length")
        service.write(session, offset, length, body, conn(), flush)
        return bottle.HTTPResponse(status=200, **{"Content-Length": "0"})

    @web.handles_errors
    def patch(session_id):
        msg = web.read_json(bottle.request.environ, max_body)
        if not isinstance(msg, dict):
            raise errors.BadRequest("invalid body: expected a JSON object")
        op = msg.get("op")
        if op == "zero":
            size = _int(msg, "size")
            offset = _int(msg, "offset", default=0)
            flush = _bool(msg, "flush", default=False)
            session = service.session(session_id, "write", conn())
            service.zero(session, offset, size, conn(), flush)
        elif op == "flush":
            session = service.session(session_id, "write", conn())
            service.flush(session, conn())
        else:
            raise errors.BadRequest(
                f"invalid op: expected 'zero' or 'flush', got {op!r:.40}")
        return bottle.HTTPResponse(status=200, **{"Content-Length": "0"})

    @web.handles_errors
    def extents(session_id):
        query = bottle.request.query
        context = query.get("context", "zero")
        if context == "dirty":
            raise errors.NotFound("dirty extents are not available for this session")
        if context != "zero":
            raise errors.BadRequest(f"invalid context: {context!r:.40}")
        session = service.session(session_id, "read", conn())
        start = _query_int(query, "start", 0)
        length = _query_int(query, "length", None)
        return web.json_response(service.extents(session, conn(), start, length))

    @web.handles_errors
    def checksum(session_id):
        query = bottle.request.query
        algorithm = query.get("algorithm", blkhash.ALGORITHM)
        block_size = _query_int(query, "block_size", blkhash.BLOCK_SIZE)
        blkhash.validate(algorithm, block_size)
        session = service.session(session_id, "read", conn())
        return web.json_response(
            service.checksum(session, conn(), algorithm, block_size))

    @web.handles_errors
    def checksum_blocks(session_id):
        query = bottle.request.query
        algorithm = query.get("algorithm", blkhash.ALGORITHM)
        block_size = _query_int(query, "block_size", blkhash.BLOCK_SIZE)
        start = _query_int(query, "start", 0)
        length = _query_int(query, "length", None)
        session = service.session(session_id, "read", conn())
        return web.json_response(service.checksum_blocks(
            session, conn(), algorithm, block_size, start, length))

    @web.handles_errors
    def algorithms(session_id):
        return web.json_response({"algorithms": blkhash.algorithms()})

    app.route("/images/<session_id>", "OPTIONS", options)
    app.route("/images/<session_id>", "GET", get)
    app.route("/images/<session_id>", "PUT", put)
    app.route("/images/<session_id>", "PATCH", patch)
    app.route("/images/<session_id>/extents", "GET", extents)
    app.route("/images/<session_id>/checksum", "GET", checksum)
    app.route("/images/<session_id>/checksum/algorithms", "GET", algorithms)
    app.route("/images/<session_id>/checksum/blocks", "GET", checksum_blocks)
    return app


def _flush_param(value):
    if value not in ("y", "n"):
        raise errors.BadRequest(f"invalid flush: expected y or n, got {value!r:.20}")
    return value == "y"


def _int(msg, name, default=...):
    if name not in msg:
        if default is ...:
            raise errors.BadRequest(f"missing {name}")
        return default
    value = msg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.BadRequest(
            f"invalid {name}: expected a non-negative integer, got {value!r:.40}")
    return value


def _bool(msg, name, default):
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise errors.BadRequest(f"invalid {name}: expected true or false, got {value!r:.40}")
    return value


def _query_int(query, name, default):
    raw = query.get(name)
    if raw is None:
        return default
    # isdigit() alone takes "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
        raise errors.BadRequest(f"invalid {name}: expected a non-negative integer")
    return int(raw)
