"""
NBD URLs: the forms a session `url` may take for an NBD export.

Parsing needs no NBD library, so sessions can be validated on hosts where
python3-libnbd is missing (using such a session then fails with a message).

Accepted forms (SPEC §8; ovirt-imageio takes the first two):

    nbd:unix:/path/sock[:exportname=NAME]     qemu's syntax, unix socket
    nbd:HOST:PORT[:exportname=NAME]           qemu's syntax, TCP
    nbd://HOST[:PORT]/NAME                    NBD URI, TCP (port 10809)
    nbd+unix:///NAME?socket=/path/sock        NBD URI, unix socket

In qemu's syntax the export name is everything after ":exportname=", taken
literally. In the URIs it is the percent-decoded path without its first
"/". No export name means the empty name, qemu-nbd's default export.
"""

import re
import urllib.parse
from typing import NamedTuple, Optional

# The NBD protocol's limit on export names.
MAX_EXPORT_NAME_BYTES = 4096

# sun_path of struct sockaddr_un holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

DEFAULT_PORT = 10809

SCHEMES = ("nbd", "nbd+unix")

_EXPORT = r"(?::exportname=(?P<export>.*))?"
_QEMU_UNIX = re.compile(r"nbd:unix:(?P<path>/[^:]*)" + _EXPORT, re.DOTALL)
_QEMU_TCP = re.compile(
    r"nbd:(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})"
    + _EXPORT, re.DOTALL)
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")


class Address(NamedTuple):
    """Where an NBD export is: a unix socket `path` or `host` and `port`."""

    transport: str          # "unix" or "tcp"
    export: str
    path: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None

    def __str__(self):
        # For messages and logs: no secret in here, the export name is the
        # host agent's choice (usually the volume id).
        where = self.path if self.transport == "unix" else \
            f"{self.host}:{self.port}"
        return f"{where} export {self.export!r}"


class InvalidURL(ValueError):
    """The url is not an NBD URL of a form we take; the message says why."""


def is_nbd(url):
    """True if `url` claims to be an NBD URL (whether valid or not)."""
    return isinstance(url, str) and (
        url.startswith("nbd:") or url.startswith("nbd+unix:"))


def parse(url):
    """Parse an NBD url into an Address; raises InvalidURL."""
    if not isinstance(url, str):
        raise InvalidURL("expected a string")
    if "\0" in url or not url.isprintable():
        raise InvalidURL("control characters are not allowed")
    if url.startswith("nbd://") or url.startswith("nbd+unix://"):
        addr = _parse_uri(url)
    else:
        addr = _parse_qemu(url)
    if len(addr.export.encode("utf-8", "surrogateescape")) > MAX_EXPORT_NAME_BYTES:
        raise InvalidURL(f"export name longer than {MAX_EXPORT_NAME_BYTES} bytes")
    if addr.transport == "unix":
        if not addr.path.startswith("/") or addr.path == "/":
            raise InvalidURL("the socket must be an absolute path")
        if len(addr.path.encode("utf-8", "surrogateescape")) > MAX_SOCKET_PATH_BYTES:
            raise InvalidURL(
                f"socket path longer than {MAX_SOCKET_PATH_BYTES} bytes")
    elif not 0 < addr.port < 65536:
        raise InvalidURL(f"invalid port {addr.port}")
    return addr


def _parse_qemu(url):
    m = _QEMU_UNIX.fullmatch(url)
    if m:
        return Address("unix", m.group("export") or "", path=m.group("path"))
    m = _QEMU_TCP.fullmatch(url)
    if m:
        host = m.group("host")
        if host.startswith("["):
            host = host[1:-1]
        return Address("tcp", m.group("export") or "", host=host,
                       port=int(m.group("port")))
    raise InvalidURL(
        "expected nbd:unix:/path[:exportname=NAME], "
        "nbd:HOST:PORT[:exportname=NAME], nbd://HOST:PORT/NAME or "
        "nbd+unix:///NAME?socket=/path")


def _parse_uri(url):
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidURL(str(e)) from None
    if parts.fragment or parts.username or parts.password:
        raise InvalidURL("user info and fragments are not allowed")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    try:
        export = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidURL("export name is not valid UTF-8") from None
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True,
                                      strict_parsing=bool(parts.query),
                                      errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidURL(f"invalid query: {e}") from None
    if parts.scheme == "nbd+unix":
        if parts.netloc:
            raise InvalidURL("nbd+unix URLs have no host: nbd+unix:///NAME?socket=/path")
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise InvalidURL("expected one socket=/path query parameter")
        if query:
            raise InvalidURL(f"unsupported query parameter {sorted(query)[0]!r}")
        return Address("unix", export, path=sockets[0])
    if query:
        raise InvalidURL(f"unsupported query parameter {sorted(query)[0]!r}")
    host = parts.hostname
    if not host or not _HOST.fullmatch(host):
        raise InvalidURL("expected nbd://HOST:PORT/NAME")
    return Address("tcp", export, host=host,
                   port=DEFAULT_PORT if port is None else port)
