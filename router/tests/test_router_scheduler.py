"""The per-group state machine, driven with a fake clock and a fake backend (the test plays the driver)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmstack_router.scheduler import (
    CutInFlight,
    Grant,
    GroupScheduler,
    Phase,
    Reject,
    StartLoad,
    StartUnload,
    Waiter,
)


@dataclass
class Harness:
    """Plays the driver: applies actions, keeps granted leases, completes loads when told."""

    core: GroupScheduler
    now: float = 0.0
    granted: dict[int, tuple[Waiter, int]] = field(default_factory=dict)
    rejected: dict[int, Reject] = field(default_factory=dict)
    pending_load: StartLoad | None = None
    pending_unload: StartUnload | None = None
    loads: list[StartLoad] = field(default_factory=list)
    cuts: list[CutInFlight] = field(default_factory=list)

    def take(self, actions: list) -> list:
        for action in actions:
            if isinstance(action, Grant):
                assert action.waiter.ticket not in self.granted, "granted twice"
                self.granted[action.waiter.ticket] = (action.waiter, action.epoch)
            elif isinstance(action, Reject):
                self.rejected[action.waiter.ticket] = action
            elif isinstance(action, StartLoad):
                assert self.pending_load is None, "two loads at once"
                self.pending_load = action
                self.loads.append(action)
            elif isinstance(action, StartUnload):
                self.pending_unload = action
            elif isinstance(action, CutInFlight):
                # What the lane does: the cut requests are forgotten (their close releases nothing).
                for ticket, (waiter, epoch) in list(self.granted.items()):
                    if epoch == action.epoch:
                        waiter.granted_epoch = None
                        del self.granted[ticket]
                self.cuts.append(action)
        return actions

    def ask(self, model: str) -> Waiter:
        waiter = Waiter(model, self.now)
        self.take(self.core.acquire(waiter, self.now))
        return waiter

    def done(self, waiter: Waiter) -> None:
        # A request ends the way the driver ends it (Ticket.close): through cancel.
        self.granted.pop(waiter.ticket)
        self.take(self.core.cancel(waiter, self.now))

    def finish_load(self, error: str | None = None, active_after: str | None = None) -> None:
        load = self.pending_load
        assert load is not None
        self.pending_load = None
        after = load.target if error is None else active_after
        self.take(self.core.load_finished(load.target, error, after, self.now))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.take(self.core.tick(self.now))


def make(**kwargs) -> Harness:
    params = {"queue_size": 8, "min_residency_s": 10.0, "idle_ttl_s": 0.0, "drain_timeout_s": 1e9,
              "queue_max_wait_s": 1e9, **kwargs}
    return Harness(GroupScheduler("gpu0", **params))


def test_first_request_loads_and_all_waiters_share_one_load() -> None:
    h = make()
    first, second = h.ask("a"), h.ask("a")
    assert h.loads == [StartLoad("a", None)]
    assert h.core.phase == Phase.LOADING
    h.now = 3.0
    h.finish_load()
    assert first.ticket in h.granted
    assert second.ticket in h.granted
    assert h.core.in_flight == 2
    assert h.core.phase == Phase.READY


def test_loaded_model_is_granted_without_queueing() -> None:
    h = make()
    h.ask("a")
    h.finish_load()
    waiter = h.ask("a")
    assert waiter.ticket in h.granted
    assert h.core.queue_depth() == 0


def test_swap_waits_for_drain_and_minimum_residency() -> None:
    h = make(min_residency_s=10.0)
    a = h.ask("a")
    h.finish_load()
    h.now = 1.0
    b = h.ask("b")
    assert h.core.queue_depth() == 1
    h.now = 2.0
    h.done(a)
    assert h.pending_load is None, "swapped inside the residency window"
    assert h.core.next_wake() == 10.0
    h.advance(8.0)
    assert h.pending_load == StartLoad("b", "a")
    h.finish_load()
    assert b.ticket in h.granted


def test_swap_does_not_start_while_requests_are_in_flight() -> None:
    h = make(min_residency_s=0.0)
    a1, a2 = h.ask("a"), h.ask("a")
    h.finish_load()
    h.ask("b")
    assert h.core.phase == Phase.DRAINING
    h.done(a1)
    assert h.pending_load is None
    late_a = h.ask("a")
    assert late_a.ticket not in h.granted, "draining model admitted a new request"
    h.done(a2)
    assert h.pending_load == StartLoad("b", "a")
    h.finish_load()
    assert h.pending_load is None
    assert late_a.ticket not in h.granted  # queued behind b, served after b's residency
    assert h.core.waiters[0] is late_a


def test_full_queue_rejects_with_retry_after() -> None:
    h = make(queue_size=2)
    h.ask("a")
    h.ask("a")
    third = h.ask("a")
    rejection = h.rejected[third.ticket]
    assert rejection.retry_after_s == h.core.retry_after_s
    assert h.core.queue_depth() == 2


def test_cancelled_waiter_leaves_queue_and_no_swap_happens_for_it() -> None:
    h = make(min_residency_s=0.0)
    a = h.ask("a")
    h.finish_load()
    b = h.ask("b")
    assert h.core.phase == Phase.DRAINING
    h.take(h.core.cancel(b, h.now))
    assert h.core.queue_depth() == 0
    assert h.core.phase == Phase.READY
    assert h.ask("a").ticket in h.granted
    h.done(a)
    assert h.pending_load is None


def test_cancel_after_grant_releases_the_slot() -> None:
    h = make()
    a = h.ask("a")
    h.finish_load()
    h.granted.pop(a.ticket)
    h.take(h.core.cancel(a, h.now))
    assert h.core.in_flight == 0


def test_closing_a_request_twice_releases_its_slot_once() -> None:
    # Found by the invariant test below: a finished request cancelled again released a second
    # slot, leaving another granted request uncounted (and an early swap possible).
    h = make()
    first, second = h.ask("a"), h.ask("a")
    h.finish_load()
    h.done(first)
    h.take(h.core.cancel(first, h.now))
    assert h.core.in_flight == 1
    assert second.ticket in h.granted


def test_failed_load_rejects_every_waiter_and_next_request_retries() -> None:
    h = make()
    w1, w2 = h.ask("a"), h.ask("a")
    other = h.ask("b")
    h.finish_load(error="exited with code 1")
    assert set(h.rejected) == {w1.ticket, w2.ticket}
    assert h.core.last_error == "exited with code 1"
    # the queued request for b is not stuck behind the failure
    assert h.pending_load == StartLoad("b", None)
    h.finish_load()
    assert other.ticket in h.granted
    h.now = 20.0
    h.done(other)
    h.ask("a")
    assert h.pending_load == StartLoad("a", "b")


def test_refused_preflight_keeps_the_previous_model_serving() -> None:
    h = make(min_residency_s=0.0)
    a = h.ask("a")
    h.finish_load()
    big = h.ask("big")
    h.done(a)
    assert h.pending_load == StartLoad("big", "a")
    h.finish_load(error="needs 90000 MiB", active_after="a")
    assert big.ticket in h.rejected
    assert h.core.phase == Phase.READY
    assert h.core.active == "a"
    assert h.ask("a").ticket in h.granted


def test_idle_ttl_unloads_and_a_request_during_unload_reloads() -> None:
    h = make(idle_ttl_s=30.0)
    a = h.ask("a")
    h.finish_load()
    h.now = 5.0
    h.done(a)
    assert h.core.next_wake() == 35.0
    h.advance(29.0)
    assert h.pending_unload is None
    h.advance(1.0)
    assert h.pending_unload == StartUnload("a")
    assert h.core.phase == Phase.UNLOADING
    late = h.ask("a")  # the TTL-vs-request race (llama-swap #946): must queue, not deadlock
    assert late.ticket not in h.granted
    h.take(h.core.unload_finished(None, h.now))
    assert h.pending_load == StartLoad("a", None)
    h.finish_load()
    assert late.ticket in h.granted


def test_busy_model_does_not_starve_others() -> None:
    h = make(min_residency_s=10.0)
    h.ask("a")
    h.finish_load()
    b = h.ask("b")
    while h.now < 10.0:  # steady traffic for a, each request short
        h.now += 0.5
        for waiter, _epoch in list(h.granted.values()):
            h.done(waiter)
        h.ask("a")
    h.advance(0.5)
    for waiter, _epoch in list(h.granted.values()):
        h.done(waiter)
    assert h.pending_load == StartLoad("b", "a")
    h.finish_load()
    assert b.ticket in h.granted


def test_backend_lost_resets_and_stale_release_is_ignored() -> None:
    h = make()
    a = h.ask("a")
    h.finish_load()
    _waiter, old_epoch = h.granted[a.ticket]
    h.take(h.core.backend_lost("a", "killed", h.now))
    assert h.core.phase == Phase.IDLE
    again = h.ask("a")
    assert h.pending_load == StartLoad("a", None)
    h.finish_load()
    assert again.ticket in h.granted
    h.take(h.core.release(old_epoch, h.now))  # the dead request finishing late
    assert h.core.in_flight == 1


def test_admin_unload_waits_for_in_flight() -> None:
    h = make()
    a = h.ask("a")
    h.finish_load()
    h.now = 20.0
    h.take(h.core.request_unload(h.now))
    assert h.pending_unload is None
    h.done(a)
    assert h.pending_unload == StartUnload("a")


@pytest.mark.parametrize(("gap_s", "service_s"), [(0.0, 0.05), (0.05, 0.05), (0.5, 0.2)])
def test_alternating_requests_swap_count_is_bounded(gap_s: float, service_s: float) -> None:
    """200 requests alternating a/b: at most one swap per residency window (plus load time)."""
    load_s, residency = 2.0, 5.0
    h = make(min_residency_s=residency, queue_size=256)
    outstanding: list[tuple[float, Waiter]] = []
    issued = 0
    load_done_at: float | None = None
    while issued < 200 or h.granted or h.core.queue_depth() or h.pending_load:
        if issued < 200:
            h.ask("ab"[issued % 2])
            issued += 1
        h.now += gap_s if issued < 200 else 0.05
        if h.pending_load and load_done_at is None:
            load_done_at = h.now + load_s
        if load_done_at is not None and h.now >= load_done_at:
            load_done_at = None
            h.finish_load()
        for waiter, _epoch in list(h.granted.values()):
            outstanding.append((h.now + service_s, waiter))
            h.granted.pop(waiter.ticket)
        for due, waiter in [o for o in outstanding if o[0] <= h.now]:
            outstanding.remove((due, waiter))
            h.granted[waiter.ticket] = (waiter, h.core.epoch)
            h.done(waiter)
        h.take(h.core.tick(h.now))
        assert h.now < 10_000
    assert not h.rejected
    bound = 1 + h.now / (residency + load_s)
    print(f"alternating gap={gap_s}s: {len(h.loads)} loads in {h.now:.0f}s simulated (bound {bound:.0f})")
    assert len(h.loads) <= bound, (len(h.loads), h.now)


EVENTS = st.lists(st.tuples(st.sampled_from(["ask", "done", "cancel", "tick", "load_ok", "load_fail", "lost"]),
                            st.sampled_from(["a", "b", "c"]), st.floats(0, 5)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_invariants_hold_for_any_event_sequence(events: list[tuple[str, str, float]]) -> None:
    h = make(queue_size=6, min_residency_s=2.0, idle_ttl_s=7.0, drain_timeout_s=9.0, queue_max_wait_s=40.0)
    live: list[Waiter] = []
    for kind, model, dt in events:
        h.now += dt
        wake = h.core.next_wake()
        if wake is not None and wake <= h.now:  # what the lane's timer does
            h.take(h.core.tick(h.now))
        if kind == "ask":
            live.append(h.ask(model))
        elif kind == "done" and h.granted:
            waiter, _epoch = next(iter(h.granted.values()))
            h.done(waiter)
        elif kind == "cancel" and live:
            waiter = live.pop(0)
            h.granted.pop(waiter.ticket, None)
            h.take(h.core.cancel(waiter, h.now))
        elif kind == "tick":
            h.take(h.core.tick(h.now))
        elif kind in ("load_ok", "load_fail") and h.pending_load:
            h.finish_load(None if kind == "load_ok" else "boom")
        elif kind == "lost" and h.core.active:
            h.take(h.core.backend_lost(h.core.active, "lost", h.now))
        if h.pending_unload and h.core.phase == Phase.UNLOADING:
            h.pending_unload = None
            h.take(h.core.unload_finished(None, h.now))
        core = h.core
        assert core.in_flight >= 0
        assert core.queue_depth() <= core.queue_size
        assert (core.phase == Phase.LOADING) == (h.pending_load is not None)
        current = [epoch for _waiter, epoch in h.granted.values() if epoch == core.epoch]
        assert core.in_flight == len(current)
        if core.phase == Phase.IDLE:
            assert not core.waiters, "idle with waiters: nobody would ever load them"
        # Nothing a client does stalls the lane: no drain outlives its deadline, no waiter its maximum.
        if core.phase == Phase.DRAINING and core.in_flight:
            assert h.now < core.drain_started + core.drain_timeout_s
        assert all(h.now < w.enqueued_at + core.queue_max_wait_s for w in core.waiters)
    # Drain: finishing loads and requests must resolve every waiter still queued.
    for _step in range(200):
        if h.pending_load:
            h.finish_load()
        for waiter, _epoch in list(h.granted.values()):
            h.done(waiter)
        h.advance(3.0)
        if h.pending_unload and h.core.phase == Phase.UNLOADING:
            h.pending_unload = None
            h.take(h.core.unload_finished(None, h.now))
    assert h.core.queue_depth() == 0


def test_drain_deadline_cuts_requests_in_flight_and_the_swap_goes_on() -> None:
    h = make(min_residency_s=0.0, drain_timeout_s=30.0)
    a = h.ask("a")
    h.finish_load()
    h.now = 5.0
    b = h.ask("b")
    assert h.core.phase == Phase.DRAINING
    assert h.core.next_wake() == 35.0, "the drain deadline is the lane timer's next wake"
    h.advance(29.0)
    assert h.pending_load is None
    assert not h.cuts, "cut before the deadline"
    h.advance(1.0)
    assert [c.epoch for c in h.cuts] == [1]
    assert "drain_timeout_s=30" in h.cuts[0].reason
    assert h.pending_load == StartLoad("b", "a")
    assert a.ticket not in h.granted
    assert h.core.in_flight == 0
    h.take(h.core.cancel(a, h.now))  # the cut request's handler closes its ticket: no double release
    h.finish_load()
    assert b.ticket in h.granted
    assert h.core.in_flight == 1


def test_queued_request_past_its_maximum_wait_gets_503_with_retry_after() -> None:
    h = make(min_residency_s=0.0, queue_max_wait_s=60.0)
    a = h.ask("a")
    h.finish_load()
    h.now = 10.0
    b = h.ask("b")  # waits for a's drain; a never finishes (a client that never stops reading)
    assert h.core.next_wake() == 70.0
    h.advance(59.0)
    assert b.ticket not in h.rejected
    h.advance(1.0)
    reject = h.rejected[b.ticket]
    assert reject.timed_out
    assert reject.retry_after_s == h.core.retry_after_s
    assert "queue_max_wait_s=60" in reject.error
    assert h.core.queue_depth() == 0
    assert h.core.phase == Phase.READY, "nobody waits any more: the model is re-admitted"
    assert a.ticket in h.granted


def test_idle_lane_arms_no_deadline() -> None:
    # Issue 14's hot path: the deadlines are only due while something drains or waits.
    h = make(min_residency_s=0.0, drain_timeout_s=30.0, queue_max_wait_s=60.0)
    a = h.ask("a")
    h.finish_load()
    assert h.core.next_wake() is None
    h.done(a)
    assert h.core.next_wake() is None
