"""
Resume: a transfer killed with SIGKILL in the middle is finished by
`--resume`, also against another daemon (another host) with a new
session: per-block digests are compared and only the blocks that differ
move the second time.
"""

import json
import re
import signal

import pytest

from imaged import client
from tests.client.common import (CLI_TIMEOUT_S, MiB, assert_one_line_error, fill_random,
                                 make_sparse_image, run_cli, same_content, start_cli,
                                 wait_progress)

SIZE = 96 * MiB
RATE = 8 * MiB


def kill_halfway(server, slow_proxy, sid, *args):
    """
    Start a transfer through a slow proxy and SIGKILL it when it reported
    3/4 of it sent: up to a server buffer (8 MiB) and the socket buffers of
    each connection were still on their way and are lost.
    """
    proxy = slow_proxy(server, RATE)
    args = [proxy.url(sid) if a == "URL" else a for a in args]
    proc = start_cli(*args, "--no-unix-socket", "--json", "--progress-interval", "0",
                     "--buffer-size", "1M", "--connections", "2")
    try:
        wait_progress(proc, done_at_least=SIZE * 3 // 4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return proxy


# A resume gets the usual CLI timeout. It once stalled for 60 s beside the
# killed upload's connections: the daemon's body reader lost the tail of a
# request body in its stream buffer (see imaged.transport._read_plain and
# tests/test_transport_reader.py). A resume taking longer than STALL_S
# prints the stacks of the client and of the daemons (py-spy), to show
# where a stall is.
RESUME_TIMEOUT_S = CLI_TIMEOUT_S
STALL_S = 30


def resume(*args, daemons=()):
    r = run_cli(*args, "--resume", "--json", "-q", timeout=RESUME_TIMEOUT_S,
                dump_after=STALL_S, dump_pids=[d.pid for d in daemons])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("other_host", [False, True])
def test_upload_killed_and_resumed(server, slow_proxy, make_daemon, tmp_path, other_host):
    src = str(tmp_path / "src.raw")
    fill_random(src, SIZE, seed=11)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    sid = server.add_session(dst)
    kill_halfway(server, slow_proxy, sid, "upload", src, "URL")
    assert not same_content(src, dst)

    # After a crash the engine may point the client at another host: a new
    # daemon with a new session on the same image.
    host = make_daemon() if other_host else server
    sid2 = host.add_session(dst)
    result = resume("upload", src, host.tls_url + sid2, "--cafile", host.cert,
                    "--verify", daemons={server, host})
    assert same_content(src, dst)
    assert result["verified"] is True
    # Well under the whole image moved the second time.
    assert result["skipped_bytes"] >= SIZE * 0.4
    assert result["data_bytes"] + result["zero_bytes"] <= SIZE * 0.6
    assert result["data_bytes"] + result["zero_bytes"] + result["skipped_bytes"] == SIZE


@pytest.mark.parametrize("other_host", [False, True])
def test_download_killed_and_resumed(server, slow_proxy, make_daemon, tmp_path,
                                     other_host):
    img = str(tmp_path / "img.raw")
    fill_random(img, SIZE, seed=12)
    sid = server.add_session(img, ops=["read"])
    out = str(tmp_path / "out.raw")
    kill_halfway(server, slow_proxy, sid, "download", "URL", out)
    assert not same_content(img, out)

    host = make_daemon() if other_host else server
    sid2 = host.add_session(img, ops=["read"])
    result = resume("download", host.tls_url + sid2, out, "--cafile", host.cert)
    assert same_content(img, out)
    assert result["skipped_bytes"] >= SIZE * 0.4
    assert result["data_bytes"] <= SIZE * 0.6


def test_resume_moves_only_changed_blocks(server, tmp_path):
    # Block by block: two changed bytes far apart move two blocks, not the
    # range between them; a block zeroed on the server is zeroed here
    # without being read.
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, 32 * MiB, regions=6, seed=13)
    sid = server.add_session(img)
    out = str(tmp_path / "out.raw")
    client.download(server.tls_url + sid, out, cafile=server.cert)
    with open(img, "r+b") as f:
        f.seek(5 * MiB + 7)
        f.write(b"\x01")
        f.seek(27 * MiB)
        f.write(b"\x02")
    with open(out, "r+b") as f:
        f.seek(13 * MiB)
        f.write(b"\x03" * 100)
    # Buffers smaller than a block: each block moves in pieces.
    result = client.download(server.tls_url + sid, out, cafile=server.cert, resume=True,
                             buffer_size=MiB)
    assert same_content(img, out)
    # Three blocks of 4 MiB differ: two changed on the server, one here.
    assert result.data_bytes == 3 * 4 * MiB
    assert result.skipped_bytes == 32 * MiB - 3 * 4 * MiB

    # The other way: the local file changed in one block.
    with open(out, "r+b") as f:
        f.seek(20 * MiB)
        f.write(b"\x04")
    result = client.upload(out, server.tls_url + sid, cafile=server.cert, resume=True,
                           buffer_size=MiB)
    assert same_content(img, out)
    assert result.data_bytes == 4 * MiB
    assert result.skipped_bytes == 28 * MiB


def test_resume_of_a_complete_transfer_moves_nothing(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 16 * MiB, regions=4, seed=14)
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.truncate(16 * MiB)
    sid = server.add_session(dst)
    client.upload(src, server.tls_url + sid, cafile=server.cert)
    result = client.upload(src, server.tls_url + sid, cafile=server.cert, resume=True)
    assert result.data_bytes == result.zero_bytes == 0
    assert result.skipped_bytes == 16 * MiB


def test_resume_needs_checksum_blocks(old_server, tmp_path):
    src = str(tmp_path / "src.raw")
    fill_random(src, MiB)
    with open(old_server.path, "wb") as f:
        f.truncate(MiB)
    r = run_cli("upload", src, old_server.url, "--resume")
    assert r.returncode == 1
    assert "--resume" in assert_one_line_error(r.stderr)
    assert old_server.requests == [("OPTIONS", "/images/old"), ("GET", "/images/old")]


def test_resume_moves_while_comparing(server, tmp_path):
    # The blocks the extents alone prove missing (data here, a hole there)
    # move from the start, beside the comparisons, not after all of them:
    # with one connection the daemon writes the missing half before it
    # hashes the half in place.
    src = str(tmp_path / "src.raw")
    fill_random(src, SIZE, seed=15)
    dst = str(tmp_path / "dst.raw")
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.truncate(SIZE)
        g.write(f.read(SIZE // 2))
    sid = server.add_session(dst)
    before = len(server.log())
    result = client.upload(src, server.tls_url + sid, cafile=server.cert, resume=True,
                           connections=1)
    assert same_content(src, dst)
    assert result.skipped_bytes == result.data_bytes == SIZE // 2
    log = server.log()[before:]
    writes = [m.start() for m in re.finditer(r"WRITE offset=(\d+)", log)]
    hashes = [m.start() for m in re.finditer(r"CHECKSUM BLOCKS ", log)]
    assert writes and hashes
    assert writes[0] < hashes[-1]
