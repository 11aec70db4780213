"""
Client parts without a daemon: planning, local extents and checksums,
progress output, option parsing, and what importing the library pulls in.
"""

import io
import json
import os
import socket
import subprocess
import sys

import pytest

from imaged import blkhash
from imaged.client import api
from imaged.client import cli
from imaged.client import errors
from imaged.client import http
from imaged.client import local
from imaged.client import progress
from imaged.client import resume
from imaged.client import transfer
from imaged.client.images import BASIC_OPTIONS, Extent, Options
from tests.client.common import ROOT, MiB, RecordingProgress, make_sparse_image


def test_import_does_not_start_or_import_the_daemon():
    code = ("import sys, imaged.client, imaged.client.cli; "
            "bad = [m for m in ('gevent', 'bottle', 'imaged.daemon', 'imaged.server', "
            "'imaged.images', 'imaged.sessions', 'yaml') if m in sys.modules]; "
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_plan_splits_data_and_zero():
    exts = [Extent(0, 10, False), Extent(10, 25, True), Extent(35, 4, False)]
    items = list(transfer.plan(exts, chunk_size=4, zero_step=10))
    assert items == [
        (0, 4, False), (4, 4, False), (8, 2, False),
        (10, 10, True), (20, 10, True), (30, 5, True),
        (35, 4, False),
    ]


def test_resume_plan_sorts_blocks_by_both_sides_extents():
    # Blocks of 4: [0, 8) zero on both sides (in place), [8, 16) data here
    # and zero there (fill), [16, 24) data on both (compare), [24, 28) zero
    # here and data there (zero), and [28, 30) too: a block is zero only if
    # all of it is, and half of it is data there.
    mine = [Extent(0, 8, True), Extent(8, 16, False), Extent(24, 6, True)]
    theirs = [Extent(0, 16, True), Extent(16, 13, False), Extent(29, 1, True)]
    p = RecordingProgress()
    plan = resume.Plan(mine, theirs, 30, block_size=4, window_bytes=8, progress=p,
                       zero_step=4)
    windows = list(plan)
    assert windows == [
        resume.Window(8, 8, resume.FILL),
        resume.Window(16, 8, resume.COMPARE),
        resume.Window(24, 4, resume.ZERO),
        resume.Window(28, 2, resume.ZERO),
    ]
    assert plan.same_bytes == 8 and p.done == 8


def test_resume_plan_interleaves_moves_and_comparisons():
    # [0, 16) data on both sides (compare), [16, 32) data here and a hole
    # there (fill), [32, 40) a hole here and data there (zero). The moves
    # and the comparisons take turns by the bytes handed out (a zero window
    # weighs nothing), each kind in offset order; one ends, the other goes on.
    mine = [Extent(0, 32, False), Extent(32, 8, True)]
    theirs = [Extent(0, 16, False), Extent(16, 16, True), Extent(32, 8, False)]
    plan = resume.Plan(mine, theirs, 40, block_size=4, window_bytes=4,
                       progress=RecordingProgress(), zero_step=4)
    W, F, C, Z = resume.Window, resume.FILL, resume.COMPARE, resume.ZERO
    assert list(plan) == [
        W(16, 4, F), W(0, 4, C), W(20, 4, F), W(4, 4, C), W(24, 4, F), W(8, 4, C),
        W(28, 4, F), W(12, 4, C), W(32, 4, Z), W(36, 4, Z)]
    assert plan.same_bytes == 0


def test_resume_plan_windows_are_bounded():
    mine = [Extent(0, 40, False)]
    plan = resume.Plan(mine, mine, 40, block_size=4, window_bytes=12,
                       progress=RecordingProgress())
    assert [(w.start, w.length) for w in plan] == [(0, 12), (12, 12), (24, 12), (36, 4)]


def test_resume_plan_refuses_extents_not_covering_the_image():
    plan = resume.Plan([Extent(0, 8, False)], [Extent(0, 8, False)], 12, block_size=4,
                       window_bytes=8, progress=RecordingProgress())
    with pytest.raises(errors.ClientError):
        list(plan)


def test_resume_algorithm_is_a_candidate():
    assert resume.algorithm() in resume.ALGORITHMS
    blkhash.validate(resume.algorithm(), blkhash.BLOCK_SIZE)


def test_run_raises_first_failure_and_stops_others():
    class Worker:
        def __init__(self, fail_at):
            self.fail_at = fail_at
            self.done = []
            self.aborted = False

        def handle(self, item):
            if item == self.fail_at:
                raise errors.ForbiddenError("refused")
            self.done.append(item)

        def abort(self):
            self.aborted = True

        def finish(self):
            pass

        def drain(self):
            self.drained = True

    workers = [Worker(fail_at=50), Worker(fail_at=50)]
    with pytest.raises(errors.ForbiddenError):
        transfer.run(iter(range(1000)), workers)
    assert all(w.aborted for w in workers)
    assert all(w.drained for w in workers)
    done = workers[0].done + workers[1].done
    assert len(done) == len(set(done)) < 1000


def test_local_extents(tmp_path):
    path = str(tmp_path / "img")
    regions = make_sparse_image(path, 16 * MiB, regions=4, seed=2)
    with open(path, "rb") as f:
        exts = list(local.extents(f.fileno(), 16 * MiB))
    # Contiguous, alternating, covering the file.
    assert exts[0].start == 0
    assert sum(e.length for e in exts) == 16 * MiB
    for a, b in zip(exts, exts[1:]):
        assert a.start + a.length == b.start
        assert a.zero != b.zero
    for offset, length in regions:
        covering = [e for e in exts if e.start <= offset < e.start + e.length]
        assert not covering[0].zero


def test_local_extents_without_seek_data(tmp_path, monkeypatch):
    path = str(tmp_path / "img")
    make_sparse_image(path, MiB, regions=1)
    real_lseek = os.lseek

    def lseek(fd, pos, how):
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(22, "Invalid argument")
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    with open(path, "rb") as f:
        assert list(local.extents(f.fileno(), MiB)) == [Extent(0, MiB, False)]


@pytest.mark.parametrize("block_size", [MiB, 4 * MiB])
def test_local_checksum_matches_blkhash(tmp_path, block_size):
    path = str(tmp_path / "img")
    make_sparse_image(path, 9 * MiB + 100, regions=5)
    assert local.checksum(path, block_size=block_size) == \
        blkhash.checksum_file(path, block_size)


def test_local_checksum_pads_with_zeroes(tmp_path):
    short = str(tmp_path / "short")
    make_sparse_image(short, 5 * MiB, regions=2)
    padded = str(tmp_path / "padded")
    with open(short, "rb") as f, open(padded, "wb") as g:
        g.write(f.read())
        g.truncate(12 * MiB)
    assert local.checksum(short, size=12 * MiB) == blkhash.checksum_file(padded)


def test_local_checksum_bad_arguments(tmp_path):
    path = str(tmp_path / "img")
    open(path, "wb").close()
    with pytest.raises(errors.ClientError, match="block_size"):
        local.checksum(path, block_size=12345)
    with pytest.raises(errors.ClientError, match="algorithm"):
        local.checksum(path, algorithm="nope")


def test_is_local_host():
    assert http.is_local_host("localhost")
    assert http.is_local_host("127.0.0.1")
    assert http.is_local_host("127.1.2.3")
    assert not http.is_local_host("192.0.2.1")  # TEST-NET-1
    assert not http.is_local_host("no-such-host.invalid")
    assert not http.is_local_host("")
    # Our own address, if it has a non-loopback one.
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return
    assert http.is_local_host(addr)


def test_invalid_urls():
    for url in ("ftp://host/images/x", "https:///images/x", "https://host/",
                "https://host:port/images/x"):
        with pytest.raises(errors.ClientError):
            http.Connection(url)


def test_connections():
    opts = Options(True, ("GET", "PUT"), (), 8, 2, None)
    assert api._connections(None, opts, "writer", 100 * MiB, MiB) == 2
    assert api._connections(None, opts, "reader", 100 * MiB, MiB) == 4
    assert api._connections(6, opts, "reader", 100 * MiB, MiB) == 6
    # Never more connections than chunks of work.
    assert api._connections(None, opts, "reader", 2 * MiB, MiB) == 2
    assert api._connections(None, opts, "reader", 0, MiB) == 1
    assert api._connections(4, BASIC_OPTIONS, "writer", 100 * MiB, MiB) == 1
    with pytest.raises(errors.ClientError):
        api._connections(0, opts, "reader", MiB, MiB)


def test_read_only_options():
    opts = Options(True, ("OPTIONS", "GET"), ("checksum", "extents"), 8, 0, None)
    assert not opts.writable
    assert BASIC_OPTIONS.writable


def test_format():
    assert progress.format_size(0) == "0 B"
    assert progress.format_size(1023) == "1023 B"
    assert progress.format_size(1536) == "1.50 KiB"
    assert progress.format_size(3 * 1024**3) == "3.00 GiB"
    assert progress.format_duration(None) == "-:--:--"
    assert progress.format_duration(3725.4) == "1:02:05"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_progress():
    out = io.StringIO()
    clock = Clock()
    p = progress.Lines(out, interval=10, clock=clock)
    p.start("upload", 100 * MiB)
    clock.now += 5
    p.update(10 * MiB)  # too early for a line
    clock.now += 5
    p.update(10 * MiB)
    clock.now += 10
    p.update(80 * MiB)
    p.end()
    lines = out.getvalue().splitlines()
    assert lines == [
        "imaged-client: upload: 20.0% 20.00 MiB / 100.00 MiB, 2.00 MiB/s, ETA 0:00:40",
        "imaged-client: upload: 100.0% 100.00 MiB / 100.00 MiB, 5.00 MiB/s, ETA 0:00:00",
        "imaged-client: upload: 100.0% 100.00 MiB / 100.00 MiB in 20.0 s, 5.00 MiB/s",
    ]


def test_json_progress():
    out = io.StringIO()
    clock = Clock()
    p = progress.JsonLines(out, interval=1, clock=clock)
    p.start("download", 4 * MiB)
    clock.now += 2
    p.update(MiB)
    p.end()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events[1] == {"event": "progress", "phase": "download", "done": MiB,
                         "total": 4 * MiB, "elapsed": 2.0, "rate": MiB // 2,
                         "eta": 6.0, "end": False}
    assert events[-1]["end"] is True


def test_bar_progress():
    out = io.StringIO()
    clock = Clock()
    p = progress.Bar(out, interval=0.1, width=80, clock=clock)
    p.start("upload", 10 * MiB)
    clock.now += 1
    p.update(5 * MiB)
    p.end()
    frames = out.getvalue().split("\r")[1:]
    assert all(len(f.rstrip("\n")) == 79 for f in frames)
    assert frames[1].startswith("upload    50.0% [#")
    assert "ETA 0:00:01" in frames[1]
    assert frames[-1].endswith("\n")


@pytest.mark.parametrize("text,value", [("8M", 8 * MiB), ("1048576", MiB),
                                        ("512k", 512 * 1024), ("2MiB", 2 * MiB)])
def test_size_option(text, value):
    assert cli._size(text) == value


def test_main_returns_codes(capsys):
    assert cli.main(["--version"]) == 0
    assert cli.main(["upload"]) == 2
    assert cli.main(["info", "ftp://x/images/y"]) == 1
    assert "unsupported URL scheme" in capsys.readouterr().err


class ResendingImage:
    """Takes a streamed write twice, like a request sent again on a new
    connection after its first connection turned out closed."""

    def __init__(self):
        self.received = []

    def write_stream(self, offset, length, pieces, flush):
        first = pieces()
        next(first)                     # the connection broke after one piece
        first.close()
        self.received = [bytes(p) for p in pieces()]


def test_upload_progress_counted_once_when_a_request_is_resent(tmp_path):
    path = tmp_path / "src.raw"
    data = os.urandom(5 * 4096)
    path.write_bytes(data)
    recording = RecordingProgress()

    image = ResendingImage()
    fd = os.open(path, os.O_RDONLY)
    try:
        worker = transfer.UploadWorker(image, local.FileReader(fd), 2 * 4096, recording,
                                       BASIC_OPTIONS)
        worker.handle(transfer.Item(0, len(data), False))
    finally:
        os.close(fd)
    assert b"".join(image.received) == data
    assert [len(p) for p in image.received] == [8192, 8192, 4096]
    assert recording.done == len(data)
    assert worker.data_bytes == len(data)


def test_request_size():
    # Up to REQUEST_BYTES, a multiple of the buffer size, an even
    # share for each connection, one buffer when looking for zeroes.
    big = transfer.REQUEST_BYTES
    assert api._request_size(10 * big, 1, MiB, False) == big
    assert api._request_size(24 * MiB, 4, MiB, False) == 6 * MiB
    assert api._request_size(23 * MiB + 1, 4, MiB, False) == 6 * MiB
    assert api._request_size(MiB // 2, 1, MiB, False) == MiB
    assert api._request_size(10 * big, 1, 2 * big, False) == 2 * big
    assert api._request_size(10 * big, 1, MiB, True) == MiB
