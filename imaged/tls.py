"""
TLS for imaged's listeners: the key file check done at start, the server
context, and the OpenSSL settings Python's `ssl` module does not
expose.

The private key of the host is the daemon's identity: a key readable by
other users, or writable by anyone but its owner, is refused rather than
used.

Every TLS choice of the server is made here: TLS 1.2 or later, AEAD
suites with forward secrecy only, no compression. Four more settings
are made for speed; all are measured in docs/benchmarks.md, all can be
turned off in the config, and none weakens anything:

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
- **Write buffer** (`tls.write_buffer_bytes`). OpenSSL hands each 16 KiB
  record to the socket in its own write(): 131,072 calls for a 2 GiB
  download. While a large piece of a response is sent (`write_buffer()`),
  a buffering BIO of OpenSSL's own (BIO_f_buffer) sits between the TLS
  connection and the socket, so records leave in 256 KiB writes (8,192
  calls); it is flushed and taken away before the send returns, so no
  byte waits in it and idle connections keep no buffer. Side by side with
  curl over TLS 1.3, a server sending 2 GiB spent 0.46 s of system time
  per transfer without it and 0.27 s with it (medians of 9, user time
  equal at 0.85 s): the copy into the buffer costs less than the calls.

- **Body read buffer** (also `tls.read_buffer_bytes`). Read-ahead has a
  cost of its own: at the start of every record OpenSSL moves what it
  holds past that record to an aligned spot at the front of its buffer
  (ssl3_read_n), so a 256 KiB read is copied again and again as its
  records are taken out: `memmove` was 21% of the CPU samples of a
  2 GiB upload. While a pool thread reads a large request body
  (`ReadBuffer`), a buffering BIO of OpenSSL's own takes the socket's
  data in reads of `read_buffer_bytes` instead, and OpenSSL, read-ahead
  off, takes each record from it with two copies and nothing moved:
  `memmove` 13-15% of the samples, server CPU per 2 GiB upload 1.87 s
  instead of 2.03 (medians of 6, alternating; docs/benchmarks.md). The
  buffer is taken away once it is empty after the request (kept until
  then: a client may have sent its next request behind the body), so
  idle connections keep no buffer.

Python's ssl module has no call for any of them (its set_ciphers()
covers TLS 1.2 only, it never sets read-ahead, and it cannot stack
BIOs), so they are set on the context's SSL_CTX and the connection's SSL
through ctypes, with libssl's own functions (no crypto here). Finding
those pointers takes the layout of CPython's SSLContext object (the
pointer right after the object header) and of its SSLSocket object (the
socket, the SSL, the context); both are checked before anything is set
(the context's options read through both paths; the SSLSocket's context
pointer against the context object), and where they do not match the
settings are skipped with a warning, never guessed.
"""

import contextlib
import ctypes
import logging
import os
import ssl
import stat
import sys
import weakref

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
# From OpenSSL's bio.h.
_BIO_CTRL_PENDING = 10
_BIO_CTRL_FLUSH = 11
_BIO_C_SET_BUFF_SIZE = 117
_BIO_FLAGS_SHOULD_RETRY = 0x08

_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)

# Write buffer size per context (set_write_buffer); contexts are shared by
# all the connections of a listener.
_write_buffers = weakref.WeakKeyDictionary()
# Body read buffer size per context (set_read_ahead).
_read_buffers = weakref.WeakKeyDictionary()


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
    if tls.get("write_buffer_bytes"):
        set_write_buffer(ctx, tls["write_buffer_bytes"])
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
    _read_buffers[ctx] = buffer_bytes
    return True


def set_read_buffer(ctx, buffer_bytes):
    """
    Let ReadBuffer.attach() put a buffer of `buffer_bytes` under the
    connections of `ctx`, without read-ahead on the context: for clients,
    whose connections take a buffer once and keep it (see
    imaged.client.http). Returns True if it will.
    """
    if _libssl(ctx) is None:
        return False
    _read_buffers[ctx] = buffer_bytes
    return True


def read_ahead(ctx):
    """Whether read-ahead is on in `ctx` (for tests and --show-config)."""
    lib = _libssl(ctx)
    return bool(lib and lib.SSL_CTX_ctrl(_ssl_ctx(ctx), _SSL_CTRL_GET_READ_AHEAD, 0, None))


def set_write_buffer(ctx, buffer_bytes):
    """
    Let write_buffer() gather the records sent on connections of `ctx`
    into writes of `buffer_bytes`. Returns True if it will.
    """
    if _libssl(ctx) is None:
        return False
    _write_buffers[ctx] = buffer_bytes
    return True


