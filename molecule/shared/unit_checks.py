"""Checks every scenario's verify shares for the units the roles install: sandbox exposure, start limit.

Import from a scenario's tests: sys.path.insert(0, <repo>/molecule/shared); import unit_checks.
"""

from __future__ import annotations

import re

# `systemd-analyze security` exposure (0 = fully sandboxed, 10 = unprotected) a unit may reach. GPU engines keep
# writable+executable memory (CUDA/Triton JIT) and the GPU's device nodes, so they get the widest bound.
MAX_EXPOSURE = {"router": 2.0, "litellm": 3.0, "engine": 5.0}

_SPAN = re.compile(r"(\d+(?:\.\d+)?)(us|ms|min|s|h|d)")
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def timespan_s(text: str) -> float:
    """Seconds of a systemd timespan as `systemctl show` prints it ("25min 50s", "1min 30s", "infinity")."""
    text = text.strip()
    if text == "infinity":
        return float("inf")
    parts = _SPAN.findall(text.replace(" ", ""))
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError("not a systemd timespan: %r" % text)
    return sum(float(n) * _SECONDS[u] for n, u in parts)


def exposure(host, unit: str) -> float:
    out = host.run(f"systemd-analyze security --no-pager {unit}")
    assert out.rc == 0, out.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert match, out.stdout[-400:]
    score = float(match.group(1))
    print(f"systemd-analyze security {unit}: {score}")
    return score


def start_limit(host, unit: str) -> dict:
    """What systemd took for the unit: StartLimitIntervalUSec, StartLimitBurst, TimeoutStartUSec, RestartUSec."""
    props = "StartLimitIntervalUSec,StartLimitBurst,TimeoutStartUSec,RestartUSec"
    out = host.run(f"systemctl show -p {props} {unit}")
    assert out.rc == 0, out.stderr
    values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return {
        "interval": timespan_s(values["StartLimitIntervalUSec"]),
        "burst": int(values["StartLimitBurst"]),
        "timeout_start": timespan_s(values["TimeoutStartUSec"]),
        "restart": timespan_s(values["RestartUSec"]),
    }


def assert_start_limit_holds_long_loads(host, unit: str) -> None:
    """`burst` starts that each fail after a full load (TimeoutStartSec) fall into one start-limit window.

    Otherwise a unit that crashes after every load restarts forever: a 300 s window never holds five
    starts 270 s apart.
    """
    limit = start_limit(host, unit)
    print(f"{unit}: {limit}")
    assert 1 <= limit["burst"] <= 10, limit
    assert limit["interval"] >= limit["burst"] * (limit["timeout_start"] + limit["restart"]), limit


def assert_ip_filter_loopback_only(host, unit: str) -> None:
    """IPAddressDeny=any with only loopback allowed, as systemd took it (`systemctl show` prints prefixes)."""
    out = host.run(f"systemctl show -p IPAddressDeny -p IPAddressAllow {unit}")
    assert out.rc == 0, out.stderr
    values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    print(f"{unit}: {values}")
    assert set(values["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}, values
    assert set(values["IPAddressAllow"].split()) == {"127.0.0.0/8", "::1/128"}, values
