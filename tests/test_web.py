"""imaged.web: the streamed response body and its corking, on a real TCP connection."""

import socket

import pytest

from imaged import config
from imaged import transport
from imaged import web


@pytest.fixture
def tcp_link():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    with client, server:
        yield transport.Link(server)


def corked(link):
    return link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)


class Chunks:
    """The shape ops.read gives: an iterator of buffers with a close()."""

    def __init__(self, pieces):
        self._it = iter(pieces)
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        self.closed = True


def test_large_body_streams_corked_and_uncorks_at_its_end(tcp_link):
    size = config.SMALL_BODY_BYTES + 1
    pieces = [memoryview(b"a" * size), memoryview(b"b" * 100)]
    body = web.StreamResponse(Chunks(pieces), tcp_link, size + 100)
    # Bottle peeks at one byte; the rest of the piece follows uncopied.
    assert next(body) == b"a"
    assert corked(tcp_link)
    assert bytes(next(body)) == b"a" * (size - 1)
    assert bytes(next(body)) == b"b" * 100
    assert corked(tcp_link)
    with pytest.raises(StopIteration):
        next(body)
    assert not corked(tcp_link)


@pytest.mark.parametrize("length", [1, config.SMALL_BODY_BYTES])
def test_small_body_goes_whole_with_the_head_uncorked(tcp_link, length):
    chunks = Chunks([memoryview(b"x" * length)])
    body = web.StreamResponse(chunks, tcp_link, length)
    first = next(body)
    assert type(first) is bytes and first == b"x" * length
    assert not corked(tcp_link)
    with pytest.raises(StopIteration):
        next(body)
    body.close()
    assert chunks.closed


def test_body_of_unknown_length_is_corked(tcp_link):
    # A chunked body (the extents list) may go on for long.
    body = web.StreamResponse(Chunks([b"[]"]), tcp_link)
    assert next(body) == b"["
    assert corked(tcp_link)
    body.close()
    assert not corked(tcp_link)