@contextlib.contextmanager
def write_buffer(conn, wait_writable):
    """
    Within the block, records written to the TLS connection `conn` (the
    C object an SSLSocket wraps, `sock._sslobj`) gather in a buffer and
    leave in writes of the size set_write_buffer() gave its context;
    anything else, the block runs as without it.

    Leaving the block normally flushes the buffer, calling
    `wait_writable()` whenever the socket is full (it raises to give up);
    then the buffer is taken away (kept empty for the next large send of
    any connection), so nothing written after the block can wait in it.
    Leaving by an exception drops what the buffer holds: the connection
    failed mid-send and must be closed.
    """
    size = _write_buffers.get(conn.context, 0)
    ssl_ptr = _ssl_of(conn) if size else None
    buf = _take_buffer(_WRITE, size) if ssl_ptr else None
    if not buf:
        yield
        return
    sock_bio = _lib.SSL_get_wbio(ssl_ptr)
    # SSL_set0_wbio() frees the BIO it replaces: the chain keeps its own
    # reference to the socket BIO.
    _lib.BIO_up_ref(sock_bio)
    _lib.BIO_push(buf, sock_bio)
    _lib.SSL_set0_wbio(ssl_ptr, buf)
    try:
        yield
        while _lib.BIO_ctrl(buf, _BIO_CTRL_FLUSH, 0, None) != 1:
            if not _lib.BIO_test_flags(buf, _BIO_FLAGS_SHOULD_RETRY):
                raise BrokenPipeError("the TLS connection failed while sending")
            wait_writable()
        if _lib.SSL_get_wbio(ssl_ptr) != buf:
            # OpenSSL stacked a buffer of its own on top for a handshake
            # message and has not taken it away: the buffer cannot be
            # removed safely, and a byte must never wait in it.
            raise BrokenPipeError("TLS state changed while sending")
    except BaseException:
        # The connection failed midway: what the buffer holds is dropped
        # with it, and the buffer is not reused.
        if _lib.SSL_get_wbio(ssl_ptr) == buf:
            _lib.BIO_pop(buf)                       # the reference is ours again
            _lib.SSL_set0_wbio(ssl_ptr, sock_bio)   # frees buf
        # Else leave the BIOs to SSL_free(), with the connection.
        raise
    _lib.BIO_pop(buf)
    _lib.BIO_up_ref(buf)                            # kept for the next send
    _lib.SSL_set0_wbio(ssl_ptr, sock_bio)
    _give_back_buffer(buf, _WRITE, size)


# Buffering BIOs kept for the next large send (_WRITE) or body read
# (_READ), at most this much memory of each kind (and always one):
# allocating and freeing 256 KiB per 8 MiB sent cost ~3% of a download's
# CPU samples (py-spy; a fresh mapping from malloc, faulted in, then
# unmapped).
_IDLE_BUFFERS_MAX_BYTES = 2 * 1024**2
# BIO_C_SET_BUFF_SIZE's argument: which of the BIO's two buffers to size.
_READ, _WRITE = 0, 1
_idle_buffers = {_READ: [], _WRITE: []}


def _take_buffer(kind, size):
    """An empty buffering BIO whose `kind` buffer holds `size` bytes, or None."""
    idle = _idle_buffers[kind]
    try:
        buf_size, buf = idle.pop()
    except IndexError:
        pass
    else:
        if buf_size == size:
            return buf
        _lib.BIO_free(buf)
    buf = _lib.BIO_new(_lib.BIO_f_buffer())
    if buf and _lib.BIO_int_ctrl(buf, _BIO_C_SET_BUFF_SIZE, size, kind) != 1:
        _lib.BIO_free(buf)
        buf = None
    return buf


