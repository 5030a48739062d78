"""The driver of one scheduler lane: applies events to its scheduler and carries out the actions.

A lane is the exclusive slot of a GPU group (all its backends without ``co_reside``), or one
co-resident backend (``lane_layout``). Events are applied only here, on the event loop thread,
through ``apply``; swaps (``swap.Swapper``) run as tasks that report back with an event. No locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp

from .config import BackendSpec, GroupSpec, ModelSpec, RouterConfig
from .control import ControlError, UnitController, make_controller
from .engines import make_engine
from .metrics import Metrics
from .scheduler import (
    Action,
    CutInFlight,
    Grant,
    GroupScheduler,
    LaneState,
    Phase,
    QueueFull,
    QueueTimeout,
    Reject,
    RouterStopping,
    StartLoad,
    StartUnload,
    Waiter,
)
from .swap import BackendRuntime, SwapError, Swapper, SwapRecord
from .vram import VramProbe

__all__ = ["Lane", "LoadFailed", "SwapError", "Ticket", "build_lanes", "lane_layout"]

log = logging.getLogger("llmstack_router.group")


class LoadFailed(RuntimeError):
    """The model could not be made ready; the message is for the client (503)."""


class Ticket:
    """A request's place in a lane: wait on ``future``, then ``close()`` exactly once (finally).

    ``cut`` is set (with the reason) when the drain deadline cut the request: its task is then
    cancelled, and the handler answers with an error event instead of dying silently."""

    def __init__(self, lane: Lane, waiter: Waiter, future: asyncio.Future[int]) -> None:
        self.lane, self.waiter, self.future = lane, waiter, future
        self.task = asyncio.current_task()
        self.closed = False
        self.cut: str | None = None

    def result(self) -> int:
        return self.future.result()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.lane.futures.pop(self.waiter, None)
        self.lane.serving.pop(self.waiter, None)
        if not self.future.done():
            self.future.cancel()
        self.lane.cancel(self.waiter)


class Lane:
    def __init__(self, name: str, group: GroupSpec, backends: list[BackendSpec], config: RouterConfig,
                 session: aiohttp.ClientSession, probe: VramProbe, metrics: Metrics,
                 held_elsewhere: Callable[[Lane], int] = lambda lane: 0) -> None:
        self.name = name
        self.group = group
        self.config = config
        self.loop = asyncio.get_running_loop()
        # The scheduler: read here, written only through its event methods, only from ``apply``'s callers.
        self.core = GroupScheduler(name, queue_size=group.queue_size, min_residency_s=group.min_residency_s,
                                   idle_ttl_s=group.idle_ttl_s, drain_timeout_s=group.drain_timeout_s,
                                   queue_max_wait_s=group.queue_max_wait_s)
        self.backends: dict[str, BackendRuntime] = {
            b.name: BackendRuntime(b, make_controller(b, config, lambda code, name=b.name: self._exited(name, code)),
                                   make_engine(b, session))
            for b in backends}
        self.models: dict[str, ModelSpec] = {m.id: m for b in backends for m in b.models}
        self.swapper = Swapper(name, group, config, probe, metrics, self.backends, self.models,
                               lambda: held_elsewhere(self), self.now)
        # Queued tickets (granted: moved to ``serving``, which the drain deadline cuts).
        self.futures: dict[Waiter, Ticket] = {}
        self.serving: dict[Waiter, Ticket] = {}
        self.history: deque[SwapRecord] = deque(maxlen=20)
        self.tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def now(self) -> float:
        return self.loop.time()

    def snapshot(self) -> LaneState:
        return self.core.snapshot()

    # ---- the only place scheduler actions are carried out --------------------------------

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Grant):
                ticket = self.futures.pop(action.waiter, None)
                # A future already cancelled means its client left; Ticket.close() (always run
                # by the handler) releases the grant, so nothing to hand back here.
                if ticket is not None and not ticket.future.done():
                    ticket.future.set_result(action.epoch)
                    self.serving[action.waiter] = ticket
            elif isinstance(action, Reject):
                ticket = self.futures.pop(action.waiter, None)
                if ticket is not None and not ticket.future.done():
                    error: Exception = (QueueTimeout(action.retry_after_s or 1, action.error) if action.timed_out
                                        else QueueFull(action.retry_after_s) if action.retry_after_s is not None
                                        else LoadFailed(action.error))
                    ticket.future.set_exception(error)
            elif isinstance(action, CutInFlight):
                self._cut(action)
            elif isinstance(action, StartLoad):
                self._spawn(self._load(action.target, action.previous))
            elif isinstance(action, StartUnload):
                self._spawn(self._unload(action.model))
        self._arm_timer()

    def _cut(self, action: CutInFlight) -> None:
        log.warning(action.reason, extra={"lane": self.name})
        for waiter, ticket in list(self.serving.items()):
            if waiter.granted_epoch == action.epoch:
                # The scheduler forgot this grant (epoch+1): a later close must release nothing.
                waiter.granted_epoch = None
                del self.serving[waiter]
                ticket.cut = action.reason
                if ticket.task is not None:
                    ticket.task.cancel()

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

    # ---- events from requests ------------------------------------------------------------

    def enqueue(self, model_id: str) -> Ticket:
        waiter = Waiter(model_id, self.now())
        future: asyncio.Future[int] = self.loop.create_future()
        ticket = Ticket(self, waiter, future)
        self.futures[waiter] = ticket
        self.apply(self.core.acquire(waiter, self.now()))
        return ticket

    def cancel(self, waiter: Waiter) -> None:
        self.apply(self.core.cancel(waiter, self.now()))

    def request_unload(self) -> None:
        self.apply(self.core.request_unload(self.now()))

    # ---- events from backends ------------------------------------------------------------

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

    # ---- actions that take time: run by the swapper, reported back as events -------------

    async def _load(self, target_id: str, previous_id: str | None) -> None:
        record, active_after = await self.swapper.load(target_id, previous_id)
        self.history.append(record)
        self.apply(self.core.load_finished(target_id, record.error, active_after, self.now(),
                                           took_s=record.duration_s))

    async def _unload(self, model_id: str) -> None:
        error = await self.swapper.unload(model_id)
        self.apply(self.core.unload_finished(error, self.now()))

    # ---- start-up and shutdown -----------------------------------------------------------

    async def adopt_running(self) -> None:
        """After a router restart, keep a model that is already up instead of reloading it."""
        model_id = await self.swapper.survey()
        if model_id is not None and self.core.phase == Phase.IDLE:
            # Through apply: it arms the timer, so the idle TTL counts from the adoption.
            self.apply(self.core.adopt(model_id, self.now()))
            log.info("adopted running model %s", model_id, extra={"lane": self.name})

    def refuse_queued(self, message: str) -> None:
        """Shutdown begins: every queued request gets its answer now (the handlers' Ticket.close() then
        takes them out of the scheduler); requests in flight go on until the server's shutdown timeout."""
        for ticket in list(self.futures.values()):
            if not ticket.future.done():
                ticket.future.set_exception(RouterStopping(1, message))

    async def shutdown(self) -> None:
        await self.swapper.shutdown()
        for task in list(self.tasks):
            task.cancel()

    def reconfigure(self, group: GroupSpec) -> None:
        """SIGHUP (reload.py): new scheduling settings; requests queued and in flight stay."""
        self.group = self.swapper.group = group  # the swapper reads the VRAM settings from it
        core = self.core
        core.queue_size, core.min_residency_s = group.queue_size, group.min_residency_s
        core.idle_ttl_s = group.idle_ttl_s
        core.drain_timeout_s, core.queue_max_wait_s = group.drain_timeout_s, group.queue_max_wait_s
        self.apply(core.tick(self.now()))

    def status(self) -> dict[str, Any]:
        state = self.snapshot()
        return {
            "lane": self.name,
            "group": self.group.name,
            "state": state.phase.value,
            "loaded_model": state.loaded,
            "loading_model": state.target,
            "queue_depth": state.queue_depth,
            "in_flight": state.in_flight,
            "swaps": state.swaps,
            "last_error": state.last_error,
            "models": sorted(self.models),
            "backends": {name: runtime.engine.status() for name, runtime in self.backends.items()
                         if runtime.engine.status()},
            # systemd's view of each unit backend as last seen: a start-limit-hit shows here.
            "units": {name: runtime.controller.status() for name, runtime in self.backends.items()
                      if isinstance(runtime.controller, UnitController) and runtime.controller.status()},
            "last_swaps": [r.as_dict() for r in list(self.history)[-5:]],
        }


def lane_layout(config: RouterConfig) -> list[tuple[str, GroupSpec, list[BackendSpec]]]:
    """Which lanes the config makes: per group, one for its exclusive backends, one per co-resident one."""
    layout: list[tuple[str, GroupSpec, list[BackendSpec]]] = []
    for group in config.groups.values():
        members = [b for b in config.backends.values() if b.group == group.name]
        exclusive = [b for b in members if not b.co_reside]
        if exclusive:
            layout.append((group.name, group, exclusive))
        layout += [(f"{group.name}/{b.name}", group, [b]) for b in members if b.co_reside]
    return layout


def build_lanes(config: RouterConfig, session: aiohttp.ClientSession, probe: VramProbe, metrics: Metrics,
                held_elsewhere: Callable[[Lane], int]) -> list[Lane]:
    return [Lane(name, group, backends, config, session, probe, metrics, held_elsewhere)
            for name, group, backends in lane_layout(config)]
