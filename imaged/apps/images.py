"""
The images API (data plane), wire-compatible with ovirt-imageio's.

A handler class per resource, as routes of one Bottle app:

    /images/{id}                       Image: OPTIONS GET PUT PATCH
    /images/{id}/extents               Extents: GET
    /images/{id}/checksum              Checksum: GET
    /images/{id}/checksum/algorithms   algorithms(): GET
    /images/{id}/checksum/blocks       ChecksumBlocks: GET

Handlers parse and validate the request (imaged.validate, imaged.ranges),
then call the images service (imaged.images), which knows nothing of HTTP.
Errors are raised as imaged.errors and answered by web.ErrorPlugin; the
CORS plugin adds what a browser needs to every answer of this app.
"""

import unicodedata
import urllib.parse

import bottle

from .. import __version__
from .. import blkhash
from .. import errors
from .. import images
from .. import ranges
from .. import tokens
from .. import transport
from .. import validate
from .. import web

# /info/ answers the engine's "Test Connection" of the images service.
PREFIXES = ("/images/", "/info/")

# Browsers may cache a CORS preflight answer this long.
CORS_MAX_AGE_S = 24 * 3600

# "*" does not cover Authorization (Fetch standard): name what the lab
# page and the engine's UI send.
CORS_ALLOW_HEADERS = "Authorization, Content-Range, Content-Type, *"
CORS_ALLOW_METHODS = "OPTIONS,GET,PUT,PATCH"
# Headers a page's script may read from an answer.
CORS_EXPOSE_HEADERS = "Content-Range, Content-Length, Content-Disposition"

# The Link.context key of the images service's per-connection state.
_CLIENT_KEY = "images"


def make_app(registry, cfg, unix_socket=None):
    """The images app over `registry`; `unix_socket` is reported in OPTIONS."""
    service = images.Images(registry, cfg, unix_socket=unix_socket)
    app = web.make_app(plugins=[CorsPlugin()])
    image = Image(service, cfg["sessions"]["max_body_bytes"])
    app.route("/images/<session_id>", "OPTIONS", image.options)
    app.route("/images/<session_id>", "GET", image.get)
    app.route("/images/<session_id>", "PUT", image.put)
    app.route("/images/<session_id>", "PATCH", image.patch)
    app.route("/images/<session_id>/extents", "GET", Extents(service).get)
    app.route("/images/<session_id>/checksum", "GET", Checksum(service).get)
    app.route("/images/<session_id>/checksum/algorithms", "GET", algorithms)
    app.route("/images/<session_id>/checksum/blocks", "GET", ChecksumBlocks(service).get)
    for path in ("/info", "/info/"):
        app.route(path, "GET", info)
        app.route(path, "OPTIONS", info)
    return app


def client(service):
    """The service's state for this request's connection (see images.Client)."""
    environ = bottle.request.environ
    link = transport.link(environ)
    state = link.context.get(_CLIENT_KEY)
    if state is None:
        state = link.context[_CLIENT_KEY] = service.client(
            cancel=link.abort, set_idle_timeout=link.set_idle_timeout)
        link.on_close(state.close)
    return state


def token():
    """The signed token of the request (imaged.tokens), or None."""
    return tokens.bearer(bottle.request.environ.get("HTTP_AUTHORIZATION"))


def is_preflight(environ):
    return bool(environ.get("HTTP_ORIGIN") and
                environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"))


class Image:
    """/images/{id}: the image data."""

    def __init__(self, service, max_body_bytes):
        self.service = service
        self.max_body_bytes = max_body_bytes

    def options(self, session_id):
        if is_preflight(bottle.request.environ):
            # A CORS preflight: browsers send it without the Authorization
            # header, so it cannot be authorized; it only learns what any
            # session may allow (the CORS plugin adds the headers).
            response = web.empty_response()
            response.set_header("Allow", CORS_ALLOW_METHODS)
            return response
        allow, body = self.service.options(session_id, client(self.service), token())
        response = web.json_response(body)
        response.set_header("Allow", ",".join(allow))
        return response

    def get(self, session_id):
        conn = client(self.service)
        session = self.service.session(session_id, "read", conn, token())
        header = bottle.request.environ.get("HTTP_RANGE")
        if header:
            offset, length = ranges.parse_range(header, session.size)
        else:
            offset, length = 0, session.size
        chunks = self.service.read(session, offset, length, conn)
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Content-Disposition": content_disposition(session.filename),
        }
        status = 200
        if header:
            status = 206
            headers["Content-Range"] = \
                f"bytes {offset}-{offset + length - 1}/{session.size}"
        body = web.StreamResponse(chunks, transport.link(bottle.request.environ), length)
        return bottle.HTTPResponse(body, status=status, **headers)

    def put(self, session_id):
        try:
            return self._put(session_id)
        except errors.Error:
            # The rest of the body may still be on the wire, up to many GiB,
            # and where it stands is unknown: this connection carries no
            # further request.
            transport.link(bottle.request.environ).close_after_response()
            raise

    def _put(self, session_id):
        environ = bottle.request.environ
        flush = _flush_param(bottle.request.query)
        conn = client(self.service)
        session = self.service.session(session_id, "write", conn, token())
        offset, last = 0, None
        header = environ.get("HTTP_CONTENT_RANGE")
        if header:
            offset, last = ranges.parse_content_range(header)
        reader = transport.body(environ)
        if not reader.chunked:
            if not environ.get("CONTENT_LENGTH"):
                raise errors.BadRequest("Content-Length header is required")
            if last is not None and last - offset + 1 != reader.length:
                raise errors.BadRequest("Content-Range does not match Content-Length")
        # The backend says whether receiving may spin (the NBD one does not).
        reader.allow_spin(self.service.capabilities(session, conn).upload_spin)
        if reader.chunked:
            end = None if last is None else last + 1
            self.service.write_stream(session, offset, reader, conn, flush, end)
        else:
            self.service.write(session, offset, reader.length, reader, conn, flush)
        return web.empty_response()

    def patch(self, session_id):
        msg = validate.json_object(
            web.read_json(bottle.request.environ, self.max_body_bytes))
        op = msg.get("op")
        conn = client(self.service)
        if op == "zero":
            size = validate.integer(msg, "size")
            offset = validate.integer(msg, "offset", default=0)
            flush = validate.boolean(msg, "flush", default=False)
            session = self.service.session(session_id, "write", conn, token())
            self.service.zero(session, offset, size, conn, flush)
        elif op == "flush":
            session = self.service.session(session_id, "write", conn, token())
            self.service.flush(session, conn)
        else:
            raise errors.BadRequest(
                f"invalid op: expected 'zero' or 'flush', got {op!r:.40}")
        return web.empty_response()


