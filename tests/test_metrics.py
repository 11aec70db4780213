"""
GET /metrics (SPEC §10) and the log line of every finished operation, on a
real daemon: the figures must follow what clients really did.
"""

import os
import re
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imaged import metrics

MiB = 1024**2


def scrape(daemon):
    with daemon.control() as c:
        r = c.get("http+unix://imaged/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(4 * MiB))
    return str(path)


def test_transfers_are_counted(daemon, image):
    sid = daemon.add_session(image)
    before = scrape(daemon)
    s = daemon.https()
    assert s.put(daemon.tls_url + sid, data=os.urandom(4 * MiB)).status_code == 200
    assert s.get(daemon.tls_url + sid, headers={"Range": "bytes=0-1048575"}).status_code == 206
    r = s.patch(daemon.tls_url + sid, json={"op": "zero", "offset": 0, "size": 2 * MiB})
    assert r.status_code == 200
    assert s.get(daemon.tls_url + "no-such-session").status_code == 403
    s.close()
    after = scrape(daemon)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imaged_bytes_total", op="write") == 4 * MiB
    assert delta("imaged_bytes_total", op="read") == 1 * MiB
    assert delta("imaged_bytes_total", op="zero") == 2 * MiB
    assert delta("imaged_requests_total", method="PUT", status="200") == 1
    assert delta("imaged_requests_total", method="GET", status="206") == 1
    assert delta("imaged_requests_total", method="GET", status="403") == 1
    assert delta("imaged_requests_total", method="PATCH", status="200") == 1
    assert delta("imaged_request_duration_seconds_count", method="GET") >= 2
    assert delta("imaged_operations_total", op="write", result="ok") == 1
    assert value(after, "imaged_sessions") == 1
    assert value(after, "imaged_sessions_active") == 0


def test_expired_sessions_and_aborted_operations(daemon, image):
    sid = daemon.add_session(image, timeout=1)
    assert wait_for(lambda: value(scrape(daemon), "imaged_sessions_expired_total") == 1)
    assert value(scrape(daemon), "imaged_sessions") == 0

    # An upload stalled mid-body, then its session removed: aborted.
    sid = daemon.add_session(image)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(daemon.local_path)
    sock.sendall(f"PUT /images/{sid} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {4 * MiB}\r\n\r\n".encode() + b"x" * MiB)
    assert wait_for(lambda: value(scrape(daemon), "imaged_sessions_active") == 1)
    assert daemon.control().delete(daemon.control_url + sid).status_code == 204
    sock.close()
    samples = scrape(daemon)
    assert value(samples, "imaged_operations_aborted_total", op="write") == 1
    assert value(samples, "imaged_operations_total", op="write", result="canceled") == 1


def test_open_connections(daemon):
    socks = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", daemon.tcp_port))
        socks.append(s)
    # The scrape's own connection counts too.
    assert wait_for(lambda: value(scrape(daemon), "imaged_connections_open") >= 4)
    for s in socks:
        s.close()
    assert wait_for(lambda: value(scrape(daemon), "imaged_connections_open") == 1)


def test_odd_methods_do_not_grow_labels(daemon):
    for i in range(5):
        with socket.create_connection(("127.0.0.1", daemon.tcp_port)) as s:
            s.sendall(f"FOO{i} /images/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.recv(4096)
    samples = scrape(daemon)
    methods = {dict(labels).get("method") for (name, labels) in samples
               if name == "imaged_requests_total"}
    assert not any(m and m.startswith("FOO") for m in methods)


@pytest.mark.parametrize("request_bytes,method,status", [
    (b"GET /images/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
     b"Content-Length: 2\r\n\r\nab", "GET", "400"),
    (b"GET /images/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "GET", "501"),
    (b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n", "other", "414"),
    (b"\x16\x03\x01 garbage\r\n\r\n", "other", "400"),
])
def test_requests_refused_by_the_transport_are_counted(daemon, request_bytes, method, status):
    # Refused before any app saw them (framing, request line): counted all
    # the same, or a flood of bad requests would not show in the metrics.
    before = value(scrape(daemon), "imaged_requests_total", method=method, status=status)
    with socket.create_connection(("127.0.0.1", daemon.tcp_port)) as s:
        s.sendall(request_bytes)
        assert s.recv(4096).startswith(f"HTTP/1.1 {status}".encode())
    assert wait_for(lambda: value(scrape(daemon), "imaged_requests_total",
                                  method=method, status=status) == before + 1)


def test_two_daemons_do_not_share_figures():
    a, b = metrics.Metrics(), metrics.Metrics()
    a.moved("read", 100)
    assert b"imaged_bytes_total{op=\"read\"} 100.0" in a.render()
    assert b"imaged_bytes_total{op=\"read\"} 0.0" in b.render()


def test_one_log_line_per_operation(daemon, image, tmp_path):
    sid = daemon.add_session(image, transfer_id="t-log-1")
    s = daemon.https()
    s.put(daemon.tls_url + sid, data=os.urandom(4 * MiB))
    s.get(daemon.tls_url + sid, headers={"Range": "bytes=1048576-2097151"})
    s.close()
    # A client that goes away mid-download: of a larger image, which the
    # socket buffers cannot take whole (4 MiB could all be sent before the
    # client was gone, and logged as ok).
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(64 * MiB)
    big_sid = daemon.add_session(big, transfer_id="t-log-1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", daemon.tcp_port))
    sock.sendall(f"GET /images/{big_sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    sock.recv(1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()

    def lines():
        return [line for line in daemon.log().splitlines()
                if re.search(r"\] (READ|WRITE) t-log-1 ", line)]

    assert wait_for(lambda: len(lines()) == 3)
    write, read, gone = lines()
    assert re.search(r"WRITE t-log-1 range=0-4194303 bytes=4194304 seconds=[\d.]+ "
                     r"MB/s=[\d.]+ result=ok$", write), write
    assert re.search(r"READ t-log-1 range=1048576-2097151 bytes=1048576 .* result=ok$",
                     read), read
    assert re.search(r"READ t-log-1 range=0-67108863 .* result=client gone$", gone), gone
    assert sid not in daemon.log() and big_sid not in daemon.log()


def test_log_line_shows_short_id_without_transfer_id(daemon, image):
    sid = daemon.add_session(image)
    s = daemon.https()
    s.get(daemon.tls_url + sid)
    s.close()
    line = [l for l in daemon.log().splitlines() if "] READ " in l][-1]
    assert f"READ {sid[:8]}... range=0-4194303 bytes=4194304" in line
    assert sid not in daemon.log()


def test_canceled_operation_log_line(daemon, image):
    sid = daemon.add_session(image, transfer_id="t-cancel")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(daemon.local_path)
    sock.sendall(f"PUT /images/{sid} HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Length: {4 * MiB}\r\n\r\n".encode() + b"x" * 1000)
    assert wait_for(lambda: daemon.control().get(
        daemon.control_url + sid).json()["active"])
    threading.Thread(target=lambda: (time.sleep(0.2), sock.close())).start()
    assert daemon.control().delete(daemon.control_url + sid).status_code == 204
    assert wait_for(lambda: re.search(r"WRITE t-cancel range=0-4194303 bytes=0 .* "
                                      r"result=canceled", daemon.log()))


def test_refused_extents_log_their_result(daemon, image):
    # A file session lists no dirty extents: 404, and the operation ends
    # as an error in the log and the metrics, not as "ok".
    sid = daemon.add_session(image, transfer_id="t-ext")
    s = daemon.https()
    assert s.get(daemon.tls_url + sid + "/extents?context=dirty").status_code == 404
    assert s.get(daemon.tls_url + sid + "/extents").status_code == 200
    s.close()
    # Each line is logged once its answer is sent: wait for both.
    assert wait_for(lambda: re.search(r"EXTENTS t-ext .* result=error", daemon.log()))
    assert wait_for(lambda: re.search(r"EXTENTS t-ext .* result=ok", daemon.log()))
    assert value(scrape(daemon), "imaged_operations_total", op="extents",
                 result="error") == 1
