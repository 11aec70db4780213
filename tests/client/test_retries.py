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


# Each direction with 1 and 4 connections, once reporting its retries in
# the summary, once in the --json result.
@pytest.mark.parametrize("direction,connections,json_out", [
    ("upload", 1, True), ("upload", 4, False), ("download", 1, False), ("download", 4, True)])
def test_transfer_through_cutting_relay(server, relay, tmp_path, direction, connections,
                                        json_out):
    img = str(tmp_path / "img.raw")
    local = str(tmp_path / "local.raw")
    if direction == "upload":
        fill_random(local, SIZE, seed=connections)
        fill_random(img, SIZE, seed=99)
        # The first connections are cut after 3 MiB, in the middle of a
        # request body; one in 3 connections is answered 503.
        proxy = relay(cut_after=3 * MiB + 1000, cut_connections=connections + 2,
                      busy_every=3)
    else:
        make_sparse_image(img, SIZE, regions=8, max_region=3 * MiB, seed=connections)
        # The first connections are cut in the middle of a response.
        proxy = relay(cut_after=MiB + 5000, cut_connections=connections + 2, busy_every=4)
    sid = server.add_session(img)
    ends = [local, proxy.url(sid)] if direction == "upload" else [proxy.url(sid), local]
    r = run_cli(direction, *ends, "--buffer-size", "1M", "--connections", str(connections),
                "--retry-delay", "0.01", "--no-unix-socket", "--retries", "20",
                *(["--json", "-q"] if json_out else []))
    assert r.returncode == 0, r.stderr
    if direction == "upload":
        # Every connection sends more than the cut: all the cuts happen.
        assert proxy.cuts == connections + 2 and proxy.busy >= 1
    else:
        # Connections that moved less than the cut are not cut.
        assert proxy.cuts >= 2
    if json_out:
        retries = result_of(r.stdout)["retries"]
    else:
        retries = int(r.stdout.split(" retr")[0].rsplit(" ", 1)[-1])
    assert retries >= proxy.cuts
    assert "retry" in r.stderr
    assert same_content(img, local)


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
