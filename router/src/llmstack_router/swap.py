"""The swap procedure: everything between the scheduler's StartLoad/StartUnload and its
load_finished/unload_finished event. Pre-flight (VRAM), stop the others, wait for the VRAM
back, start, wait until loaded, or switch in place; and the start-up survey of what is up.

``Swapper`` is the one writer of every mutable ``BackendRuntime`` field. It never touches the
scheduler: the lane (group.py) turns what it returns into events.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .config import BackendSpec, GroupSpec, ModelSpec, RouterConfig
from .control import CommandController, ControlError, Controller, ExternalController, UnitController
from .engine_base import Check, Engine, EngineError, WaitFor
from .metrics import Metrics
from .vram import VramProbe, VramProbeError

log = logging.getLogger("llmstack_router.group")


def poll_delays(first_s: float, cap_s: float) -> Iterator[float]:
    """Sleeps between readiness probes: ``first_s``, doubling, then ``cap_s`` for ever.

    Defaults 1 ms and 25 ms: 1, 2, 4, 8, 16, 25, 25, ... ms, so a fast engine is seen within about
    as long again as it took, and one that loads for minutes is probed at the fixed rate it always
    was (9,604 probes over 4 minutes instead of 9,600). ``first_s == cap_s`` is the fixed period."""
    delay = first_s
    while True:
        yield min(delay, cap_s)
        delay *= 2


def watch_delay(waited_s: float, first_s: float, cap_s: float) -> float:
    """Sleep between port probes while nothing listens: 0.1% of the wait so far, within [first_s, cap_s].

    At the defaults about 1,000 refused connects in the first second, 3,200 more up to 25 s, then
    one per cap: about 12,800 over 4 minutes, each ~30 us of router CPU (a failed HTTP probe costs
    ~10 times that); the engine sees none of them."""
    return min(cap_s, max(first_s, waited_s / 1000))


async def _loopback_address(url: str) -> tuple[int, Any] | None:
    """Family and address of a backend URL on this host (loopback), for the port probe; None: no
    port probe (a remote host answers a connect only after a round trip: HTTP probes alone)."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        if not parts.hostname or not port:
            return None
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError):
        return None
    for family, _type, _proto, _name, sockaddr in infos:
        if ipaddress.ip_address(sockaddr[0]).is_loopback:
            return family, sockaddr
    return None


def _listens(address: tuple[int, Any]) -> bool:
    """Whether something may listen at a loopback ``address``; never waits. The kernel completes
    or refuses a loopback connect inside the call; a connect still pending (a full backlog)
    counts as listening: the real probe decides then."""
    family, sockaddr = address
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        sock.connect_ex(sockaddr)
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not poller.poll(0):
            return True
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != errno.ECONNREFUSED


class SwapError(RuntimeError):
    def __init__(self, message: str, active_after: str | None) -> None:
        super().__init__(message)
        self.active_after = active_after


@dataclass
class BackendRuntime:
    """One backend of a lane. ``spec``, ``controller`` and ``engine`` are set once (Lane.__init__)."""

    spec: BackendSpec
    controller: Controller
    engine: Engine
    # True until we know the backend is down; the lane stops such backends before starting
    # another one, which keeps "one member up" true after a router restart too.
    # Writer: Swapper (_start, _stop, survey).
    maybe_running: bool = True
    # Free VRAM just before this backend was last started: what it should give back on stop.
    # Writer: Swapper._start.
    free_before_start: int | None = None


@dataclass
class SwapRecord:
    lane: str
    from_model: str | None
    to_model: str
    started: float
    duration_s: float = 0.0
    stop_s: float = 0.0
    vram_wait_s: float = 0.0
    start_to_ready_s: float = 0.0
    start_called_at: float = 0.0  # wall clock, so benchmarks can line it up with the backend's own log
    ready_at: float = 0.0
    error: str | None = None
    wall_time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        wall = ("start_called_at", "ready_at", "wall_time")
        return {k: (round(v, 4) if isinstance(v, float) and k not in wall else v)
                for k, v in self.__dict__.items() if k != "started"}


