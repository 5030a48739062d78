"""The router's HTTP edge under client and upstream faults (issue 13): bodies, limits, timeouts.

Each test names the defect it guards; on b0b22a2 each of them failed (hung past its timeout,
answered 500, echoed the input, or let the client hold its slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import uvloop
from llmstack_router.app import serve
from llmstack_router.config import parse_config
from router_fake_upstream import FakeUpstream
from router_helpers import AUTH, RunningRouter, free_port, router_config, start_fake, start_router

pytestmark = pytest.mark.asyncio
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# The CLI serves on uvloop (cli.py), these tests' in-process routers on asyncio's loop by default: the write and
# header deadlines hang on the transport's pause_writing/resume_writing calls and on data_received, which each
# loop implements in its own transports, so the tests of those deadlines run on both.
BOTH_LOOPS = pytest.mark.parametrize("event_loop_policy", [
    pytest.param(asyncio.DefaultEventLoopPolicy(), id="asyncio"),
    pytest.param(uvloop.EventLoopPolicy(), id="uvloop"),
])
LIMITS = {"body_read_timeout_s": 0.5, "client_write_timeout_s": 0.5, "upstream_total_timeout_s": 1.5}


def _config(port: int, **model: Any) -> dict:
    return router_config({"b": {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
                                "models": [{"id": "m", **model}]}}, limits=dict(LIMITS), max_body_bytes=8 << 20)


@pytest_asyncio.fixture
async def edge(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RunningRouter, FakeUpstream]]:
    fake = FakeUpstream("m")
    runner, port = await start_fake(fake)
    router = await start_router(_config(port, **getattr(request, "param", {})))
    yield router, fake
    await router.close()
    await runner.cleanup()


async def raw_exchange(url: str, head: bytes, body: bytes, timeout_s: float = 5.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        async with asyncio.timeout(timeout_s):
            return await reader.read(65536)
    finally:
        writer.close()


def _error(body: dict) -> dict:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


async def test_a_body_shorter_than_its_content_length_is_408_after_the_read_timeout(edge) -> None:
    router, _fake = edge
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH["Authorization"].encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    began = time.monotonic()
    answer = await raw_exchange(router.url, head, b'{"model": "m"')  # main: held until the client gives up
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - began < 3
    assert b'"code": "request_timeout"' in answer


@pytest.mark.parametrize(("body", "headers", "needle"), [
    (b'{"model": "m\xff", "messages": []}', {}, "UTF-8"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {}, "NaN"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', {}, "NaN"),
    (b"not gzip at all", {"Content-Encoding": "gzip"}, "Content-Encoding"),
    (gzip.compress(json.dumps(CHAT).encode()), {"Content-Encoding": "compress"}, "Content-Encoding"),
], ids=["invalid-utf8", "nan", "infinity", "bad-gzip", "unknown-encoding"])
async def test_bad_bodies_are_400_in_openai_shape(edge, body: bytes, headers: dict, needle: str) -> None:
    router, fake = edge
    async with aiohttp.ClientSession(headers={**AUTH, "Content-Type": "application/json", **headers},
                                     auto_decompress=False) as client, \
            client.post(router.url + "/v1/chat/completions", data=body) as resp:
        status, answer = resp.status, await resp.json()
    assert status == 400, answer
    assert needle in _error(answer)["message"]
    assert _error(answer)["type"] == "invalid_request_error"
    assert fake.requests == 0


async def test_a_gzip_body_still_works(edge) -> None:
    router, _fake = edge
    headers = {**AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as client, \
            client.post(router.url + "/v1/chat/completions", data=gzip.compress(json.dumps(CHAT).encode())) as resp:
        assert resp.status == 200, await resp.text()


async def test_an_engine_error_in_html_is_wrapped_in_openai_shape(edge) -> None:
    router, _fake = edge
    async with aiohttp.ClientSession(headers=AUTH) as client, \
            client.post(router.url + "/v1/chat/completions", json={**CHAT, "fake_fault": "html_error"}) as resp:
        status, answer = resp.status, await resp.json()  # main: text/html passed through, .json() fails
    assert status == 502
    error = _error(answer)
    assert error["code"] == "upstream_error"
    assert "502 Bad Gateway" in error["message"]


async def test_the_404_for_an_unknown_model_does_not_echo_megabytes(edge) -> None:
    router, _fake = edge
    async with aiohttp.ClientSession(headers=AUTH) as client, \
            client.post(router.url + "/v1/chat/completions", json={**CHAT, "model": "x" * 4_000_000}) as resp:
        raw = await resp.read()
    assert resp.status == 404
    assert len(raw) < 2000, len(raw)  # main: 4 MB back
    assert "(4000000 characters)" in _error(json.loads(raw))["message"]


@pytest.mark.parametrize("edge", [{"max_in_flight": 1}], indirect=True)
async def test_max_in_flight_answers_429_with_retry_after_and_counts_it(edge) -> None:
    router, _fake = edge
    async with aiohttp.ClientSession(headers=AUTH) as client:
        held = await client.post(router.url + "/v1/chat/completions",
                                 json={**CHAT, "stream": True, "fake_fault": "hang"})
        try:
            async with client.post(router.url + "/v1/chat/completions", json=CHAT) as resp:
                status, answer, retry = resp.status, await resp.json(), resp.headers.get("Retry-After")
        finally:
            held.close()
        assert status == 429, answer
        assert retry == "1"
        assert _error(answer)["code"] == "too_many_requests"
        await asyncio.sleep(0.2)
        assert router.router.in_flight["m"] == 0  # the held one left: its slot is back
        async with client.post(router.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        async with client.get(router.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'llmrouter_rejected_total{code="429"} 1' in metrics


async def test_rejections_are_counted(edge) -> None:
    router, _fake = edge
    async with aiohttp.ClientSession() as client:
        async with client.post(router.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 401
        async with client.post(router.url + "/v1/chat/completions", data=b"{", headers=AUTH) as resp:
            assert resp.status == 400
        async with client.post(router.url + "/v1/chat/completions", json={**CHAT, "model": "nope"},
                               headers=AUTH) as resp:
            assert resp.status == 404
        async with client.post(router.url + "/v1/chat/completions", data=b"x" * (9 << 20), headers=AUTH) as resp:
            assert resp.status == 413
        async with client.get(router.url + "/metrics", headers=AUTH) as resp:
            metrics = await resp.text()
    for code in ("400", "401", "404", "413"):
        assert f'llmrouter_rejected_total{{code="{code}"}} 1' in metrics, metrics


@pytest.mark.parametrize("fault", ["hang", "trickle"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
async def test_an_upstream_that_sends_headers_then_hangs_or_trickles_is_cut_at_the_total_deadline(
        edge, fault: str, stream: bool) -> None:
    router, fake = edge
    began = time.monotonic()
    async with aiohttp.ClientSession(headers=AUTH) as client:
        async with asyncio.timeout(10):  # main: request_timeout_s (600 s) per chunk, a trickle never ends
            async with client.post(router.url + "/v1/chat/completions",
                                   json={**CHAT, "stream": stream, "fake_fault": fault}) as resp:
                text = await resp.text()
                rid = resp.headers.get("X-Request-Id")
    assert 1.4 < time.monotonic() - began < 5
    assert rid, "a streamed answer carries its request id too"
    if stream:
        assert resp.status == 200
        assert "upstream_total_timeout_s" in text, text[-300:]
    else:
        assert resp.status == 504
        assert "upstream_total_timeout_s" in _error(json.loads(text))["message"]
    await asyncio.sleep(0.2)
    assert fake.disconnects == 1  # the engine saw the cut and stops generating
    assert router.router.in_flight["m"] == 0


def _reader_that_stops(url: str, payload: dict) -> socket.socket:
    """A client that sends ``payload`` and never reads (a tiny receive buffer: the router's writes stall)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps(payload).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH["Authorization"].encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession(headers=AUTH) as client, client.get(url + "/metrics") as resp:
        return await resp.text()


@BOTH_LOOPS
async def test_a_slow_reader_is_dropped_after_the_write_timeout_and_frees_its_slot(edge) -> None:
    router, fake = edge
    sock = _reader_that_stops(router.url, {**CHAT, "stream": True, "fake_fault": "flood"})
    try:
        lane = router.router.lane_of["m"]
        async with asyncio.timeout(5):
            while not fake.requests:
                await asyncio.sleep(0.02)
        assert router.router.in_flight["m"] == 1
        deadline = time.monotonic() + 8  # main: held for as long as the client keeps the socket
        while time.monotonic() < deadline and (router.router.in_flight["m"] or lane.snapshot().in_flight):
            await asyncio.sleep(0.1)
        assert router.router.in_flight["m"] == 0
        assert lane.snapshot().in_flight == 0
        await asyncio.sleep(0.2)
        assert fake.disconnects == 1
        assert 'llmrouter_client_timeouts_total{kind="write"} 1' in await _metrics(router.url)
    finally:
        sock.close()


@BOTH_LOOPS
@pytest.mark.parametrize("edge", [{"max_in_flight": 1}], indirect=True)
async def test_a_slow_reader_of_an_unstreamed_answer_is_dropped_and_the_model_serves_others(edge) -> None:
    """16 MiB unstreamed to a client that never reads: aiohttp writes it after the handler returned and
    waited in drain() for ever (main: the connection and the 16 MiB held for as long as the client
    keeps its socket). Now cut at client_write_timeout_s (0.5 s here), counted, logged."""
    router, fake = edge
    server = router.runner.server
    sock = _reader_that_stops(router.url, {**CHAT, "fake_fault": "big"})
    try:
        async with asyncio.timeout(5):
            while not fake.requests:
                await asyncio.sleep(0.02)
        began = time.monotonic()
        while time.monotonic() - began < 8 and (server.connections or router.router.in_flight["m"]):
            await asyncio.sleep(0.05)
        assert not server.connections, "the stalled client still holds its connection"
        assert time.monotonic() - began < 0.5 + 2.5
        assert router.router.in_flight["m"] == 0
        assert router.router.lane_of["m"].snapshot().in_flight == 0
        async with aiohttp.ClientSession(headers=AUTH) as client, \
                client.post(router.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200, await resp.text()  # max_in_flight 1: the slot is free
        assert 'llmrouter_client_timeouts_total{kind="write"} 1' in await _metrics(router.url)
    finally:
        sock.close()


@BOTH_LOOPS
async def test_a_connection_without_complete_headers_is_closed_and_leaves_the_connection_limit() -> None:
    """Slowloris: connections that send nothing, or headers a byte at a time, held every connection slot
    for ever (main: aiohttp has no header-read deadline; its keepalive timer, 3630 s, is the only end)."""
    fake = FakeUpstream("m")
    fake_runner, port = await start_fake(fake)
    config = _config(port)
    config["limits"].update(max_connections=16, header_read_timeout_s=0.5)
    router = await start_router(config)
    host, lport = router.url.removeprefix("http://").split(":")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"

    async def trickle(writer: asyncio.StreamWriter) -> None:
        for byte in head:  # 0.1 s a byte: the headers would take 7 s
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    held = [await asyncio.open_connection(host, int(lport)) for _index in range(16)]
    tricklers = [asyncio.create_task(trickle(writer)) for _reader, writer in held[::2]]
    try:
        began = time.monotonic()
        async with aiohttp.ClientSession(headers=AUTH) as client:
            async with client.post(router.url + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 503  # all 16 slots held
            for reader, _writer in held:  # each closed by the router, silent and trickling alike
                async with asyncio.timeout(5):
                    with contextlib.suppress(ConnectionResetError):
                        assert await reader.read() == b""
            assert time.monotonic() - began < 0.5 + 2.5
            await asyncio.sleep(0.1)
            async with client.post(router.url + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200, await resp.text()
        assert 'llmrouter_client_timeouts_total{kind="header_read"} 16' in await _metrics(router.url)
    finally:
        for task in tricklers:
            task.cancel()
        for _reader, writer in held:
            writer.close()
        await router.close()
        await fake_runner.cleanup()


async def test_streamed_answers_carry_the_request_id(edge) -> None:
    router, _fake = edge
    async with aiohttp.ClientSession(headers={**AUTH, "X-Request-Id": "abc-123"}) as client, \
            client.post(router.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        await resp.read()
        assert resp.headers.get("X-Request-Id") == "abc-123"  # main: only on unstreamed answers


async def test_2000_connections_are_bounded_then_answered_503_and_others_still_served() -> None:
    fake = FakeUpstream("m")
    fake_runner, port = await start_fake(fake)
    config = _config(port)
    # Held without a request for as long as opening 2000 takes on a loaded machine: the header deadline
    # (its own test below) must not close them meanwhile.
    config["limits"].update(max_connections=1000, header_read_timeout_s=120)
    router = await start_router(config)
    parsed = parse_config({**config, "listen": {"host": "127.0.0.1", "port": free_port()}})
    listener = await serve(parsed, router.runner)
    limited = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    host, lport = "127.0.0.1", listener.sockets[0].getsockname()[1]
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _index in range(2000):
            held.append(await asyncio.open_connection(host, lport))
        await asyncio.sleep(0.3)
        busy = 0
        for reader, _writer in held[1000:]:
            answer = await asyncio.wait_for(reader.read(4096), 5)
            busy += answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        assert busy == 1000
        assert len(router.runner.server.connections) == 1000
        for _reader, writer in held[1000:]:
            writer.close()
        # Drop a few held ones: new clients get through again.
        for _reader, writer in held[:10]:
            writer.close()
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession(headers=AUTH) as client, \
                client.post(limited + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    finally:
        for _reader, writer in held:
            writer.close()
        listener.close()
        await router.close()
        await fake_runner.cleanup()


async def test_the_connection_limit_answers_503_on_uvloop_too() -> None:
    """The CLI runs on uvloop (cli.py), whose transports are not asyncio.WriteTransport subclasses:
    on main the 503 protocol asserted that and every connection over the limit got a reset instead."""
    uvloop = pytest.importorskip("uvloop")
    from llmstack_router.app import _Busy
    from llmstack_router.metrics import Metrics

    metrics = Metrics()

    async def over_the_limit() -> bytes:
        server = await asyncio.get_running_loop().create_server(lambda: _Busy(metrics), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            async with asyncio.timeout(5):
                return await reader.read()
        finally:
            writer.close()
            server.close()

    answer = await asyncio.to_thread(uvloop.run, over_the_limit())
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"too_many_connections" in answer
    assert metrics.rejected.values == {("503",): 1.0}
