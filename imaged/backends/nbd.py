"""
NbdBackend: images exported by an NBD server (qemu-nbd, qemu-storage-daemon).

The host agent exposes a disk in any qemu format (qcow2 with its backing
chain, a thin volume, a snapshot) with an NBD server and gives imaged an NBD
URL (see imaged.backends.nbdurl); clients see the guest-visible raw bytes.
One backend is one NBD connection, made with libnbd's Python bindings (the
NBD client of the qemu and libguestfs projects); the images service keeps
it open for the life of the client connection.

Blocking and timeouts
---------------------
Requests are made with libnbd's asynchronous API and waited for against
a deadline, so a server that stops answering (a stopped qemu-nbd, a
blackholed TCP host) fails the call after `timeout_s` instead of holding
anything forever. The connection is then dropped. A server that dies
closes the socket and fails the call at once.

How a call waits depends on where it runs. In a pool thread it blocks in
libnbd's `poll()` (which releases the GIL). In a greenlet of the event
loop's thread it waits for the NBD socket with a gevent watcher, so the
loop serves everything else meanwhile (`cooperative`): the images service
reads a GET's first chunk that way, which saves the hand-off to a pool
thread and back on every request (a client downloading a sparse image
makes one request per data extent: 513 for the bench's 8 GiB image).
Measured: 2,000 GETs of 64 KiB on one TLS connection cost the server
1.29-1.41 CPU s instead of 1.46-2.02 (3 pairs alternating, busy 2-core
VM, docs/benchmarks.md).

After a lost connection the next call connects again. If writes were
acknowledged on the lost connection but not flushed, the next flush()
fails: the server may have lost them, and a client must not be told they
are safe.

Pipelining
----------
A read or write is sent as pieces of REQUEST_BYTES, all in flight at once,
so qemu-nbd works on several of them in parallel (it serves up to 16
requests of a connection concurrently) while the next one crosses the
socket; see docs/benchmarks.md for the measured effect.

Read-ahead
----------
A client downloading a sparse image asks for one data extent after
another, and the NBD server's read of each (qemu-nbd with O_DIRECT: the
disk's latency) used to start only when its request arrived. On a
read-only export, read_ahead(offset) (called by the images service when a
GET's last chunk has been read, before it is sent) looks up the next
READ_AHEAD_DEPTH data extents after `offset` (in the list of data runs one
block status request gave for a READ_AHEAD_WINDOW_BYTES window) and keeps
the NBD reads of their first READ_AHEAD_BYTES in flight without waiting
for them: the server reads the disk while imaged sends the current answers
and the client asks for the next ranges. One extent ahead was not enough:
qemu-nbd with O_DIRECT takes ~2.6 ms to read one of the bench's 1.5 MiB
extents, longer than imaged takes to send the one before, and the client
waited 2.4 ms a request for the headers of its answer (1.7 ms with three
ahead). The reads only go ahead while the client reads where expected: a
GET anywhere else (random reads, or a client whose connections share the
extents) drops them, and reading ahead stops until a GET starts where the
backend would have read ahead (read_ahead keeps that guess, from the
listed runs, without a request). Before, every such GET waited for a
useless 2 MiB read: 4 KiB GETs at random offsets took 2.1 ms each instead
of 0.55 (ovirt-imageio 0.4-0.5). Meanwhile a watcher on the event loop takes in their replies
as they come (qemu-nbd can only get ~208 KiB ahead into a unix socket, its
send buffer), so the loop receives them while it would otherwise wait for
the client. A GET of the first one's offset sends it from its buffer
(read_ahead_view); a read elsewhere on the loop leaves them in flight;
any other call first takes them in and gives the buffers back (settle()
does that on the event loop's thread, which the images service and
ops.read call before they call the backend in a pool thread). A
read-only export cannot change under imaged (qemu-nbd --read-only, or a
backup export of a point-in-time node), so data read a request early is
the data the request would get; writable exports get no read-ahead.
Memory: the read-ahead buffers are the daemon's transfer buffers while
they are idle (BufferPool.get_spare: at most half of the budget, never
beyond it): a GET answered from a read-ahead leases no transfer buffers,
so reading ahead costs no memory the daemon does not already have.
Measured on the bench's sparse download (513 GETs of 64 KiB-3 MiB, busy
2-core VM, docs/benchmarks.md): the NBD read of a GET's range took 1.8 ms
of its ~5 ms before, 0.7-0.8 ms after; 1.37x main's throughput at 0.80x
its server CPU (8 pairs).

Extents
-------
`context="zero"` merges `base:allocation` (bit 2: reads as zeroes) with
`qemu:allocation-depth` (0: no layer of the exported chain holds the range,
reported as hole=True); `context="dirty"` merges `base:allocation` with the
export's `qemu:dirty-bitmap:NAME` (bit 1: changed since the bitmap was
created). Block status is asked for in steps of EXTENTS_STEP_BYTES (the
protocol's lengths are 32 bits and servers may refuse 4 GiB or more); the
server may answer less than a step, and the contexts may end at different
offsets, so each step advances by what every context covered.
"""

import contextlib
import errno
import functools
import _socket
import logging
import os
import time

from .. import errors
from . import Capabilities, Extent, byte_view, check_range, check_writable, merged
from . import nbdurl

