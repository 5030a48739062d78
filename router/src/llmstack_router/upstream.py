"""A small keep-alive HTTP/1.1 client for the one hot path: forwarding a request to a backend.

Why not aiohttp's client here: bench/bench.py measured it at ~200 us of CPU per request on the
CI machine kind, this one at ~45 us, and the router's added latency is mostly CPU. Backends are
configured loopback/LAN engines (uvicorn, cpp-httplib, Go net/http) that answer with
Content-Length, chunked, or close-delimited bodies; that is all this parses. Readiness probes
and TabbyAPI's admin calls stay on aiohttp (rare, and they want its conveniences).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

_MAX_HEAD = 64 * 1024
_READ_SIZE = 64 * 1024
# uvicorn closes idle keep-alive connections after 5 s; reusing one near that edge races its FIN.
_MAX_IDLE_S = 2.0


class UpstreamError(ConnectionError):
    """The backend closed the connection or sent something that is not HTTP/1.x."""


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and now - self.idle_since < _MAX_IDLE_S)

    def close(self) -> None:
        self.writer.close()


class Upstream:
    """One backend base URL with its pool of idle connections."""

    def __init__(self, base_url: str, max_idle: int = 64) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc
        self.max_idle = max_idle
        self.idle: deque[_Conn] = deque()

    async def _connect(self, connect_timeout_s: float) -> _Conn:
        context = ssl.create_default_context() if self.tls else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=context, limit=_MAX_HEAD), connect_timeout_s)
        return _Conn(reader, writer)

    def _checkout(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    def checkin(self, conn: _Conn) -> None:
        if len(self.idle) >= self.max_idle or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()

    async def post(self, path: str, body: bytes, headers: dict[str, str], read_timeout_s: float,
                   connect_timeout_s: float = 10.0) -> Response:
        head = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        conn = self._checkout()
        if conn is not None:
            try:
                return await self._exchange(conn, request, read_timeout_s)
            except _StaleConnection:
                pass  # closed by the backend while idle, before it read our request: use a new one
        conn = await self._connect(connect_timeout_s)
        try:
            return await self._exchange(conn, request, read_timeout_s)
        except _StaleConnection as exc:
            raise UpstreamError(f"backend closed the connection without answering ({exc.__cause__!r})") from exc

    async def _exchange(self, conn: _Conn, request: bytes, read_timeout_s: float) -> Response:
        try:
            conn.writer.write(request)
            async with asyncio.timeout(read_timeout_s):
                raw = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if not exc.partial:
                raise _StaleConnection from exc
            raise UpstreamError("backend closed the connection mid-headers") from exc
        except ConnectionError as exc:
            conn.close()
            raise _StaleConnection from exc  # reset before any answer: a pooled one gets one retry
        except asyncio.LimitOverrunError as exc:
            conn.close()
            raise UpstreamError(f"backend sent over {_MAX_HEAD} bytes of headers") from exc
        except BaseException:
            conn.close()
            raise
        return Response(self, conn, raw, read_timeout_s)


class _StaleConnection(Exception):
    pass


class Response:
    def __init__(self, upstream: Upstream, conn: _Conn, raw_head: bytes, read_timeout_s: float) -> None:
        self._upstream, self._timeout = upstream, read_timeout_s
        self._conn: _Conn | None = conn
        lines = raw_head.decode("latin-1").split("\r\n")
        version, _space, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            conn.close()
            raise UpstreamError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        self.status = int(rest[:3])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self._remaining = int(length) if length is not None and not self._chunked else None
        if self.status in (204, 304) or 100 <= self.status < 200:
            self._remaining = 0
        self._keep_alive = version == "HTTP/1.1" and self.headers.get("connection", "").lower() != "close"
        self._done = False

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/json")

    async def _read_chunk(self) -> bytes:
        if self._conn is None:
            raise ConnectionError("response already closed")
        reader = self._conn.reader
        if self._chunked:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                self._done = True
                return b""
            data = await reader.readexactly(size + 2)
            return data[:-2]
        if self._remaining is not None:
            if self._remaining == 0:
                self._done = True
                return b""
            data = await reader.read(min(self._remaining, _READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", self._remaining)
            self._remaining -= len(data)
            self._done = self._remaining == 0  # no second pass (and timer) just to learn the body ended
            return data
        data = await reader.read(_READ_SIZE)  # close-delimited
        if not data:
            self._done = True
            self._keep_alive = False
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Yield body pieces as they arrive; the connection goes back to the pool at the end."""
        try:
            while not self._done:
                async with asyncio.timeout(self._timeout):
                    data = await self._read_chunk()
                if data:
                    yield data
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise UpstreamError(f"backend connection broke mid-body: {exc!r}") from exc
        except BaseException:
            self.close()  # cancelled (client left) or timed out: the backend must see the disconnect
            raise
        self.release()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.iter_chunks()])

    def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._done and self._keep_alive:
            self._upstream.checkin(conn)
        else:
            conn.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