def _give_back_buffer(buf, kind, size):
    idle = _idle_buffers[kind]
    if len(idle) < max(1, _IDLE_BUFFERS_MAX_BYTES // size):
        idle.append((size, buf))
    else:
        _lib.BIO_free(buf)


class ReadBuffer:
    """
    A buffering BIO under the reads of one TLS connection, for the length
    of a large request body (see "Body read buffer" above).

    attach() puts it in place and turns OpenSSL's read-ahead off for the
    connection; detach() takes it away and turns read-ahead back on, but
    only once the buffer is empty: bytes the client sent after the body
    (its next request) wait in it until they are read, through OpenSSL
    like every read. Until detached, OpenSSL owns the BIO: freeing the
    connection frees it.
    """

    def __init__(self, conn, ssl_ptr, sock_bio, buf, size):
        # `conn` keeps OpenSSL's connection (and so the BIOs) alive.
        self._conn = conn
        self._ssl = ssl_ptr
        self._sock_bio = sock_bio
        self._buf = buf
        self._size = size

    @classmethod
    def attach(cls, conn):
        """
        Put a read buffer under the TLS connection `conn` (the C object an
        SSLSocket wraps), if its context has a read buffer size
        (set_read_ahead). Returns the ReadBuffer, or None.
        """
        size = _read_buffers.get(conn.context, 0)
        ssl_ptr = _ssl_of(conn) if size else None
        if not ssl_ptr:
            return None
        sock_bio = _lib.SSL_get_rbio(ssl_ptr)
        buf = _take_buffer(_READ, size)
        if not buf:
            return None
        # SSL_set0_rbio() frees the BIO it replaces: the chain keeps its own
        # reference to the socket BIO.
        _lib.BIO_up_ref(sock_bio)
        _lib.BIO_push(buf, sock_bio)
        _lib.SSL_set0_rbio(ssl_ptr, buf)
        _lib.SSL_set_read_ahead(ssl_ptr, 0)
        # With read-ahead off OpenSSL's own buffer holds one record at a
        # time, and is released and allocated again for each (the context
        # releases buffers): one record's size, not read_buffer_bytes.
        _lib.SSL_set_default_read_buffer_len(ssl_ptr, 0)
        return cls(conn, ssl_ptr, sock_bio, buf, size)

    def detach(self):
        """
        Take the buffer away if it holds no byte. Returns True if the
        connection reads without it from now on.
        """
        if self._buf is None:
            return True
        if _lib.BIO_ctrl(self._buf, _BIO_CTRL_PENDING, 0, None) > 0:
            return False
        ssl_ptr, buf = self._ssl, self._buf
        self._buf = None
        if _lib.SSL_get_rbio(ssl_ptr) != buf:
            # Not ours any more: OpenSSL frees it with the connection.
            log.warning("TLS read BIO replaced while reading a body; buffer left in place")
            return True
        _lib.BIO_pop(buf)                               # the reference is ours again
        _lib.BIO_up_ref(buf)                            # kept for the next body
        _lib.SSL_set0_rbio(ssl_ptr, self._sock_bio)     # drops OpenSSL's reference
        _lib.SSL_set_default_read_buffer_len(ssl_ptr, self._size)
        _lib.SSL_set_read_ahead(ssl_ptr, 1)
        _give_back_buffer(buf, _READ, self._size)
        self._conn = None
        return True


def read_buffer_bytes(ctx):
    """The read buffer set on `ctx` (set_read_ahead), 0 if none."""
    return _read_buffers.get(ctx, 0)


def write_buffer_bytes(ctx):
    """The write buffer set on `ctx`, 0 if none (for tests)."""
    return _write_buffers.get(ctx, 0)


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
        # libraries it links. PyDLL: the calls keep the GIL. Each is short
        # (the flush writes to a non-blocking socket), and with CDLL every
        # call gave the GIL away and waited to get it back from the pool
        # thread reading the next chunk: py-spy put ~4% of a download's
        # samples on the dozen calls that set a write buffer up.
        lib = ctypes.PyDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                     ctypes.c_void_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_set_default_read_buffer_len.restype = None
        lib.SSL_CTX_set_default_read_buffer_len.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        p, i, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        for name, restype, argtypes in [
                ("SSL_get_SSL_CTX", p, [p]),
                ("SSL_get_wbio", p, [p]),
                ("SSL_get_rbio", p, [p]),
                ("SSL_set0_rbio", None, [p, p]),
                ("SSL_set_read_ahead", None, [p, i]),
                ("SSL_set_default_read_buffer_len", None, [p, ctypes.c_size_t]),
                ("SSL_set0_wbio", None, [p, p]),
                ("BIO_f_buffer", p, []),
                ("BIO_new", p, [p]),
                ("BIO_free", i, [p]),
                ("BIO_up_ref", i, [p]),
                ("BIO_push", p, [p, p]),
                ("BIO_pop", p, [p]),
                ("BIO_ctrl", long, [p, i, long, p]),
                ("BIO_int_ctrl", long, [p, i, long, i]),
                ("BIO_test_flags", i, [p, i])]:
            f = getattr(lib, name)
            f.restype, f.argtypes = restype, argtypes
    except (OSError, AttributeError) as e:
        log.warning("OpenSSL tuning not available: %s", e)
        return False
    return lib


def _ssl_ctx(ctx):
    # CPython's PySSLContext: the object header, then `SSL_CTX *ctx`.
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value


def _ssl_of(conn):
    """
    The SSL of the connection `conn` (an _ssl._SSLSocket), or None. Only
    for connections of a context set_write_buffer() or set_read_ahead()
    took: their context's layout (and libssl) were checked there, once.
    """
    # CPython's PySSLSocket: the object header, then `PyObject *Socket`,
    # `SSL *ssl` and `PySSLContext *ctx`. The context pointer is checked
    # against the context object before the SSL is used.
    base = id(conn) + object.__basicsize__
    ctx = conn.context
    if ctypes.c_void_p.from_address(base + 2 * _POINTER_BYTES).value != id(ctx):
        log.warning("unexpected layout of ssl.SSLSocket; TLS buffers skipped")
        return None
    ptr = ctypes.c_void_p.from_address(base + _POINTER_BYTES).value
    if not ptr or _lib.SSL_get_SSL_CTX(ptr) != _ssl_ctx(ctx):
        return None
    return ptr