# libnbd's bindings, imported with the first NBD backend (_load_libnbd):
# they bring GnuTLS, libxml2 and ICU with them, 4 MiB of RSS that a
# daemon serving only files does without (38 MiB at start instead of 42).
libnbd = None

try:
    import gevent
    from gevent._hub_local import get_hub_if_exists
except ImportError:     # pragma: no cover - the daemon always has gevent
    gevent = None

log = logging.getLogger("backends.nbd")

KiB, MiB, GiB = 1024, 1024**2, 1024**3

# Size of each NBD read or write request; a larger read or write is sent as
# several requests at once. See the module docstring.
REQUEST_BYTES = 2 * MiB

# Read-ahead (see the module docstring): at most this much of each data
# extent is read ahead (the bench's sparse image has extents of 64 KiB-3 MiB,
# a GET each; a longer extent reads the rest when asked), for at most this
# many extents ahead, at most this many read-ahead buffers exist in the
# whole daemon when it is used without the daemon's buffer pool, and the next data
# extent is looked for this far after the end of a read, one block status
# request per window (per GET it cost ~0.3 ms before the answer). 2 MiB, not
# 4 (measured with buffers of its own, one extent ahead): a sparse
# download after a full NBD GET peaked at 63.8 MiB of RSS
# instead of 67.9 (the limit is 64), and took 1.8-2.1 s against 1.7-1.9
# (1 MiB: 61.7 MiB, 1.9-2.2 s; 3 alternating rounds each, 2026-11-30).
READ_AHEAD_BYTES = 2 * MiB
READ_AHEAD_DEPTH = 3
READ_AHEAD_SLOTS = 4
READ_AHEAD_WINDOW_BYTES = 256 * MiB

# Kernel socket buffers asked for on the NBD connection (see
# _grow_socket_buffers).
SOCKET_BUFFER_BYTES = 4 * MiB

# Block status requests cover at most this much: lengths are 32 bits and
# some servers refuse 4 GiB or more.
EXTENTS_STEP_BYTES = 2 * GiB

# Zero requests are at most this long: qemu-nbd takes up to 2 GiB - 512,
# and a huge zero would delay the connection's other requests.
ZERO_STEP_BYTES = 1 * GiB

# Seconds an NBD request (or connecting) may take before it fails, when
# the opener gives no timeout (the images service gives the session's
# inactivity timeout).
DEFAULT_TIMEOUT_S = 60.0

ALLOCATION = "base:allocation"
DEPTH = "qemu:allocation-depth"
DIRTY_PREFIX = "qemu:dirty-bitmap:"

# base:allocation flags (NBD protocol).
STATE_HOLE = 1
STATE_ZERO = 2
# qemu:dirty-bitmap:NAME flags.
STATE_DIRTY = 1


class Timeout(Exception):
    """The NBD server did not answer in time."""


