"""The lane's read-only view: one definition of "loaded" behind /v1/models, the gauge and /status."""

from __future__ import annotations

from llmstack_router.app import Router
from llmstack_router.config import parse_config
from llmstack_router.group import lane_layout
from llmstack_router.scheduler import Phase, Waiter
from router_helpers import free_port, router_config


def _config() -> dict:
    port = free_port()  # nothing listens: adoption finds no model up
    backends = {
        "multi": {"engine": "ollama", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
                  "models": [{"id": "a"}, {"id": "b"}]},
        "side": {"engine": "ollama", "group": "gpu0", "url": f"http://127.0.0.1:{port}", "co_reside": True,
                 "models": [{"id": "c"}]},
    }
    return router_config(backends)


def test_lane_layout_gives_the_exclusive_slot_and_each_co_resident_backend_a_lane() -> None:
    layout = lane_layout(parse_config(_config()))
    assert [(name, [b.name for b in backends]) for name, _group, backends in layout] == [
        ("gpu0", ["multi"]), ("gpu0/side", ["side"])]


async def test_is_loaded_and_status_agree_in_every_phase() -> None:
    router = Router(parse_config(_config()))
    await router.start()
    try:
        lane = router.lane_of["a"]
        core, now = lane.core, 0.0  # the test plays the driver: events straight into the scheduler
        seen: list[Phase] = []

        def check() -> None:
            status = lane.status()
            seen.append(core.phase)
            for model in ("a", "b"):
                assert router.is_loaded(model) is (status["loaded_model"] == model), (core.phase, model)
            assert status["state"] == lane.snapshot().phase.value

        check()                                                  # idle
        first = Waiter("a", now)
        core.acquire(first, now)
        check()                                                  # loading a
        core.load_finished("a", None, "a", now, took_s=2.5)
        check()                                                  # ready a, one in flight
        assert router.is_loaded("a")
        assert not router.is_loaded("b")
        core.request_unload(now)
        check()                                                  # draining a
        assert router.is_loaded("a")
        core.cancel(first, now)
        check()                                                  # unloading a
        assert not router.is_loaded("a")
        core.unload_finished(None, now)
        check()                                                  # idle again
        assert seen == [Phase.IDLE, Phase.LOADING, Phase.READY, Phase.DRAINING, Phase.UNLOADING, Phase.IDLE]
        assert core.retry_after_s == 3  # the swap's duration, set by load_finished (the one writer)
    finally:
        await router.stop()