class Swapper:
    """Carries out one lane's swaps. Runs as tasks of the lane; at most one at a time (the
    scheduler's invariant 1), so no two of its methods write a runtime at once."""

    def __init__(self, lane: str, group: GroupSpec, config: RouterConfig, probe: VramProbe, metrics: Metrics,
                 backends: dict[str, BackendRuntime], models: dict[str, ModelSpec],
                 held_elsewhere: Callable[[], int], now: Callable[[], float]) -> None:
        self.lane = lane
        self.group = group
        self.config = config
        self.probe = probe
        self.metrics = metrics
        self.backends = backends
        self.models = models
        self.held_elsewhere = held_elsewhere
        self.now = now

    # ---- load / unload (what the lane calls) ---------------------------------------------

    async def load(self, target_id: str, previous_id: str | None) -> tuple[SwapRecord, str | None]:
        """Make ``target_id`` serve; returns the record (``error`` set on failure) and what is up after."""
        record = SwapRecord(self.lane, previous_id, target_id, self.now())
        target = self.models[target_id]
        previous = self.models[previous_id] if previous_id else None
        try:
            active_after = await self._swap(target, previous, record)
            error = None
        except SwapError as exc:
            error, active_after = str(exc), exc.active_after
        except Exception as exc:  # a bug must not leave the lane stuck in LOADING
            log.exception("swap to %s crashed", target_id, extra={"lane": self.lane})
            error, active_after = f"internal error while loading {target_id}: {exc!r}", None
        record.duration_s = self.now() - record.started
        record.error = error
        self.metrics.swaps.inc(self.lane, "ok" if error is None else "error")
        self.metrics.swap_seconds.observe(record.duration_s, self.lane)
        log.info("swap %s -> %s %s in %.3fs", previous_id, target_id, "ok" if error is None else "FAILED",
                 record.duration_s, extra={"lane": self.lane, "swap": record.as_dict()})
        return record, active_after

    async def unload(self, model_id: str) -> str | None:
        """Stop ``model_id``'s backend; returns the error, if any."""
        backend = self.backends[self.models[model_id].backend]
        error = None
        try:
            await self._stop(backend)
        except SwapError as exc:
            error = str(exc)
        log.info("unloaded %s", model_id, extra={"lane": self.lane, "error": error})
        return error

    async def survey(self) -> str | None:
        """After a router restart: which model is already up (to adopt instead of reloading)."""
        adopted = None
        for runtime in self.backends.values():
            if isinstance(runtime.controller, CommandController):
                runtime.maybe_running = False  # a spawned backend died with the previous router
                continue
            for model in runtime.spec.models:
                if await runtime.engine.is_loaded(model):
                    adopted = adopted or model.id
                    break
            else:
                if isinstance(runtime.controller, ExternalController):
                    runtime.maybe_running = False
        return adopted

    async def shutdown(self) -> None:
        for runtime in self.backends.values():
            if isinstance(runtime.controller, CommandController):
                with contextlib.suppress(ControlError, OSError):
                    await runtime.controller.stop(min(runtime.spec.stop_timeout_s, 10.0))

    # ---- the sequence --------------------------------------------------------------------

    async def _swap(self, target: ModelSpec, previous: ModelSpec | None, record: SwapRecord) -> str:
        backend = self.backends[target.backend]
        if previous is not None and previous.backend == target.backend:
            # Same process: the engine switches in place (TabbyAPI) or loads lazily (ollama, openai).
            started = self.now()
            try:
                await backend.engine.switch(target, previous, self._waiter(backend, target, previous.id))
            except EngineError as exc:
                raise SwapError(str(exc), previous.id if exc.previous_kept else None) from exc
            record.start_to_ready_s = self.now() - started
            return target.id
        await self._preflight(target, previous)
        for other in self.backends.values():
            if other is not backend and other.maybe_running:
                began = self.now()
                await self._stop(other)
                record.stop_s += self.now() - began
                began = self.now()
                await self._await_vram_back(other, target)
                record.vram_wait_s += self.now() - began
        try:
            backend.engine.prepare_start(target)
        except EngineError as exc:
            raise SwapError(str(exc), None) from exc
        started = self.now()
        await self._start(backend, target, record)
        record.start_to_ready_s = self.now() - started
        record.ready_at = time.time()
        return target.id

    async def _start(self, backend: BackendRuntime, target: ModelSpec, record: SwapRecord) -> None:
        if not backend.maybe_running:
            backend.free_before_start = await self._free_mib()
        record.start_called_at = time.time()
        try:
            await backend.controller.start()
        except ControlError as exc:
            raise SwapError(f"cannot start backend {backend.spec.name} for {target.id}: {exc}", None) from exc
        backend.maybe_running = True
        try:
            try:
                await backend.engine.load(target, self._waiter(backend, target, None))
            except EngineError as exc:
                raise SwapError(str(exc), None) from exc
        except SwapError as exc:
            logs = await backend.controller.last_logs(20)
            with contextlib.suppress(ControlError, OSError):
                await backend.controller.stop(backend.spec.stop_timeout_s)
                backend.maybe_running = False
            raise SwapError(f"{exc}\n--- last log lines of {backend.spec.name} ({backend.controller.description}) "
                            f"---\n{logs}", None) from exc

    def _waiter(self, backend: BackendRuntime, target: ModelSpec, active_on_failure: str | None) -> WaitFor:
        async def wait(check: Check, what: str) -> None:
            await self._poll(backend, target, check, what, active_on_failure)

        return wait

    async def _poll(self, backend: BackendRuntime, target: ModelSpec, check: Check, what: str,
                    active_on_failure: str | None) -> None:
        """Wait until ``check`` (the engine's real readiness probe, the only decider) is true.

        While nothing listens on the backend's port, the wait probes only the port (a loopback TCP
        connect the kernel refuses; the engine sees nothing), every ``watch_delay`` (1 ms, then 0.1%
        of the wait so far, capped at ready_poll_interval_s). Once the port accepts, and again when a
        unit turns ``active`` (systemd's READY=1 for Type=notify units; read from the
        ``systemctl show`` the failure check runs anyway, once a second), the real probe runs at
        once and then after ``poll_delays``: ready_poll_first_s (1 ms), doubling, capped at
        ready_poll_interval_s (25 ms). Over a 4-minute load that is 4 probes more than the fixed
        period alone (9,600 at 25 ms): the load on a slow engine stays today's."""
        first, cap = self.config.ready_poll_first_s, self.config.ready_poll_interval_s
        began = self.now()
        deadline = began + backend.spec.ready_timeout_s
        spawned = isinstance(backend.controller, CommandController)
        unit = backend.controller if isinstance(backend.controller, UnitController) else None
        next_failure_check = began + (0.0 if spawned else 1.0)
        address = await _loopback_address(backend.spec.url)
        listening = address is None
        was_active = unit is not None and unit.last_state.get("ActiveState") == "active"
        delays = poll_delays(first, cap)
        while True:
            if not listening and _listens(address):
                listening, delays = True, poll_delays(first, cap)
            if listening and await check():
                return
            if self.now() >= next_failure_check:
                failure = await backend.controller.failure(loading=True)
                if failure is not None:
                    raise SwapError(f"backend {backend.spec.name} failed while loading {target.id}: {failure}",
                                    active_on_failure)
                next_failure_check = self.now() + (0.0 if spawned else 1.0)
                if unit is not None and not was_active and unit.last_state.get("ActiveState") == "active":
                    was_active, listening, delays = True, True, poll_delays(first, cap)
                    continue  # READY=1 (or, for other unit types, the start job done): probe now
            if self.now() >= deadline:
                raise SwapError(f"backend {backend.spec.name} not {what} for {target.id} after "
                                f"{backend.spec.ready_timeout_s:.0f}s (ready_timeout_s)", active_on_failure)
            await asyncio.sleep(next(delays) if listening else watch_delay(self.now() - began, first, cap))

    async def _stop(self, backend: BackendRuntime) -> None:
        try:
            await backend.controller.stop(backend.spec.stop_timeout_s)
        except (ControlError, OSError) as exc:
            raise SwapError(f"cannot stop backend {backend.spec.name}: {exc}", None) from exc
        backend.maybe_running = False

    # ---- VRAM ----------------------------------------------------------------------------

    async def _free_mib(self) -> int | None:
        """Free MiB of the group's tightest GPU (vram.py): every figure below is per GPU, as a
        model's ``vram_mib`` is what it needs on each GPU of its group."""
        try:
            return await self.probe.free_mib(self.group.gpus)
        except VramProbeError as exc:
            log.warning("VRAM probe failed: %s", exc, extra={"lane": self.lane})
            return None

    async def _preflight(self, target: ModelSpec, previous: ModelSpec | None) -> None:
        need = target.vram_mib
        if need is None:
            return
        active_after = previous.id if previous else None
        free = await self._free_mib()
        if free is None:
            if self.group.vram_mib is None:
                return
            available = self.group.vram_mib - self.held_elsewhere()
            if need > available:
                raise SwapError(f"model {target.id} needs {need} MiB but GPU group {self.group.name} has "
                                f"{self.group.vram_mib} MiB and co-resident backends hold "
                                f"{self.group.vram_mib - available} MiB (groups.{self.group.name}.vram_mib)",
                                active_after)
            return
        reclaimable = 0
        for runtime in self.backends.values():
            if runtime.maybe_running and runtime.spec.name != target.backend:
                declared = [m.vram_mib for m in runtime.spec.models if m.id == (previous.id if previous else None)]
                if declared and declared[0] is not None:
                    reclaimable += declared[0]
                elif runtime.free_before_start is not None:
                    reclaimable += max(0, runtime.free_before_start - free)
        if free + reclaimable < need:
            raise SwapError(f"model {target.id} needs {need} MiB but GPU group {self.group.name} can free at most "
                            f"{free + reclaimable} MiB on its tightest GPU ({free} MiB free now + {reclaimable} MiB "
                            f"held by {previous.id if previous else 'nothing we manage'}); not swapping", active_after)

    async def _await_vram_back(self, stopped: BackendRuntime, target: ModelSpec) -> None:
        baseline = stopped.free_before_start
        if baseline is None and target.vram_mib is None:
            return
        wanted = max(target.vram_mib or 0, (baseline or 0) - self.group.vram_release_slack_mib)
        deadline = self.now() + self.group.vram_release_timeout_s
        while True:
            free = await self._free_mib()
            if free is None or free >= wanted:
                return
            if self.now() >= deadline:
                raise SwapError(f"VRAM not released {self.group.vram_release_timeout_s:.0f}s after stopping "
                                f"{stopped.spec.name}: {free} MiB free, need {wanted} MiB "
                                f"(a process outside the unit may hold it; see nvidia-smi)", None)
            await asyncio.sleep(0.1)