class NbdBackend:
    """
    One connection to an NBD export; see imaged.backends for the interface.

    address: an nbdurl.Address. mode: "r" or "rw". sparse: zero() may
    deallocate. dirty: negotiate the export's dirty bitmap, for
    extents(context="dirty"). timeout_s: how long one request may take.
    """

    direct = False
    # Called in a greenlet of the event loop, its calls wait by yielding to
    # the loop (see _wait_on_loop), so the images service may call it
    # there instead of in a pool thread.
    cooperative = True
    # NBD servers take any offset and length (qemu reports a minimum block
    # size of 1).
    block_size = 1

    # No class attribute `capabilities`: they depend on the export (an
    # instance attribute, set when connected).

    @classmethod
    def check_url(cls, url):
        """Raise BadRequest naming `url` unless it is an NBD URL we take."""
        try:
            nbdurl.parse(url)
        except nbdurl.InvalidURL as e:
            raise errors.BadRequest(f"invalid url: {e}") from None

    @classmethod
    def open(cls, url, mode, options):
        """Connect to the export of an NBD url (see imaged.backends.nbdurl)."""
        try:
            address = nbdurl.parse(url)
        except nbdurl.InvalidURL as e:
            raise errors.BadRequest(f"invalid url: {e}") from None
        timeout_s = options.timeout_s or DEFAULT_TIMEOUT_S
        return cls(address, mode, sparse=options.sparse, dirty=options.dirty,
                   timeout_s=timeout_s, spare_buffers=options.spare_buffers)

    def __init__(self, address, mode="r", *, sparse=False, dirty=False,
                 timeout_s=DEFAULT_TIMEOUT_S, spare_buffers=None):
        if mode not in ("r", "rw"):
            raise errors.BadRequest(f"Invalid mode {mode!r}, expected 'r' or 'rw'")
        _load_libnbd()
        self._address = address
        self._writable = mode == "rw"
        self.sparse = sparse
        self._dirty = dirty
        self._timeout_s = timeout_s
        self._h = None
        # Where read-ahead buffers come from: the daemon's idle transfer
        # buffers, or buffers of this module's own (a backend used alone).
        self._buffers = _AheadBuffers.of(spare_buffers)
        # Writes acknowledged since the last flush, and whether such writes
        # were on a connection that was lost (see the module docstring).
        self._unflushed = False
        self._lost_writes = False
        self._no_fast_zero = False
        # The read-aheads sent and not yet taken in, oldest first: lists
        # [start, length, buffer, cookies not yet retired].
        self._ahead = []
        # Where the run of the newest read-ahead ends: the next one looks
        # for data from there.
        self._ahead_end = 0
        # What takes in the read-aheads' replies (_start_drain).
        self._drain = None
        # Where the client's next GET is expected to start, and whether
        # the last GET started elsewhere (see _follow).
        self._expected = None
        self._missed = False
        # The read-ahead buffer lent by read_ahead_view().
        self._held = None
        # The data runs of the last window looked up for read-ahead, and
        # where that window ended (see _next_data).
        self._runs = [], 0
        # The deadline of request waits on the event loop (_start_timer).
        self._timer = None
        self._h = self._connect()

    # Connecting

    def _connect(self):
        h = libnbd.NBD()
        # libnbd zeroes each read buffer before reading into it unless told
        # not to: 8 MiB of memset per chunk for nothing, as a failed read's
        # buffer is never sent.
        h.set_pread_initialize(False)
        h.set_export_name(self._address.export)
        if self._dirty:
            # The bitmap's name is the host agent's choice: ask the server
            # which ones the export has, then pick them.
            h.set_opt_mode(True)
            h.add_meta_context(DIRTY_PREFIX)
        else:
            h.add_meta_context(ALLOCATION)
            h.add_meta_context(DEPTH)
        bitmap = None
        try:
            with self._deadline("connect") as wait:
                if self._address.transport == "unix":
                    h.aio_connect_unix(self._address.path)
                else:
                    h.aio_connect_tcp(self._address.host, str(self._address.port))
                if self._dirty:
                    wait(h, h.aio_is_negotiating)
                    names = []
                    done = []
                    h.aio_opt_list_meta_context(
                        lambda name: names.append(name) or 0,
                        lambda err: done.append(err.value) or 0)
                    wait(h, lambda: bool(done))
                    h.clear_meta_contexts()
                    h.add_meta_context(ALLOCATION)
                    h.add_meta_context(DEPTH)
                    bitmaps = sorted(n for n in names if n.startswith(DIRTY_PREFIX))
                    if len(bitmaps) > 1:
                        log.warning("NBD %s has %d dirty bitmaps, using %s",
                                    self._address, len(bitmaps), bitmaps[0])
                    if bitmaps:
                        bitmap = bitmaps[0]
                        h.add_meta_context(bitmap)
                    h.aio_opt_go()
                wait(h, h.aio_is_ready)
        except (libnbd.Error, Timeout) as e:
            raise errors.StorageError(
                f"Cannot connect to NBD server {self._address}: {_describe(e)}") from None
        _grow_socket_buffers(h)
        self._size = h.get_size()
        self._read_only_export = bool(h.is_read_only())
        if self._writable and self._read_only_export:
            raise errors.Forbidden(f"NBD export {self._address} is read-only")
        self._max_request = min(REQUEST_BYTES, _max_block(h))
        self._bitmap = bitmap if bitmap and h.can_meta_context(bitmap) else None
        # Known from the handshake; kept after a lost connection, so that
        # asking never connects (the service asks in the event loop).
        extents = ("zero", "dirty") if self._bitmap else ("zero",)
        # Without multi-conn, a flush on one connection need not cover the
        # writes of another: one writer only.
        # zero() writes zeroes where the server cannot zero; flush() is a
        # no-op where the server has no cache to flush.
        # No spinning for uploads: the NBD server writing what we send
        # needs the core a spin would hold. A unix socket PUT of 2 GiB into
        # a new qcow2 on 2 cores, 4 pairs: 86,000-113,000 readv() calls and
        # 1.52-1.64 server CPU s with spins, 32,700 and 1.33-1.68 s without
        # (median 1.60 -> 1.44; ovirt-imageio 1.37-2.24), qemu-nbd's CPU
        # and the throughput the same (docs/benchmarks.md, fifth session).
        self.capabilities = Capabilities(
            extents=extents, max_writers=None if h.can_multi_conn() else 1,
            zero=True, flush=True, sparse=True, fixed_size=True,
            upload_spin=False)
        log.debug("connected to NBD %s: size=%d multi_conn=%s depth=%s bitmap=%s",
                  self._address, self._size, h.can_multi_conn(),
                  h.can_meta_context(DEPTH), self._bitmap)
        return h

    def _handle(self):
        if self._h is None:
            self._h = self._connect()
        return self._h

    # Properties

    @property
    def address(self):
        return self._address

    # Backend interface

    def size(self):
        """The export size in bytes, as the server said when connecting."""
        return self._size

    def readinto(self, offset, buf):
        """Read len(buf) bytes at `offset`; fewer only at the end of the export."""
        if offset < 0:
            raise errors.BadRequest(f"Invalid offset {offset}")
        mv = byte_view(buf)
        count = max(0, min(len(mv), self._size - offset))
        done = self._take_ahead(offset, mv[:count])
        h = self._handle()
        if count > done:
            with self._reporting("read", offset + done), self._drain_paused():
                self._pipelined(h, h.aio_pread, mv[done:count], offset + done)
        return count

    def read_ahead(self, offset):
        """
        A hint: the client is likely to read the next data extents after
        `offset` next. On a read-only export, called in a greenlet of the
        event loop, keep the reads of the next READ_AHEAD_DEPTH data
        extents (their first READ_AHEAD_BYTES each) in flight and return
        without waiting for them (see the module docstring). Never
        raises: a failed read-ahead only costs the read it saved.
        """
        if not self._read_only_export or self._h is None or _on_loop() is None:
            return
        if self._missed:
            # Reads ahead only once the client reads in order again: a
            # guess that needs no request to the server.
            self._expected = self._cached_next_data(offset)
            return
        if not self._ahead:
            self._ahead_end = offset
        while len(self._ahead) < READ_AHEAD_DEPTH and self._ahead_end < self._size:
            if not self._send_ahead(self._h):
                break
        self._expected = self._ahead[0][0] if self._ahead else None

    def _send_ahead(self, h):
        """Send the reads of the next data extent after _ahead_end; False
        if there is none or no buffer is free."""
        buf = self._buffers.get()
        if buf is None:
            return False
        cookies = []
        found = None
        try:
            with self._reporting("block status", self._ahead_end), self._drain_paused():
                found = self._next_data(h, self._ahead_end)
            if found is not None:
                start, run = found
                length = min(run, len(buf))
                step = self._max_request
                with self._reporting("read", start):
                    for pos in range(0, length, step):
                        cookies.append(h.aio_pread(
                            buf[pos:min(pos + step, length)], start + pos))
                self._ahead_end = start + run
        except errors.StorageError as e:
            log.debug("NBD read-ahead at %d failed: %s", self._ahead_end, e)
            found = None
        finally:
            if cookies and self._h is h:
                # Sent reads write into `buf`: it is given back only once
                # they are done (_settle_ahead), whatever happened here.
                self._ahead.append([start, length, buf, cookies] if found else
                                   [-1, 0, buf, cookies])
                self._start_drain(h)
            else:
                # None sent, or the connection was dropped with them.
                self._buffers.put(buf)
        return found is not None

    def settle(self):
        """
        Take in the read-aheads (see read_ahead). Call it in the event
        loop's thread before calling the backend in another thread.
        """
        self._take_ahead()

    def _start_drain(self, h):
        """
        Receive the read-aheads' replies whenever the NBD socket is
        readable, from the event loop (_Drain), until no command is in
        flight. Paused while a call waits for the server (_drain_paused),
        ended by _settle_ahead and _drop.
        """
        if self._drain is not None and self._drain.handle is h:
            self._drain.resume()
            return
        self._end_drain()
        self._drain = _Drain(h)

    def _end_drain(self):
        """Stop taking replies in (on the event loop's thread)."""
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.close()

    @contextlib.contextmanager
    def _drain_paused(self):
        """
        A wait for the server on the loop must see every reply itself: the
        drain, taking one in first, would leave it waiting for a socket
        that has nothing more to say.
        """
        drain = self._drain
        if drain is None or not drain.active:
            yield
            return
        drain.pause()
        try:
            yield
        finally:
            if self._drain is drain and self._h is drain.handle and self._ahead:
                drain.resume()

    def write(self, offset, buf):
        """Write all of `buf` at `offset`; never past the end of the export."""
        check_writable(self._writable)
        mv = byte_view(buf)
        h = self._handle()
        check_range(offset, len(mv), self._size)
        if len(mv):
            with self._reporting("write", offset):
                self._unflushed = True
                self._pipelined(h, h.aio_pwrite, mv, offset)
        return len(mv)

    def zero(self, offset, length):
        """
        Make [offset, offset + length) read as zeroes with WRITE_ZEROES.

        Only a sparse backend lets the server deallocate (punch holes);
        otherwise NO_HOLE keeps the space allocated. Where the server
        offers fast zero, it is asked first, falling back to a plain zero
        the first time the server says it cannot zero fast.
        """
        check_writable(self._writable)
        h = self._handle()
        check_range(offset, length, self._size)
        with self._reporting("zero", offset):
            self._unflushed = True
            if not h.can_zero():
                self._write_zeroes(h, offset, length)
                return
            flags = 0 if self.sparse else libnbd.CMD_FLAG_NO_HOLE
            pos, end = offset, offset + length
            while pos < end:
                step = min(ZERO_STEP_BYTES, end - pos)
                self._zero_step(h, pos, step, flags)
                pos += step

    def flush(self):
        """Make written data durable (NBD FLUSH)."""
        self._take_ahead()
        if self._lost_writes:
            self._lost_writes = False
            raise errors.StorageError(
                "the NBD connection was lost before a flush: "
                "writes since the last flush may be lost")
        h = self._handle()
        if not h.can_flush():
            return
        with self._reporting("flush", 0):
            self._wait(h, h.aio_flush())
        self._unflushed = False

    def extents(self, start=0, length=None, context="zero"):
        """
        Return an iterator of Extent describing [start, start + length).

        context="zero": zero from base:allocation, hole where
        qemu:allocation-depth is 0. context="dirty": dirty from the
        export's dirty bitmap, zero from base:allocation; raises NotFound
        when the export has no bitmap (or dirty was not asked for).
        """
        if start < 0 or (length is not None and length < 0):
            raise errors.BadRequest(
                f"Invalid extents range: start={start} length={length}")
        self._take_ahead()
        h = self._handle()
        end = self._size if length is None else min(start + length, self._size)
        if context == "dirty":
            if self._bitmap is None:
                raise errors.NotFound(
                    "dirty extents are not available: the NBD export has no "
                    "dirty bitmap" if self._dirty else
                    "dirty extents are not available for this session")
            contexts = (ALLOCATION, self._bitmap)
        elif context == "zero":
            contexts = tuple(c for c in (ALLOCATION, DEPTH) if h.can_meta_context(c))
        else:
            raise errors.BadRequest(f"Invalid extents context {context!r}")
        if start >= end:
            return iter(())
        if not contexts:
            # The server tells nothing: everything is data, which is true.
            return iter((Extent(start, end - start, False),))
        return merged(self._block_status(h, start, end, contexts, context))

    def close(self):
        """Disconnect from the server. Safe to call more than once."""
        self._take_ahead()
        self.release_ahead()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()
        h, self._h = self._h, None
        if h is None:
            return
        try:
            if h.aio_is_ready():
                # A polite NBD_CMD_DISC; the server may still be busy.
                h.aio_disconnect()
                with self._deadline("disconnect", min(self._timeout_s, 5)) as wait:
                    wait(h, h.aio_is_closed)
        except (libnbd.Error, Timeout):
            pass
        # Dropping the last reference closes the socket (libnbd's close).
        del h

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Read-ahead

    def _next_data(self, h, offset):
        """
        (start, length) of the first data run (not reading as zeroes,
        base:allocation) at or after `offset`, within the READ_AHEAD_WINDOW_BYTES
        looked up last, or None.

        One block status request lists the data runs of a window, and the
        next read-aheads take them from that list: a request per GET cost
        ~0.3 ms on the way to sending its answer (timestamps of the sparse
        download, busy 2-core VM). The export is read-only: the list stays
        true.
        """
        found = self._listed_next_data(offset)
        if found is False:
            self._runs = self._data_runs(h, offset)
            found = self._listed_next_data(offset, listed=True)
        return found

    def _cached_next_data(self, offset):
        """Where the next data at or after `offset` starts, from the window
        looked up last, or `offset` itself outside it: a guess, no request."""
        found = self._listed_next_data(offset)
        if found is False:
            return offset
        return None if found is None else found[0]

    def _listed_next_data(self, offset, listed=False):
        """_next_data from the window looked up last: False if `offset` is
        outside it, unless the window was just `listed` from `offset`."""
        runs, covered = self._runs
        if not listed and (offset >= covered or offset < (runs[0][0] if runs else covered)):
            return False
        while runs and runs[0][0] + runs[0][1] <= offset:
            runs.pop(0)
        if not runs:
            return None
        start, length = runs[0]
        if start < offset:
            start, length = offset, start + length - offset
        return start, length

    def _data_runs(self, h, offset):
        """([(start, length)] of the data runs, end of what was listed) from
        one block status request at `offset`."""
        end = min(offset + READ_AHEAD_WINDOW_BYTES, self._size)
        if not h.can_meta_context(ALLOCATION):
            return [(offset, end - offset)], end
        entries = []

        def collect(metacontext, pos, got, err):
            if metacontext == ALLOCATION and pos == offset:
                entries.extend(got)
            return 0

        self._wait(h, h.aio_block_status(end - offset, offset, collect))
        runs = []
        pos = offset
        for i in range(0, len(entries) - 1, 2):
            length, flags = entries[i], entries[i + 1]
            length = min(length, end - pos)
            if length <= 0:
                break
            if not flags & STATE_ZERO:
                if runs and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length)
                else:
                    runs.append((pos, length))
            pos += length
        return runs, pos

    def _follow(self, offset):
        """
        Note where a GET starts: a client that does not read where the
        read-ahead expected (several connections sharing the extents, or
        random reads) would make every request wait for reads it does not
        want, so reading ahead stops until a GET starts where expected
        again (read_ahead keeps guessing, from what it knows).
        """
        if self._expected is not None:
            self._missed = offset != self._expected
            if self._missed:
                self._settle_ahead()
        self._expected = None

    def _ahead_at(self, offset):
        """Whether the oldest read-ahead read at `offset`."""
        return bool(self._ahead) and self._ahead[0][0] == offset

    def _settle_ahead(self, offset=None):
        """
        Take in read-aheads: the oldest one if it read at `offset` (the
        others stay in flight), else all of them. Returns (start, length,
        buffer) of the one at `offset`, the buffer now the caller's to give
        back (self._buffers.put), or None. A failed read-ahead is logged
        and not the caller's failure (it reads, or fails, for itself).
        """
        if not self._ahead:
            return None
        if _on_loop() is None:
            self._abandon_ahead()
            return None
        if self._ahead_at(offset):
            taken = [self._ahead.pop(0)]
        else:
            taken, self._ahead = self._ahead, []
        if not self._ahead:
            self._end_drain()
        got = None
        try:
            while taken:
                start, length, buf, cookies = taken[0]
                ok = self._wait_ahead(start, cookies)
                taken.pop(0)
                if ok and start == offset:
                    got = start, length, buf
                else:
                    self._buffers.put(buf)
        except BaseException:
            # Interrupted (the request was canceled): _wait_ahead dropped
            # the connection, so nothing writes into these buffers now.
            for entry in taken:
                self._buffers.put(entry[2])
            if got is not None:
                self._buffers.put(got[2])
            raise
        return got

    def _abandon_ahead(self):
        """
        Read-aheads met off the event loop (settle() avoids this; it is a
        fallback): the drain lives on the loop and could take in a reply
        this thread would then wait for in poll(). The connection is
        dropped with them (_drop).
        """
        log.warning("NBD read-ahead taken in off the event loop; reconnecting")
        if self._h is not None:
            self._drop()
        else:
            self._forget_ahead()

    def _forget_ahead(self):
        """
        The connection is going: its read-aheads will never be taken in.
        Their buffers go back once nothing can write into them, after the
        drain has ended (on the loop, where it lives).
        """
        taken, self._ahead = self._ahead, []
        drain, self._drain = self._drain, None

        def give_back():
            if drain is not None:
                drain.close()
            for entry in taken:
                self._buffers.put(entry[2])

        if drain is None or _on_loop() is not None:
            give_back()
        else:
            drain.hub.loop.run_callback_threadsafe(give_back)

    def _wait_ahead(self, start, cookies):
        """Wait for the reads of one read-ahead; True if they all read."""
        settled = False
        try:
            if self._h is None:
                settled = True
                return False
            with self._reporting("read", start), self._drain_paused():
                self._wait(self._h, *cookies)
            settled = True
            return start >= 0
        except errors.StorageError as e:
            # A dead or stuck connection was dropped (_reporting).
            settled = True
            log.debug("NBD read-ahead at %d failed: %s", start, e)
            return False
        finally:
            if not settled and self._h is not None:
                # Interrupted (the request was canceled): the reads in
                # flight would still write into the buffer once the handle
                # is polled again, after another backend got it.
                self._drop()

    def _take_ahead(self, offset=None, mv=None):
        """
        Take in the read-ahead at `offset` and copy what it read into `mv`
        (returns how many bytes; else 0). On the event loop the other
        read-aheads stay in flight; elsewhere, or with no `offset`, all are
        taken in.
        """
        if offset is not None and _on_loop() is not None and not self._ahead_at(offset):
            return 0
        got = self._settle_ahead(offset)
        if got is None:
            return 0
        start, length, buf = got
        try:
            if mv is None:
                return 0
            n = min(length, len(mv))
            mv[:n] = buf[:n]
            return n
        finally:
            self._buffers.put(buf)

    def read_ahead_view(self, offset, length):
        """
        Called as a GET of [offset, offset + length) starts. If a
        read-ahead read at `offset`: a view of up to `length` bytes of
        what it read, valid until release_ahead(); else None. Saves the
        copy readinto() makes: ~0.1 ms per request of the sparse
        download, 10% of imaged's Python samples (py-spy) with the copy.
        """
        self._follow(offset)
        if not self._ahead_at(offset):
            return None
        got = self._settle_ahead(offset)
        if got is None:
            return None
        start, n, buf = got
        self.release_ahead()
        self._held = buf
        return buf[:min(n, length)]

    def release_ahead(self):
        """Give back the buffer of read_ahead_view()."""
        buf, self._held = self._held, None
        if buf is not None:
            self._buffers.put(buf)

    # Requests

    def _pipelined(self, h, start, mv, offset):
        """Send [offset, offset + len(mv)) as requests all in flight at once."""
        step = self._max_request
        cookies = []
        try:
            for pos in range(0, len(mv), step):
                cookies.append(start(mv[pos:pos + step], offset + pos))
        finally:
            # Every request in flight writes into (or reads from) `mv`: all
            # must be done before the caller gets its buffer back, whatever
            # happened.
            self._wait(h, *cookies)

    def _wait(self, h, *cookies):
        first = None
        hub = _on_loop()
        deadline = timer = None
        try:
            for cookie in cookies:
                try:
                    # Commands already done (a read-ahead's, whose replies the
                    # watcher took in while the loop waited for the client)
                    # are retired without setting up a deadline.
                    if h.aio_command_completed(cookie):
                        continue
                    done = functools.partial(h.aio_command_completed, cookie)
                    if hub is None:
                        if deadline is None:
                            deadline = time.monotonic() + self._timeout_s
                        _wait_polling(h, done, deadline, "request", self._timeout_s)
                    else:
                        if timer is None:
                            timer = self._start_timer()
                        _wait_on_loop(hub, h, done)
                except libnbd.Error as e:
                    if first is None:
                        first = e
                    if h.aio_is_dead() or h.aio_is_closed():
                        break
        except Timeout:
            if timer is self._timer:
                # It fired: a new one for the next wait, not an exception
                # raised again with this one's traceback.
                self._timer = None
            raise
        finally:
            if timer is not None:
                if timer is self._timer:
                    timer.cancel()      # Kept for the next wait.
                else:
                    timer.close()       # A nested wait's own, or one that fired.
        if first is not None:
            raise first

    def _start_timer(self):
        """
        Start the deadline of a request wait on the event loop: a gevent
        timer raising Timeout in this greenlet. One per backend, reused:
        with the context managers it replaced, a new timer per wait was
        ~5% of imaged's Python samples answering 4 KiB GETs (py-spy --gil).
        A nested wait, finding it running, gets one of its own.
        """
        timer = self._timer
        if timer is None or timer.pending:
            timer = gevent.Timeout(self._timeout_s, _no_answer("request", self._timeout_s))
            if self._timer is None:
                self._timer = timer
        timer.start()
        return timer

    @contextlib.contextmanager
    def _deadline(self, what, timeout_s=None):
        """
        Yields wait(h, done): make progress on `h` until done() is true,
        or Timeout. On the event loop's thread the wait yields to the
        loop (see _on_loop); elsewhere it blocks in libnbd's poll().
        """
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        hub = _on_loop()
        if hub is not None:
            with _loop_deadline(timeout_s, what):
                yield lambda h, done: _wait_on_loop(hub, h, done)
            return
        yield lambda h, done: _wait_polling(h, done, deadline, what, timeout_s)

    def _zero_step(self, h, offset, length, flags):
        if not self._no_fast_zero and h.can_fast_zero():
            try:
                self._wait(h, h.aio_zero(length, offset, None,
                                         flags | libnbd.CMD_FLAG_FAST_ZERO))
                return
            except libnbd.Error as e:
                if e.errnum != errno.ENOTSUP and e.errnum != errno.EOPNOTSUPP:
                    raise
                # Zeroing here is no faster than writing zeroes; the plain
                # zero below does that, and we stop asking.
                self._no_fast_zero = True
        self._wait(h, h.aio_zero(length, offset, None, flags))

    def _write_zeroes(self, h, offset, length):
        zeroes = memoryview(bytearray(min(length, self._max_request)))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zeroes), end - pos)
            self._pipelined(h, h.aio_pwrite, zeroes[:n], pos)
            pos += n

    def _block_status(self, h, start, end, contexts, context):
        pos = start
        while pos < end:
            step = min(EXTENTS_STEP_BYTES, end - pos)
            got = {name: [] for name in contexts}

            def collect(metacontext, offset, entries, err):
                if metacontext in got and offset == pos:
                    got[metacontext].extend(entries)
                return 0

            with self._reporting("block status", pos):
                self._wait(h, h.aio_block_status(step, pos, collect))
            lists = []
            for name in contexts:
                entries = got[name]
                if not entries:
                    raise errors.StorageError(
                        f"NBD server sent no {name} extents at offset {pos}")
                lists.append([(entries[i], entries[i + 1])
                              for i in range(0, len(entries) - 1, 2)])
            covered = min(end - pos, *(sum(n for n, _ in lst) for lst in lists))
            for ext_start, ext_len, flags in _overlay(pos, covered, lists):
                yield _extent(ext_start, ext_len, flags, context)
            pos += covered

    # Errors

    @contextlib.contextmanager
    def _reporting(self, op, offset):
        """Turn libnbd errors and timeouts into errors.StorageError."""
        try:
            yield
        except (libnbd.Error, Timeout) as e:
            h = self._h
            if isinstance(e, Timeout) or h is None or h.aio_is_dead() \
                    or h.aio_is_closed():
                self._drop()
            raise errors.StorageError(
                f"NBD {op} failed at offset {offset}: {_describe(e)}") from None

    def _drop(self):
        """Forget a dead or stuck connection; the next call connects again."""
        self._forget_ahead()
        h, self._h = self._h, None
        if self._unflushed:
            self._lost_writes = True
            self._unflushed = False
        log.warning("NBD connection to %s lost%s", self._address,
                    ", with unflushed writes" if self._lost_writes else "")
        del h


