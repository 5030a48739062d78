"""The per-GPU-group state machine: pure, synchronous, no I/O, time passed in.

Every event method mutates the state and returns the actions the driver (``group.py``) must
carry out. Nothing else mutates a ``GroupScheduler``; that is the "one owner of state" rule that
design.md states, and what lets the unit tests drive it with a fake clock.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    IDLE = "idle"            # nothing of this group is up
    LOADING = "loading"      # a swap to `target` runs (stop previous, start, wait ready)
    READY = "ready"          # `active` is up and admits requests
    DRAINING = "draining"    # `active` admits no new request; waits for in-flight to finish
    UNLOADING = "unloading"  # `active` is being stopped (idle TTL or admin unload)


class QueueFull(Exception):
    code = "queue_full"  # the OpenAI-shaped error's code

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(message or f"queue full, retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class QueueTimeout(QueueFull):
    """A queued request waited ``queue_max_wait_s``: 503 with Retry-After, like a full queue."""


class RouterStopping(QueueFull):
    """The router is stopping (SIGTERM, a restart): a queued request is answered 503 with Retry-After at
    once, instead of waiting out the shutdown timeout and then losing its connection without an answer."""

    code = "router_restarting"


@dataclass(eq=False)
class Waiter:
    """One request waiting for its model; the driver attaches a future to it."""

    model: str
    enqueued_at: float
    ticket: int = field(default_factory=itertools.count().__next__)
    granted_epoch: int | None = None


@dataclass(frozen=True)
class Grant:
    waiter: Waiter
    epoch: int


@dataclass(frozen=True)
class Reject:
    waiter: Waiter
    error: str
    retry_after_s: int | None = None
    timed_out: bool = False  # waited queue_max_wait_s (else: queue full, or the load failed)


@dataclass(frozen=True)
class CutInFlight:
    """The drain deadline passed: every request granted in ``epoch`` is cut with ``reason``.
    The scheduler has already forgotten them (epoch+1), so the swap goes on at once."""

    epoch: int
    reason: str


@dataclass(frozen=True)
class StartLoad:
    target: str
    previous: str | None


@dataclass(frozen=True)
class StartUnload:
    model: str


Action = Grant | Reject | StartLoad | StartUnload | CutInFlight


@dataclass(frozen=True)
class LaneState:
    """A read-only copy of a lane's state for everything outside the lane (app, metrics, status)."""

    phase: Phase
    active: str | None
    target: str | None
    in_flight: int
    queue_depth: int
    swaps: int
    last_error: str | None

    @property
    def loaded(self) -> str | None:
        """The model that is up and serving (or finishing) requests: ``ready`` or ``draining``.

        The one definition of "loaded": /v1/models, the loaded gauge and /status all use it.
        While ``unloading`` the model is being stopped and counts as not loaded.
        """
        return self.active if self.phase in (Phase.READY, Phase.DRAINING) else None


