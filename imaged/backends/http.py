"""
HttpBackend: an image served by another daemon (the proxy role).

A session whose url is `https://HOST:PORT/images/ID` (`http://` for labs)
names an image on the imaged, or ovirt-imageio, of another host. Each
backend call becomes one request to that daemon's images API over one
keep-alive connection owned by the backend, so a client connection (which
keeps its backend open, see web.Connection) keeps its own connection to the
host:

    readinto(offset, buf)   GET with Range: bytes=offset-(offset+len-1)
    write(offset, buf)      PUT ?flush=n with Content-Range: bytes a-b/*
    zero(offset, length)    PATCH {"op": "zero", ...}
    flush()                 PATCH {"op": "flush"}
    extents(start, length)  GET .../extents?context=zero
    checksum(alg, bs)       GET .../checksum (forwarded: the host reads its
                            own disk, nothing crosses the network)

Bodies move straight between the caller's buffer and the socket; nothing
is buffered beyond one transfer chunk.

Like every backend, the calls block: the images service runs them in the
threadpool. The connections come from imaged.outbound (blocking sockets
made for pool threads, where OpenSSL decrypts straight into the transfer
buffer with the GIL released); this module only speaks HTTP over them with
http.client.

At open the backend asks the host for OPTIONS: its features and limits are
what the proxy reports, and when the host is this machine (the connection's
local and peer addresses are the same, as ovirt-imageio's proxy decides)
and it reports a unix socket, the backend moves to that socket: no TLS on
the second leg. The host certificate is verified first, over TLS, either
way.

Errors: a 4xx answer of the host reaches the client with its status and
message (errors.HostError, Forbidden, RangeNotSatisfiable); a host that is
down, times out or answers garbage is errors.BadGateway (502). Messages name
the host's address, never the URL path (it holds the host's session id).
"""

import contextlib
import http.client
import json
import logging
import re
import urllib.parse

from .. import errors
from .. import outbound
from . import Capabilities, Extent

log = logging.getLogger("backends.http")

# An error body longer than this is not a message: the connection is closed
# instead of reading it.
MAX_ERROR_BODY_BYTES = 64 * 1024
# What of a host's error message is passed on.
SHOWN_ERROR_CHARS = 512
# JSON answers (OPTIONS, extents, checksum) are read whole: cap them. A
# fragmented image's extents list is ~60 bytes per extent.
MAX_JSON_BYTES = 256 * 1024**2

_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")

URL_FORM = "https://HOST:PORT/images/ID (http:// for labs)"


def parse_url(url):
    """
    Check a proxy session url; returns urllib's SplitResult. Raises
    BadRequest naming the field `url`.
    """
    def bad(why):
        return errors.BadRequest(f"invalid url: {why}; expected {URL_FORM}")

    if not isinstance(url, str) or not url.isascii() or not url.isprintable():
        raise bad("not a printable ASCII string")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        raise bad("scheme must be https or http")
    if parsed.username is not None or parsed.password is not None:
        raise bad("credentials in the url are not supported")
    if not parsed.hostname:
        raise bad("no host")
    try:
        parsed.port
    except ValueError:
        raise bad("invalid port") from None
    if parsed.query or parsed.fragment:
        raise bad("no query or fragment allowed")
    parts = parsed.path.split("/")
    if len(parts) != 3 or parts[0] != "" or parts[1] != "images" \
            or not _ID_RE.match(parts[2]) or parts[2] in (".", ".."):
        raise bad("path must be /images/ID")
    return parsed