# Helpers

def _load_libnbd():
    global libnbd
    if libnbd is None:
        try:
            import nbd
        except ImportError:     # pragma: no cover - depends on the host
            raise errors.ServerError(
                "NBD images need libnbd's Python bindings (python3-libnbd), "
                "which are not installed") from None
        libnbd = nbd
    return libnbd


class _AheadBuffers:
    """
    Read-ahead buffers of this module's own, for backends used without the
    daemon's buffer pool: at most READ_AHEAD_SLOTS, made on first use and
    kept for reuse (a new 2 MiB buffer per request would be faulted in
    every time).
    """

    @staticmethod
    def of(pool):
        """Read-ahead buffers from `pool` (a BufferPool), or this module's
        own if None."""
        return _ahead_buffers if pool is None else _SpareBuffers(pool)

    def __init__(self, slots, size):
        self._slots = slots
        self._size = size
        self._free = []
        self._made = 0

    def get(self):
        """A free buffer (a memoryview), or None if all are in use."""
        if self._free:
            return self._free.pop()
        if self._made >= self._slots:
            return None
        self._made += 1
        return memoryview(bytearray(self._size))

    def put(self, buf):
        self._free.append(buf)


_ahead_buffers = _AheadBuffers(READ_AHEAD_SLOTS, READ_AHEAD_BYTES)


