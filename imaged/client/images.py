"""
The images API, client side: one method per request, on one Connection.

Only documented requests of the ovirt-imageio images API are used, so this
works against imaged and any server speaking that API. What the server
offers is learned from OPTIONS (see Options); callers check it before using
a feature.
"""

import json
import re
from typing import NamedTuple

from . import errors
from . import http
from . import retry as retry_mod

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(?:\d+-\d+|\*)\s*/\s*(\d+)\s*$")


class Extent(NamedTuple):
    """A range of the image; `zero` is True if it reads as zeroes."""

    start: int
    length: int
    zero: bool


class Options(NamedTuple):
    """
    What the server offers for a session (OPTIONS /images/{id}).

    `supported` is False when the server is too old to answer OPTIONS; it
    then gets the basic protocol: one connection, GET and PUT only.
    """

    supported: bool
    allow: tuple
    features: tuple
    max_readers: int
    max_writers: int
    unix_socket: object

    @property
    def writable(self):
        """The session accepts writes (as far as the server tells)."""
        if not self.supported:
            return True
        return "PUT" in self.allow and self.max_writers > 0

    def has(self, feature):
        return feature in self.features

    def to_dict(self):
        return {
            "options_supported": self.supported,
            "allow": list(self.allow),
            "features": list(self.features),
            "max_readers": self.max_readers,
            "max_writers": self.max_writers,
            "unix_socket": self.unix_socket,
        }


# Basic protocol of servers without OPTIONS.
BASIC_OPTIONS = Options(False, ("GET", "PUT"), (), 1, 1, None)


class DirtyExtent(NamedTuple):
    """A range of the image; `dirty`: changed since the bitmap was made."""

    start: int
    length: int
    dirty: bool
    zero: bool


