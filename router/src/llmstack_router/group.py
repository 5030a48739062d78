"""The driver of one scheduler lane: turns scheduler actions into swaps and answers waiters.

A lane is the exclusive slot of a GPU group (all its backends without ``co_reside``), or one
co-resident backend. All scheduler events are applied here, on the event loop thread, through
``_apply``; swaps run as tasks that report back with an event. No locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import engines
from .config import BackendSpec, GroupSpec, ModelSpec, RouterConfig, UnitControl
from .control import CommandController, ControlError, Controller, ExternalController, UnitController
from .metrics import Metrics
from .scheduler import Action, Grant, GroupScheduler, Phase, QueueFull, Reject, StartLoad, StartUnload, Waiter
from .vram import VramProbe, VramProbeError

log = logging.getLogger("llmstack_router.group")


class SwapError(RuntimeError):
    def __init__(self, message: str, active_after: str | None) -> None:
        super().__init__(message)
        self.active_after = active_after


class LoadFailed(RuntimeError):
    """The model could not be made ready; the message is for the client (503)."""


@dataclass
class BackendRuntime:
    spec: BackendSpec
    controller: Controller
    # True until we know the backend is down; the lane stops such backends before starting
    # another one, which keeps "one member up" true after a router restart too.
    maybe_running: bool = True
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


class Ticket:
    """A request's place in a lane: wait on ``future``, then ``close()`` exactly once (finally)."""

    def __init__(self, lane: Lane, waiter: Waiter, future: asyncio.Future[int]) -> None:
        self.lane, self.waiter, self.future = lane, waiter, future
        self.closed = False

    def result(self) -> int:
        return self.future.result()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.lane.futures.pop(self.waiter, None)
        if not self.future.done():
            self.future.cancel()
        self.lane.apply(self.lane.core.cancel(self.waiter, self.lane.now()))


