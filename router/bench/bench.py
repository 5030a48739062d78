"""What the router adds to a request, measured against the same upstreams, with LiteLLM's proxy beside it.

One run starts, all on 127.0.0.1: a minimal fake OpenAI server (fast upstream), optionally a
llama.cpp server (llama-cpp-python) on a GGUF, the router (backends adopted, no swaps), LiteLLM's
proxy in its own venv, then sends bounded request batches directly / via router / via LiteLLM:
non-streaming at concurrency 1 and 32, and streams (time to first chunk, gap between chunks).
Last, the router's own time inside a swap: two spawned fake engines swapped N times; each
engine writes when it got SIGTERM, when it exited and when it listened, so the backend's part
is subtracted from what the client saw.

With two or more CPUs the router and LiteLLM run pinned to one core, the load generator and the
upstreams to another (os.sched_setaffinity), so concurrency-32 figures are the proxy's and not
the client's; the pinning is printed. Each table is followed by issue 14's targets and whether the
run met them. --profile instead runs the router under cProfile for --requests sequential requests
and prints its top functions by own and by cumulative time.

    .venv/bin/python router/bench/bench.py [--litellm .cache/venvs/litellm/bin/litellm | --no-litellm]
        [--llama-python .cache/venvs/llamacpp/bin/python]
        [--llama-model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
KEY = "bench-api-key-0123456789"
LITELLM_KEY = "sk-bench-master-key-0123456789"
CHAT = {"messages": [{"role": "user", "content": "Say hi"}]}
CACHE = Path(os.environ.get("LLMSTACK_CACHE", ROOT / ".cache"))
# Issue 14's targets for the router's added latency (ms) and its share of LiteLLM's; a benchmark, not a test.
TARGETS = {1: {"p50": 0.25, "p99": 0.5, "ratio": 0.03}, 32: {"p50": 1.0}}
# CPU sets: the proxies on one core, the client and the upstreams on the other (None: not pinned).
PIN: dict[str, set[int] | None] = {"proxy": None, "load": None}


# ---- the fast upstream -----------------------------------------------------------------------

def _fake_app(model: str, chunks: int, chunk_delay_s: float) -> web.Application:
    body = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "hi"}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
    chunk = ("data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                                    "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]})
             + "\n\n").encode()

    async def complete(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if not payload.get("stream"):
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _chunk in range(chunks):
            await asyncio.sleep(chunk_delay_s)
            await response.write(chunk)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


async def _serve_fake(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    term_at: list[float] = []

    def on_term() -> None:
        term_at.append(time.time())
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    runner = web.AppRunner(_fake_app(args.model, args.chunks, args.chunk_delay), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    if args.stamp:
        Path(args.stamp + ".ready").write_text(repr(time.time()))
    await stop.wait()
    await runner.cleanup()
    if args.stamp:
        Path(args.stamp + ".stop").write_text(json.dumps([term_at[0], time.time()]))


# ---- process helpers -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_cmd(port: int, model: str, chunks: int = 20, delay: float = 0.005, stamp: str | None = None) -> list[str]:
    cmd = [sys.executable, __file__, "--serve-fake", "--port", str(port), "--model", model,
           "--chunks", str(chunks), "--chunk-delay", str(delay)]
    return cmd + (["--stamp", stamp] if stamp else [])


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if cpus is not None:
            os.sched_setaffinity(proc.pid, cpus)  # before it serves: its threads inherit the set
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def wait_http(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            try:
                async with client.get(url, headers=headers or {}) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not up after {timeout_s}s")


# ---- measurement -----------------------------------------------------------------------------

def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: aiohttp.ClientSession, url: str, model: str, headers: dict[str, str],
                      extra: dict[str, Any]) -> float:
    began = time.perf_counter()
    async with client.post(url + "/v1/chat/completions", json={"model": model, **CHAT, **extra},
                           headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {(await resp.text())[:300]}")
    return time.perf_counter() - began


async def batch(url: str, model: str, headers: dict[str, str], count: int, concurrency: int,
                extra: dict[str, Any]) -> list[float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:
        warmups = min(concurrency, 8)
        await asyncio.gather(*(one_request(client, url, model, headers, extra) for _warmup in range(warmups)))
        semaphore = asyncio.Semaphore(concurrency)

        async def guarded() -> float:
            async with semaphore:
                return await one_request(client, url, model, headers, extra)

        return list(await asyncio.gather(*(guarded() for _request in range(count))))


async def stream_once(client: aiohttp.ClientSession, url: str, model: str, headers: dict[str, str],
                      extra: dict[str, Any]) -> tuple[float, list[float]]:
    began = time.perf_counter()
    arrivals: list[float] = []
    async with client.post(url + "/v1/chat/completions", json={"model": model, "stream": True, **CHAT, **extra},
                           headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {(await resp.text())[:300]}")
        async for line in resp.content:
            if line.startswith(b"data:"):
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0] - began, gaps


async def stream_batch(url: str, model: str, headers: dict[str, str], count: int,
                       extra: dict[str, Any]) -> tuple[list[float], list[float]]:
    ttft: list[float] = []
    gaps: list[float] = []
    async with aiohttp.ClientSession() as client:
        await stream_once(client, url, model, headers, extra)
        for _sample in range(count):
            first, between = await stream_once(client, url, model, headers, extra)
            ttft.append(first)
            gaps.extend(between)
    return ttft, gaps


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process, so CPU per request can be shown next to contended latencies."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def compare(targets: dict[str, tuple[str, str, dict[str, str]]], label: str, count: int, concurrency: int,
                  extra: dict[str, Any], rounds: int = 3,
                  target: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Interleave targets over rounds so that drifting background load hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
    for _round in range(rounds):
        for name, (url, model, headers) in targets.items():
            before = cpu_seconds(PIDS.get(name))
            samples[name] += await batch(url, model, headers, count // rounds, concurrency, extra)
            cpu[name] += cpu_seconds(PIDS.get(name)) - before
    report(label, samples, {name: cpu[name] / len(samples[name]) for name in targets if name in PIDS},
           target)
    return samples


def show_targets(target: dict[str, float], router_added: tuple[float, float], ratio: float | None) -> None:
    checks = [("router added p50", router_added[0] * 1e3, target["p50"], "ms")]
    if "p99" in target:
        checks.append(("router added p99", router_added[1] * 1e3, target["p99"], "ms"))
    if "ratio" in target:
        checks.append(("router/LiteLLM added p50", ratio, target["ratio"], ""))
    for name, value, limit, unit in checks:
        if value is None:
            print(f"  target {name} <= {limit}: not measured (--no-litellm)")
            continue
        verdict = "met" if value <= limit else "NOT met"
        print(f"  target {name} <= {limit}{unit and ' ' + unit}: {value:.3f}{unit and ' ' + unit}  {verdict}")


def report(label: str, samples: dict[str, list[float]], cpu_per_request: dict[str, float],
           target: dict[str, float] | None = None) -> None:
    direct = samples["direct"]
    d50, d99 = pct(direct, 0.5), pct(direct, 0.99)
    print(f"\n{label}  (n={len(direct)} per target)")
    print(f"  {'target':8} {'p50 ms':>9} {'p99 ms':>9} {'added p50':>10} {'added p99':>10} {'proxy CPU/req':>14}")
    added = {}
    for name, values in samples.items():
        p50, p99 = pct(values, 0.5), pct(values, 0.99)
        added[name] = (p50 - d50, p99 - d99)
        extra = "" if name == "direct" else f"{(p50 - d50) * 1e3:10.3f} {(p99 - d99) * 1e3:10.3f}"
        cpu = f"{cpu_per_request[name] * 1e6:11.0f} us" if name in cpu_per_request else ""
        print(f"  {name:8} {p50 * 1e3:9.3f} {p99 * 1e3:9.3f} {extra} {cpu}")
    ratio = None
    if "litellm" in added and "router" in added:
        r50, r99 = added["router"]
        l50, l99 = added["litellm"]
        ratio = r50 / l50 if l50 > 0 else float("nan")
        print(f"  router added / litellm added: p50 {ratio:.3f}, "
              f"p99 {r99 / l99 if l99 else float('nan'):.3f}")
    if target is not None and "router" in added:
        show_targets(target, added["router"], ratio)
    RESULTS[label] = {name: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3, "n": len(v),
                             "cpu_us_per_request": cpu_per_request.get(name, 0.0) * 1e6}
                      for name, v in samples.items()}


PIDS: dict[str, int] = {}
RESULTS: dict[str, Any] = {}


async def streams(targets: dict[str, tuple[str, str, dict[str, str]]], label: str, count: int,
                  extra: dict[str, Any]) -> None:
    print(f"\n{label}  (n={count} streams per target)")
    print(f"  {'target':8} {'ttft p50':>9} {'ttft p99':>9} {'gap p50':>9} {'gap p99':>9}  (ms)")
    out = {}
    for name, (url, model, headers) in targets.items():
        ttft, gaps = await stream_batch(url, model, headers, count, extra)
        out[name] = {"ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
                     "gap_p50_ms": pct(gaps, 0.5) * 1e3, "gap_p99_ms": pct(gaps, 0.99) * 1e3}
        row = out[name]
        print(f"  {name:8} {row['ttft_p50_ms']:9.3f} {row['ttft_p99_ms']:9.3f} {row['gap_p50_ms']:9.3f} "
              f"{row['gap_p99_ms']:9.3f}")
    RESULTS[label] = out


async def client_choice(port: int, count: int) -> None:
    """Why the router forwards with its own HTTP/1.1 client: CPU per request of each candidate."""
    sys.path.insert(0, str(ROOT / "router" / "src"))
    from llmstack_router.upstream import Upstream

    body = json.dumps({"model": "fake", **CHAT}).encode()
    headers = {"Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}"

    async def with_aiohttp() -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            for _request in range(count):
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
                    await resp.read()

    async def with_builtin() -> None:
        upstream = Upstream(url)
        for _request in range(count):
            await (await upstream.post("/v1/chat/completions", body, headers, 30)).read()
        upstream.close()

    print(f"\nforwarding client candidates, {count} sequential requests to the fast upstream, 3 rounds")
    out: dict[str, list[float]] = {"aiohttp": [], "builtin": []}
    for _round in range(3):
        for name, run in (("aiohttp", with_aiohttp), ("builtin", with_builtin)):
            before = cpu_seconds(os.getpid())
            await run()
            out[name].append((cpu_seconds(os.getpid()) - before) / count)
    for name, values in out.items():
        print(f"  {name:8} CPU per request: min {min(values) * 1e6:.0f} us, "
              f"median {statistics.median(values) * 1e6:.0f} us")
    RESULTS["client_choice_cpu_us"] = {name: min(values) * 1e6 for name, values in out.items()}


def _record_once(times: list[float]) -> None:
    if not times:
        times.append(time.time())


def _pid_listening_on(port: int) -> int | None:
    needle = f"--serve-fake\0--port\0{port}\0".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    return None


async def swap_overhead(workdir: Path, swaps: int) -> None:
    port_a, port_b, router_port = free_port(), free_port(), free_port()
    stamps = {"a": str(workdir / "swap-a"), "b": str(workdir / "swap-b")}
    config = {
        "listen": {"host": "127.0.0.1", "port": router_port}, "log_level": "WARNING",
        "auth": {"api_keys": [KEY]}, "groups": {"gpu0": {"min_residency_s": 0}},
        "backends": {
            name: {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
                   "command": fake_cmd(port, f"m{name}", stamp=stamps[name]), "models": [{"id": f"m{name}"}]}
            for name, port in (("a", port_a), ("b", port_b))},
    }
    path = workdir / "swap-router.yml"
    path.write_text(yaml.safe_dump(config))
    procs = Procs(workdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "router" / "src")}
    procs.start("swap-router", [sys.executable, "-m", "llmstack_router.cli", "--config", str(path)], env)
    url = f"http://127.0.0.1:{router_port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    rows = []
    loop = asyncio.get_running_loop()
    try:
        await wait_http(url + "/health", 30)
        async with aiohttp.ClientSession() as client:
            for index in range(swaps + 1):
                name, old = "ab"[index % 2], "ab"[(index + 1) % 2]
                for suffix in (".ready", ".stop"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(stamps[name] + suffix)
                # The old engine's real exit (interpreter teardown included) is the backend's time:
                # a pidfd turns readable the instant the kernel marks the process dead.
                exited: list[float] = []
                old_pid = _pid_listening_on(port_a if old == "a" else port_b) if index else None
                pidfd = os.pidfd_open(old_pid) if old_pid else None
                if pidfd is not None:
                    loop.add_reader(pidfd, _record_once, exited)
                total = await one_request(client, url, f"m{name}", headers, {})
                direct = await one_request(client, url, f"m{name}", headers, {})  # now loaded: plain hop
                if pidfd is not None:
                    loop.remove_reader(pidfd)
                    os.close(pidfd)
                async with client.get(url + "/status", headers=headers) as resp:
                    record = (await resp.json())["groups"][0]["last_swaps"][-1]
                if index == 0:
                    continue  # the first load has nothing to stop
                ready_at = float(Path(stamps[name] + ".ready").read_text())
                term_at, _exited_at = json.loads(Path(stamps[old] + ".stop").read_text())
                backend_start = ready_at - record["start_called_at"]
                backend_stop = exited[0] - term_at
                router_own = total - direct - backend_start - backend_stop
                rows.append({"client_total_s": total, "backend_start_s": backend_start,
                             "backend_stop_s": backend_stop, "router_own_s": router_own,
                             "router_stop_wait_s": record["stop_s"],
                             "ready_detect_lag_s": record["ready_at"] - ready_at})
    finally:
        procs.stop_all()
    own = [r["router_own_s"] for r in rows]
    lag = [r["ready_detect_lag_s"] for r in rows]
    print(f"\nswap overhead ({len(rows)} swaps between two spawned fake engines)")
    print(f"  client-seen swap p50 {statistics.median(r['client_total_s'] for r in rows) * 1e3:.1f} ms; "
          f"backend start p50 {statistics.median(r['backend_start_s'] for r in rows) * 1e3:.1f} ms; "
          f"backend stop p50 {statistics.median(r['backend_stop_s'] for r in rows) * 1e3:.1f} ms")
    print(f"  router's own time: p50 {pct(own, 0.5) * 1e3:.1f} ms, max {max(own) * 1e3:.1f} ms "
          f"(of which readiness-poll lag p50 {pct(lag, 0.5) * 1e3:.1f} ms)")
    RESULTS["swap"] = {"n": len(rows), "router_own_p50_ms": pct(own, 0.5) * 1e3, "router_own_max_ms": max(own) * 1e3,
                       "ready_lag_p50_ms": pct(lag, 0.5) * 1e3, "rows": rows}


def idle_connection_memory(port: int, pid: int, count: int) -> None:
    """The router's RSS growth per idle keep-alive connection: each answered one request, then waits."""
    before = rss_kib(pid)
    socks = []
    try:
        for _index in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                reply += sock.recv(4096)
            socks.append(sock)
        time.sleep(0.5)
        after = rss_kib(pid)
    finally:
        for sock in socks:
            sock.close()
    per = (after - before) / count
    print(f"\nmemory per idle keep-alive connection ({count} held, one request each): "
          f"{per:.1f} KiB (router RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB)")
    RESULTS["idle_connection_kib"] = per


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def pin_plan(enabled: bool) -> None:
    """Proxies on the last allowed core, this process (the load generator) and upstreams on the rest."""
    allowed = sorted(os.sched_getaffinity(0))
    if not enabled or len(allowed) < 2:
        print(f"pinning: none ({len(allowed)} CPUs allowed{'' if enabled else ', --no-pin'}): "
              "client, upstreams and proxies share the cores")
        return
    PIN["proxy"], PIN["load"] = {allowed[-1]}, set(allowed[:-1])
    os.sched_setaffinity(0, PIN["load"])
    print(f"pinning: router and LiteLLM on CPU {allowed[-1]}; client and upstreams on CPU "
          f"{','.join(map(str, allowed[:-1]))} (os.sched_setaffinity; other processes on the machine are not moved)")


