"""
Retries: transfers through a relay that cuts connections and answers 503
go on and complete, counting their retries; 4xx answers are final.
"""

import functools
import json

import pytest

from imaged import client
from tests.client.common import (MiB, CuttingProxy, assert_one_line_error, fill_random,
                                 make_sparse_image, run_cli, same_content)

SIZE = 16 * MiB


@pytest.fixture
def relay(server, relays):
    """Factory: relay(cut_after, ...) -> a CuttingProxy to `server`."""
    return functools.partial(relays, CuttingProxy, server)


def result_of(stdout):
    return [json.loads(line) for line in stdout.splitlines()][-1]


@pytest.mark.parametrize("connections", [1, 4])
def test_upload_through_cutting_relay(server, relay, tmp_path, connections):
    src = str(tmp_path / "src.raw")
    fill_random(src, SIZE, seed=connections)
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, SIZE, seed=99)
    sid = server.add_session(dst)
    # The first connections are cut after 3 MiB, in the middle of a request
    # body; one in 3 connections is answered 503.
    proxy = relay(cut_after=3 * MiB + 1000, cut_connections=connections + 2,
                  busy_every=3)
    r = run_cli("upload", src, proxy.url(sid), "--json", "-q", "--buffer-size", "1M",
                "--connections", str(connections), "--retry-delay", "0.01", "--no-unix-socket",
                "--retries", "10")
    assert r.returncode == 0, r.stderr
    result = result_of(r.stdout)
    assert proxy.cuts == connections + 2 and proxy.busy >= 1
    assert result["retries"] >= proxy.cuts
    assert "retry" in r.stderr
    assert same_content(src, dst)


@pytest.mark.parametrize("connections", [1, 4])
def test_download_through_cutting_relay(server, relay, tmp_path, connections):
    img = str(tmp_path / "img.raw")
    make_sparse_image(img, SIZE, regions=8, max_region=3 * MiB, seed=connections)
    sid = server.add_session(img)
    # The first connections are cut in the middle of a response.
    proxy = relay(cut_after=MiB + 5000, cut_connections=connections + 2, busy_every=4)
    out = str(tmp_path / "out.raw")
    r = run_cli("download", proxy.url(sid), out, "--buffer-size", "1M",
                "--connections", str(connections), "--retry-delay", "0.01", "--no-unix-socket",
                "--retries", "20")
    assert r.returncode == 0, r.stderr
    # Connections that moved less than the cut are not cut.
    assert proxy.cuts >= 2
    retries = int(r.stdout.split(" retr")[0].rsplit(" ", 1)[-1])
    assert retries >= proxy.cuts
    assert same_content(img, out)


def test_library_counts_retries(server, relay, tmp_path):
    src = str(tmp_path / "src.raw")
    fill_random(src, 8 * MiB)
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, 8 * MiB, seed=3)
    sid = server.add_session(dst)
    proxy = relay(cut_after=2 * MiB + 1, cut_connections=2)
    result = client.upload(src, proxy.url(sid), connections=1, buffer_size=MiB,
                           retry_delay=0.01, use_unix_socket=False)
    assert result.retries == proxy.cuts > 0
    assert result.to_dict()["retries"] == result.retries
    assert same_content(src, dst)


def test_gives_up_after_the_limit(server, relay, tmp_path):
    src = str(tmp_path / "src.raw")
    fill_random(src, 4 * MiB)
    dst = str(tmp_path / "dst.raw")
    fill_random(dst, 4 * MiB, seed=3)
    sid = server.add_session(dst)
    # Every request is cut: no progress is possible.
    proxy = relay(cut_after=3000, cut_connections=1000)
    r = run_cli("upload", src, proxy.url(sid), "--retries", "2", "--retry-delay", "0.01", "--no-unix-socket")
    assert r.returncode == 5, r.stderr
    assert "lost" in assert_one_line_error(r.stderr) or "closed" in r.stderr
    assert r.stderr.count("retry ") == 2


def test_4xx_is_not_retried(server, relay, tmp_path):
    proxy = relay(cut_after=10 * MiB)
    r = run_cli("download", proxy.url("no-such-session"), str(tmp_path / "out.raw"),
                "--retry-delay", "0.01", "--no-unix-socket")
    assert r.returncode == 3, r.stderr
    assert "retry" not in r.stderr
    assert proxy.accepted == 1
