"""
imaged-client end to end: the CLI in a subprocess against a real daemon.
"""

import json
import os
import pty
import signal
import subprocess
import sys

import pytest

from imaged import blkhash
from tests.client.common import (ROOT, MiB, assert_one_line_error, assert_sparse,
                                 cli_command, corrupt, fill_random, finish,
                                 make_sparse_image, run_cli, same_content, start_cli,
                                 wait_progress)

SIZE = 24 * MiB


def new_image(tmp_path, name="dst.raw", size=SIZE):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_help_documents_exit_codes():
    r = run_cli("--help")
    assert r.returncode == 0
    for code in ("0", "1", "2", "3", "4", "5", "6", "130"):
        assert f"\n  {code} " in r.stdout
    for command in ("upload", "download", "checksum", "info"):
        r = run_cli(command, "--help")
        assert r.returncode == 0
        assert "exit status" in r.stdout
    r = run_cli("upload", "--help")
    for option in ("--cafile", "--insecure", "--connections", "--verify", "--json",
                   "--no-unix-socket", "--detect-zeroes", "--timeout"):
        assert option in r.stdout


@pytest.mark.parametrize("args", [[], ["upload"], ["upload", "only-a-file"],
                                  ["bogus", "x"], ["upload", "-c", "0", "f", "u"]])
def test_usage_errors(args):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("connections", [1, 4])
def test_round_trip_tls_verified(server, tmp_path, connections):
    src = str(tmp_path / "src.raw")
    regions = make_sparse_image(src, SIZE, regions=10, seed=connections)
    dst = new_image(tmp_path)
    sid = server.add_session(dst, sparse=True)
    url = server.tls_url + sid
    common = ["--cafile", server.cert, "--no-unix-socket", "--buffer-size", "1M",
              "--connections", connections, "--verify"]

    r = run_cli("upload", src, url, *common)
    assert r.returncode == 0, r.stderr
    assert "uploaded 24.00 MiB" in r.stdout
    assert f"{connections} connection" in r.stdout
    assert "over HTTPS" in r.stdout
    checksum = blkhash.checksum_file(src)["checksum"]
    assert f"verified: blake2b checksum {checksum} matches" in r.stdout
    assert same_content(src, dst)
    assert_sparse(dst, regions)

    out = str(tmp_path / "out.raw")
    r = run_cli("download", url, out, *common)
    assert r.returncode == 0, r.stderr
    assert "downloaded 24.00 MiB" in r.stdout
    assert checksum in r.stdout
    assert same_content(src, out)
    assert_sparse(out, regions)


def test_round_trip_unix_socket_json(server, tmp_path):
    # An https URL on this host goes over the daemon's unix socket.
    src = str(tmp_path / "src.raw")
    regions = make_sparse_image(src, SIZE, regions=10, seed=9)
    dst = new_image(tmp_path)
    sid = server.add_session(dst, sparse=True)
    url = server.tls_url + sid

    r = run_cli("upload", src, url, "--cafile", server.cert, "--json", "--verify",
                "--buffer-size", "1M", "--progress-interval", "0")
    assert r.returncode == 0, r.stderr
    events = json_lines(r.stdout)
    result = events[-1]
    assert result["event"] == "result"
    assert result["transport"] == "unix"
    assert result["operation"] == "upload"
    assert result["size"] == SIZE
    assert result["connections"] == 4
    assert result["verified"] is True
    progress = [e for e in events if e["event"] == "progress" and e["phase"] == "upload"]
    assert progress[-1]["end"] is True
    assert progress[-1]["done"] == progress[-1]["total"] == SIZE
    assert any(e["event"] == "progress" and e["phase"] == "verify" for e in events)
    assert same_content(src, dst)

    out = str(tmp_path / "out.raw")
    r = run_cli("download", url, out, "--cafile", server.cert, "--json", "-q")
    assert r.returncode == 0, r.stderr
    (result,) = json_lines(r.stdout)
    assert result["transport"] == "unix"
    assert same_content(src, out)
    assert_sparse(out, regions)


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "imaged.client", "--version"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stdout.startswith("imaged-client ")


def test_plain_http(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 4 * MiB, regions=3)
    dst = new_image(tmp_path, size=4 * MiB)
    sid = server.add_session(dst)
    r = run_cli("upload", src, server.tcp_url + sid, "--no-unix-socket", "-q")
    assert r.returncode == 0, r.stderr
    assert "over HTTP" in r.stdout
    assert same_content(src, dst)


def test_progress_lines_when_not_a_terminal(server, tmp_path):
    src = str(tmp_path / "src.raw")
    fill_random(src, 8 * MiB)
    dst = new_image(tmp_path, size=8 * MiB)
    sid = server.add_session(dst)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert,
                "--buffer-size", "1M", "--progress-interval", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(line.startswith("imaged-client: upload: ") and "ETA" in line
               for line in lines)
    assert lines[-1].startswith("imaged-client: upload: 100.0% 8.00 MiB / 8.00 MiB in ")


