"""SIGHUP reloads the config of a running router (the real CLI) without dropping a request in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from router_helpers import AUTH, free_port, router_config, spawned_backend

pytestmark = pytest.mark.asyncio
NEW_KEY = "rotated-api-key-0123456789"


async def test_sighup_reloads_keys_keeps_the_stream_in_flight_and_refuses_a_bad_file(tmp_path: Path) -> None:
    # Failed on b0b22a2: SIGHUP's default action killed the router (and the stream with it).
    port, router_port = free_port(), free_port()
    cfg = router_config({"a": spawned_backend(port, "model-a", "--chunks", "30", "--chunk-delay", "0.1")})
    cfg["listen"] = {"host": "127.0.0.1", "port": router_port}
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "llmstack_router.cli", "--config", str(config),
                                                env=env, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{router_port}"
    chat = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as client:
            for _poll in range(1200):  # up to a minute: the router's start is slow on a loaded machine
                try:
                    async with client.get(url + "/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            async with client.post(url + "/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH) as resp:
                assert resp.status == 200
                first = b""
                while not first.startswith(b"data: "):  # past the ": loading" comments
                    first = await resp.content.readline()
                    assert first, "the stream ended before its first event"
                cfg["auth"]["api_keys"] = [NEW_KEY]
                config.write_text(yaml.safe_dump(cfg))
                proc.send_signal(signal.SIGHUP)
                rest = await resp.content.read()
            assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
            assert proc.returncode is None, "SIGHUP killed the router"
            new = {"Authorization": f"Bearer {NEW_KEY}"}
            async with client.post(url + "/v1/chat/completions", json=chat, headers=new) as resp:
                assert resp.status == 200
            async with client.post(url + "/v1/chat/completions", json=chat, headers=AUTH) as resp:
                assert resp.status == 401, "the old key still works after the reload"
            config.write_text("groups: [not, a, mapping]\n")
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            async with client.post(url + "/v1/chat/completions", json=chat, headers=new) as resp:
                assert resp.status == 200, "a bad file replaced the running config"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    logs = err.decode()
    assert "config reloaded from" in logs
    assert "reload refused, keeping the running config" in logs