# The router under cProfile, enabled by SIGUSR1 once it serves, so that imports and startup stay out.
_PROFILED = """
import atexit, cProfile, signal, sys
from llmstack_router import cli
prof = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
atexit.register(lambda: (prof.disable(), prof.dump_stats(sys.argv[1])))
sys.exit(cli.main(["--config", sys.argv[2]]))
"""


async def profile(args: argparse.Namespace) -> None:
    """One router under cProfile, --requests sequential requests through it, its top functions."""
    workdir = Path(tempfile.mkdtemp(prefix="router-profile-"))
    procs = Procs(workdir)
    fake_port, router_port = free_port(), free_port()
    procs.start("fake", fake_cmd(fake_port, "fake"), cpus=PIN["load"])
    backends = {"fake": {"engine": "openai", "group": "g1", "url": f"http://127.0.0.1:{fake_port}",
                         "models": [{"id": "fake"}]}}
    (workdir / "router.yml").write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": router_port}, "auth": {"api_keys": [KEY]}, "log_level": "INFO",
        "groups": {"g1": {}}, "backends": backends}))
    stats = workdir / "router.prof"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "router" / "src")}
    url, headers = f"http://127.0.0.1:{router_port}", {"Authorization": f"Bearer {KEY}"}
    try:
        await wait_http(f"http://127.0.0.1:{fake_port}/health", 30)
        router = procs.start("router", [sys.executable, "-c", _PROFILED, str(stats), str(workdir / "router.yml")],
                             env, PIN["proxy"])
        await wait_http(url + "/health", 60)
        await batch(url, "fake", headers, 20, 1, {})  # warm: pooled upstream connection, first-call paths
        os.kill(router.pid, signal.SIGUSR1)
        await asyncio.sleep(0.2)
        await batch(url, "fake", headers, args.requests, 1, {})
        os.kill(router.pid, signal.SIGTERM)
        router.wait(30)
    finally:
        procs.stop_all()
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        print(f"\nrouter under cProfile, {args.requests} requests at concurrency 1 (startup excluded): "
              f"top {args.profile_top} by {title}")
        pstats.Stats(str(stats)).strip_dirs().sort_stats(key).print_stats(args.profile_top)
    print(f"profile: {stats} (python -m pstats)")


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    procs = Procs(workdir)
    fake_port, router_port = free_port(), free_port()
    llama_port, litellm_port = free_port(), free_port()
    use_llama = bool(args.llama_python and args.llama_model)
    use_litellm = not args.no_litellm
    procs.start("fake", fake_cmd(fake_port, "fake", args.chunks, args.chunk_delay), cpus=PIN["load"])
    if use_llama:
        procs.start("llama", [args.llama_python, "-m", "llama_cpp.server", "--model", args.llama_model,
                              "--host", "127.0.0.1", "--port", str(llama_port), "--model_alias", "smol",
                              "--n_ctx", "512", "--n_threads", "1"], cpus=PIN["load"])
    backends: dict[str, Any] = {"fake": {"engine": "openai", "group": "g1", "url": f"http://127.0.0.1:{fake_port}",
                                         "models": [{"id": "fake"}]}}
    groups: dict[str, Any] = {"g1": {}}
    if use_llama:
        backends["llama"] = {"engine": "llamacpp", "group": "g2", "url": f"http://127.0.0.1:{llama_port}",
                             "models": [{"id": "smol"}]}
        groups["g2"] = {}
    router_cfg = {"listen": {"host": "127.0.0.1", "port": router_port}, "auth": {"api_keys": [KEY]},
                  "groups": groups, "backends": backends, "log_level": "INFO"}
    (workdir / "router.yml").write_text(yaml.safe_dump(router_cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "router" / "src")}
    try:
        await wait_http(f"http://127.0.0.1:{fake_port}/health", 30)
        if use_llama:
            await wait_http(f"http://127.0.0.1:{llama_port}/v1/models", 120)
        PIDS["router"] = procs.start("router", [sys.executable, "-m", "llmstack_router.cli", "--config",
                                                str(workdir / "router.yml")], env, PIN["proxy"]).pid
        await wait_http(f"http://127.0.0.1:{router_port}/health", 30)
        if use_litellm:
            model_list = [{"model_name": "fake", "litellm_params": {
                "model": "openai/fake", "api_base": f"http://127.0.0.1:{fake_port}/v1", "api_key": "none"}}]
            if use_llama:
                model_list.append({"model_name": "smol", "litellm_params": {
                    "model": "openai/smol", "api_base": f"http://127.0.0.1:{llama_port}/v1", "api_key": "none"}})
            (workdir / "litellm.yml").write_text(yaml.safe_dump({
                "model_list": model_list, "general_settings": {"master_key": LITELLM_KEY},
                "litellm_settings": {"telemetry": False}}))
            litellm_env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}
            litellm_env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "127.0.0.1,localhost",
                            "LITELLM_LOG": "ERROR"}
            litellm_argv = [args.litellm, "--config", str(workdir / "litellm.yml"), "--host", "127.0.0.1",
                            "--port", str(litellm_port), "--num_workers", "1"]
            PIDS["litellm"] = procs.start("litellm", litellm_argv, litellm_env, PIN["proxy"]).pid
            await wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", 180)
        router_headers = {"Authorization": f"Bearer {KEY}"}
        fast = {"direct": (f"http://127.0.0.1:{fake_port}", "fake", {}),
                "router": (f"http://127.0.0.1:{router_port}", "fake", router_headers)}
        if use_litellm:
            fast["litellm"] = (f"http://127.0.0.1:{litellm_port}", "fake", {"Authorization": f"Bearer {LITELLM_KEY}"})
        await compare(fast, "fast upstream, non-streaming, concurrency 1", args.requests, 1, {},
                      target=TARGETS[1])
        await compare(fast, "fast upstream, non-streaming, concurrency 32", args.requests * 2, 32, {},
                      target=TARGETS[32])
        await streams(fast, f"fast upstream, streaming {args.chunks} chunks every {args.chunk_delay * 1e3:.0f} ms",
                      args.streams, {})
        await client_choice(fake_port, args.requests)
        idle_connection_memory(router_port, PIDS["router"], args.idle_connections)
        if use_llama:
            llama = {"direct": (f"http://127.0.0.1:{llama_port}", "smol", {}),
                     "router": (f"http://127.0.0.1:{router_port}", "smol", router_headers)}
            if use_litellm:
                llama["litellm"] = (f"http://127.0.0.1:{litellm_port}", "smol",
                                    {"Authorization": f"Bearer {LITELLM_KEY}"})
            short = {"max_tokens": 2, "temperature": 0}
            await compare(llama, "llama.cpp SmolLM2, non-streaming (max_tokens 2), concurrency 1",
                          args.llama_requests, 1, short)
            await compare(llama, "llama.cpp SmolLM2, non-streaming (max_tokens 2), concurrency 32",
                          args.llama_requests * 2, 32, short, rounds=1)
            await streams(llama, "llama.cpp SmolLM2, streaming (max_tokens 16)", args.llama_streams,
                          {"max_tokens": 16, "temperature": 0})
    finally:
        procs.stop_all()
    await swap_overhead(workdir, args.swaps)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))
    print(f"\nlogs: {workdir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="fake", help=argparse.SUPPRESS)
    parser.add_argument("--stamp", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-delay", type=float, default=0.005)
    parser.add_argument("--requests", type=int, default=600, help="fast-upstream requests per target (c=1)")
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--llama-requests", type=int, default=60)
    parser.add_argument("--llama-streams", type=int, default=10)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--llama-python", default=None)
    parser.add_argument("--llama-model", default=None)
    parser.add_argument("--litellm", default=str(CACHE / "venvs" / "litellm" / "bin" / "litellm"),
                        help="the litellm executable, in its own venv from requirements/litellm.lock "
                             "(default: $LLMSTACK_CACHE/venvs/litellm/bin/litellm)")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out (no ratio target then)")
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    parser.add_argument("--idle-connections", type=int, default=500)
    parser.add_argument("--profile", action="store_true",
                        help="only profile the router (cProfile) over --requests requests and print its top entries")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.serve_fake:
        asyncio.run(_serve_fake(args))
        return
    if not (args.no_litellm or args.profile or os.access(args.litellm, os.X_OK)):
        parser.error(f"--litellm {args.litellm}: not an executable; build LiteLLM's venv (uv venv DIR && "
                     "uv pip install --python DIR/bin/python --require-hashes -r requirements/litellm.lock), "
                     "pass its bin/litellm, or --no-litellm")
    pin_plan(not args.no_pin)
    asyncio.run(profile(args) if args.profile else run(args))


if __name__ == "__main__":
    main()