def test_progress_bar_on_a_terminal(server, tmp_path):
    src = str(tmp_path / "src.raw")
    fill_random(src, 8 * MiB)
    dst = new_image(tmp_path, size=8 * MiB)
    sid = server.add_session(dst)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cli_command("upload", src, server.tls_url + sid, "--cafile", server.cert,
                    "--buffer-size", "1M", "--verify"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    out, _ = proc.communicate(timeout=60)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.returncode == 0
    frames = screen.decode().split("\r")
    assert any(f.startswith("upload   100.0% [####") for f in frames)
    assert any(f.startswith("verify   100.0% [####") for f in frames)
    assert b"uploaded 8.00 MiB" in out


def test_read_only_session_refuses_upload(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 4 * MiB, regions=2)
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, 4 * MiB)
    before = blkhash.checksum_file(dst)
    sid = server.add_session(dst, ops=["read"])
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert)
    assert r.returncode == 3
    line = assert_one_line_error(r.stderr)
    assert "read-only" in line
    assert sid not in r.stderr
    assert blkhash.checksum_file(dst) == before


def test_verify_mismatch(server, tmp_path):
    src = str(tmp_path / "src.raw")
    regions = make_sparse_image(src, SIZE, regions=6)
    dst = new_image(tmp_path)
    sid = server.add_session(dst)
    url = server.tls_url + sid
    r = run_cli("upload", src, url, "--cafile", server.cert, "-q")
    assert r.returncode == 0, r.stderr

    r = run_cli("checksum", url, "--cafile", server.cert, "--compare", src)
    assert r.returncode == 0, r.stderr
    assert "checksum matches" in r.stdout

    # One block changes on the server side: the transfer is not verified.
    corrupt(dst, regions[3][0])
    r = run_cli("checksum", url, "--cafile", server.cert, "--compare", src)
    assert r.returncode == 6
    line = assert_one_line_error(r.stderr)
    assert "checksum mismatch" in line

    r = run_cli("checksum", url, "--cafile", server.cert, "--compare", src, "--json")
    assert r.returncode == 6
    event = json_lines(r.stdout)[-1]
    assert event["event"] == "error"
    assert event["exit_code"] == 6

    # Downloading the corrupted image and verifying it passes: the copy
    # equals the image.
    out = str(tmp_path / "out.raw")
    r = run_cli("download", url, out, "--cafile", server.cert, "--verify", "-q")
    assert r.returncode == 0, r.stderr
    assert same_content(out, dst)


def test_checksum_and_info(server, tmp_path):
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, 8 * MiB, regions=3)
    sid = server.add_session(img, ops=["read"])
    url = server.tls_url + sid

    r = run_cli("checksum", url, "--cafile", server.cert)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == blkhash.checksum_file(img)["checksum"]

    r = run_cli("checksum", url, "--cafile", server.cert, "--json",
                "--algorithm", "sha256", "--block-size", "1M")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == blkhash.checksum_file(img, 1024**2, "sha256")

    r = run_cli("info", url, "--cafile", server.cert)
    assert r.returncode == 0, r.stderr
    assert "8.00 MiB (8388608 bytes)" in r.stdout
    assert "no (read-only session)" in r.stdout

    r = run_cli("info", url, "--cafile", server.cert, "--json")
    info = json.loads(r.stdout)
    assert info["size"] == 8 * MiB
    assert info["features"] == ["checksum", "extents"]
    assert info["unix_socket"] == server.local_path
    assert info["transport"] == "unix"


def test_out_of_range(server, tmp_path):
    src = str(tmp_path / "src.raw")
    make_sparse_image(src, 4 * MiB, regions=2)
    dst = new_image(tmp_path, size=4 * MiB)
    sid = server.add_session(dst, size=2 * MiB)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert)
    assert r.returncode == 4
    assert "larger than the image" in assert_one_line_error(r.stderr)


def test_unknown_session_forbidden(server):
    r = run_cli("info", server.tls_url + "no-such-session", "--cafile", server.cert)
    assert r.returncode == 3
    assert "403" in assert_one_line_error(r.stderr)


def test_connection_refused():
    from tests.conftest import free_port
    r = run_cli("info", f"https://127.0.0.1:{free_port()}/images/x")
    assert r.returncode == 5
    assert "cannot connect" in assert_one_line_error(r.stderr)


def test_tls_verification(server, tmp_path):
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, MiB, regions=1)
    sid = server.add_session(img)
    r = run_cli("info", server.tls_url + sid)
    assert r.returncode == 1
    line = assert_one_line_error(r.stderr)
    assert "certificate verification failed" in line
    assert "--cafile" in line

    r = run_cli("info", server.tls_url + sid, "--insecure", "--no-unix-socket")
    assert r.returncode == 0, r.stderr
    assert "imaged-client: warning: TLS certificate verification is disabled" in r.stderr


