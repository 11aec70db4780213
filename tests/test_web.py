"""
imaged.web pieces that need no server: the blocking body readers that run
in pool threads, on real socket pairs (plain, and TLS with real handshakes).
"""

import os
import socket
import ssl
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


@pytest.fixture
def tls_pair(tls_files):
    """(server, client): TLS over a socket pair, the server non-blocking."""
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    a, b = socket.socketpair()
    client = client_ctx.wrap_socket(b, server_hostname="localhost",
                                    do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    server = server_ctx.wrap_socket(a, server_side=True)
    t.join(10)
    server.setblocking(False)
    yield server, client
    server.close()
    client.close()


def recv_tls(server, view, timeout_s):
    # The C object under the socket, as BodyReader passes it.
    return web._recv_blocking(server.fileno(), view, timeout_s, server._sslobj)


def test_recv_tls_fills_the_view_from_many_records(tls_pair):
    server, client = tls_pair
    data = os.urandom(3 * 1024**2 + 5)

    def send():
        for start in range(0, len(data), 64 * 1024):
            client.sendall(data[start:start + 64 * 1024])

    t = threading.Thread(target=send)
    t.start()
    view = memoryview(bytearray(len(data)))
    assert recv_tls(server, view, 10) == len(data)
    t.join()
    assert view.tobytes() == data


def test_recv_tls_stops_when_the_client_closes(tls_pair):
    server, client = tls_pair
    client.sendall(b"abc")
    # Sends close_notify, then waits for the server's, which never comes.
    client.settimeout(0.5)
    with pytest.raises(OSError):
        client.unwrap()
    view = memoryview(bytearray(10))
    assert recv_tls(server, view, 10) == 3
    assert view[:3] == b"abc"


def test_recv_tls_stops_when_the_connection_drops(tls_pair):
    # No close_notify: a client that died mid-upload.
    server, client = tls_pair
    client.sendall(b"abc")
    client.shutdown(socket.SHUT_RDWR)
    view = memoryview(bytearray(10))
    assert recv_tls(server, view, 10) == 3


def test_recv_tls_times_out_without_data(tls_pair):
    server, client = tls_pair
    client.sendall(b"x")
    with pytest.raises(socket.timeout):
        recv_tls(server, memoryview(bytearray(10)), 0.2)


def test_recv_tls_times_out_on_half_a_record(tls_pair):
    # A record cut short: OpenSSL keeps asking for the rest.
    server, client = tls_pair
    raw = socket.socket(fileno=os.dup(client.fileno()))
    raw.sendall(bytes([23, 3, 3, 0x40, 0x00]) + b"x" * 100)
    raw.close()
    with pytest.raises(socket.timeout):
        recv_tls(server, memoryview(bytearray(10)), 0.2)


def test_recv_tls_wakes_when_the_connection_is_torn_down(tls_pair):
    server, client = tls_pair
    result = []
    t = threading.Thread(target=lambda: result.append(
        recv_tls(server, memoryview(bytearray(10)), 60)))
    t.start()
    client.sendall(b"12")
    # What Connection.abort() does.
    socket.socket.shutdown(server, socket.SHUT_RDWR)
    t.join(10)
    assert not t.is_alive()
    assert result and result[0] <= 2