class _Drain:
    """
    A watcher on the event loop that takes in the replies of an NBD
    handle's commands whenever its socket is readable (a callback, no
    greenlet), until none is in flight.
    """

    def __init__(self, h):
        self.handle = h
        self.hub = _on_loop()
        self._watcher = self.hub.loop.io(h.aio_get_fd(), 1)
        self._watcher.start(self._readable)

    @property
    def active(self):
        return self._watcher.active

    def pause(self):
        self._watcher.stop()

    def resume(self):
        if not self._watcher.active:
            self._watcher.start(self._readable)

    def close(self):
        self._watcher.stop()
        self._watcher.close()

    def _readable(self):
        h = self.handle
        try:
            h.aio_notify_read()
            done = not h.aio_in_flight() or h.aio_is_dead() or h.aio_is_closed()
        except Exception:
            # A callback of the loop must not raise (it would be called
            # again and again); the next call finds out what went wrong
            # and reports it.
            done = True
        if done:
            self._watcher.stop()


class _SpareBuffers:
    """
    Read-ahead buffers borrowed from the daemon's transfer buffers while
    they have room to spare (BufferPool.get_spare): a GET answered from a
    read-ahead needs no transfer buffers of its own, so a sparse download
    reads ahead in memory the daemon already has, and its peak RSS does
    not grow with READ_AHEAD_DEPTH. The pool is the event loop's: buffers
    are taken there (read_ahead), and one given back elsewhere (a
    fallback, see _settle_ahead) goes back through the loop.
    """

    def __init__(self, pool):
        self._pool = pool
        self._hub = None

    def get(self):
        self._hub = _on_loop()
        return self._pool.get_spare(READ_AHEAD_BYTES)

    def put(self, buf):
        if _on_loop() is None and self._hub is not None:
            self._hub.loop.run_callback_threadsafe(self._pool.put_spare, buf)
        else:
            self._pool.put_spare(buf)


