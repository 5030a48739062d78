"""The forwarding client against a raw socket server that answers with canned HTTP/1.x bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from llmstack_router.upstream import Upstream, UpstreamError

pytestmark = pytest.mark.asyncio


class Canned:
    """Answers each request on a connection with the next canned response; counts connections."""

    def __init__(self, responses: list[bytes], close_after: int | None = None, hold_s: float = 0.0) -> None:
        self.responses = responses
        self.hold_s = hold_s
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while self.responses:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.responses.pop(0).split(b"|"):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        await asyncio.sleep(self.hold_s)  # a backend that stalls mid-body
        writer.close()


@pytest_asyncio.fixture
async def serve() -> AsyncIterator:
    servers = []

    async def start(canned: Canned) -> Upstream:
        server = await asyncio.start_server(canned.handle, "127.0.0.1", 0)
        servers.append(server)
        return Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/prefix")

    yield start
    for server in servers:
        server.close()


async def test_content_length_body_and_connection_reuse(serve) -> None:
    canned = Canned([b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"] * 3)
    upstream = await serve(canned)
    for _request in range(3):
        response = await upstream.post("/v1/x", b'{"a":1}', {"X-Test": "1"}, 5)
        assert response.status == 200
        assert await response.read() == b"{}"
    assert canned.connections == 1
    assert canned.requests[0].startswith(b"POST /prefix/v1/x HTTP/1.1\r\n")
    assert b"X-Test: 1\r\n" in canned.requests[0]
    assert canned.requests[0].endswith(b'\r\n\r\n{"a":1}')


async def test_chunked_stream_yields_each_chunk_as_it_arrives(serve) -> None:
    body = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n|"
            b"6\r\ndata: \r\n|3;ext=1\r\nabc\r\n|0\r\nX-Trailer: t\r\n\r\n")
    upstream = await serve(Canned([body, b"HTTP/1.1 204 No Content\r\n\r\n"]))
    response = await upstream.post("/s", b"{}", {}, 5)
    assert response.content_type == "text/event-stream"
    assert [piece async for piece in response.iter_chunks()] == [b"data: ", b"abc"]
    again = await upstream.post("/s", b"{}", {}, 5)  # same connection, after the trailers
    assert again.status == 204
    assert await again.read() == b""


async def test_close_delimited_body(serve) -> None:
    upstream = await serve(Canned([b"HTTP/1.0 200 OK\r\n\r\nhello |world"], close_after=1))
    response = await upstream.post("/c", b"{}", {}, 5)
    assert await response.read() == b"hello world"
    assert not upstream.idle  # HTTP/1.0: not kept


async def test_stale_pooled_connection_is_replaced_transparently(serve) -> None:
    canned = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
                     b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"], close_after=1)
    upstream = await serve(canned)
    assert await (await upstream.post("/", b"{}", {}, 5)).read() == b"a"
    await asyncio.sleep(0.05)  # the server closed its side while the connection sat in the pool
    assert await (await upstream.post("/", b"{}", {}, 5)).read() == b"b"
    assert canned.connections == 2


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    b"garbage\r\n\r\n",
])
async def test_broken_bodies_raise_upstream_error(serve, reply: bytes) -> None:
    upstream = await serve(Canned([reply], close_after=1))

    async def exchange() -> bytes:
        response = await upstream.post("/", b"{}", {}, 5)
        return await response.read()

    with pytest.raises(UpstreamError):
        await exchange()


async def test_connection_refused_is_an_os_error() -> None:
    upstream = Upstream("http://127.0.0.1:9")
    with pytest.raises(ConnectionRefusedError):
        await upstream.post("/", b"{}", {}, 5, connect_timeout_s=2)


async def test_read_timeout(serve) -> None:
    canned = Canned([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"], hold_s=3.0)
    upstream = await serve(canned)
    response = await upstream.post("/", b"{}", {}, 0.3)
    with pytest.raises(TimeoutError):
        await response.read()
