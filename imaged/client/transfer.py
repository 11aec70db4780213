"""
Planning a transfer into work items, and running them on worker threads.

The image is described by extents (data or zero). plan() cuts them into
items: data items of at most one buffer, so memory stays bounded whatever
the image size, and zero items of at most ZERO_STEP so that progress and
the load of the connections stay even. Workers, one thread and one
keep-alive connection each, take the next item from a shared iterator:
they always work on disjoint ranges, and a fast connection simply takes
more items.

The first failure of any worker stops all of them (their connections are
aborted, so none stays blocked on the network) and is raised to the caller;
so is KeyboardInterrupt in the calling thread.
"""

import concurrent.futures
import threading
from typing import NamedTuple

from .. import util
from . import errors

# Largest zero request. Zeroing is fast on the server (fallocate) but may
# fall back to writing zeroes; 1 GiB keeps each request well within the
# timeout even then.
ZERO_STEP = 1024**3

# How long the calling thread waits for workers to stop after an
# interruption before giving up on them (they are daemon threads).
STOP_TIMEOUT_S = 10.0

# Largest data request, sent or received in buffer-size pieces. At the
# end of every upload request the server finishes writing and answers
# before the next one starts, and that wait was a quarter of an upload with
# 8 MiB requests (one connection over TLS: 0.66-0.74 GB/s with 8 MiB
# requests, 0.77-1.03 with 64 MiB ones); a download request waits for the
# server's first read, and costs the server an operation each.
REQUEST_BYTES = 64 * 1024**2


class Item(NamedTuple):
    """A range to transfer; zero items need no data moved."""

    start: int
    length: int
    zero: bool


def plan(extents, chunk_size, zero_step=ZERO_STEP):
    """Yield the Items covering `extents`, in order."""
    for ext in extents:
        step = zero_step if ext.zero else chunk_size
        pos, end = ext.start, ext.start + ext.length
        while pos < end:
            n = min(step, end - pos)
            yield Item(pos, n, ext.zero)
            pos += n


class _Shared:
    """An iterator shared by threads."""

    def __init__(self, iterable):
        self._it = iter(iterable)
        self._lock = threading.Lock()

    def next(self):
        with self._lock:
            return next(self._it, None)


def run(items, workers):
    """
    Run `items` on `workers`, one thread each, until all are done.

    A worker has handle(item), finish() (no items left: complete what is
    pending), drain() (wait for its pending I/O, whatever happened; called
    before run returns or raises) and abort() (break its connection from
    another thread). Raises the first worker failure, or KeyboardInterrupt
    if the caller was interrupted; either way every worker is stopped first.
    """
    source = _Shared(items)
    stop = threading.Event()
    failures = []
    lock = threading.Lock()

    def stop_all():
        stop.set()
        for w in workers:
            w.abort()

    def loop(worker):
        try:
            while not stop.is_set():
                item = source.next()
                if item is None:
                    worker.finish()
                    return
                worker.handle(item)
        except BaseException as e:
            # Failures after a stop are consequences of the abort.
            with lock:
                first = not stop.is_set()
                if first:
                    failures.append(e)
            if first:
                stop_all()

    threads = [threading.Thread(target=loop, args=(w,), daemon=True,
                                name=f"imaged-client-worker-{i}")
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            # A timed join keeps the calling thread responsive to Ctrl-C.
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        stop_all()
        for t in threads:
            t.join(STOP_TIMEOUT_S)
        raise
    finally:
        # No I/O of a worker may outlive the run: the caller closes the
        # files and connections next.
        for w in workers:
            w.drain()
    if failures:
        raise failures[0]


class _Worker:
    """State shared by upload and download workers."""

    def __init__(self, image, chunk_size, progress, detect_zeroes):
        self.image = image
        self.chunk_size = chunk_size
        self.progress = progress
        self.detect_zeroes = detect_zeroes
        self.data_bytes = 0
        self.zero_bytes = 0
        self._bufs = [None, None]
        # The local side's I/O runs in a helper thread, overlapped with the
        # network: see DownloadWorker and UploadWorker._pieces.
        self._helper = None
        self._pending = [None, None]

    def _view(self, length, i=0):
        # Allocated on first use: a worker that gets no data item costs no
        # buffer memory.
        if self._bufs[i] is None:
            self._bufs[i] = memoryview(bytearray(self.chunk_size))
        return self._bufs[i][:length]

    def _submit(self, i, func, *args):
        """Run func(*args) in the helper thread as the user of buffer `i`."""
        if self._helper is None:
            self._helper = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="imaged-client-io")
        self._pending[i] = self._helper.submit(func, *args)
        return self._pending[i]

    def _wait(self, i):
        """Wait until buffer `i` is free; raises what its user raised."""
        pending, self._pending[i] = self._pending[i], None
        if pending is not None:
            return pending.result()
        return None

    def finish(self):
        """Called when no items are left: complete the pending local I/O."""
        for i in (0, 1):
            self._wait(i)

    def drain(self):
        """Wait for the pending local I/O, whatever happened."""
        for i in (0, 1):
            try:
                self._wait(i)
            except BaseException:
                pass
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None

    def abort(self):
        self.image.abort()

    def close(self):
        self.image.close()


