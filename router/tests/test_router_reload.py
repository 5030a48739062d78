"""SIGHUP reloads the config of a running router (the real CLI) without dropping a request in flight."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
import yaml
from router_helpers import AUTH, free_port, router_config, spawned_backend, start_cli, wait_healthy

pytestmark = pytest.mark.asyncio
NEW_KEY = "rotated-api-key-0123456789"


async def test_sighup_reloads_keys_keeps_the_stream_in_flight_and_refuses_a_bad_file(tmp_path: Path) -> None:
    # Failed on b0b22a2: SIGHUP's default action killed the router (and the stream with it).
    port, router_port = free_port(), free_port()
    cfg = router_config({"a": spawned_backend(port, "model-a", "--chunks", "30", "--chunk-delay", "0.1")})
    cfg["listen"] = {"host": "127.0.0.1", "port": router_port}
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(cfg))
    proc = await start_cli(config)
    url = f"http://127.0.0.1:{router_port}"
    chat = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as client:
            await wait_healthy(client, url)
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


async def test_router_restart_with_requests_queued_answers_each_then_serves_again(tmp_path: Path) -> None:
    # Failed before: on SIGTERM aiohttp waited out the shutdown timeout for the queued handlers, then
    # cancelled them, and their clients lost the connection without an answer.
    port, router_port = free_port(), free_port()
    cfg = router_config({"a": spawned_backend(port, "model-a", "--start-delay", "3")})
    cfg["listen"] = {"host": "127.0.0.1", "port": router_port}
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{router_port}"
    chat = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
    proc = await start_cli(config)
    async with aiohttp.ClientSession() as client:
        try:
            await wait_healthy(client, url)

            async def plain() -> tuple[int, dict, str | None]:
                async with client.post(url + "/v1/chat/completions", json=chat, headers=AUTH) as resp:
                    return resp.status, await resp.json(), resp.headers.get("Retry-After")

            queued = [asyncio.create_task(plain()) for _client in range(3)]
            async with client.post(url + "/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH) as resp:
                assert resp.status == 200
                assert (await resp.content.readline()).startswith(b": loading"), "the stream was not queued"
                proc.send_signal(signal.SIGTERM)
                began = asyncio.get_running_loop().time()
                rest = (await asyncio.wait_for(resp.content.read(), 10)).decode()
            answers = await asyncio.wait_for(asyncio.gather(*queued), 10)
            assert asyncio.get_running_loop().time() - began < 4, "queued clients waited out the shutdown timeout"
            assert '"code": "router_restarting"' in rest, rest
            for status, body, retry_after in answers:
                assert (status, body["error"]["code"], retry_after) == (503, "router_restarting", "1"), body
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        # The spawned backend went with the router; a new router serves the same model again.
        proc = await start_cli(config)
        try:
            await wait_healthy(client, url)
            async with client.post(url + "/v1/chat/completions", json=chat, headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 60)
