"""
Streaming: `download URL -` writes the raw image to stdout and nothing
else; `upload - URL` reads raw bytes from stdin until its end.
"""

import json
import os
import subprocess

import pytest

from tests.client.common import (ROOT, MiB, assert_one_line_error, cli_command,
                                 fill_random, make_sparse_image, same_content)

SIZE = 12 * MiB + 4096


def run_bytes(*args, input=None, stdout=subprocess.PIPE):
    return subprocess.run(cli_command(*args), cwd=ROOT, input=input, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=60)


@pytest.mark.parametrize("extra", [[], ["--json", "--progress-interval", "0"]])
def test_download_to_stdout(server, tmp_path, extra):
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, SIZE, regions=6, seed=4)
    sid = server.add_session(img, ops=["read"])
    r = run_bytes("download", server.tls_url + sid, "-", "--cafile", server.cert,
                  "--buffer-size", "1M", *extra)
    assert r.returncode == 0, r.stderr
    with open(img, "rb") as f:
        assert r.stdout == f.read()
    err = r.stderr.decode()
    if extra:
        # Results and progress as JSON lines on stderr.
        events = [json.loads(line) for line in err.splitlines()]
        assert events[-1]["event"] == "result"
        assert events[-1]["size"] == SIZE
        assert any(e["event"] == "progress" for e in events)
    else:
        assert "downloaded 12.00 MiB" in err


def test_download_pipe_into_qemu_img(server, tmp_path):
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, SIZE, regions=4, seed=5)
    sid = server.add_session(img, ops=["read"])
    out = str(tmp_path / "out.raw")
    with open(out, "wb") as f:
        r = run_bytes("download", server.tls_url + sid, "-", "--cafile", server.cert,
                      "-q", stdout=f)
    assert r.returncode == 0, r.stderr
    assert same_content(img, out)


def test_upload_from_stdin(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, SIZE, regions=6, seed=6)
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, SIZE)
    sid = server.add_session(dst, sparse=True)
    with open(src, "rb") as f:
        data = f.read()
    r = run_bytes("upload", "-", server.tls_url + sid, "--cafile", server.cert,
                  "--buffer-size", "1M", input=data)
    assert r.returncode == 0, r.stderr
    assert b"uploaded 12.00 MiB" in r.stdout
    # Zero buffers went as zero requests: the sparse session punched holes.
    zero_part = r.stdout.decode().split(" data, ")[1]
    assert not zero_part.startswith("0 bytes zero")
    assert same_content(src, dst)


def test_upload_short_stream_leaves_the_rest(server, tmp_path):
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, 8 * MiB)
    with open(dst, "rb") as f:
        old = f.read()
    sid = server.add_session(dst)
    data = os.urandom(3 * MiB + 17)
    r = run_bytes("upload", "-", server.tls_url + sid, "--cafile", server.cert,
                  "--buffer-size", "1M", input=data)
    assert r.returncode == 0, r.stderr
    with open(dst, "rb") as f:
        assert f.read() == data + old[len(data):]


@pytest.mark.parametrize("extra_bytes", [1, 3 * MiB])
def test_upload_stream_larger_than_image(server, tmp_path, extra_bytes):
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, 4 * MiB)
    sid = server.add_session(dst)
    r = run_bytes("upload", "-", server.tls_url + sid, "--cafile", server.cert,
                  "--buffer-size", "1M", input=os.urandom(4 * MiB + extra_bytes))
    assert r.returncode == 4, r.stderr
    assert "larger than the image" in assert_one_line_error(r.stderr.decode())


def test_streaming_refuses_file_options(server, tmp_path):
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, MiB)
    sid = server.add_session(dst)
    for args in (["upload", "-", server.tls_url + sid, "--verify"],
                 ["download", server.tls_url + sid, "-", "--resume"],
                 ["download", server.tls_url + sid, "-", "--format", "qcow2"]):
        r = run_bytes(*args, "--cafile", server.cert, input=b"")
        assert r.returncode == 2, r.stderr
        assert b"cannot be used with -" in r.stderr
        assert r.stdout == b""
