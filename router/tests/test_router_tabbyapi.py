"""TabbyAPI behind the router: load payloads, identity of same-basename models, the state file.

The fake (``router_fake_upstream.FakeTabbyApi``) follows the real server at both pinned commits;
each behaviour it fakes names the TabbyAPI source file it follows.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from llmstack_router.config import BackendSpec, ConfigError, parse_config
from llmstack_router.engine_base import EngineError
from llmstack_router.engine_tabbyapi import TabbyApiEngine, read_state_file, write_state_file
from router_fake_upstream import FakeTabbyApi
from router_helpers import ADMIN, AUTH, router_config, start_fake, start_router

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
TABBY_ADMIN = "tabby-admin-key-0123456789"
FOLDERS = ["exl3/A/4.0bpw", "exl3/B/4.0bpw", "exl3/C/5.0bpw"]
LOAD_A = {"model_name": "exl3/A/4.0bpw", "max_seq_len": 8192, "cache_mode": "8,8",
          "draft_model": {"draft_model_name": "exl3/Draft/4.0bpw"}}
LOAD_B = {"model_name": "exl3/B/4.0bpw", "max_seq_len": 4096}
LOAD_C = {"model_name": "exl3/C/5.0bpw"}


def tabby_backend(port: int, state_file: Path, **extra: Any) -> dict[str, Any]:
    return {"engine": "tabbyapi", "group": "gpu0", "url": f"http://127.0.0.1:{port}", "admin_keys": [TABBY_ADMIN],
            "state_file": str(state_file), "ready_timeout_s": 5.0,
            "models": [{"id": "a", "load": LOAD_A}, {"id": "b", "load": LOAD_B}, {"id": "c", "load": LOAD_C}],
            **extra}


async def chat(client: aiohttp.ClientSession, url: str, model: str) -> tuple[int, dict]:
    async with client.post(url + "/v1/chat/completions", json={"model": model, **CHAT}) as resp:
        return resp.status, await resp.json()


@pytest.fixture
def umask_0077() -> Any:
    # The router's unit runs with UMask=0077; the state file must still be 0644 for the tabbyapi user.
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.fixture
async def tabby(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeTabbyApi, int]]:
    options = getattr(request, "param", {})
    fake = FakeTabbyApi(FOLDERS, options.get("loaded", "exl3/A/4.0bpw"), TABBY_ADMIN,
                        generation=options.get("generation", "exl3"), fail_load=options.get("fail_load", ()))
    runner, port = await start_fake(fake)
    yield fake, port
    await runner.cleanup()


# ---- config ---------------------------------------------------------------------------------

def test_config_defaults_for_tabbyapi_load_served_name_and_state_file() -> None:
    backend = {"engine": "tabbyapi", "group": "gpu0", "url": "http://127.0.0.1:5000",
               "models": [{"id": "nested", "load": LOAD_A}, {"id": "plain"}, {"id": "named", "served_name": "Big"}]}
    config = parse_config(router_config({"tabby": backend}))
    spec = config.backends["tabby"]
    assert spec.state_file == f"{BackendSpec.STATE_DIR}/tabby.json" == "/var/lib/llmstack/router-active/tabby.json"
    nested, plain, named = spec.models
    assert (nested.served_name, nested.load) == ("4.0bpw", LOAD_A)  # the card names the basename
    assert (plain.served_name, plain.load) == ("plain", {"model_name": "plain"})
    assert (named.served_name, named.load) == ("Big", {"model_name": "Big"})
    llama = {"engine": "llamacpp", "group": "gpu0", "url": "http://127.0.0.1:8081", "models": [{"id": "smol"}]}
    other = parse_config(router_config({"llama": llama})).backends["llama"]
    assert other.state_file is None
    assert other.models[0].load is None


@pytest.mark.parametrize(("key", "value", "where", "fragment"), [
    ("tabby_config", "/opt/tabbyapi/config.yml", "backends.tabby.tabby_config", "state_file"),
    ("state_file", "active/tabby.json", "backends.tabby.state_file", "absolute path"),
])
def test_config_refuses_the_removed_key_and_a_relative_state_file(key: str, value: Any, where: str,
                                                                  fragment: str) -> None:
    backend = {"engine": "tabbyapi", "group": "gpu0", "url": "http://127.0.0.1:5000", "models": [{"id": "x"}],
               key: value}
    with pytest.raises(ConfigError) as error:
        parse_config(router_config({"tabby": backend}))
    assert error.value.key == where
    assert fragment in str(error.value)


@pytest.mark.parametrize(("load", "where", "fragment"), [
    ({"max_seq_len": 4096}, "backends.tabby.models[0].load.model_name", "is required"),
    ({"model_name": "/srv/models/x"}, "backends.tabby.models[0].load.model_name", "relative to model_dir"),
    ({"model_name": "a/../../etc"}, "backends.tabby.models[0].load.model_name", "without '..'"),
    ({"model_name": "x", "rope_alpha": float("nan")}, "backends.tabby.models[0].load", "JSON values only"),
    (["x"], "backends.tabby.models[0].load", "must be a mapping"),
])
def test_config_refuses_bad_load_bodies(load: Any, where: str, fragment: str) -> None:
    backend = {"engine": "tabbyapi", "group": "gpu0", "url": "http://127.0.0.1:5000",
               "models": [{"id": "x", "load": load}]}
    with pytest.raises(ConfigError) as error:
        parse_config(router_config({"tabby": backend}))
    assert error.value.key == where
    assert fragment in str(error.value)


# ---- the state file -------------------------------------------------------------------------

def test_state_file_is_atomic_0644_under_umask_0077_and_makes_its_directory_0755(tmp_path: Path,
                                                                                 umask_0077: Any) -> None:
    path = tmp_path / "router" / "active" / "tabby.json"
    write_state_file(str(path), {"id": "b", "model_name": "exl3/B/4.0bpw"})
    assert json.loads(path.read_text()) == {"id": "b", "model_name": "exl3/B/4.0bpw"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o755
    inode = path.stat().st_ino
    write_state_file(str(path), {"id": "a", "model_name": "exl3/A/4.0bpw"})
    assert path.stat().st_ino != inode, "rewritten in place, not replaced"
    assert read_state_file(str(path)) == {"id": "a", "model_name": "exl3/A/4.0bpw"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["tabby.json"], "temp file left behind"
    path.write_text('{"id": "a"')  # torn or foreign: not a record
    assert read_state_file(str(path)) is None
    assert read_state_file(str(tmp_path / "missing.json")) is None


# ---- through the router ---------------------------------------------------------------------

@pytest.mark.parametrize("tabby", [{"generation": "exl3"}, {"generation": "exl2"}], indirect=True,
                         ids=["exl3", "exl2"])
async def test_switch_between_same_basename_models_sends_each_load_and_records_it(
        tabby: tuple[FakeTabbyApi, int], tmp_path: Path, umask_0077: Any) -> None:
    fake, port = tabby
    state = tmp_path / "active" / "tabby.json"
    router = await start_router(router_config({"tabby": tabby_backend(port, state)}))
    lane = router.router.lane_of["a"]
    try:
        # The card says 4.0bpw, which a and b share, and no state file says which: not adopted.
        assert lane.snapshot().loaded is None
        async with aiohttp.ClientSession(headers=AUTH) as client:
            status, body = await chat(client, router.url, "b")
            assert status == 200, body
            assert fake.loaded == "exl3/B/4.0bpw"
            assert json.loads(state.read_text()) == {"id": "b", "model_name": "exl3/B/4.0bpw"}
            assert stat.S_IMODE(state.stat().st_mode) == 0o644
            status, body = await chat(client, router.url, "a")
            assert status == 200, body
        assert fake.loaded == "exl3/A/4.0bpw"
        assert fake.load_bodies[-1] == LOAD_A  # the model's own load body, verbatim
        assert json.loads(state.read_text()) == {"id": "a", "model_name": "exl3/A/4.0bpw"}
        # exl2 answers a load of a same-basename sibling with nothing (it compares basenames): the
        # router unloads and loads again; main switches at once.
        assert fake.unloads == (2 if fake.generation == "exl2" else 0)
        assert lane.snapshot().loaded == "a"
    finally:
        await router.close()


async def test_a_router_restart_adopts_the_model_its_state_file_names(tabby: tuple[FakeTabbyApi, int],
                                                                      tmp_path: Path) -> None:
    fake, port = tabby
    fake.loaded, fake.model = "exl3/B/4.0bpw", "4.0bpw"
    state = tmp_path / "tabby.json"
    write_state_file(str(state), {"id": "b", "model_name": "exl3/B/4.0bpw"})
    router = await start_router(router_config({"tabby": tabby_backend(port, state)}))
    try:
        assert router.router.lane_of["b"].snapshot().loaded == "b"
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "b"))[0] == 200
        assert fake.load_bodies == []
    finally:
        await router.close()


async def test_a_unique_card_is_adopted_and_a_stale_state_file_ignored(
    tabby: tuple[FakeTabbyApi, int], tmp_path: Path
) -> None:
    fake, port = tabby
    fake.loaded, fake.model = "exl3/C/5.0bpw", "5.0bpw"
    state = tmp_path / "tabby.json"
    write_state_file(str(state), {"id": "gone", "model_name": "exl3/Gone/1.0bpw"})
    router = await start_router(router_config({"tabby": tabby_backend(port, state)}))
    try:
        assert router.router.lane_of["c"].snapshot().loaded == "c"  # 5.0bpw: only c has that served_name
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "c"))[0] == 200
        assert fake.load_bodies == []
    finally:
        await router.close()


@pytest.mark.parametrize("tabby", [{"fail_load": ("exl3/C/5.0bpw",)}], indirect=True)
async def test_an_sse_error_fails_the_switch_keeps_the_last_good_state_and_recovers(
        tabby: tuple[FakeTabbyApi, int], tmp_path: Path) -> None:
    fake, port = tabby
    state = tmp_path / "tabby.json"
    write_state_file(str(state), {"id": "a", "model_name": "exl3/A/4.0bpw"})
    router = await start_router(router_config({"tabby": tabby_backend(port, state)}))
    lane = router.router.lane_of["a"]
    try:
        assert lane.snapshot().loaded == "a"
        async with aiohttp.ClientSession(headers=AUTH) as client:
            status, body = await chat(client, router.url, "c")
            assert status == 503
            assert "CUDA out of memory loading exl3/C/5.0bpw" in body["error"]["message"]
            # TabbyAPI unloaded a before it failed on c: nothing is up, and the router knows it.
            assert fake.loaded is None
            assert lane.snapshot().loaded is None
            assert json.loads(state.read_text())["id"] == "a"  # a restart brings back what worked
            assert (await chat(client, router.url, "a"))[0] == 200
        assert fake.loaded == "exl3/A/4.0bpw"
    finally:
        await router.close()


async def test_a_refused_load_keeps_the_previous_model(tabby: tuple[FakeTabbyApi, int], tmp_path: Path) -> None:
    fake, port = tabby
    state = tmp_path / "tabby.json"
    write_state_file(str(state), {"id": "a", "model_name": "exl3/A/4.0bpw"})
    backend = tabby_backend(port, state)
    backend["models"].append({"id": "missing", "load": {"model_name": "exl3/Missing/4.0bpw"}})
    router = await start_router(router_config({"tabby": backend}))
    lane = router.router.lane_of["a"]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            status, body = await chat(client, router.url, "missing")
            assert status == 503
            assert "(400)" in body["error"]["message"]
            assert "Could not find the model path" in body["error"]["message"]
            assert lane.snapshot().loaded == "a"  # refused before its stream: a still serves
            assert (await chat(client, router.url, "a"))[0] == 200
        assert fake.loaded == "exl3/A/4.0bpw"
        assert [b["model_name"] for b in fake.load_bodies] == ["exl3/Missing/4.0bpw"]
        assert json.loads(state.read_text())["id"] == "a"
    finally:
        await router.close()


async def test_a_state_file_that_cannot_be_written_is_reported_not_fatal(tabby: tuple[FakeTabbyApi, int],
                                                                         tmp_path: Path) -> None:
    fake, port = tabby
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    router = await start_router(router_config({"tabby": tabby_backend(port, blocker / "tabby.json")}))
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "c"))[0] == 200  # served all the same
            async with client.get(router.url + "/metrics") as resp:
                metrics = await resp.text()
        async with aiohttp.ClientSession(headers=ADMIN) as admin, admin.get(router.url + "/admin/status") as resp:
            lane_status = (await resp.json())["groups"][0]
        assert fake.loaded == "exl3/C/5.0bpw"
        tabby_status = lane_status["backends"]["tabby"]
        assert tabby_status["known_active"] == "c"
        assert "cannot write" in tabby_status["state_error"]
        assert 'llmrouter_state_file_ok{backend="tabby"} 0' in metrics
    finally:
        await router.close()


async def test_adopting_a_running_model_arms_the_idle_ttl(tabby: tuple[FakeTabbyApi, int], tmp_path: Path) -> None:
    fake, port = tabby
    fake.loaded, fake.model = "exl3/C/5.0bpw", "5.0bpw"
    config = router_config({"tabby": tabby_backend(port, tmp_path / "tabby.json")}, group={"idle_ttl_s": 0.2})
    router = await start_router(config)
    lane = router.router.lane_of["c"]
    try:
        assert lane.snapshot().loaded == "c"
        for _attempt in range(100):
            if lane.snapshot().phase.value == "idle":
                break
            await asyncio.sleep(0.02)
        assert lane.snapshot().phase.value == "idle", "adopted model never unloaded after its idle TTL"
    finally:
        await router.close()


async def test_admin_load_full_queue_says_the_lanes_retry_after(
    tabby: tuple[FakeTabbyApi, int], tmp_path: Path
) -> None:
    fake, port = tabby
    config = router_config({"tabby": tabby_backend(port, tmp_path / "tabby.json")}, group={"queue_size": 1})
    router = await start_router(config)
    lane = router.router.lane_of["a"]
    try:
        fake.module_delay_s = 0.5  # b's load takes 3 s: its waiter holds the one place in the queue
        lane.core.retry_after_s = 42  # as if the last swap took 42 s (it was 5 s, hard-coded, before)
        first = lane.enqueue("b")
        async with aiohttp.ClientSession(headers=ADMIN) as admin, \
                admin.post(router.url + "/admin/load", json={"model": "c"}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "42"
        first.close()
    finally:
        await router.close()


@pytest.mark.parametrize("tabby", [{"generation": "exl3"}, {"generation": "exl2"}], indirect=True,
                         ids=["exl3", "exl2"])
async def test_start_path_writes_the_target_before_the_start_and_rolls_back_a_failed_start(
        tabby: tuple[FakeTabbyApi, int], tmp_path: Path) -> None:
    fake, port = tabby
    state = tmp_path / "tabby.json"
    write_state_file(str(state), {"id": "b", "model_name": "exl3/B/4.0bpw"})
    spec = parse_config(router_config({"tabby": tabby_backend(port, state)})).backends["tabby"]
    a, _b, c = spec.models

    async def wait(check: Any, what: str) -> None:
        for _attempt in range(100):
            if await check():
                return
            await asyncio.sleep(0.01)
        raise TimeoutError(what)

    async with aiohttp.ClientSession() as session:
        engine = TabbyApiEngine(spec, session)
        assert engine.known_active == "b"  # from the state file
        engine.prepare_start(a)  # before (re)starting TabbyAPI: the ExecStartPre will read this
        assert json.loads(state.read_text()) == {"id": "a", "model_name": "exl3/A/4.0bpw"}
        # The process came up with exl3/A/4.0bpw (card 4.0bpw, shared with b): a new process is known
        # by its card only, so the router loads: main answers processing + finished for the same path,
        # exl2 an empty stream, after which the router unloads and loads again.
        await engine.load(a, wait)
        assert fake.loaded == "exl3/A/4.0bpw"
        assert fake.real_loads == (1 if fake.generation == "exl2" else 0)
        assert engine.known_active == "a"
        fake.fail_load = ("exl3/C/5.0bpw",)
        engine.prepare_start(c)
        assert json.loads(state.read_text())["id"] == "c"
        with pytest.raises(EngineError, match="CUDA out of memory"):
            await engine.load(c, wait)
        assert json.loads(state.read_text()) == {"id": "a", "model_name": "exl3/A/4.0bpw"}  # what worked
        assert engine.known_active is None  # TabbyAPI unloaded a before it failed on c
