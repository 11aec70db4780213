"""
TLS for imaged's listeners: the key file check done at start, the server
context, and the two OpenSSL settings Python's `ssl` module does not
expose.

The private key of the host is the daemon's identity: a key readable by
other users, or writable by anyone but its owner, is refused rather than
used.

Every TLS choice of the server is made here: TLS 1.2 or later, AEAD
suites with forward secrecy only, no compression. Two more settings are
made for speed; both are measured in docs/benchmarks.md, both can be
turned off in the config, and neither weakens anything:

- **AES-128-GCM first** (`tls.prefer_aes128_gcm`). Clients ask for
  TLS_AES_256_GCM_SHA384 first (curl, Python, browsers on machines with
  AES instructions), and OpenSSL takes the client's order unless the
  server has its own. Both are AEAD suites that TLS 1.3 allows; AES-128
  runs 10 rounds per block instead of 14, and encryption is a third of
  the server's CPU on an HTTPS download. The server puts the 128-bit
  suite first in the list it was given (the system's crypto policy,
  nothing added); Python's server contexts already make OpenSSL use the
  server's order (and so does this module).
- **Read-ahead** (`tls.read_buffer_bytes`). Without it OpenSSL reads each
  TLS record with two read() calls, its 5-byte header and then the rest:
  263,000 calls for a 2 GiB upload. With read-ahead into a larger buffer
  it takes what the socket holds in one call (17,000 calls with 256 KiB).
  Safe for imaged: every reader of a TLS socket here asks OpenSSL first
  and waits for the socket only when OpenSSL has no whole record left
  (gevent's SSLSocket.read, transport._recv_blocking), so data held in
  OpenSSL's buffer is never waited for. Python releases the buffer of an
  idle connection (SSL_MODE_RELEASE_BUFFERS), so idle connections cost
  no more memory than before.

Python's ssl module has no call for either (its set_ciphers() covers
TLS 1.2 only, and it never sets read-ahead), so they are set on the
context's SSL_CTX through ctypes, with libssl's own functions (no crypto
here). Finding the SSL_CTX takes the layout of CPython's SSLContext
object (the pointer right after the object header); it is checked by
reading the context's options through both paths before anything is
set, and where it does not match the two settings are skipped with a
warning, never guessed.
"""

import ctypes
import logging
import os
import ssl
import stat
import sys

import _ssl

log = logging.getLogger("tls")

# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are all
# AEAD and not affected by set_ciphers().
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS"
# The same suites, AES-128 first; used with the server's own order.
TLS12_CIPHERS_AES128_FIRST = "ECDHE+AESGCM+AES128:" + TLS12_CIPHERS

AES128_GCM_TLS13 = "TLS_AES_128_GCM_SHA256"

# From OpenSSL's ssl.h: SSL_CTX_ctrl() commands (stable ABI).
_SSL_CTRL_MODE = 33
_SSL_CTRL_GET_READ_AHEAD = 40
_SSL_CTRL_SET_READ_AHEAD = 41
_SSL_MODE_RELEASE_BUFFERS = 0x10


class InsecureKey(OSError):
    """The TLS key file has unsafe permissions."""


def check_key_file(path):
    """Raise InsecureKey if others may read, or anyone but the owner may
    write, the key file at `path`."""
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise InsecureKey(
            f"TLS key file {path} has unsafe mode {mode:04o}: it must not be "
            f"readable by others nor writable by anyone but its owner "
            f"(chmod 0600 or 0640 with the imaged group)")


def server_context(tls):
    """
    A server context from the `tls` config section (cert_file, key_file,
    ca_file, verify_clients, prefer_aes128_gcm, read_buffer_bytes).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(TLS12_CIPHERS)
    if tls.get("prefer_aes128_gcm"):
        prefer_aes128_gcm(ctx)
    if tls.get("read_buffer_bytes"):
        set_read_ahead(ctx, tls["read_buffer_bytes"])
    ctx.load_cert_chain(tls["cert_file"], tls["key_file"])
    if tls["ca_file"]:
        ctx.load_verify_locations(tls["ca_file"])
    if tls.get("verify_clients"):
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def prefer_aes128_gcm(ctx):
    """
    Make `ctx` choose AES-128-GCM where the client offers it, among the
    suites it already allows. Returns True if it did.
    """
    lib = _libssl(ctx)
    if lib is None:
        return False
    ptr = _ssl_ctx(ctx)
    tls13 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
    if AES128_GCM_TLS13 in tls13:
        tls13.remove(AES128_GCM_TLS13)
        tls13.insert(0, AES128_GCM_TLS13)
        if lib.SSL_CTX_set_ciphersuites(ptr, ":".join(tls13).encode()) != 1:
            log.warning("could not reorder the TLS 1.3 suites; keeping OpenSSL's order")
            return False
    ctx.set_ciphers(TLS12_CIPHERS_AES128_FIRST)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return True


def set_read_ahead(ctx, buffer_bytes):
    """
    Let OpenSSL read as much as the socket holds, up to `buffer_bytes`,
    in one call. Returns True if it did.
    """
    lib = _libssl(ctx)
    if lib is None:
        return False
    ptr = _ssl_ctx(ctx)
    if not lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_MODE, 0, None) & _SSL_MODE_RELEASE_BUFFERS:
        # Without it every connection, idle ones too, would keep a buffer.
        log.warning("OpenSSL keeps connection buffers; not enabling read-ahead")
        return False
    lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    lib.SSL_CTX_set_default_read_buffer_len(ptr, buffer_bytes)
    return True


def read_ahead(ctx):
    """Whether read-ahead is on in `ctx` (for tests and --show-config)."""
    lib = _libssl(ctx)
    return bool(lib and lib.SSL_CTX_ctrl(_ssl_ctx(ctx), _SSL_CTRL_GET_READ_AHEAD, 0, None))


_lib = None


def _libssl(ctx):
    """libssl's functions, or None if `ctx`'s SSL_CTX cannot be found."""
    global _lib
    if _lib is None:
        _lib = _load()
    if not _lib:
        return None
    if _lib.SSL_CTX_get_options(_ssl_ctx(ctx)) != ctx.options:
        log.warning("unexpected layout of ssl.SSLContext; OpenSSL tuning skipped")
        return None
    return _lib


def _load():
    if sys.implementation.name != "cpython":
        return False
    try:
        # The libssl that _ssl uses: symbols are looked up in _ssl and the
        # libraries it links.
        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_void_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_set_default_read_buffer_len.restype = None
        lib.SSL_CTX_set_default_read_buffer_len.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError) as e:
        log.warning("OpenSSL tuning not available: %s", e)
        return False
    return lib


def _ssl_ctx(ctx):
    # CPython's PySSLContext: the object header, then `SSL_CTX *ctx`.
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