class UploadWorker(_Worker):
    """
    Sends items of a local image: data as PUT, zeroes as PATCH zero.
    `source` reads the image: readinto(view, offset) (see local.FileReader,
    formats.NbdReader).
    """

    def __init__(self, image, source, chunk_size, progress, options, detect_zeroes=False):
        super().__init__(image, chunk_size, progress, detect_zeroes)
        self.source = source
        self.can_zero = options.has("zero")
        # Servers with the flush feature accept ?flush=n: one flush at the
        # end instead of one per request. Others get no parameter.
        self.flush = False if options.has("flush") else None
        self._zeroes = None

    def handle(self, item):
        if item.zero:
            self._zero(item.start, item.length)
            return
        if item.length > self.chunk_size:
            self._send(item.start, item.length)
            return
        view = self._view(item.length)
        self.source.readinto(view, item.start)
        if self.detect_zeroes and util.is_zero(view):
            self._zero(item.start, item.length)
            return
        self.image.write(item.start, view, self.flush)
        self.data_bytes += item.length
        self.progress.update(item.length)

    def _send(self, start, length):
        """Send [start, start + length) of the local image in one request."""
        # Bytes counted as progress so far: pieces are counted as they are
        # sent, once even if the request is sent again on a new connection.
        # A request succeeds only after all its pieces were sent, so all of
        # them are counted by then.
        item = Item(start, length, False)
        counted = [0]
        self.image.write_stream(start, length, lambda: self._pieces(item, counted),
                                self.flush)
        self.data_bytes += length

    def _read(self, view, pos):
        try:
            self.source.readinto(view, pos)
        except OSError as e:
            raise errors.ClientError(
                f"reading the local image at {pos} failed: {e.strerror}") from None
        return view

    def _pieces(self, item, counted):
        """
        The bytes of `item` from the local image, a buffer at a time. The
        next buffer is read (in the helper thread) while the current one is
        sent: reading through qemu-nbd and sending are both waits.
        """
        pos, end = item.start, item.start + item.length
        i = 0
        self._submit(i, self._read, self._view(min(self.chunk_size, end - pos), i), pos)
        try:
            while pos < end:
                view = self._wait(i)
                after = pos + len(view)
                if after < end:
                    self._submit(1 - i, self._read,
                                 self._view(min(self.chunk_size, end - after), 1 - i),
                                 after)
                yield view
                # Resumed: the piece was sent.
                i = 1 - i
                pos = after
                if pos - item.start > counted[0]:
                    self.progress.update(pos - item.start - counted[0])
                    counted[0] = pos - item.start
        finally:
            # The request failed while a read is pending: the buffer is not
            # reused before that read ended.
            for j in (0, 1):
                try:
                    self._wait(j)
                except BaseException:
                    pass

    def _zero(self, start, length):
        if self.can_zero:
            self.image.zero(start, length, flush=False)
            self.zero_bytes += length
            self.progress.update(length)
            return
        # No zero request on this server: send zeroes as data, one buffer
        # at a time.
        if self._zeroes is None:
            self._zeroes = memoryview(bytes(self.chunk_size))
        pos, end = start, start + length
        while pos < end:
            n = min(self.chunk_size, end - pos)
            self.image.write(pos, self._zeroes[:n], self.flush)
            self.zero_bytes += n
            self.progress.update(n)
            pos += n


class DownloadWorker(_Worker):
    """
    Fetches data items into a local image that starts as one big hole:
    zero items need nothing, so they stay holes; with `write_zeroes` (an
    image on top of a backing file, or one with old content), zero items are
    zeroed there. `sink` writes the image: pwrite(view, offset),
    zero(offset, length) (see local.FileSink, formats.NbdWriter).
    """

    def __init__(self, image, sink, chunk_size, progress, detect_zeroes=False,
                 write_zeroes=False):
        super().__init__(image, chunk_size, progress, detect_zeroes)
        self.sink = sink
        self.write_zeroes = write_zeroes
        self._next = 0
        # The end of what was counted as moved (see filled()).
        self._counted = 0

    def handle(self, item):
        if item.zero:
            self._zeroed(item.start, item.length)
            return
        self._counted = item.start
        if item.length > self.chunk_size:
            # One request, a buffer at a time: per request the server opens
            # an operation and reads its first chunk before any byte flows;
            # 8 MiB requests cost it 0.3 s more CPU per 2 GiB than 64 MiB
            # ones (qcow2 download, one connection).
            self.image.read_stream(item.start, item.length, self)
            return
        view = self.view(item.start, item.length)
        self.image.read_into(item.start, view)
        self.filled(item.start, view)

    def view(self, pos, length):
        """The next free buffer, for up to `length` bytes at `pos`."""
        # Two buffers: the next piece is fetched while the helper thread
        # writes the previous one (with qemu-nbd writing a qcow2 the write
        # is as long as the fetch).
        i = self._next
        self._wait(i)
        return self._view(min(length, self.chunk_size), i)

    def filled(self, pos, view):
        """`view`, from view(), holds the image bytes at `pos`."""
        i = self._next
        self._next = 1 - i
        # A request sent again after a failure gives its pieces again: they
        # count once.
        end = pos + len(view)
        new = max(0, end - max(pos, self._counted))
        self._counted = max(self._counted, end)
        if self.detect_zeroes and util.is_zero(view):
            if self.write_zeroes:
                self.sink.zero(pos, len(view))
            self.zero_bytes += new
        else:
            self._submit(i, self.sink.pwrite, view, pos)
            self.data_bytes += new
        self.progress.update(new)

    def _zeroed(self, start, length):
        if self.write_zeroes:
            self.sink.zero(start, length)
        self.zero_bytes += length
        self.progress.update(length)
