"""The router's own time inside a swap, for two readiness schedules side by side in one run.

Two routers run at once, each with two spawned fake engines (bench.py's fake: it stamps the
instant it listens, and when it got SIGTERM); the swaps alternate between the routers, so
machine load hits both alike:

- ``fixed``: ``ready_poll_first_s = ready_poll_interval_s``, the schedule before issue 14 (a
  probe every 25 ms);
- ``backoff``: the defaults (port probes until the engine listens, then 1 ms doubling to 25 ms).

Per swap: router's own time = client-seen swap - the plain hop after it - the backend's start
(start called -> listening) - the backend's stop (SIGTERM -> the process is gone, via a pidfd);
"ready lag" = the router's ready_at - the engine's listening stamp. Also prints what each
schedule costs over a 4-minute load (probes; a benchmark, never a timed test).

    .venv/bin/python router/bench/swap.py [--swaps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench import KEY, ROOT, _pid_listening_on, fake_cmd, free_port, one_request, pct, wait_http
from llmstack_router.config import RouterConfig
from llmstack_router.swap import poll_delays, watch_delay

TARGET_MS = 5.0
LOAD_S = 240.0


def probes_over(load_s: float, first_s: float, cap_s: float) -> tuple[int, int]:
    """(port probes while nothing listens, HTTP probes once it listens) for a load of ``load_s``,
    each as if that phase lasted the whole load (probe time itself not counted)."""
    port, waited = 1, 0.0
    while waited < load_s:
        waited += watch_delay(waited, first_s, cap_s)
        port += 1
    http, waited = 1, 0.0
    for delay in poll_delays(first_s, cap_s):
        waited += delay
        if waited >= load_s:
            return port, http
        http += 1
    raise AssertionError("unreachable")


class Side:
    """One router and its two spawned fake engines, swapped a <-> b."""

    def __init__(self, name: str, workdir: Path, overrides: dict[str, Any]) -> None:
        self.name, self.workdir = name, workdir
        self.ports = {"a": free_port(), "b": free_port()}
        self.stamps = {m: str(workdir / f"{name}-{m}") for m in "ab"}
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "listen": {"host": "127.0.0.1", "port": int(self.url.rsplit(":", 1)[1])}, "log_level": "WARNING",
            "auth": {"api_keys": [KEY]}, "groups": {"gpu0": {"min_residency_s": 0}}, **overrides,
            "backends": {m: {"engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
                             "command": fake_cmd(port, f"m{m}", stamp=self.stamps[m]), "models": [{"id": f"m{m}"}]}
                         for m, port in self.ports.items()},
        }
        (workdir / f"{name}.yml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "router" / "src")}
        with open(workdir / f"{name}.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "llmstack_router.cli", "--config",
                                          str(workdir / f"{name}.yml")], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.rows: list[dict[str, float]] = []

    async def swap(self, client: aiohttp.ClientSession, index: int) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        new, old = "ab"[index % 2], "ab"[(index + 1) % 2]
        for suffix in (".ready", ".stop"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.stamps[new] + suffix)
        # The old engine's real exit (interpreter teardown included) is the backend's time:
        # a pidfd turns readable the instant the kernel marks the process dead.
        exited: list[float] = []
        old_pid = _pid_listening_on(self.ports[old]) if index else None
        pidfd = os.pidfd_open(old_pid) if old_pid else None
        loop = asyncio.get_running_loop()
        if pidfd is not None:
            loop.add_reader(pidfd, lambda: exited or exited.append(time.time()))
        total = await one_request(client, self.url, f"m{new}", headers, {})
        direct = await one_request(client, self.url, f"m{new}", headers, {})  # now loaded: the plain hop
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        async with client.get(self.url + "/status", headers=headers) as resp:
            record = (await resp.json())["groups"][0]["last_swaps"][-1]
        if index == 0:
            return  # the first load has nothing to stop
        listening_at = float(Path(self.stamps[new] + ".ready").read_text())
        term_at, _exited_at = json.loads(Path(self.stamps[old] + ".stop").read_text())
        backend = (listening_at - record["start_called_at"]) + (exited[0] - term_at)
        self.rows.append({"client_total_s": total, "backend_s": backend, "router_own_s": total - direct - backend,
                          "ready_lag_s": record["ready_at"] - listening_at})

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def measure(workdir: Path, swaps: int) -> dict[str, Any]:
    cap = RouterConfig.ready_poll_interval_s
    sides = [Side("fixed", workdir, {"ready_poll_first_s": cap, "ready_poll_interval_s": cap}),
             Side("backoff", workdir, {})]
    try:
        async with aiohttp.ClientSession() as client:
            for side in sides:
                await wait_http(side.url + "/health", 30)
            for index in range(swaps + 1):
                for side in sides:
                    await side.swap(client, index)
    finally:
        for side in sides:
            side.stop()
    results: dict[str, Any] = {"n": swaps, "target_router_own_p50_ms": TARGET_MS, "cpus": os.cpu_count(),
                               "loadavg": os.getloadavg()[0]}
    print(f"\nrouter's own time inside a swap ({swaps} swaps per schedule, alternating; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f})")
    print(f"  {'schedule':8} {'own p50':>8} {'own p99':>8} {'lag p50':>8} {'lag p99':>8} {'backend p50':>12}   target")
    for side in sides:
        own = [r["router_own_s"] * 1e3 for r in side.rows]
        lag = [r["ready_lag_s"] * 1e3 for r in side.rows]
        backend = [r["backend_s"] * 1e3 for r in side.rows]
        results[side.name] = {"router_own_p50_ms": pct(own, 0.5), "router_own_p99_ms": pct(own, 0.99),
                              "ready_lag_p50_ms": pct(lag, 0.5), "ready_lag_p99_ms": pct(lag, 0.99),
                              "backend_p50_ms": pct(backend, 0.5), "rows": side.rows}
        met = "met" if pct(own, 0.5) <= TARGET_MS else "NOT met"
        print(f"  {side.name:8} {pct(own, 0.5):6.1f}ms {pct(own, 0.99):6.1f}ms {pct(lag, 0.5):6.1f}ms "
              f"{pct(lag, 0.99):6.1f}ms {pct(backend, 0.5):10.1f}ms   own p50 <= {TARGET_MS:.0f} ms: {met}")
    ratio = results["backoff"]["router_own_p50_ms"] / results["fixed"]["router_own_p50_ms"]
    results["ratio_own_p50_backoff_over_fixed"] = ratio
    print(f"  backoff / fixed, router's own p50: {ratio:.2f}")
    first = RouterConfig.ready_poll_first_s
    fixed_port, fixed_http = probes_over(LOAD_S, cap, cap)
    port, http = probes_over(LOAD_S, first, cap)
    results["probes_4min"] = {"fixed_http": fixed_http, "backoff_http": http, "backoff_port": port,
                              "fixed_port": fixed_port}
    print(f"  over a {LOAD_S / 60:.0f}-minute load (cap {cap * 1e3:.0f} ms): HTTP probes on a listening engine "
          f"fixed {fixed_http}, backoff {http}; port probes while nothing listens (refused by the kernel) "
          f"fixed {fixed_port}, backoff {port}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="router-swap-bench-"))
    results = asyncio.run(measure(workdir, args.swaps))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nlogs: {workdir}")


if __name__ == "__main__":
    main()