def _grow_socket_buffers(h):
    """
    Larger kernel buffers on the NBD socket: libnbd sends and receives as
    much as the socket takes per poll(), and each poll() is a trip through
    Python here. With the default buffers an 8 MiB write took ~38 polls,
    with 4 MiB ones 2-5 (and 10-25% less client CPU, measured with
    qemu-nbd on a unix socket; the kernel caps the size at
    net.core.wmem_max/rmem_max).
    """
    # The C socket type on a duplicate of libnbd's descriptor: gevent's
    # socket (the daemon monkey patches) would make a hub in this pool
    # thread.
    try:
        s = _socket.socket(fileno=os.dup(h.aio_get_fd()))
    except (OSError, libnbd.Error):
        return
    try:
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    except OSError:
        pass    # A smaller buffer only costs CPU.
    finally:
        s.close()


def _on_loop():
    """
    The gevent hub when called in a greenlet of the thread running it (the
    event loop's), else None (a pool thread, or no gevent at all).
    """
    if gevent is None:
        return None
    hub = get_hub_if_exists()
    if hub is None or gevent.getcurrent() is hub:
        return None
    return hub


@contextlib.contextmanager
def _loop_deadline(timeout_s, what):
    """One gevent timer for a whole wait: raises Timeout in the waiting greenlet."""
    timer = gevent.Timeout(timeout_s, _no_answer(what, timeout_s))
    timer.start()
    try:
        yield
    finally:
        timer.close()


