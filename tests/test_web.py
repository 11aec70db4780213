"""
imaged.web pieces that need no server: the blocking body reader that runs
in pool threads, on real socket pairs.
"""

import os
import socket
import threading

import pytest

from imaged import web


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    # Like a gevent socket: the file descriptor is non-blocking.
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_recv_blocking_fills_the_view_from_many_sends(pair):
    reader, writer = pair
    data = os.urandom(3 * 1024**2 + 5)

    def send():
        for start in range(0, len(data), 64 * 1024):
            writer.sendall(data[start:start + 64 * 1024])

    t = threading.Thread(target=send)
    t.start()
    view = memoryview(bytearray(len(data)))
    assert web._recv_blocking(reader.fileno(), view, 10) == len(data)
    t.join()
    assert view.tobytes() == data


def test_recv_blocking_stops_at_the_end_of_the_stream(pair):
    reader, writer = pair
    writer.sendall(b"abc")
    writer.shutdown(socket.SHUT_WR)
    view = memoryview(bytearray(10))
    assert web._recv_blocking(reader.fileno(), view, 10) == 3
    assert view[:3] == b"abc"


def test_recv_blocking_times_out_without_data(pair):
    reader, writer = pair
    writer.sendall(b"x")
    view = memoryview(bytearray(10))
    with pytest.raises(socket.timeout):
        web._recv_blocking(reader.fileno(), view, 0.2)


def test_recv_blocking_wakes_when_the_connection_is_torn_down(pair):
    # Aborting a transfer shuts the server's socket down: the pool thread
    # must return at once, not wait for its timeout.
    reader, writer = pair
    result = []
    t = threading.Thread(target=lambda: result.append(
        web._recv_blocking(reader.fileno(), memoryview(bytearray(10)), 60)))
    t.start()
    writer.sendall(b"12")
    reader.shutdown(socket.SHUT_RDWR)
    t.join(10)
    assert not t.is_alive()
    assert result and result[0] <= 2