@dataclass
class GroupScheduler:
    # Settings (no defaults here: they come from the group's config, config.GroupSpec).
    name: str
    queue_size: int
    min_residency_s: float
    idle_ttl_s: float
    # Nothing a client does stalls the lane: a drain lasts at most drain_timeout_s (then the
    # requests still in flight are cut), a request waits in the queue at most queue_max_wait_s.
    # Both are deadlines of the one lane timer (next_wake), never a timer per request.
    drain_timeout_s: float
    queue_max_wait_s: float
    # State: written only by the event methods below.
    phase: Phase = Phase.IDLE
    active: str | None = None
    target: str | None = None
    in_flight: int = 0
    # Increments on every load; a release from an older epoch (request on a backend that
    # died and was restarted meanwhile) must not touch today's counter.
    epoch: int = 0
    loaded_at: float = 0.0
    last_used: float = 0.0
    unload_requested: bool = False
    drain_started: float = 0.0  # when the current drain began (phase became DRAINING)
    waiters: deque[Waiter] = field(default_factory=deque)
    swaps: int = 0
    last_error: str | None = None
    # What a full queue's 503 says in Retry-After: the last successful swap's duration.
    retry_after_s: int = 5

    # ---- queries -------------------------------------------------------------------------

    def queue_depth(self) -> int:
        return len(self.waiters)

    def snapshot(self) -> LaneState:
        return LaneState(self.phase, self.active, self.target, self.in_flight, len(self.waiters), self.swaps,
                         self.last_error)

    def next_wake(self) -> float | None:
        """When the driver must call ``tick`` even if no other event arrives."""
        times = []
        if self.phase == Phase.READY:
            if any(w.model != self.active for w in self.waiters) or self.unload_requested:
                times.append(self.loaded_at + self.min_residency_s)
            if self.idle_ttl_s > 0 and self.in_flight == 0 and not self.waiters:
                times.append(self.last_used + self.idle_ttl_s)
        if self.phase == Phase.DRAINING and self.in_flight > 0:
            times.append(self.drain_started + self.drain_timeout_s)
        if self.waiters:  # FIFO: the head is the oldest waiter, the first to time out
            times.append(self.waiters[0].enqueued_at + self.queue_max_wait_s)
        return min(times) if times else None

    # ---- events --------------------------------------------------------------------------

    def acquire(self, waiter: Waiter, now: float) -> list[Action]:
        if self.phase == Phase.READY and waiter.model == self.active and self._admits_active(now):
            return [self._grant(waiter, now)]
        if len(self.waiters) >= self.queue_size:
            return [Reject(waiter, f"GPU group {self.name}: queue full ({self.queue_size} waiting)",
                           retry_after_s=self.retry_after_s)]
        self.waiters.append(waiter)
        return self._advance(now)

    def release(self, epoch: int, now: float) -> list[Action]:
        if epoch == self.epoch and self.in_flight > 0:
            self.in_flight -= 1
            self.last_used = now
        return self._advance(now)

    def cancel(self, waiter: Waiter, now: float) -> list[Action]:
        """The client left. A queued waiter is dropped; a granted one is released."""
        if waiter.granted_epoch is not None:
            # Forget the grant so a second close of the same request cannot release twice.
            epoch, waiter.granted_epoch = waiter.granted_epoch, None
            return self.release(epoch, now)
        try:
            self.waiters.remove(waiter)
        except ValueError:
            return []
        return self._advance(now)

    def load_finished(self, model: str, error: str | None, active_after: str | None, now: float,
                      took_s: float | None = None) -> list[Action]:
        """A swap ended. ``active_after`` is what is up now: ``model`` on success; on failure
        the previous model when the swap stopped nothing (pre-flight refused), else None.
        ``took_s``, the swap's duration, becomes the Retry-After of a full queue (success only)."""
        actions: list[Action] = []
        if error is None and took_s is not None:
            self.retry_after_s = max(1, math.ceil(took_s))
        self.target = None
        self.swaps += 1
        self.epoch += 1
        self.in_flight = 0
        self.active = active_after
        if error is None:
            self.last_error = None
            self.phase = Phase.READY
            self.loaded_at = self.last_used = now
            # Batch: every queued request for the new model goes at once, in FIFO order.
            for waiter in [w for w in self.waiters if w.model == model]:
                self.waiters.remove(waiter)
                actions.append(self._grant(waiter, now))
        else:
            self.last_error = error
            for waiter in [w for w in self.waiters if w.model == model]:
                self.waiters.remove(waiter)
                actions.append(Reject(waiter, error))
            self.phase = Phase.READY if active_after is not None else Phase.IDLE
        return actions + self._advance(now)

    def unload_finished(self, error: str | None, now: float) -> list[Action]:
        self.phase = Phase.IDLE
        self.active = None
        self.in_flight = 0
        self.epoch += 1
        self.unload_requested = False
        if error is not None:
            self.last_error = error
        return self._advance(now)

    def backend_lost(self, model: str, reason: str, now: float) -> list[Action]:
        """The active backend died on its own (kill -9, OOM). Its requests fail upstream;
        the next request for it loads it again."""
        if self.active != model or self.phase not in (Phase.READY, Phase.DRAINING):
            return []
        self.last_error = reason
        self.phase = Phase.IDLE
        self.active = None
        self.in_flight = 0
        self.epoch += 1
        return self._advance(now)

    def adopt(self, model: str, now: float) -> list[Action]:
        """Start-up only: a backend was already serving ``model`` (router restart)."""
        if self.phase == Phase.IDLE:
            self.phase, self.active = Phase.READY, model
            self.loaded_at = now - self.min_residency_s
            self.last_used = now
        return self._advance(now)

    def request_unload(self, now: float) -> list[Action]:
        if self.phase in (Phase.READY, Phase.DRAINING):
            self.unload_requested = True
        return self._advance(now)

    def tick(self, now: float) -> list[Action]:
        return self._advance(now)

    # ---- transitions ---------------------------------------------------------------------

    def _admits_active(self, now: float) -> bool:
        # Anti-thrash: inside the residency window the loaded model serves its new requests
        # even if others wait; after it, they queue behind the others (FIFO, no starvation).
        if self.unload_requested:
            return False
        if not any(w.model != self.active for w in self.waiters):
            return True
        return now < self.loaded_at + self.min_residency_s

    def _grant(self, waiter: Waiter, now: float) -> Grant:
        self.in_flight += 1
        self.last_used = now
        waiter.granted_epoch = self.epoch
        return Grant(waiter, self.epoch)

    def _expire(self, now: float) -> list[Action]:
        """Queued requests past queue_max_wait_s get 503 + Retry-After (oldest first, FIFO)."""
        actions: list[Action] = []
        while self.waiters and now >= self.waiters[0].enqueued_at + self.queue_max_wait_s:
            waiter = self.waiters.popleft()
            actions.append(Reject(waiter, f"GPU group {self.name}: waited {now - waiter.enqueued_at:.0f}s for "
                                          f"model {waiter.model} (queue_max_wait_s={self.queue_max_wait_s:g})",
                                  retry_after_s=self.retry_after_s, timed_out=True))
        return actions

    def _cut_overdue_drain(self, now: float) -> list[Action]:
        """Past the drain deadline the requests still in flight are cut and forgotten."""
        if (self.phase != Phase.DRAINING or self.in_flight == 0
                or now < self.drain_started + self.drain_timeout_s):
            return []
        cut = CutInFlight(self.epoch, f"GPU group {self.name}: cut after {now - self.drain_started:.0f}s of "
                                      f"draining {self.active} (drain_timeout_s={self.drain_timeout_s:g}); "
                                      f"retry the request")
        self.in_flight = 0
        self.epoch += 1
        return [cut]

    def _advance(self, now: float) -> list[Action]:
        actions: list[Action] = self._expire(now)
        if (self.phase == Phase.DRAINING and not self.unload_requested
                and not any(w.model != self.active for w in self.waiters)):
            self.phase = Phase.READY  # whoever we drained for left the queue
        if self.phase == Phase.READY:
            others_wait = any(w.model != self.active for w in self.waiters)
            residency_over = now >= self.loaded_at + self.min_residency_s
            ttl_over = (self.idle_ttl_s > 0 and self.in_flight == 0 and not self.waiters
                        and now >= self.last_used + self.idle_ttl_s)
            if ((others_wait or self.unload_requested) and residency_over) or ttl_over:
                self.unload_requested = self.unload_requested or ttl_over
                self.phase = Phase.DRAINING
                self.drain_started = now
            else:
                # Same-model waiters can exist only if they queued while it was not admitting.
                for waiter in [w for w in self.waiters if w.model == self.active]:
                    if not self._admits_active(now):
                        break
                    self.waiters.remove(waiter)
                    actions.append(self._grant(waiter, now))
        actions += self._cut_overdue_drain(now)
        if self.phase == Phase.DRAINING and self.in_flight == 0:
            head = self.waiters[0].model if self.waiters else None
            if head is not None and head == self.active:
                # FIFO: the oldest waiter wants the loaded model; serve it, then swap.
                self.phase = Phase.READY
                waiter = self.waiters.popleft()
                actions.append(self._grant(waiter, now))
                self.phase = Phase.DRAINING
                self.drain_started = now  # its own full drain window
            elif head is not None:
                self.phase, self.target = Phase.LOADING, head
                self.unload_requested = False
                actions.append(StartLoad(head, self.active))
            elif self.unload_requested:
                assert self.active is not None
                self.phase = Phase.UNLOADING
                actions.append(StartUnload(self.active))
            else:
                self.phase = Phase.READY
        if self.phase == Phase.IDLE and self.waiters:
            self.phase, self.target = Phase.LOADING, self.waiters[0].model
            actions.append(StartLoad(self.target, None))
        return actions