def _no_answer(what, timeout_s):
    return Timeout(f"no answer to {what} within {timeout_s:g} s")


def _wait_polling(h, done, deadline, what, timeout_s):
    """Make progress on `h` in libnbd's poll() until done(), or Timeout at monotonic `deadline`."""
    while not done():
        if h.aio_is_dead() or h.aio_is_closed():
            raise libnbd.Error("the NBD connection is closed", errno.ENOTCONN)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _no_answer(what, timeout_s)
        h.poll(max(1, int(remaining * 1000)))


def _wait_on_loop(hub, h, done):
    """
    Drive `h` from the event loop until done(): wait for its socket in the
    direction libnbd asks for, then let libnbd's poll(0) read or write what
    is ready. No pool thread, no hand-off between threads.
    """
    fd = h.aio_get_fd()
    while not done():
        if h.aio_is_dead() or h.aio_is_closed():
            raise libnbd.Error("the NBD connection is closed", errno.ENOTCONN)
        if h.poll(0):
            continue
        direction = h.aio_get_direction()
        events = (1 if direction & libnbd.AIO_DIRECTION_READ else 0) | \
            (2 if direction & libnbd.AIO_DIRECTION_WRITE else 0)
        watcher = hub.loop.io(fd, events)
        try:
            hub.wait(watcher)
        finally:
            watcher.close()