class HttpBackend:
    """
    The image of a session on another images daemon. See the module
    docstring; the interface is imaged.backends'.
    """

    @classmethod
    def check_url(cls, url):
        parse_url(url)

    @classmethod
    def open(cls, url, mode, options):
        proxy = options.proxy or {}
        return cls(url, mode, ca_file=proxy.get("ca_file"),
                   write_buffer_bytes=proxy.get("write_buffer_bytes", 0),
                   use_unix_socket=proxy.get("use_unix_socket", True),
                   connect_timeout_s=proxy.get("connect_timeout_s", 10.0),
                   timeout_s=proxy.get("timeout_s") or options.timeout_s or 60.0)

    def __init__(self, url, mode="r", *, ca_file=None, write_buffer_bytes=0,
                 use_unix_socket=True, connect_timeout_s=10.0, timeout_s=60.0):
        if mode not in ("r", "rw"):
            raise errors.BadRequest(f"Invalid mode {mode!r}, expected 'r' or 'rw'")
        parsed = parse_url(url)
        self._path = parsed.path
        self._writable = mode == "rw"
        self._timeout_s = timeout_s
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        # What messages and logs show of the host.
        self.host = f"{parsed.hostname}:{port}"
        self.transport = parsed.scheme
        self._size = None
        # The answer of a GET being read chunk after chunk (see will_read):
        # (response, next offset, end offset).
        self._stream = None
        self._read_ahead = None
        # The PUT whose body is being sent chunk after chunk (see
        # will_write): [next offset, end offset].
        self._upload = None
        self._write_ahead = None
        tls = (outbound.tls_context(ca_file, write_buffer_bytes)
               if parsed.scheme == "https" else None)
        self._con = outbound.connect_tcp(parsed.hostname, port, tls, connect_timeout_s,
                                         timeout_s)
        try:
            self.options = self._options()
            if use_unix_socket:
                self._use_unix_socket(self.options.get("unix_socket"))
        except BaseException:
            self.close()
            raise
        self.features = frozenset(self.options.get("features", ()))
        # What the host offers is what the client sees.
        extents = ("zero", "dirty") if "dirty" in self.features else ("zero",)
        self.capabilities = Capabilities(
            extents=extents, max_writers=self.max_writers,
            max_readers=self.max_readers,
            zero="zero" in self.features, flush="flush" in self.features,
            sparse=True)

    # Properties used by the images service.

    # The host refuses a range past the end of its image (416), passed on.
    checks_ranges = True

    @property
    def block_size(self):
        return 1

    @property
    def direct(self):
        return False

    @property
    def sparse(self):
        return False

    @property
    def max_readers(self):
        """The host's limit; 1 when an old host does not say."""
        return _limit(self.options.get("max_readers"), 1)

    @property
    def max_writers(self):
        return _limit(self.options.get("max_writers"), 1)

    # Backend interface.

    def size(self):
        """The size of the host's session (asked once: GET of byte 0)."""
        if self._size is None:
            with self._talking("read the image size"):
                self._con.request("GET", self._path, headers={"Range": "bytes=0-0"})
                res = self._con.getresponse()
                if res.status == 416:
                    # An empty image: no byte 0 to get.
                    total = _content_range_total(res.getheader("Content-Range"))
                    self._read_error(res)
                    if total != 0:
                        raise errors.BadGateway(
                            f"host {self.host}: unexpected 416 for the first byte")
                    self._size = 0
                    return 0
                if res.status != 206:
                    self._raise_for(res)
                total = _content_range_total(res.getheader("Content-Range"))
                res.read(2)
                if total is None:
                    raise errors.BadGateway(
                        f"host {self.host}: no image size in its Content-Range")
                self._size = total
        return self._size

    def will_read(self, offset, length):
        """
        A hint: [offset, offset + length) will be read next, in order.

        The next readinto() at `offset` then asks the host for the whole
        range in one GET, and the following ones read on in its answer. The
        host streams it, reading its disk while it sends, instead of
        answering one chunk at a time with its disk and the network taking
        turns; a 2 GiB download is one request instead of 256.
        """
        self._read_ahead = (offset, offset + length) if length > 0 else None

    def readinto(self, offset, buf):
        """Read [offset, offset + len(buf)) of the host's image into `buf`."""
        view = memoryview(buf).cast("B")
        length = len(view)
        if not length:
            return 0
        with self._talking("read"):
            stream = self._stream
            if stream is None or stream[1] != offset or offset + length > stream[2]:
                self._end_stream()
                end = offset + length
                ahead = self._read_ahead
                if ahead and ahead[0] == offset and end <= ahead[1]:
                    end = ahead[1]
                self._read_ahead = None
                self._con.request("GET", self._path, headers={
                    "Range": f"bytes={offset}-{end - 1}"})
                res = self._con.getresponse()
                if res.status != 206:
                    self._raise_for(res)
                if res.length != end - offset:
                    self._con.close()
                    raise errors.BadGateway(
                        f"host {self.host}: answered {res.length} bytes, "
                        f"asked {end - offset}")
                stream = (res, offset, end)
            res = stream[0]
            got = 0
            while got < length:
                count = res.readinto(view[got:])
                if not count:
                    self._stream = None
                    self._con.close()
                    raise errors.BadGateway(
                        f"host {self.host}: answer ended before its length")
                got += count
            pos = offset + length
            # A fully read answer leaves the connection ready for the next.
            self._stream = (res, pos, stream[2]) if pos < stream[2] else None
        return length

    def _end_stream(self):
        """Abandon a GET answer not read to its end."""
        if self._stream is not None:
            self._stream = None
            # Its unread bytes are on the wire: this connection is done. The
            # next request connects again.
            self._con.close()

    def will_write(self, offset, length):
        """
        A hint: [offset, offset + length) will be written next, in order.

        The next write() at `offset` starts one PUT of the whole range and
        the following ones send on in its body, so the host receives and
        writes to disk at once instead of taking turns per chunk.
        """
        self._write_ahead = (offset, offset + length) if length > 0 else None

    def write(self, offset, buf):
        """Write `buf` at `offset` of the host's image, without a flush."""
        view = memoryview(buf).cast("B")
        length = len(view)
        if not length:
            return 0
        with self._talking("write"):
            upload = self._upload
            if upload is None or upload[0] != offset or offset + length > upload[1]:
                self._end_upload()
                end = offset + length
                ahead = self._write_ahead
                if ahead and ahead[0] == offset and end <= ahead[1]:
                    end = ahead[1]
                self._write_ahead = None
                path = self._path + ("?flush=n" if "flush" in self.features else "")
                con = self._con
                con.putrequest("PUT", path, skip_accept_encoding=True)
                con.putheader("Content-Type", "application/octet-stream")
                con.putheader("Content-Length", str(end - offset))
                con.putheader("Content-Range", f"bytes {offset}-{end - 1}/*")
                con.endheaders()
                upload = self._upload = [offset, end]
            try:
                self._con.send(view)
            except (BrokenPipeError, ConnectionResetError):
                # The host refused and closed; its answer may say why.
                self._upload = None
                self._upload_answer()
                raise errors.BadGateway(f"host {self.host}: closed the upload")
            upload[0] += length
            if upload[0] == upload[1]:
                self._upload = None
                self._upload_answer()
        return length

    def _upload_answer(self):
        res = self._con.getresponse()
        if res.status != 200:
            self._raise_for(res)
        res.read()

    def _end_upload(self):
        """Abandon a PUT whose body was not sent to its end."""
        if self._upload is not None:
            self._upload = None
            # The host waits for the rest of the body: this connection is
            # done (the host sees the body end early and refuses it).
            self._con.close()

    def zero(self, offset, length):
        if "zero" not in self.features:
            raise errors.Unsupported("the host does not support zero")
        self._patch({"op": "zero", "offset": offset, "size": length, "flush": False})

    def flush(self):
        # A host without flush (read-only, or an old daemon) writes through.
        if "flush" in self.features:
            self._patch({"op": "flush"})

    def extents(self, start=0, length=None, context="zero"):
        """The host's extents, clipped to [start, start + length)."""
        if "extents" not in self.features:
            size = self.size()
            end = size if length is None else min(start + length, size)
            if start < end:
                yield Extent(start, end - start, False, False)
            return
        items = self._get_json(f"{self._path}/extents?context={context}", "list extents")
        end = None if length is None else start + length
        if not isinstance(items, list):
            raise errors.BadGateway(f"host {self.host}: invalid extents answer")
        for item in items:
            try:
                ext = Extent(int(item["start"]), int(item["length"]),
                             bool(item["zero"]), bool(item.get("hole", False)),
                             bool(item.get("dirty", False)))
            except (KeyError, TypeError, ValueError):
                raise errors.BadGateway(f"host {self.host}: invalid extents answer") from None
            ext_end = ext.start + ext.length
            if ext_end <= start:
                continue
            if end is not None and ext.start >= end:
                break
            s = max(ext.start, start)
            e = ext_end if end is None else min(ext_end, end)
            yield Extent(s, e - s, ext.zero, ext.hole, ext.dirty)

    def checksum_blocks(self, algorithm, block_size, start, length=None):
        """The host's block digests of a window (see imaged.blkhash)."""
        query = {"algorithm": algorithm, "block_size": block_size, "start": start}
        if length is not None:
            query["length"] = length
        result = self._get_json(
            f"{self._path}/checksum/blocks?{urllib.parse.urlencode(query)}",
            "compute block checksums")
        if not isinstance(result, dict) or not isinstance(result.get("blocks"), list):
            raise errors.BadGateway(f"host {self.host}: invalid checksum blocks answer")
        return result

    def checksum(self, algorithm, block_size):
        """The host's checksum of its image (see imaged.blkhash)."""
        query = urllib.parse.urlencode({"algorithm": algorithm, "block_size": block_size})
        result = self._get_json(f"{self._path}/checksum?{query}", "compute the checksum")
        if not isinstance(result, dict) or not isinstance(result.get("checksum"), str):
            raise errors.BadGateway(f"host {self.host}: invalid checksum answer")
        return {"algorithm": result.get("algorithm", algorithm),
                "block_size": result.get("block_size", block_size),
                "checksum": result["checksum"]}

    def close(self):
        self._stream = self._upload = None
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Private.

    def _options(self):
        with self._talking("connect"):
            self._con.request("OPTIONS", self._path)
            res = self._con.getresponse()
            if res.status != 200:
                self._raise_for(res)
            options = self._json_body(res)
        if not isinstance(options, dict) or not isinstance(options.get("features", []), list):
            raise errors.BadGateway(f"host {self.host}: invalid OPTIONS answer")
        return options

    def _use_unix_socket(self, path):
        if not isinstance(path, str) or not path:
            return
        if not self._con.is_local():
            return
        con = outbound.connect_unix(path, self._timeout_s)
        try:
            con.connect()
        except OSError as e:
            log.warning("host %s: cannot use its unix socket, staying on %s: %s",
                        self.host, self.transport, e)
            con.close()
            return
        log.debug("host %s is this machine: relaying through its unix socket", self.host)
        self._con.close()
        self._con = con
        self.transport = "unix"

    def _patch(self, msg):
        body = json.dumps(msg).encode()
        with self._talking(msg["op"]):
            self._con.request("PATCH", self._path, body=body,
                              headers={"Content-Type": "application/json"})
            res = self._con.getresponse()
            if res.status != 200:
                self._raise_for(res)
            res.read()

    def _get_json(self, path, what):
        with self._talking(what):
            self._con.request("GET", path)
            res = self._con.getresponse()
            if res.status != 200:
                self._raise_for(res)
            return self._json_body(res)

    def _json_body(self, res):
        if res.length is not None and res.length > MAX_JSON_BYTES:
            raise errors.BadGateway(f"host {self.host}: answer too large")
        data = res.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise errors.BadGateway(f"host {self.host}: answer too large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise errors.BadGateway(f"host {self.host}: invalid JSON answer") from None

    def _read_error(self, res):
        """The message of an error answer, read so the connection stays usable."""
        if res.length is not None and res.length > MAX_ERROR_BODY_BYTES:
            data = res.read(SHOWN_ERROR_CHARS)
            self._con.close()
        else:
            data = res.read(MAX_ERROR_BODY_BYTES + 1)
            if len(data) > MAX_ERROR_BODY_BYTES or not res.isclosed():
                self._con.close()
        return data[:SHOWN_ERROR_CHARS].decode("utf-8", "replace").strip() or res.reason

    def _raise_for(self, res):
        status = res.status
        message = self._read_error(res)
        if status == 416:
            raise errors.RangeNotSatisfiable(
                message, _content_range_total(res.getheader("Content-Range")))
        if status == 403:
            raise errors.Forbidden(message)
        if 400 <= status < 500 or status == 503:
            raise errors.HostError(status, message)
        raise errors.BadGateway(f"host {self.host} answered {status}: {message}")

    @contextlib.contextmanager
    def _talking(self, what):
        """Map transport failures to 502; close the connection on any error."""
        if self._con is None:
            raise errors.BadGateway(f"host {self.host}: connection closed")
        if what != "read":
            self._end_stream()
        if what != "write":
            self._end_upload()
        try:
            yield
        except errors.Error:
            raise
        except outbound.CertificateError as e:
            self._stream = self._upload = None
            self._con.close()
            raise errors.BadGateway(
                f"host {self.host}: certificate not trusted: {e.verify_message}") from None
        except outbound.Timeout:
            self._stream = self._upload = None
            self._con.close()
            raise errors.BadGateway(
                f"host {self.host}: no answer within {self._timeout_s:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            self._stream = self._upload = None
            self._con.close()
            reason = e.strerror if isinstance(e, OSError) and e.strerror \
                else type(e).__name__
            raise errors.BadGateway(f"host {self.host}: cannot {what}: {reason}") from None
        except BaseException:
            # Interrupted mid-request: the connection is in an unknown state.
            self._stream = self._upload = None
            self._con.close()
            raise


def _limit(value, default):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return default
    return value


def _content_range_total(header):
    """N of 'bytes a-b/N' or 'bytes */N', or None."""
    if not header:
        return None
    m = re.match(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", header)
    return int(m.group(1)) if m else None