class Lane:
    def __init__(self, name: str, group: GroupSpec, backends: list[BackendSpec], config: RouterConfig,
                 session: aiohttp.ClientSession, probe: VramProbe, metrics: Metrics,
                 held_elsewhere: Callable[[Lane], int] = lambda lane: 0) -> None:
        self.name = name
        self.group = group
        self.config = config
        self.session = session
        self.probe = probe
        self.metrics = metrics
        self.held_elsewhere = held_elsewhere
        self.loop = asyncio.get_running_loop()
        self.core = GroupScheduler(name, queue_size=group.queue_size, min_residency_s=group.min_residency_s,
                                   idle_ttl_s=group.idle_ttl_s)
        self.backends: dict[str, BackendRuntime] = {b.name: BackendRuntime(b, self._controller(b)) for b in backends}
        self.models: dict[str, ModelSpec] = {m.id: m for b in backends for m in b.models}
        self.futures: dict[Waiter, asyncio.Future[int]] = {}
        self.history: deque[SwapRecord] = deque(maxlen=20)
        self.tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def _controller(self, spec: BackendSpec) -> Controller:
        control = spec.control
        if control is None:
            return ExternalController()
        if isinstance(control, UnitControl):
            return UnitController(control, self.config.systemctl, self.config.journalctl)
        return CommandController(control, spec.name, on_exit=lambda code, name=spec.name: self._exited(name, code))

    def now(self) -> float:
        return self.loop.time()

    # ---- the only place scheduler events are applied -------------------------------------

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Grant):
                future = self.futures.pop(action.waiter, None)
                # A future already cancelled means its client left; Ticket.close() (always run
                # by the handler) releases the grant, so nothing to hand back here.
                if future is not None and not future.done():
                    future.set_result(action.epoch)
            elif isinstance(action, Reject):
                future = self.futures.pop(action.waiter, None)
                if future is not None and not future.done():
                    error: Exception = (QueueFull(action.retry_after_s) if action.retry_after_s is not None
                                        else LoadFailed(action.error))
                    future.set_exception(error)
            elif isinstance(action, StartLoad):
                self._spawn(self._load(action.target, action.previous))
            elif isinstance(action, StartUnload):
                self._spawn(self._unload(action.model))
        self._arm_timer()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _arm_timer(self) -> None:
        wake = self.core.next_wake()
        if wake == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, wake
        if wake is not None:
            self._timer = self.loop.call_at(max(wake, self.now()) + 0.001, self._tick)

    def _tick(self) -> None:
        self._timer, self._timer_at = None, None
        self.apply(self.core.tick(self.now()))

    # ---- request side --------------------------------------------------------------------

    def enqueue(self, model_id: str) -> Ticket:
        waiter = Waiter(model_id, self.now())
        future: asyncio.Future[int] = self.loop.create_future()
        self.futures[waiter] = future
        ticket = Ticket(self, waiter, future)
        self.apply(self.core.acquire(waiter, self.now()))
        return ticket

    def request_unload(self) -> None:
        self.apply(self.core.request_unload(self.now()))

    def _exited(self, backend_name: str, code: int) -> None:
        active = self.core.active
        if active is not None and self.models[active].backend == backend_name:
            reason = f"backend {backend_name} exited with code {code} while serving {active}"
            log.warning(reason, extra={"lane": self.name, "backend": backend_name})
            # maybe_running stays True: leftovers of its process group are stopped before a restart.
            self.apply(self.core.backend_lost(active, reason, self.now()))

    def upstream_failed(self, model_id: str) -> None:
        """A request saw a broken connection: ask the controller whether the backend died."""
        backend = self.backends[self.models[model_id].backend]

        async def check() -> None:
            with contextlib.suppress(ControlError, OSError):
                failure = await backend.controller.failure()
                if failure is not None:
                    self.apply(self.core.backend_lost(model_id, failure, self.now()))

        self._spawn(check())

    # ---- swaps ---------------------------------------------------------------------------

    async def _load(self, target_id: str, previous_id: str | None) -> None:
        record = SwapRecord(self.name, previous_id, target_id, self.now())
        target = self.models[target_id]
        previous = self.models[previous_id] if previous_id else None
        try:
            active_after = await self._swap(target, previous, record)
            error = None
        except SwapError as exc:
            error, active_after = str(exc), exc.active_after
        except Exception as exc:  # a bug must not leave the lane stuck in LOADING
            log.exception("swap to %s crashed", target_id, extra={"lane": self.name})
            error, active_after = f"internal error while loading {target_id}: {exc!r}", None
        record.duration_s = self.now() - record.started
        record.error = error
        self.history.append(record)
        self.metrics.swaps.inc(self.name, "ok" if error is None else "error")
        self.metrics.swap_seconds.observe(record.duration_s, self.name)
        if error is None:
            self.core.retry_after_s = max(1, math.ceil(record.duration_s))
        log.info("swap %s -> %s %s in %.3fs", previous_id, target_id, "ok" if error is None else "FAILED",
                 record.duration_s, extra={"lane": self.name, "swap": record.as_dict()})
        self.apply(self.core.load_finished(target_id, error, active_after, self.now()))

    async def _swap(self, target: ModelSpec, previous: ModelSpec | None, record: SwapRecord) -> str:
        backend = self.backends[target.backend]
        if previous is not None and previous.backend == target.backend:
            # Same process: TabbyAPI switches through its admin API; ollama/openai load lazily.
            started = self.now()
            if backend.spec.engine == "tabbyapi":
                await self._tabby_switch(backend, target, previous.id)
            await self._wait_ready(backend, target, previous.id)
            record.start_to_ready_s = self.now() - started
            return target.id
        await self._preflight(target, previous)
        for other in self.backends.values():
            if other is not backend and other.maybe_running:
                began = self.now()
                await self._stop(other, previous.id if previous else None)
                record.stop_s += self.now() - began
                began = self.now()
                await self._await_vram_back(other, target)
                record.vram_wait_s += self.now() - began
        if backend.spec.engine == "tabbyapi" and backend.spec.tabby_config:
            try:
                engines.persist_tabby_model(backend.spec.tabby_config, target.served_name)
            except OSError as exc:
                raise SwapError(f"cannot write {backend.spec.tabby_config}: {exc}", None) from exc
        started = self.now()
        if not backend.maybe_running:
            backend.free_before_start = await self._free_mib()
        record.start_called_at = time.time()
        try:
            await backend.controller.start()
        except ControlError as exc:
            raise SwapError(f"cannot start backend {backend.spec.name} for {target.id}: {exc}", None) from exc
        backend.maybe_running = True
        try:
            if backend.spec.engine == "tabbyapi":
                await self._wait_health(backend, target)
                current = await engines.tabby_current_model(self.session, backend.spec)
                if current != target.served_name:
                    await self._tabby_switch(backend, target, None)
            await self._wait_ready(backend, target, None)
        except SwapError as exc:
            logs = await backend.controller.last_logs(20)
            with contextlib.suppress(ControlError, OSError):
                await backend.controller.stop(backend.spec.stop_timeout_s)
                backend.maybe_running = False
            raise SwapError(f"{exc}\n--- last log lines of {backend.spec.name} ({backend.controller.description}) "
                            f"---\n{logs}", None) from exc
        record.start_to_ready_s = self.now() - started
        record.ready_at = time.time()
        return target.id

    async def _tabby_switch(self, backend: BackendRuntime, target: ModelSpec, previous_id: str | None) -> None:
        try:
            await engines.tabby_load(self.session, backend.spec, target, backend.spec.ready_timeout_s)
        except (engines.EngineError, aiohttp.ClientError, TimeoutError) as exc:
            raise SwapError(f"TabbyAPI {backend.spec.name} could not switch to {target.id}: {exc}",
                            previous_id) from exc
        if backend.spec.tabby_config:
            try:
                engines.persist_tabby_model(backend.spec.tabby_config, target.served_name)
            except OSError as exc:
                log.error("loaded %s but could not persist it in %s: %s", target.id, backend.spec.tabby_config, exc)

    async def _poll(self, backend: BackendRuntime, target: ModelSpec, check: Callable[[], Any], what: str,
                    active_on_failure: str | None) -> None:
        deadline = self.now() + backend.spec.ready_timeout_s
        spawned = isinstance(backend.controller, CommandController)
        next_failure_check = self.now() + (0.0 if spawned else 1.0)
        while True:
            if await check():
                return
            if self.now() >= next_failure_check:
                failure = await backend.controller.failure()
                if failure is not None:
                    raise SwapError(f"backend {backend.spec.name} failed while loading {target.id}: {failure}",
                                    active_on_failure)
                next_failure_check = self.now() + (0.0 if spawned else 1.0)
            if self.now() >= deadline:
                raise SwapError(f"backend {backend.spec.name} not {what} for {target.id} after "
                                f"{backend.spec.ready_timeout_s:.0f}s (ready_timeout_s)", active_on_failure)
            await asyncio.sleep(self.config.ready_poll_interval_s)

    async def _wait_ready(self, backend: BackendRuntime, target: ModelSpec, active_on_failure: str | None) -> None:
        await self._poll(backend, target, lambda: engines.is_ready(self.session, backend.spec, target),
                         "ready", active_on_failure)

    async def _wait_health(self, backend: BackendRuntime, target: ModelSpec) -> None:
        async def healthy() -> bool:
            try:
                status, _body = await engines._get(self.session, backend.spec, "/health")
            except (aiohttp.ClientError, TimeoutError, OSError):
                return False
            return status == 200

        await self._poll(backend, target, healthy, "healthy", None)

    async def _stop(self, backend: BackendRuntime, active_id: str | None) -> None:
        try:
            await backend.controller.stop(backend.spec.stop_timeout_s)
        except (ControlError, OSError) as exc:
            raise SwapError(f"cannot stop backend {backend.spec.name}: {exc}", None) from exc
        backend.maybe_running = False

    async def _free_mib(self) -> int | None:
        try:
            return await self.probe.free_mib(self.group.gpus)
        except VramProbeError as exc:
            log.warning("VRAM probe failed: %s", exc, extra={"lane": self.name})
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
            available = self.group.vram_mib - self.held_elsewhere(self)
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
                            f"{free + reclaimable} MiB ({free} MiB free now + {reclaimable} MiB held by "
                            f"{previous.id if previous else 'nothing we manage'}); not swapping", active_after)

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

    async def _unload(self, model_id: str) -> None:
        backend = self.backends[self.models[model_id].backend]
        error = None
        try:
            await self._stop(backend, model_id)
        except SwapError as exc:
            error = str(exc)
        log.info("unloaded %s", model_id, extra={"lane": self.name, "error": error})
        self.apply(self.core.unload_finished(error, self.now()))

    # ---- start-up and shutdown -----------------------------------------------------------

    async def adopt_running(self) -> None:
        """After a router restart, keep a model that is already up instead of reloading it."""
        for runtime in self.backends.values():
            if isinstance(runtime.controller, CommandController):
                runtime.maybe_running = False
                continue
            for model in runtime.spec.models:
                if await engines.is_ready(self.session, runtime.spec, model):
                    if self.core.phase == Phase.IDLE:
                        self.core.adopt(model.id, self.now())
                        log.info("adopted running model %s", model.id, extra={"lane": self.name})
                    break
            else:
                if isinstance(runtime.controller, ExternalController):
                    runtime.maybe_running = False

    async def shutdown(self) -> None:
        for runtime in self.backends.values():
            if isinstance(runtime.controller, CommandController):
                with contextlib.suppress(ControlError, OSError):
                    await runtime.controller.stop(min(runtime.spec.stop_timeout_s, 10.0))
        for task in list(self.tasks):
            task.cancel()

    def status(self) -> dict[str, Any]:
        core = self.core
        return {
            "lane": self.name,
            "group": self.group.name,
            "state": core.phase.value,
            "loaded_model": core.active if core.phase in (Phase.READY, Phase.DRAINING, Phase.UNLOADING) else None,
            "loading_model": core.target,
            "queue_depth": core.queue_depth(),
            "in_flight": core.in_flight,
            "swaps": core.swaps,
            "last_error": core.last_error,
            "models": sorted(self.models),
            "last_swaps": [r.as_dict() for r in list(self.history)[-5:]],
        }