def _max_block(h):
    try:
        size = h.get_block_size(libnbd.SIZE_MAXIMUM)
    except libnbd.Error:
        size = 0
    # 0: the server did not say; 32 MiB is what the protocol lets clients
    # assume.
    return size or 32 * MiB


def _overlay(start, length, lists):
    """
    Yield (start, length, [flags of each list]) over [start, start + length),
    splitting where any list's extent ends.
    """
    iters = [iter(lst) for lst in lists]
    cur = [next(it) for it in iters]
    left = [n for n, _ in cur]
    pos, end = start, start + length
    while pos < end:
        n = min(min(left), end - pos)
        yield pos, n, [f for _, f in cur]
        pos += n
        if pos >= end:
            break
        for i, it in enumerate(iters):
            left[i] -= n
            if left[i] == 0:
                cur[i] = next(it)
                left[i] = cur[i][0]


def _extent(start, length, flags, context):
    zero = bool(flags[0] & STATE_ZERO)
    if context == "dirty":
        return Extent(start, length, zero, False, bool(flags[1] & STATE_DIRTY))
    hole = len(flags) > 1 and flags[1] == 0
    return Extent(start, length, zero, hole)


def _describe(e):
    if isinstance(e, Timeout):
        return str(e)
    return e.string if hasattr(e, "string") else str(e)
