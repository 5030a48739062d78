"""Shared test plumbing: configs, a fake VRAM probe, running the router on a loopback port."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from llmstack_router.app import KEEPALIVE_TIMEOUT_S, ROUTER_KEY, Router, create_app, serve
from llmstack_router.config import parse_config

API_KEY = "test-api-key-0123456789"
ADMIN_KEY = "test-admin-key-0123456789"
FAKE_UPSTREAM = str(Path(__file__).with_name("router_fake_upstream.py"))
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeProbe:
    """Stands in for nvidia-smi: tests set ``free`` (MiB) or a function of the call count."""

    def __init__(self, free: int | None) -> None:
        self.free = free
        self.calls = 0

    async def free_mib(self, gpus: tuple[int, ...]) -> int | None:
        self.calls += 1
        return self.free


def fake_command(port: int, model: str, *extra: str) -> list[str]:
    return [sys.executable, FAKE_UPSTREAM, "--port", str(port), "--model", model, *extra]


def spawned_backend(port: int, model: str, *extra: str, vram_mib: int | None = None, **options: Any) -> dict:
    entry: dict[str, Any] = {"id": model}
    if vram_mib is not None:
        entry["vram_mib"] = vram_mib
    return {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
            "command": fake_command(port, model, *extra), "models": [entry], **options}


def router_config(backends: dict[str, dict], **overrides: Any) -> dict:
    group = {"queue_size": 64, "min_residency_s": 0.0, "idle_ttl_s": 0, **overrides.pop("group", {})}
    return {
        "listen": {"host": "127.0.0.1", "port": 8002},
        "auth": {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]},
        "groups": {"gpu0": group},
        "backends": backends,
        "ready_poll_interval_s": 0.02,
        "loading_progress_interval_s": 0.3,
        **overrides,
    }


class RunningRouter:
    def __init__(self, runner: web.AppRunner, listener: asyncio.Server, url: str, router: Router) -> None:
        self.runner, self.listener, self.url, self.router = runner, listener, url, router

    async def close(self) -> None:
        self.listener.close()
        await self.runner.cleanup()


async def start_router(config: dict, probe: Any = None) -> RunningRouter:
    """The router as app.run serves it: app.serve's listener (connection limit, client deadlines)."""
    port = free_port()
    parsed = parse_config({**config, "listen": {"host": "127.0.0.1", "port": port}})
    app = create_app(parsed, probe=probe)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_TIMEOUT_S)
    await runner.setup()
    listener = await serve(parsed, runner)
    return RunningRouter(runner, listener, f"http://127.0.0.1:{port}", app[ROUTER_KEY])


async def start_fake(upstream: Any) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(upstream.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def start_cli(config: Path) -> asyncio.subprocess.Process:
    """The real router CLI (``llmstack-router --config``) on ``config``, stderr captured."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "llmstack_router.cli", "--config", str(config),
                                                env=env, stderr=asyncio.subprocess.PIPE)


async def wait_healthy(client: aiohttp.ClientSession, url: str, timeout_s: float = 60.0) -> None:
    """Poll ``/health`` until it answers 200 (a router's start is slow on a loaded machine)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            async with client.get(url + "/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not become healthy in {timeout_s:.0f}s")
