# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Parse a CUDA device list once (private to this collection).

The engine roles (through the engine_instances filter), the service guard and router_backends all read
device lists from the same inventory keys; this is the one parser, so an index, a GPU UUID and a MIG UUID
mean the same thing everywhere (``map('int')`` used to turn ``GPU-...`` into GPU 0).
"""

from __future__ import annotations

import re

# nvidia-smi -L prints "GPU-<uuid>" and "MIG-<uuid>" (older drivers: "MIG-GPU-<uuid>/<gi>/<ci>").
_TOKEN = re.compile(r"^(?:\d{1,3}|GPU-[0-9A-Fa-f-]{8,}|MIG-[0-9A-Za-z/-]{8,})$")


class DeviceError(ValueError):
    """A device list that CUDA_VISIBLE_DEVICES would not take."""


def parse_devices(value) -> list[str]:
    """Return the device tokens of ``value``: None/""/[] -> [], 2 -> ["2"], "0, 1" or [0, "1"] -> ["0", "1"]."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise DeviceError(f"{value!r} is not a device list")
    if isinstance(value, int):
        items = [str(value)]
    elif isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise DeviceError(f"device {item!r} is neither an index nor a UUID")
            items += str(item).split(",")
    else:
        raise DeviceError(f"{value!r} is not a device list (indexes or UUIDs, a list or a comma-separated string)")
    tokens = [item.strip() for item in items if item.strip()]
    for token in tokens:
        if not _TOKEN.match(token):
            raise DeviceError(
                f"device {token!r} is neither a GPU index (0, 1, ...) nor a GPU-/MIG- UUID (nvidia-smi -L lists them)"
            )
    if len(set(tokens)) != len(tokens):
        raise DeviceError(f"devices {tokens} name a device twice")
    return tokens


def visible_devices(tokens: list[str]) -> str:
    """The CUDA_VISIBLE_DEVICES value of parsed tokens."""
    return ",".join(tokens)


def gpu_group(tokens: list[str]) -> tuple[str, list[int]] | None:
    """The router's GPU group of a device list: ("gpu0-1", [0, 1]) for indexes; None for UUIDs or no list.

    UUIDs carry no index, so the router cannot tell which indexed group they belong to: such a backend takes its
    group from router_group or the default.
    """
    if not tokens or not all(token.isdigit() for token in tokens):
        return None
    gpus = [int(token) for token in tokens]
    return "gpu" + "-".join(str(g) for g in gpus), gpus
