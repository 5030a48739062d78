"""Swaps and failures with backends the router spawns as real processes (emulated engines)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from router_helpers import (
    ADMIN,
    AUTH,
    FAKE_UPSTREAM,
    FakeProbe,
    fake_command,
    free_port,
    router_config,
    spawned_backend,
    start_cli,
    start_router,
    wait_healthy,
)

pytestmark = pytest.mark.asyncio
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def chat(client: aiohttp.ClientSession, url: str, model: str, **extra) -> tuple[int, dict]:
    async with client.post(url + "/v1/chat/completions", json={"model": model, **CHAT, **extra}) as resp:
        return resp.status, await resp.json()


def pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_swap_both_ways_keeps_one_backend_up() -> None:
    port_a, port_b = free_port(), free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a"), "b": spawned_backend(port_b, "model-b")}))
    lane = router.router.lane_of["model-a"]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            for model in ("model-a", "model-b", "model-a"):
                status, body = await chat(client, router.url, model)
                assert status == 200, body
                assert body["choices"][0]["message"]["content"] == f"hello from {model}"
                up = [name for name, rt in lane.backends.items()
                      if rt.controller.proc is not None and rt.controller.proc.returncode is None]
                assert up == [model[-1]]
        assert lane.core.swaps == 3
        assert [r.error for r in lane.history] == [None, None, None]
    finally:
        await router.close()


async def test_backend_exiting_at_start_gives_every_waiter_503_logs_to_admins_then_retries(tmp_path: Path) -> None:
    port = free_port()
    flag = tmp_path / "broken"
    flag.touch()
    router = await start_router(router_config({"a": spawned_backend(port, "model-a", "--exit-if-file", str(flag))}))
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            results = await asyncio.gather(*(chat(client, router.url, "model-a") for _waiter in range(3)))
            for status, body in results:
                assert status == 503
                assert body["error"]["code"] == "model_load_failed"
                assert "exited with code 3" in body["error"]["message"]
                # The backend's log is for admins (/admin/status); the client gets a request id to quote.
                assert "CUDA out of memory while loading weights (emulated)" not in body["error"]["message"]
                assert "request id " in body["error"]["message"]
                assert "/admin/status" in body["error"]["message"]
            async with client.get(router.url + "/admin/status", headers=ADMIN) as resp:
                logs = (await resp.json())["backend_logs"]["a"]
            assert "error: CUDA out of memory while loading weights (emulated)" in logs
            assert router.router.lane_of["model-a"].core.swaps == 1  # three waiters, one load
            flag.unlink()
            status, body = await chat(client, router.url, "model-a")
            assert status == 200, body
    finally:
        await router.close()


async def test_backend_never_ready_times_out_and_is_stopped(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port, "model-a", "--never-ready", ready_timeout_s=4.0)}))
    lane = router.router.lane_of["model-a"]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            began = asyncio.get_running_loop().time()
            status, body = await chat(client, router.url, "model-a")
            elapsed = asyncio.get_running_loop().time() - began
        assert status == 503
        assert "not ready" in body["error"]["message"]
        assert "ready_timeout_s" in body["error"]["message"]
        # The backend's own output is for admins (the router log; /admin/status while it runs), not the client.
        assert "--- last log lines of a" not in body["error"]["message"]
        assert "--- last log lines of a (command " in caplog.text
        assert elapsed < 8.0
        assert lane.backends["a"].controller.proc.returncode is not None
        assert lane.core.phase == "idle"
    finally:
        await router.close()


async def test_kill_9_mid_stream_reports_error_and_next_request_restarts_backend() -> None:
    port = free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port, "model-a", "--chunks", "100", "--chunk-delay", "0.05")}))
    lane = router.router.lane_of["model-a"]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            lines = []
            async with client.post(router.url + "/v1/chat/completions",
                                   json={"model": "model-a", "stream": True, **CHAT}) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        lines.append(line)
                        if len(lines) == 3:
                            os.kill(lane.backends["a"].controller.proc.pid, signal.SIGKILL)
            assert b'"upstream_error"' in lines[-1], lines[-3:]
            assert not any(b"[DONE]" in line for line in lines)
            for _poll in range(100):
                if lane.core.phase == "idle":
                    break
                await asyncio.sleep(0.02)
            assert lane.core.phase == "idle"
            assert "exited with code -9" in lane.core.last_error
            status, body = await chat(client, router.url, "model-a")
            assert status == 200, body
    finally:
        await router.close()


async def test_client_cancelling_while_queued_is_dropped() -> None:
    port_a, port_b = free_port(), free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a"), "b": spawned_backend(port_b, "model-b")},
        group={"min_residency_s": 30.0}))
    lane = router.router.lane_of["model-a"]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "model-a"))[0] == 200
            waiting = asyncio.create_task(chat(client, router.url, "model-b"))
            for _poll in range(100):
                if lane.core.queue_depth() == 1:
                    break
                await asyncio.sleep(0.01)
            assert lane.core.queue_depth() == 1
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            for _poll in range(100):
                if lane.core.queue_depth() == 0:
                    break
                await asyncio.sleep(0.01)
            assert lane.core.queue_depth() == 0
            assert (await chat(client, router.url, "model-a"))[0] == 200
        assert lane.core.swaps == 1  # model-b was never loaded for the client that left
        assert lane.core.active == "model-a"
    finally:
        await router.close()


async def test_full_queue_answers_503_with_retry_after() -> None:
    port_a, port_b = free_port(), free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a"), "b": spawned_backend(port_b, "model-b")},
        group={"min_residency_s": 30.0, "queue_size": 2}))
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "model-a"))[0] == 200
            queued = [asyncio.create_task(chat(client, router.url, "model-b")) for _waiter in range(2)]
            lane = router.router.lane_of["model-b"]
            for _poll in range(200):
                if lane.core.queue_depth() == 2:
                    break
                await asyncio.sleep(0.01)
            assert lane.core.queue_depth() == 2
            async with client.post(router.url + "/v1/chat/completions", json={"model": "model-b", **CHAT}) as resp:
                assert resp.status == 503
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["error"]["code"] == "queue_full"
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
    finally:
        await router.close()


async def test_streaming_waiter_gets_loading_comments_then_the_stream() -> None:
    port = free_port()
    router = await start_router(router_config({"a": spawned_backend(port, "model-a", "--start-delay", "1.2")}))
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client, client.post(
                router.url + "/v1/chat/completions", json={"model": "model-a", "stream": True, **CHAT}) as resp:
            body = (await resp.read()).decode()
        comments = [line for line in body.splitlines() if line.startswith(": loading model-a")]
        assert len(comments) >= 2, body
        assert body.index(": loading") < body.index("data:")
        assert body.rstrip().endswith("data: [DONE]")
    finally:
        await router.close()


async def test_vram_preflight_fails_fast_and_keeps_current_model() -> None:
    port_a, port_b = free_port(), free_port()
    probe = FakeProbe(free=2000)
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a", vram_mib=1000),
        "big": spawned_backend(port_b, "model-big", vram_mib=50000)}), probe=probe)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "model-a"))[0] == 200
            began = asyncio.get_running_loop().time()
            status, body = await chat(client, router.url, "model-big")
            assert asyncio.get_running_loop().time() - began < 1.0
            assert status == 503
            message = body["error"]["message"]
            assert "needs 50000 MiB" in message
            assert "can free at most 3000 MiB" in message
            status, _body = await chat(client, router.url, "model-a")
            assert status == 200
            assert router.router.lane_of["model-a"].backends["a"].controller.proc.returncode is None
    finally:
        await router.close()


async def test_vram_not_coming_back_after_stop_is_reported() -> None:
    port_a, port_b = free_port(), free_port()
    probe = FakeProbe(free=20000)
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a", vram_mib=8000),
        "b": spawned_backend(port_b, "model-b", vram_mib=8000)},
        group={"vram_release_timeout_s": 0.5}), probe=probe)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "model-a"))[0] == 200
            probe.free = 12000  # model-a holds 8000 MiB ... and the emulated driver never returns it
            status, body = await chat(client, router.url, "model-b")
        assert status == 503
        assert "VRAM not released" in body["error"]["message"]
        assert "12000 MiB free, need 19488 MiB" in body["error"]["message"]
    finally:
        await router.close()


async def test_two_hundred_alternating_requests_no_failure_bounded_swaps() -> None:
    port_a, port_b = free_port(), free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a"), "b": spawned_backend(port_b, "model-b")},
        group={"min_residency_s": 1.0, "queue_size": 256}))
    lane = router.router.lane_of["model-a"]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            began = asyncio.get_running_loop().time()
            semaphore = asyncio.Semaphore(16)

            async def one(index: int) -> int:
                async with semaphore:
                    return (await chat(client, router.url, "model-" + "ab"[index % 2]))[0]

            codes = await asyncio.gather(*(one(i) for i in range(200)))
            elapsed = asyncio.get_running_loop().time() - began
        assert codes.count(200) == 200
        bound = 1 + elapsed / 1.0
        print(f"\n200 alternating requests (16 concurrent): {lane.core.swaps} swaps in {elapsed:.1f}s")
        assert lane.core.swaps <= bound
        assert lane.core.swaps <= 20
    finally:
        await router.close()


async def test_router_exit_kills_spawned_backend_and_its_children(tmp_path: Path) -> None:
    port, router_port = free_port(), free_port()
    # The engine forks a helper that stays in its process group (llama-swap #100's orphans).
    script = f"sleep 300 & exec {sys.executable} {FAKE_UPSTREAM} --port {port} --model model-a"
    config = tmp_path / "config.yml"
    import yaml
    cfg = router_config({"a": {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
                               "command": ["/bin/sh", "-c", script], "models": [{"id": "model-a"}]}})
    cfg["listen"] = {"host": "127.0.0.1", "port": router_port}
    config.write_text(yaml.safe_dump(cfg))
    proc = await start_cli(config)
    url = f"http://127.0.0.1:{router_port}"
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            await wait_healthy(client, url)
            assert (await chat(client, url, "model-a"))[0] == 200
            async with client.get(url + "/admin/status", headers=ADMIN) as resp:
                assert resp.status == 200
        pgids = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmd_has(p, str(port))}
        assert pgids, "backend not found in /proc"
        groups = {os.getpgid(pid) for pid in pgids}
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        await asyncio.sleep(0.2)
        assert not any(pgid_alive(g) for g in groups), "backend processes survived the router"
        logs = (await proc.stderr.read()).decode()
        assert '"logger": "llmstack_router.access"' in logs
        assert '"request_id"' in logs
        assert "(event loop: uvloop " in logs  # cli.py picks uvloop (a dependency) when it imports
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _cmd_has(proc_dir: Path, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


async def test_systemd_unit_mode_swaps_reports_journal_and_adopts_after_restart(tmp_path: Path) -> None:
    import json

    fake_systemctl = str(Path(__file__).with_name("router_fake_systemctl.py"))
    ports = {"llamacpp@a.service": free_port(), "llamacpp@b.service": free_port()}
    for unit, port in ports.items():
        model = "model-" + unit[-9]
        (tmp_path / f"{unit}.json").write_text(json.dumps(fake_command(port, model)))
    broken_command = fake_command(free_port(), "x", "--exit-at-start", "4")
    (tmp_path / "llamacpp@broken.service.json").write_text(json.dumps(broken_command))
    backends = {
        unit[-9]: {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}", "unit": unit,
                   "models": [{"id": "model-" + unit[-9]}]} for unit, port in ports.items()}
    backends["broken"] = {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{free_port()}",
                          "unit": "llamacpp@broken.service", "ready_timeout_s": 10, "models": [{"id": "broken"}]}
    config = router_config(backends, systemctl=[sys.executable, fake_systemctl, str(tmp_path)],
                           journalctl=[sys.executable, fake_systemctl, str(tmp_path), "journal"])
    calls = tmp_path / "calls.log"
    router = await start_router(config)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            for model in ("model-a", "model-b"):
                status, body = await chat(client, router.url, model)
                assert status == 200, body
            log = calls.read_text().splitlines()
            # Before b starts, a is stopped and confirmed gone ("show" after "stop").
            start_b = log.index("start llamacpp@b.service")
            assert "stop llamacpp@a.service" in log[:start_b]
            assert log.index("stop llamacpp@a.service") < max(
                i for i, line in enumerate(log[:start_b]) if line == "show llamacpp@a.service")
            status, body = await chat(client, router.url, "broken")
            assert status == 503
            assert "unit llamacpp@broken.service is failed" in body["error"]["message"]
            assert "CUDA out of memory while loading weights (emulated)" not in body["error"]["message"]
            assert "journal llamacpp@broken.service" in calls.read_text()
            async with client.get(router.url + "/admin/status", headers=ADMIN) as resp:
                logs = "\n".join((await resp.json())["backend_logs"]["broken"])
            assert "CUDA out of memory while loading weights (emulated)" in logs
            status, _body = await chat(client, router.url, "model-b")
            assert status == 200
    finally:
        await router.close()
    # Units outlive the router; a new router adopts the running one instead of restarting it.
    calls.write_text("")
    router = await start_router(config)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "model-b"))[0] == 200
        assert "start llamacpp@b.service" not in calls.read_text()
        assert router.router.lane_of["model-b"].core.swaps == 0
    finally:
        await router.close()
        for unit in ports:
            subprocess.run([sys.executable, fake_systemctl, str(tmp_path), "stop", unit], check=True)


async def _stream_events(client: aiohttp.ClientSession, url: str, model: str) -> list[str]:
    async with client.post(url + "/v1/chat/completions", json={"model": model, **CHAT, "stream": True}) as resp:
        assert resp.status == 200
        return [line.decode().strip() for line in [line async for line in resp.content] if line.strip()]


async def test_drain_deadline_cuts_a_slow_stream_with_an_error_event_and_the_swap_goes_on() -> None:
    # Failed on b0b22a2: the swap to b waited for a's 20 s stream (no drain deadline).
    port_a, port_b = free_port(), free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a", "--chunks", "200", "--chunk-delay", "0.1"),
        "b": spawned_backend(port_b, "model-b")}, group={"min_residency_s": 0.0, "drain_timeout_s": 1.0}))
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "model-a"))[0] == 200
            slow = asyncio.create_task(_stream_events(client, router.url, "model-a"))
            await asyncio.sleep(0.5)
            began = asyncio.get_running_loop().time()
            status, body = await chat(client, router.url, "model-b")
            took = asyncio.get_running_loop().time() - began
            assert status == 200, body
            assert took < 15.0, f"the swap waited {took:.1f}s for a slow stream (20 s without the deadline)"
            events = await asyncio.wait_for(slow, 10)
            assert '"code": "drain_timeout"' in events[-1] or '"drain_timeout"' in events[-2], events[-3:]
            assert any("drain_timeout_s=1" in e for e in events), events[-3:]
        assert router.router.lane_of["model-a"].core.in_flight == 0
    finally:
        await router.close()


async def test_queued_request_past_queue_max_wait_gets_503_with_retry_after() -> None:
    # Failed on b0b22a2: a request for b waited as long as a's stream lasted (no maximum wait).
    port_a, port_b = free_port(), free_port()
    router = await start_router(router_config({
        "a": spawned_backend(port_a, "model-a", "--chunks", "100", "--chunk-delay", "0.1"),
        "b": spawned_backend(port_b, "model-b")},
        group={"min_residency_s": 0.0, "drain_timeout_s": 60.0, "queue_max_wait_s": 1.0}))
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            # a is loaded outside the queue: its start may take longer than the 1 s maximum wait here.
            await router.router.lane_of["model-a"].swapper.load("model-a", None)
            router.router.lane_of["model-a"].apply(router.router.lane_of["model-a"].core.adopt("model-a", 0.0))
            slow = asyncio.create_task(_stream_events(client, router.url, "model-a"))
            await asyncio.sleep(0.5)
            began = asyncio.get_running_loop().time()
            async with client.post(router.url + "/v1/chat/completions", json={"model": "model-b", **CHAT}) as resp:
                body = await resp.json()
                assert resp.status == 503, body
                assert int(resp.headers["Retry-After"]) >= 1
            assert asyncio.get_running_loop().time() - began < 5.0
            assert body["error"]["code"] == "queue_full"
            assert "queue_max_wait_s=1" in body["error"]["message"]
            events = await asyncio.wait_for(slow, 30)
            assert events[-1] == "data: [DONE]", "the stream in flight was not disturbed"
    finally:
        await router.close()
