# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit-file lines every service role shares: the start limit and the GPU device allow-list.

One shape for the unit templates of the roles (roles/*/templates/*.service.j2), so that the rule
behind each line lives once: see unit_start_limit.yml and unit_device_allow.yml.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

# The character devices a CUDA process opens: /dev/nvidia<N>, nvidiactl and nvidia-modeset
# (major "nvidia-frontend", matched by the glob), nvidia-uvm(-tools) and the MIG capability
# nodes /dev/nvidia-caps/* (major "nvidia-caps"). Names as in /proc/devices.
NVIDIA_DEVICES = ("char-nvidia* rw", "char-nvidia-uvm rw", "char-nvidia-caps rw")


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise AnsibleFilterError(
            "unit_start_limit: %s must be a whole number of seconds, got %r" % (what, value)
        ) from exc
    if number < 0:
        raise AnsibleFilterError("unit_start_limit: %s must not be negative, got %r" % (what, value))
    return number


def unit_start_limit(load_timeout_s: Any, restart_sec: Any, burst: Any = 5) -> str:
    """[Unit] lines: at most `burst` starts within burst x (load timeout + RestartSec).

    A crash after a full model load restarts once per (load + RestartSec); a fixed 300 s window
    never holds 5 such starts, so the unit would loop forever. This window holds them all.
    """
    load = _positive_int(load_timeout_s, "the load timeout")
    restart = _positive_int(restart_sec, "RestartSec")
    count = _positive_int(burst, "the burst")
    if count < 1:
        raise AnsibleFilterError("unit_start_limit: the burst must be at least 1, got %r" % (burst,))
    interval = count * (load + restart)
    return (
        "# At most %d starts in %d x (load timeout %d s + RestartSec %d s): a crash after a full load is\n"
        "# retried, a unit that keeps failing stays failed instead of looping.\n"
        "StartLimitIntervalSec=%d\nStartLimitBurst=%d" % (count, count, load, restart, interval, count)
    )


def unit_device_allow(vendor: Any) -> str:
    """[Service] lines: no device nodes but the GPU's (DevicePolicy=closed keeps /dev/null & co.)."""
    if vendor != "nvidia":
        raise AnsibleFilterError("unit_device_allow: only 'nvidia' is known, got %r" % (vendor,))
    lines = ["# GPU: only the NVIDIA device nodes (and the pseudo devices DevicePolicy=closed keeps)."]
    lines.append("DevicePolicy=closed")
    lines.extend("DeviceAllow=%s" % device for device in NVIDIA_DEVICES)
    return "\n".join(lines)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"unit_start_limit": unit_start_limit, "unit_device_allow": unit_device_allow}
