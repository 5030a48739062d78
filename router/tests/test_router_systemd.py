"""Unit-mode backends against the strict fake systemctl: auto-restart, start limits, cgroups."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from llmstack_router.control import UnitController
from router_helpers import ADMIN, AUTH, fake_command, free_port, router_config, start_router

pytestmark = pytest.mark.asyncio
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
FAKE = str(Path(__file__).with_name("router_fake_systemctl.py"))


async def chat(client: aiohttp.ClientSession, url: str, model: str) -> tuple[int, dict]:
    async with client.post(url + "/v1/chat/completions", json={"model": model, **CHAT}) as resp:
        return resp.status, await resp.json()


def unit_config(tmp_path: Path, unit: str, port: int, argv: list[str], **settings) -> dict:
    (tmp_path / f"{unit}.json").write_text(json.dumps({"argv": argv, **settings}))
    backends = {"a": {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}", "unit": unit,
                      "ready_timeout_s": 15, "models": [{"id": "model-a"}]}}
    return router_config(backends, systemctl=[sys.executable, FAKE, str(tmp_path)],
                         journalctl=[sys.executable, FAKE, str(tmp_path), "journal"])


def show(tmp_path: Path, unit: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, FAKE, str(tmp_path), "show", unit], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


async def until(condition, timeout_s: float = 15.0) -> None:
    """Poll (generous: CI machines are loaded); the assertion after it says what was expected."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def fake_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(UnitController, "cgroup_root", tmp_path / "cgroup")


async def test_unit_dying_after_ready_is_lost_while_it_waits_to_auto_restart(tmp_path: Path) -> None:
    # Failed on b0b22a2: `activating (auto-restart)` counted as up, so the lane stayed ready on a
    # dead port and every request until systemd's restart got a 502.
    unit, port = "llamacpp@a.service", free_port()
    config = unit_config(tmp_path, unit, port, fake_command(port, "model-a"), Restart="on-failure", RestartSec=6)
    router = await start_router(config)
    lane = router.router.lane_of["model-a"]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            assert (await chat(client, router.url, "model-a"))[0] == 200
            state = show(tmp_path, unit)
            assert state["ControlGroup"] == "/system.slice/system-llamacpp.slice/llamacpp@a.service"
            assert str(state["MainPID"]) in (tmp_path / "cgroup" / state["ControlGroup"].lstrip("/")
                                             / "cgroup.procs").read_text().split()
            os.kill(int(state["MainPID"]), signal.SIGKILL)
            await until(lambda: show(tmp_path, unit)["SubState"] == "auto-restart")
            assert show(tmp_path, unit)["ActiveState"] == "activating"
            status, _body = await chat(client, router.url, "model-a")
            assert status == 502
            await until(lambda: lane.core.phase.value == "idle")
            assert lane.core.phase.value == "idle", "a unit waiting to auto-restart was counted as ready"
            assert "auto-restart" in (lane.core.last_error or "")
            status, body = await chat(client, router.url, "model-a")  # waits for the restart, then serves
            assert status == 200, body
            assert show(tmp_path, unit)["NRestarts"] == "1"
    finally:
        await router.close()
        subprocess.run([sys.executable, FAKE, str(tmp_path), "stop", unit], check=True)


async def test_start_limit_hit_is_reported_then_cleared_by_the_router(tmp_path: Path) -> None:
    # Failed on b0b22a2: the client was told "failed/failed" (not why), and once the flaw was fixed
    # the unit stayed refused: the router never ran reset-failed.
    unit, port, flag = "llamacpp@a.service", free_port(), tmp_path / "broken"
    flag.touch()
    config = unit_config(tmp_path, unit, port, fake_command(port, "model-a", "--exit-if-file", str(flag)),
                         StartLimitBurst=2, StartLimitIntervalSec=60)
    router = await start_router(config)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as client:
            for _attempt in range(2):
                status, body = await chat(client, router.url, "model-a")
                assert status == 503
                assert "Result=exit-code" in body["error"]["message"], body
            status, body = await chat(client, router.url, "model-a")  # the third start in 60 s
            assert status == 503
            assert "Result=start-limit-hit" in body["error"]["message"], body
            assert show(tmp_path, unit)["Result"] == "start-limit-hit"
            async with client.get(router.url + "/admin/status", headers=ADMIN) as resp:
                units = (await resp.json())["groups"][0]["units"]
            assert units["a"]["Result"] == "start-limit-hit"
            flag.unlink()  # the operator fixed the cause; the next request clears the limit and loads
            status, body = await chat(client, router.url, "model-a")
            assert status == 200, body
        calls = (tmp_path / "calls.log").read_text().splitlines()
        assert calls.count(f"reset-failed {unit}") == 1
        assert calls.index(f"reset-failed {unit}") < len(calls) - 1 - calls[::-1].index(f"start {unit}")
    finally:
        await router.close()
        subprocess.run([sys.executable, FAKE, str(tmp_path), "stop", unit], check=True)
