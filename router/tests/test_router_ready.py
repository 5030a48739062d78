"""How soon a swap notices that a starting engine can answer, and what the waiting costs the engine.

The schedule (design.md, "Swaps" step 6): port probes while nothing listens, then the engine's
real readiness probe at 0, 1, 2, 4, ... ms up to ready_poll_interval_s.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import pytest
from aiohttp import web
from llmstack_router.swap import poll_delays, watch_delay
from router_fake_upstream import FakeUpstream
from router_helpers import AUTH, free_port, router_config, start_router

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("first", "cap", "expected"), [
    (0.001, 0.025, [0.001, 0.002, 0.004, 0.008, 0.016, 0.025, 0.025, 0.025]),
    (0.025, 0.025, [0.025] * 8),                      # first == cap: the fixed period of before
    (0.001, 0.005, [0.001, 0.002, 0.004, 0.005, 0.005, 0.005, 0.005, 0.005]),
])
def test_poll_delays_double_from_first_up_to_the_cap(first: float, cap: float, expected: list[float]) -> None:
    assert list(itertools.islice(poll_delays(first, cap), 8)) == pytest.approx(expected)


@pytest.mark.parametrize(("waited", "expected"), [(0.0, 0.001), (0.5, 0.001), (3.0, 0.003), (10.0, 0.01),
                                                  (25.0, 0.025), (240.0, 0.025)])
def test_port_probe_waits_a_thousandth_of_the_wait_within_first_and_cap(waited: float, expected: float) -> None:
    assert watch_delay(waited, 0.001, 0.025) == pytest.approx(expected)


async def _swap_to_external(upstream: FakeUpstream, port: int, listen_after_s: float | None,
                            **backend: float) -> tuple[int, dict, float | None, object]:
    """One request to an external backend on ``port`` that starts listening ``listen_after_s``
    after the request (None: it listens already); returns status, body, when it listened, the swap."""
    router = await start_router(router_config(
        {"ext": {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
                 "models": [{"id": "m"}], **backend}},
        ready_poll_interval_s=0.5))   # the cap: a fixed 0.5 s period would notice 0.2 s late here
    runner = web.AppRunner(upstream.app(), access_log=None)
    await runner.setup()
    listened: list[float] = []

    async def listen_later() -> None:
        await asyncio.sleep(listen_after_s or 0.0)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        listened.append(time.time())

    try:
        if listen_after_s is None:
            await listen_later()
        later = asyncio.create_task(listen_later()) if listen_after_s is not None else None
        async with aiohttp.ClientSession(headers=AUTH) as client, client.post(
                router.url + "/v1/chat/completions", json={"model": "m", **CHAT}) as resp:
            status, body = resp.status, await resp.json()
        if later is not None:
            await later
        return status, body, listened[0] if listened else None, router.router.lane_of["m"].history[-1]
    finally:
        await router.close()
        await runner.cleanup()


async def test_readiness_is_noticed_within_milliseconds_of_the_engine_listening() -> None:
    status, body, listened_at, record = await _swap_to_external(FakeUpstream("m"), free_port(), 0.3)
    assert status == 200, body
    # Fixed 0.5 s probes (before issue 14) notice ~0.2 s late; 50 ms is generous for a loaded CI machine.
    assert 0.0 <= record.ready_at - listened_at < 0.05, record.as_dict()


async def test_an_engine_that_never_gets_ready_times_out_with_no_more_probes_than_the_fixed_period() -> None:
    upstream = FakeUpstream("m", never_ready=True)  # listens, answers 503 to every readiness probe
    began = time.monotonic()
    status, body, _listened, _record = await _swap_to_external(upstream, free_port(), None, ready_timeout_s=2.0)
    elapsed = time.monotonic() - began
    assert status == 503, body
    assert "not ready" in body["error"]["message"]
    assert "ready_timeout_s" in body["error"]["message"]
    assert 2.0 <= elapsed < 6.0
    # 2 s at a fixed 0.5 s: 5 probes; the backoff adds 1, 2, 4, ... 256 ms: at most 9 more.
    assert 5 <= upstream.probes <= 5 + 9, upstream.probes
