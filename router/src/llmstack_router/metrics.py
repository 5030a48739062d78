"""Prometheus text exposition (format 0.0.4), hand-written: four metric kinds need no dependency."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SWAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 45.0, 90.0, 180.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.labelnames = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class Gauge:
    """A gauge whose samples are read at scrape time, so it can never go stale."""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...],
                 collect: Callable[[], dict[tuple[str, ...], float]]) -> None:
        self.name, self.help, self.labelnames, self.collect = name, help_text, labels, collect

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        lines += [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in sorted(self.collect().items())]
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.labelnames, self.buckets = name, help_text, labels, buckets
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts, total = self.series.setdefault(labels, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter("llmrouter_requests_total", "Requests answered, by model and HTTP status.",
                                ("model", "code"))
        self.rejected = Counter("llmrouter_rejected_total",
                                "Requests refused by the router itself (400/401/404/408/413/429), by HTTP status.",
                                ("code",))
        self.client_timeouts = Counter(
            "llmrouter_client_timeouts_total", "Client connections cut by a deadline: header_read (no complete "
            "headers in limits.header_read_timeout_s), write (took no data in limits.client_write_timeout_s).",
            ("kind",))
        self.swaps = Counter("llmrouter_swaps_total", "Backend swaps, by GPU group and result.", ("group", "result"))
        self.swap_seconds = Histogram("llmrouter_swap_duration_seconds", "Time from swap start to ready.",
                                      ("group",), _SWAP_BUCKETS)
        self.upstream_seconds = Histogram("llmrouter_upstream_latency_seconds",
                                          "Time until the upstream answered with headers.", ("model",),
                                          _LATENCY_BUCKETS)
        self.gauges: list[Gauge] = []

    def add_gauge(self, gauge: Gauge) -> None:
        self.gauges.append(gauge)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.rejected, self.client_timeouts, self.swaps, self.swap_seconds,
                       self.upstream_seconds, *self.gauges):
            lines += metric.render()
        return "\n".join(lines) + "\n"