class ImageClient:
    """
    Requests on one image through one `http.Connection`.

    Every request is idempotent: a transient failure (see
    imaged.client.retry) is retried with `retry`, on a new connection.
    """

    def __init__(self, conn, retry=None):
        self.conn = conn
        self.path = conn.path
        self.retry = retry or retry_mod.Retry(0)
        conn.on_retry = self.retry.counted

    def _call(self, what, func, *args):
        return self.retry.call(what, lambda: func(*args), self.conn.close)

    @property
    def transport(self):
        return self.conn.transport

    def close(self):
        self.conn.close()

    def abort(self):
        self.retry.stop()
        self.conn.abort()

    def options(self):
        """The server's Options for this session."""
        return self._call("OPTIONS", self._options)

    def _options(self):
        resp = self.conn.request("OPTIONS", self.path, ok=(200, 204, 405, 501))
        data = self.conn.read_all(resp)
        if resp.status in (405, 501):
            return BASIC_OPTIONS
        allow = tuple(m.strip().upper() for m in
                      (resp.getheader("Allow") or "").split(",") if m.strip())
        try:
            body = json.loads(data) if data else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        features = tuple(f for f in body.get("features", ()) if isinstance(f, str))
        if not allow:
            # Servers that answer OPTIONS without Allow still serve GET; PUT
            # is known only from the write features.
            allow = ("OPTIONS", "GET") + (("PUT", "PATCH") if "zero" in features else ())
        unix_socket = body.get("unix_socket")
        return Options(
            supported=True,
            allow=allow,
            features=features,
            # Servers that do not report limits allow one connection.
            max_readers=_limit(body.get("max_readers")),
            max_writers=_limit(body.get("max_writers")) if "PUT" in allow else 0,
            unix_socket=unix_socket if isinstance(unix_socket, str) and unix_socket else None,
        )

    def size(self):
        """The image size, from the Content-Range of a one byte GET."""
        return self._call("GET", self._size)

    def _size(self):
        resp = self.conn.request("GET", self.path, headers={"Range": "bytes=0-0"},
                                 ok=(200, 206, 416))
        if resp.status == 200:
            # The server ignored Range: its answer is the whole image. Do
            # not read it; the length is all we need.
            length = resp.getheader("Content-Length")
            self.conn.close()
            if length is None or not length.isdigit():
                raise errors.ClientError("server did not report the image size")
            return int(length)
        self.conn.discard(resp)
        m = _CONTENT_RANGE_RE.match(resp.getheader("Content-Range") or "")
        if not m:
            raise errors.ClientError("server did not report the image size")
        return int(m.group(1))

    def extents(self, size):
        """
        Yield the Extents of [0, size).

        A server may answer a window shorter than the image; the next
        window is then asked with `start`. Servers that ignore `start`
        answer from 0 again, which is handled by skipping what is known.
        """
        for e in self._windows(size, "zero"):
            yield Extent(e["start"], e["length"], e["zero"])

    def dirty_extents(self, size):
        """
        Yield the DirtyExtents of [0, size) (extents?context=dirty).
        A session without dirty extents answers 404: UnsupportedError.
        """
        try:
            for e in self._windows(size, "dirty"):
                yield DirtyExtent(e["start"], e["length"], e["dirty"], e["zero"])
        except errors.HTTPError as e:
            if e.status != 404:
                raise
            raise errors.UnsupportedError(
                f"the session has no dirty extents, so an incremental backup is "
                f"impossible (a session without dirty: true, or an export without "
                f"a dirty bitmap): {e}") from None

    def _windows(self, size, context):
        pos = 0
        keys = ("zero",) if context == "zero" else ("dirty", "zero")
        while pos < size:
            query = [] if context == "zero" else [f"context={context}"]
            if pos:
                query.append(f"start={pos}")
            target = f"{self.path}/extents" + ("?" + "&".join(query) if query else "")
            data = self._call("GET extents", self._get_json, target, 256 * 1024**2)
            try:
                exts = [(int(e["start"]), int(e["length"]),
                         {k: bool(e[k]) for k in keys}) for e in data]
            except (ValueError, TypeError, KeyError):
                raise errors.ClientError("server sent invalid extents") from None
            advanced = False
            for start, length, flags in exts:
                end = min(start + length, size)
                if end <= pos:
                    continue
                if start > pos:
                    raise errors.ClientError("server sent extents with a gap")
                yield dict(flags, start=pos, length=end - pos)
                pos = end
                advanced = True
            if not advanced:
                raise errors.ClientError("server sent extents not covering the image")

    def _get_json(self, target, limit=16 * 1024**2, timeout=http.DEFAULT):
        resp = self.conn.request("GET", target, timeout=timeout)
        data = self.conn.read_all(resp, limit=limit)
        try:
            return json.loads(data)
        except ValueError:
            raise errors.ClientError("server sent invalid JSON") from None

    def read_into(self, offset, view):
        """Read len(view) bytes at `offset` into `view`."""
        self._call("GET", self._read_into, offset, view)

    def _read_into(self, offset, view):
        last = offset + len(view) - 1
        resp = self.conn.request("GET", self.path,
                                 headers={"Range": f"bytes={offset}-{last}"},
                                 ok=(206,))
        if resp.length is not None and resp.length != len(view):
            self.conn.close()
            raise errors.ClientError(
                f"server sent {resp.length} bytes for a {len(view)} bytes range")
        self.conn.read_into(resp, view)

    def read_stream(self, offset, length, sink):
        """
        Read `length` bytes at `offset` in one request, a piece at a time:
        sink.view(pos, n) gives a writable view for the `n` bytes at `pos`,
        and sink.filled(pos, view) takes it once filled. Sent again from
        `offset` if it fails transiently (the pieces are given again).
        """
        self._call("GET", self._read_stream, offset, length, sink)

    def _read_stream(self, offset, length, sink):
        last = offset + length - 1
        resp = self.conn.request("GET", self.path,
                                 headers={"Range": f"bytes={offset}-{last}"},
                                 ok=(206,))
        if resp.length is not None and resp.length != length:
            self.conn.close()
            raise errors.ClientError(
                f"server sent {resp.length} bytes for a {length} bytes range")
        pos, end = offset, offset + length
        while pos < end:
            view = sink.view(pos, end - pos)
            self.conn.read_into(resp, view)
            sink.filled(pos, view)
            pos += len(view)

    def write(self, offset, view, flush):
        """Write `view` at `offset`; `flush` is sent only if supported."""
        self._put(offset, len(view), view, flush)

    def write_stream(self, offset, length, pieces, flush):
        """
        Write `length` bytes at `offset` in one request, its body the
        bytes-like pieces that `pieces()` yields (see http.Stream).
        """
        self._put(offset, length, http.Stream(length, pieces), flush)

    def _put(self, offset, length, body, flush):
        target = self.path
        if flush is not None:
            target += "?flush=" + ("y" if flush else "n")
        headers = {"Content-Range": f"bytes {offset}-{offset + length - 1}/*",
                   "Content-Type": "application/octet-stream"}
        self._call("PUT", self._request, "PUT", target, body, headers)

    def _request(self, method, target, body, headers):
        resp = self.conn.request(method, target, body=body, headers=headers)
        self.conn.discard(resp)

    def zero(self, offset, length, flush=False):
        self._patch({"op": "zero", "offset": offset, "size": length, "flush": flush})

    def flush(self):
        self._patch({"op": "flush"})

    def _patch(self, msg):
        body = json.dumps(msg).encode()
        self._call("PATCH", self._request, "PATCH", self.path, body,
                   {"Content-Type": "application/json"})

    def checksum(self, algorithm, block_size):
        """The server's block checksum of the whole image (a dict)."""
        # Hashing a big image takes long before the first response byte:
        # wait without a deadline (Ctrl-C still stops the client).
        result = self._call(
            "GET checksum", self._get_json,
            f"{self.path}/checksum?algorithm={algorithm}&block_size={block_size}",
            16 * 1024**2, None)
        if not isinstance(result, dict) or not isinstance(result.get("checksum"), str):
            raise errors.ClientError("server sent an invalid checksum answer")
        return result

    def blocks(self, algorithm, block_size, start, length):
        """
        Yield (offset, raw digest) of the blocks of [start, start + length)
        (GET .../checksum/blocks), asking again where the server answered
        fewer blocks than asked.
        """
        end = start + length
        pos = start
        while pos < end:
            result = self._call(
                "GET checksum blocks", self._get_json,
                f"{self.path}/checksum/blocks?algorithm={algorithm}"
                f"&block_size={block_size}&start={pos}&length={end - pos}",
                16 * 1024**2, None)
            try:
                if result["start"] != pos:
                    raise ValueError
                digests = [bytes.fromhex(d) for d in result["blocks"]]
            except (ValueError, TypeError, KeyError):
                raise errors.ClientError("server sent an invalid checksum blocks answer") \
                    from None
            if not digests:
                raise errors.ClientError("server sent no checksum blocks")
            for d in digests:
                if pos >= end:
                    raise errors.ClientError("server sent more blocks than asked")
                yield pos, d
                pos += block_size


def _limit(value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 1

