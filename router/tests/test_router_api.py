"""HTTP behaviour against in-process emulated upstreams (external backends: nothing to start)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_fake_upstream import FakeUpstream
from router_helpers import ADMIN, API_KEY, AUTH, RunningRouter, router_config, start_fake, start_router

pytestmark = pytest.mark.asyncio
UPSTREAM_KEY = "upstream-key-abcdefghijkl"


@pytest_asyncio.fixture
async def stack() -> AsyncIterator[tuple[RunningRouter, FakeUpstream, FakeUpstream]]:
    first = FakeUpstream("smol-served", chunks=5, chunk_delay_s=0.0)
    second = FakeUpstream("other", chunks=3)
    runner_a, port_a = await start_fake(first)
    runner_b, port_b = await start_fake(second)
    config = router_config({
        "smol": {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port_a}",
                 "api_keys": [UPSTREAM_KEY],
                 "models": [{"id": "smollm2", "served_name": "smol-served", "aliases": ["smol"]}]},
        "other": {"engine": "openai", "group": "gpu1", "url": f"http://127.0.0.1:{port_b}", "co_reside": True,
                  "models": [{"id": "other"}]},
    }, max_body_bytes=4096)
    config["groups"]["gpu1"] = {"min_residency_s": 0}
    router = await start_router(config)
    yield router, first, second
    await router.close()
    await runner_a.cleanup()
    await runner_b.cleanup()


async def test_models_lists_every_configured_model_with_loaded_flag(stack) -> None:
    router, _first, _second = stack
    async with aiohttp.ClientSession(headers=AUTH) as client:
        async with client.get(router.url + "/v1/models") as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["object"] == "list"
        by_id = {m["id"]: m for m in body["data"]}
        assert set(by_id) == {"smollm2", "other"}
        assert by_id["smollm2"]["aliases"] == ["smol"]
        assert by_id["smollm2"]["object"] == "model"
        # Both backends are external and already serving: the router adopted them at start.
        assert by_id["smollm2"]["loaded"] is True
        assert by_id["other"]["loaded"] is True


async def test_unknown_model_is_404_in_openai_shape_naming_valid_ids(stack) -> None:
    router, _first, _second = stack
    request = {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession(headers=AUTH) as client, \
            client.post(router.url + "/v1/chat/completions", json=request) as resp:
        body = await resp.json()
    assert resp.status == 404
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"
    for valid in ("smollm2", "smol", "other"):
        assert valid in body["error"]["message"]


async def test_alias_is_rewritten_and_upstream_gets_its_own_key_and_request_id(stack) -> None:
    router, first, _second = stack
    async with aiohttp.ClientSession(headers={**AUTH, "X-Request-Id": "abc123"}) as client, client.post(
            router.url + "/v1/completions", json={"model": "smol", "prompt": "hi"}) as resp:
        body = await resp.json()
        assert resp.headers["X-Request-Id"] == "abc123"
    assert resp.status == 200
    assert body["model"] == "smol-served"
    assert first.auth_headers[-1] == f"Bearer {UPSTREAM_KEY}"  # never the client's router key
    assert first.request_ids[-1] == "abc123"


async def test_embeddings_route_to_the_co_resident_backend(stack) -> None:
    router, first, second = stack
    async with aiohttp.ClientSession(headers=AUTH) as client, client.post(
            router.url + "/v1/embeddings", json={"model": "other", "input": "x"}) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["data"][0]["embedding"] == [0.1, 0.2]
    assert second.requests == 1
    assert first.requests == 0


async def test_stream_is_passed_through_chunk_by_chunk(stack) -> None:
    router, first, _second = stack
    first.chunk_delay_s = 0.15
    arrivals: list[float] = []
    began = time.monotonic()
    async with aiohttp.ClientSession(headers=AUTH) as client, client.post(router.url + "/v1/chat/completions", json={
            "model": "smollm2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic() - began)
    assert len(arrivals) == 6  # 5 chunks + [DONE]
    # A buffering proxy would deliver everything at ~0.75 s; pass-through spreads it out.
    assert arrivals[0] < 0.5
    assert arrivals[-1] - arrivals[0] > 0.5


async def test_client_disconnect_mid_stream_cancels_upstream(stack) -> None:
    router, first, _second = stack
    first.chunk_delay_s = 0.2
    first.chunks = 50
    async with aiohttp.ClientSession(headers=AUTH) as client, client.post(router.url + "/v1/chat/completions", json={
            "model": "smollm2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as resp:
        await resp.content.readline()
        # leaving the block closes the connection mid-stream
    for _poll in range(50):
        if first.disconnects:
            break
        await asyncio.sleep(0.05)
    assert first.disconnects == 1
    assert first.completed_streams == 0
    status = router.router.lane_of["smollm2"].core
    assert status.in_flight == 0


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/v1/models", {}, 401),
    ("/v1/models", {"Authorization": "Bearer wrong-key-0123456789"}, 401),
    ("/v1/models", {"Authorization": f"Basic {API_KEY}"}, 401),
    ("/v1/models", ADMIN, 401),
    ("/admin/status", AUTH, 401),
    ("/admin/status", ADMIN, 200),
    ("/status", {}, 401),
    ("/status", AUTH, 200),
    ("/metrics", ADMIN, 200),
    ("/health", {}, 200),
])
async def test_keys_guard_their_routes(stack, path: str, headers: dict, status: int) -> None:
    router, _first, _second = stack
    async with aiohttp.ClientSession(headers=headers) as client, client.get(router.url + path) as resp:
        assert resp.status == status
        if status == 401:
            assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_body_over_limit_is_413(stack) -> None:
    router, _first, _second = stack
    async with aiohttp.ClientSession(headers=AUTH) as client:
        big = {"model": "smol", "messages": [{"role": "user", "content": "x" * 10000}]}
        async with client.post(router.url + "/v1/chat/completions", json=big) as resp:
            body = await resp.json()
    assert resp.status == 413
    assert "error" in body


async def test_status_and_metrics_report_requests_and_groups(stack) -> None:
    router, _first, _second = stack
    async with aiohttp.ClientSession(headers=AUTH) as client:
        for _request in range(2):
            async with client.post(router.url + "/v1/completions", json={"model": "smol", "prompt": "x"}) as resp:
                assert resp.status == 200
        async with client.post(router.url + "/v1/completions", json={"model": "nope", "prompt": "x"}) as resp:
            assert resp.status == 404
        async with client.get(router.url + "/status") as resp:
            status = await resp.json()
        async with client.get(router.url + "/metrics") as resp:
            metrics = await resp.text()
    lanes = {g["lane"]: g for g in status["groups"]}
    assert lanes["gpu0"]["loaded_model"] == "smollm2"
    assert lanes["gpu0"]["queue_depth"] == 0
    assert lanes["gpu0"]["swaps"] == 0  # adopted at start, never swapped
    assert 'llmrouter_requests_total{model="smollm2",code="200"} 2' in metrics
    assert 'llmrouter_queue_depth{lane="gpu0"} 0' in metrics
    assert 'llmrouter_upstream_latency_seconds_count{model="smollm2"} 2' in metrics


async def test_admin_load_and_unload(stack) -> None:
    router, _first, _second = stack
    async with aiohttp.ClientSession(headers=ADMIN) as client:
        async with client.post(router.url + "/admin/load", json={"model": "smol"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["loaded"] == "smollm2"
        async with client.post(router.url + "/admin/unload", json={"group": "gpu0"}) as resp:
            assert resp.status == 202
        for _poll in range(50):
            if router.router.lane_of["smollm2"].core.active is None:
                break
            await asyncio.sleep(0.02)
        assert router.router.lane_of["smollm2"].core.phase == "idle"
        async with client.post(router.url + "/admin/load", json={"model": "../../etc/passwd"}) as resp:
            assert resp.status == 404


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_BODIES = st.one_of(
    st.binary(max_size=300),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"model": st.one_of(st.sampled_from(["smol", "smollm2", "other", ""]), _JSON)},
                          optional={"messages": _JSON, "prompt": _JSON, "input": _JSON, "stream": _JSON,
                                    "max_tokens": _JSON}).map(lambda v: json.dumps(v).encode()),
    st.just(b"[" * 5000 + b"]" * 5000),
)


async def test_fuzzed_bad_requests_never_get_a_5xx(stack) -> None:
    router, _first, _second = stack
    seen: dict[int, int] = {}
    async with aiohttp.ClientSession() as client:

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                                     "/admin/load", "/admin/unload", "/v1/nope", "/v1/chat/completions/x"]),
               method=st.sampled_from(["POST", "POST", "GET", "PUT"]),
               body=_BODIES,
               auth=st.sampled_from([AUTH, ADMIN, {}, {"Authorization": "Bearer \u00e9"}]),
               content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data"]))
        def one(path: str, method: str, body: bytes, auth: dict, content_type: str) -> None:
            async def go() -> None:
                async with client.request(method, router.url + path, data=body,
                                          headers={**auth, "Content-Type": content_type}) as resp:
                    await resp.read()
                    seen[resp.status] = seen.get(resp.status, 0) + 1
                    assert resp.status < 500, (path, method, body[:200], resp.status, await resp.text())
            asyncio.run_coroutine_threadsafe(go(), loop).result(timeout=30)

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(one)
    assert sum(seen.values()) >= 250
    assert any(400 <= code < 500 for code in seen)