def test_local_file_errors(server, tmp_path):
    dst = new_image(tmp_path, size=MiB)
    sid = server.add_session(dst)
    url = server.tls_url + sid
    r = run_cli("upload", str(tmp_path / "missing.raw"), url, "--cafile", server.cert)
    assert r.returncode == 1
    assert "missing.raw" in assert_one_line_error(r.stderr)
    r = run_cli("download", url, str(tmp_path / "no" / "dir.raw"), "--cafile", server.cert)
    assert r.returncode == 1
    assert "No such file or directory" in assert_one_line_error(r.stderr)


# Interrupted transfers. The client goes through a slow proxy, so that the
# transfer is surely running when the test interferes.

RATE = 4 * MiB


def slow_transfer(server, slow_proxy, tmp_path, command, *extra):
    img = str(tmp_path / "img.raw")
    fill_random(img, 16 * MiB)
    sid = server.add_session(img)
    proxy = slow_proxy(server, RATE)
    local = str(tmp_path / "local.raw")
    if command == "upload":
        fill_random(local, 16 * MiB, seed=5)
        args = ("upload", local, proxy.url(sid))
    else:
        args = ("download", proxy.url(sid), local)
    proc = start_cli(*args, "--no-unix-socket", "--json", "--progress-interval", "0",
                     "--buffer-size", "256K", "--connections", "2", *extra)
    wait_progress(proc)
    return proc, proxy, sid


def test_session_deleted_during_download(server, slow_proxy, tmp_path):
    proc, proxy, sid = slow_transfer(server, slow_proxy, tmp_path, "download")
    r = server.control().delete(server.control_url + sid)
    assert r.status_code == 204
    code, out, err = finish(proc)
    assert code in (3, 5), err
    assert_one_line_error(err)
    assert json_lines(out)[-1]["event"] == "error"


def test_ctrl_c(server, slow_proxy, tmp_path):
    proc, proxy, sid = slow_transfer(server, slow_proxy, tmp_path, "upload")
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, err
    line = assert_one_line_error(err)
    assert line == "imaged-client: interrupted: the upload did not complete"
    assert json_lines(out)[-1] == {"event": "interrupted", "exit_code": 130,
                                   "message": "the upload did not complete"}


def test_ctrl_c_when_started_with_sigint_ignored(server, slow_proxy, tmp_path, monkeypatch):
    # A shell's background job (a script run with &) starts with SIGINT
    # ignored; kill -INT must still interrupt the transfer.
    from tests.client import common
    monkeypatch.setattr(common, "cli_command", lambda *args: [
        "sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable, "-m",
        "imaged.client.cli"] + [str(a) for a in args])
    proc, proxy, sid = slow_transfer(server, slow_proxy, tmp_path, "upload")
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, err


def test_timeout(server, slow_proxy, tmp_path):
    proc, proxy, sid = slow_transfer(server, slow_proxy, tmp_path, "download",
                                     "--timeout", "1", "--retries", "1",
                                     "--retry-delay", "0.1")
    proxy.pause()
    code, out, err = finish(proc)
    assert code == 5, err
    assert "timed out after 1 s" in assert_one_line_error(err)


def test_connection_lost(server, slow_proxy, tmp_path):
    proc, proxy, sid = slow_transfer(server, slow_proxy, tmp_path, "upload",
                                     "--retries", "1", "--retry-delay", "0.1")
    proxy.close()
    code, out, err = finish(proc)
    assert code == 5, err
    assert "connect" in assert_one_line_error(err)
    assert os.path.exists(tmp_path / "local.raw")


def test_upload_small_file_verify_zero_padded(server, tmp_path):
    # A file that ends inside a checksum block, with data up to its end: its
    # checksum is taken as zero-padded to the image size (it used to fail
    # with "local file ended ... was it truncated").
    src = str(tmp_path / "small.raw")
    make_sparse_image(src, 5 * MiB + 1234, regions=2, seed=3)
    with open(src, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(1234))
    dst = new_image(tmp_path, size=16 * MiB)
    sid = server.add_session(dst)
    r = run_cli("upload", src, server.tls_url + sid, "--cafile", server.cert, "--verify")
    assert r.returncode == 0, r.stderr
    assert "matches" in r.stdout
    with open(src, "rb") as a, open(dst, "rb") as b:
        data = a.read()
        assert b.read(len(data)) == data
        assert b.read() == bytes(16 * MiB - len(data))
    r = run_cli("checksum", server.tls_url + sid, "--cafile", server.cert, "--compare", src)
    assert r.returncode == 0, r.stderr