class Extents:
    """/images/{id}/extents: allocation of the image, or dirty blocks."""

    CONTEXTS = ("zero", "dirty")

    def __init__(self, service):
        self.service = service

    def get(self, session_id):
        query = bottle.request.query
        context = validate.query_choice(query, "context", self.CONTEXTS, "zero")
        start = validate.query_integer(query, "start", 0)
        length = validate.query_integer(query, "length", None)
        conn = client(self.service)
        session = self.service.session(session_id, "read", conn, token())
        chunks = self.service.extents(session, conn, start, length, context)
        # Streamed (chunked): a list of millions of extents is never whole
        # in memory nor built in the event loop.
        body = web.StreamResponse(chunks, transport.link(bottle.request.environ))
        return bottle.HTTPResponse(body, status=200,
                                   **{"Content-Type": "application/json"})


class Checksum:
    """/images/{id}/checksum: the block checksum of the image."""

    def __init__(self, service):
        self.service = service

    def get(self, session_id):
        algorithm, block_size = _hash_params(bottle.request.query)
        conn = client(self.service)
        session = self.service.session(session_id, "read", conn, token())
        return web.json_response(
            self.service.checksum(session, conn, algorithm, block_size))


class ChecksumBlocks:
    """/images/{id}/checksum/blocks: the block digests of a window."""

    def __init__(self, service):
        self.service = service

    def get(self, session_id):
        query = bottle.request.query
        algorithm, block_size = _hash_params(query)
        start = validate.query_integer(query, "start", 0)
        length = validate.query_integer(query, "length", None)
        blkhash.validate_window(start, block_size)
        conn = client(self.service)
        session = self.service.session(session_id, "read", conn, token())
        return web.json_response(self.service.checksum_blocks(
            session, conn, algorithm, block_size, start, length))


def info():
    """/info and /info/: the version, for the engine's "Test Connection"."""
    return web.json_response({"version": __version__})


def content_disposition(filename):
    """
    The Content-Disposition of a download (RFC 6266): `attachment`, with the
    session's file name if it has one (see validate.filename). A non-ASCII
    name goes as `filename*` in UTF-8 (RFC 8187), with an ASCII `filename`
    fallback for old clients: accents dropped, other characters as "_".
    """
    if filename is None:
        return "attachment"
    if filename.isascii():
        return f'attachment; filename="{filename}"'
    fallback = "".join(
        c if c.isascii() else "_"
        for c in unicodedata.normalize("NFKD", filename)
        if not unicodedata.combining(c))
    encoded = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def algorithms(session_id):
    """/images/{id}/checksum/algorithms, for any id, as ovirt-imageio serves it."""
    return web.json_response({"algorithms": blkhash.algorithms()})


def _hash_params(query):
    """The checksum's (algorithm, block_size) from the query, validated."""
    algorithm = query.get("algorithm", blkhash.ALGORITHM)
    block_size = validate.query_integer(query, "block_size", blkhash.BLOCK_SIZE)
    blkhash.validate(algorithm, block_size)
    return algorithm, block_size


def _flush_param(query):
    value = query.get("flush", "y")
    if value not in ("y", "n"):
        raise errors.BadRequest(f"invalid flush: expected y or n, got {value!r:.20}")
    return value == "y"


class CorsPlugin:
    """
    What a browser needs, on every answer of the images app (errors too).

    The engine's web UI uploads and downloads from the browser straight to
    the host or a proxy: answers carry CORS headers (any origin: the
    session id in the URL, or the signed token, is the authorization, not
    the origin), and `?close=y` closes
    the connection after the answer, as ovirt-imageio does.
    """

    name = "imaged-cors"
    api = 2

    def apply(self, callback, route):
        def wrapper(*args, **kwargs):
            response = callback(*args, **kwargs)
            if isinstance(response, bottle.HTTPResponse):
                _add_cors(response, bottle.request)
            return response
        return wrapper


def _add_cors(response, request):
    environ = request.environ
    cors = False
    if environ.get("HTTP_ORIGIN"):
        response.set_header("Access-Control-Allow-Origin", "*")
        response.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)
        cors = True
    if environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"):
        response.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
        cors = True
    if environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"):
        response.set_header("Access-Control-Allow-Methods", CORS_ALLOW_METHODS)
        cors = True
    if cors:
        response.set_header("Access-Control-Max-Age", str(CORS_MAX_AGE_S))
    if request.query.get("close") == "y":
        response.set_header("Connection", "close")
        transport.link(environ).close_after_response()
