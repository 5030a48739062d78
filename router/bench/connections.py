"""Router memory and other clients' latency while N client connections are held (issue 13).

    python router/bench/connections.py [--hold 2000] [--requests 200]

Starts the emulated engine (tests/router_fake_upstream.py) and the real router (``llmstack-router``,
run from router/src with the connection limit it ships), then: latency of sequential chat requests
from one client (baseline), opens --hold connections that each send half a request and stop
(slow clients), measures the router's RSS, open files and the same latency again. Prints one line
per figure; tests/test_router_edge.py asserts the behaviour past the limit (503), this prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROUTER = Path(__file__).resolve().parents[1]
KEY = "bench-api-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as client:
        for _attempt in range(1200):  # a loaded machine starts python slowly
            try:
                async with client.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


async def latencies(url: str, count: int) -> list[float]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    out = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as client:
        for _index in range(count):
            began = time.perf_counter()
            async with client.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            out.append((time.perf_counter() - began) * 1000)
    return out


def summary(name: str, values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"{name}: p50 {statistics.median(values):.2f} ms, p99 {p99:.2f} ms, n={len(values)}"


async def hold(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _index in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half a request, then silence
        socks.append(sock)
    await asyncio.sleep(1.0)
    return socks


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-connections", type=int, default=4096)
    args = parser.parse_args()
    upstream_port, router_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROUTER / "src")}
    fake = subprocess.Popen([sys.executable, str(ROUTER / "tests" / "router_fake_upstream.py"),
                             "--port", str(upstream_port), "--model", "m"], stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        config = {"listen": {"host": "127.0.0.1", "port": router_port},
                  "auth": {"api_keys": [KEY]}, "log_level": "WARNING",
                  # Held half-requests would be closed after the default 10 s header deadline (issue 13):
                  # the bench measures what holding them costs, so it keeps them for its whole run.
                  "limits": {"max_connections": args.max_connections, "header_read_timeout_s": 3600},
                  "groups": {"gpu0": {}},
                  "backends": {"b": {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{upstream_port}",
                                     "models": [{"id": "m"}]}}}
        path = Path(tmp) / "config.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        router = subprocess.Popen([sys.executable, "-m", "llmstack_router.cli", "--config", str(path)], env=env,
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{router_port}"
        socks: list[socket.socket] = []
        try:
            await wait_up(f"http://127.0.0.1:{upstream_port}/health")
            await wait_up(url + "/health")
            await latencies(url, 20)  # warm up
            print(f"router RSS idle: {rss_mib(router.pid):.1f} MiB")
            print(summary("latency, no held connections", await latencies(url, args.requests)))
            socks = await hold(router_port, args.hold)
            print(f"router RSS with {args.hold} held connections: {rss_mib(router.pid):.1f} MiB")
            open_fds = len(os.listdir(f"/proc/{router.pid}/fd"))
            print(f"router open files with {args.hold} held connections: {open_fds}")
            print(summary(f"latency, {args.hold} held connections", await latencies(url, args.requests)))
        finally:
            for sock in socks:
                sock.close()
            router.terminate()
            fake.terminate()
            router.wait(10)
            fake.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
