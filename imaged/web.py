"""
Bottle glue: how imaged's apps are built on Bottle.

- `make_app()` builds a Bottle app with `ErrorPlugin` installed, so every
  route's handler just raises imaged.errors and gets the right status;
  Bottle's own errors (404, 405, 500) are short plain text too.
- `json_response()`, `read_json()`: small JSON answers and bodies.
- `StreamResponse`: a streamed response body (the data of a GET) with the
  two things Bottle and the socket need from it.

Handlers use `transport.link(environ)` and `transport.body(environ)` for
the connection and the request body; nothing here touches a socket.
"""

import json
import logging

import bottle

from . import config
from . import errors
from . import transport

log = logging.getLogger("web")


def make_app(plugins=()):
    """
    A Bottle app mapping imaged.errors to statuses on every route.

    `plugins` wrap the ErrorPlugin, so they see every answer, errors too.
    """
    app = _App(catchall=True)
    app.config["json.enable"] = False
    app.default_error_handler = _plain_error
    # Bottle applies the last installed plugin first (innermost).
    for plugin in plugins:
        app.install(plugin)
    app.install(ErrorPlugin())
    return app


class _App(bottle.Bottle):
    """
    A Bottle app that also works under WSGI servers other than ours
    (webtest in the tests): a request arriving without a Link gets a
    detached one, closed when the response ends, so that per-connection
    state (a session's connection count) does not outlive the request.
    """

    def __call__(self, environ, start_response):
        if transport.LINK_KEY in environ:
            return super().__call__(environ, start_response)
        lnk = transport.link(environ)
        try:
            result = super().__call__(environ, start_response)
        except BaseException:
            lnk.close()
            raise
        return _ClosingResult(result, lnk.close)


class _ClosingResult:
    """A WSGI response iterable calling `on_close` after its own close()."""

    def __init__(self, result, on_close):
        self._result = result
        self._on_close = on_close

    def __iter__(self):
        return iter(self._result)

    def close(self):
        try:
            if hasattr(self._result, "close"):
                self._result.close()
        finally:
            self._on_close()


def _plain_error(res):
    bottle.response.content_type = "text/plain; charset=utf-8"
    if res.status_code == 500:
        # Bottle's own catchall: the exception is logged, not shown.
        if res.exception is not None:
            log.error("unhandled error: %s\n%s", res.exception, res.traceback)
        return "Internal server error\n"
    if res.status_code == 404:
        return "No such resource\n"
    if res.status_code == 405:
        return "Method not allowed\n"
    return f"{res.body}\n"


class ErrorPlugin:
    """
    The one place where imaged.errors become HTTP responses.

    A handler raises an errors.Error; the client gets its status and its
    message as a short text body. Any other exception is a server fault:
    logged with its traceback, answered 500 without details.
    """

    name = "imaged-errors"
    api = 2

    def apply(self, callback, route):
        def wrapper(*args, **kwargs):
            try:
                response = callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except errors.Error as e:
                _log_error(route, e)
                response = error_response(e)
            except Exception:
                log.exception("internal error in %s %s", route.method, route.rule)
                response = error_response(errors.ServerError("Internal server error"))
            if isinstance(response, bottle.HTTPResponse) and \
                    transport.link(bottle.request.environ).close_requested:
                # Said here too for WSGI servers other than ours; ours says
                # it whenever it closes (see transport.Handler).
                response.set_header("Connection", "close")
            return response
        return wrapper


def _log_error(route, e):
    if isinstance(e, errors.ServiceUnavailable):
        # A limit doing its job (too many connections or writers).
        log.info("%s %s refused: %s", route.method, route.rule, e.message)
    elif e.status >= 500:
        # A fault on our side (an I/O error on the image): the client gets
        # the message, the operator a log line.
        log.error("%s %s failed: %s", route.method, route.rule, e.message)


def error_response(e):
    """An HTTPResponse for an imaged.errors.Error."""
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if isinstance(e, errors.RangeNotSatisfiable) and e.size is not None:
        headers["Content-Range"] = f"bytes */{e.size}"
    if e.status == 403:
        # A refused client gets no second try on this connection, and a
        # body it may still be sending is not read (see transport.Handler).
        transport.link(bottle.request.environ).close_after_response()
    return bottle.HTTPResponse(f"{e.message}\n", status=e.status, **headers)


def json_response(obj, status=200):
    """A JSON answer."""
    body = json.dumps(obj).encode("utf-8") + b"\n"
    return bottle.HTTPResponse(body, status=status,
                               **{"Content-Type": "application/json"})


def empty_response(status=200):
    """An answer without a body."""
    if status == 204:
        return bottle.HTTPResponse(status=204)
    return bottle.HTTPResponse(status=status, **{"Content-Length": "0"})


def read_json(environ, max_bytes):
    """
    Read and parse a JSON request body of at most `max_bytes`.

    Raises PayloadTooLarge above the cap (checked before reading when the
    length is announced), BadRequest for invalid JSON.
    """
    reader = transport.body(environ)
    if reader.length is not None and reader.length > max_bytes:
        raise errors.PayloadTooLarge(
            f"request body too large: {reader.length} bytes, limit {max_bytes}")
    buf = bytearray(max_bytes + 1)
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        count = reader.readinto(view[got:])
        if not count:
            break
        got += count
    if got > max_bytes:
        raise errors.PayloadTooLarge(f"request body too large: limit {max_bytes} bytes")
    data = bytes(buf[:got])
    if not data:
        raise errors.BadRequest("missing JSON body")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.BadRequest(f"invalid JSON body: {e}") from None
    except RecursionError:
        raise errors.BadRequest("invalid JSON body: nested too deeply") from None


class StreamResponse:
    """
    A response body streamed from `chunks`, an iterator of buffers with a
    close() (ends the operation behind it, also when the client went away).

    Bottle peeks at the first item and accepts only bytes; later items go
    to the server as they are (memoryviews of reused buffers, no copy). So
    the first item is one byte, not a copy of a whole piece (up to 1 MiB),
    and the rest of the piece comes next. A WSGI server other than ours may
    keep items around and gets bytes (PEP 3333).

    The connection is corked while the body streams (see transport.Link.cork)
    and uncorked as soon as the last chunk is handed over, so the tail never
    waits. A body of known `length` up to config.SMALL_BODY_BYTES is not
    corked: its first item is the whole first chunk, sent with the head.
    """

    def __init__(self, chunks, link, length=None):
        self._chunks = chunks
        self._link = link
        self._copy = link.detached
        self._small = length is not None and length <= config.SMALL_BODY_BYTES
        self._rest = None
        self._started = False
        self._corked = False

    def __iter__(self):
        return self

    def __next__(self):
        if not self._started:
            self._started = True
            first = next(self._chunks, None)
            if first is None:
                raise StopIteration
            if self._small:
                return bytes(first)
            self._rest = first[1:]
            self._link.cork(True)
            self._corked = True
            return bytes(first[:1])
        if self._rest:
            rest, self._rest = self._rest, None
            return bytes(rest) if self._copy else rest
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._uncork()
            raise
        return bytes(chunk) if self._copy else chunk

    def _uncork(self):
        if self._corked:
            self._corked = False
            self._link.cork(False)

    def close(self):
        try:
            self._uncork()
        finally:
            self._chunks.close()
