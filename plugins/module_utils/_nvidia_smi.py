# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Parse nvidia-smi output into GPU facts (private to this collection).

Pure functions only: running nvidia-smi is the module's job, so every parser here can be
tested on recorded output.
"""

from __future__ import annotations

import csv
import re
from typing import Callable

QUERY_FIELDS = (
    "index",
    "name",
    "uuid",
    "memory.total",
    "memory.used",
    "memory.free",
    "compute_cap",
    "driver_version",
    "pci.bus_id",
)
# Drivers older than ~510 do not know compute_cap; the query is retried without it and the
# capability is then inferred from the product name.
LEGACY_QUERY_FIELDS = tuple(field for field in QUERY_FIELDS if field != "compute_cap")

# nvidia-smi prints these instead of a value when a field does not apply to a GPU
# (unified-memory parts such as GB10 report memory as [N/A]) or the driver refuses it.
UNAVAILABLE_VALUES = {
    "[n/a]",
    "n/a",
    "[not supported]",
    "not supported",
    "[unknown error]",
    "[insufficient permissions]",
    "[gpu is lost]",
    "",
}

DRIVER_UNREACHABLE_MARK = "couldn't communicate with the nvidia driver"
# A kernel module that is not the version of the user-space library (a driver upgrade without reboot).
VERSION_MISMATCH_MARK = "driver/library version mismatch"
# A GPU that fell off the bus or is lost (Xid 79): nvidia-smi cannot open it, the others still answer.
DEVICE_HANDLE_MARK = "unable to determine the device handle"
NO_DEVICES_MARK = "no devices were found"
INVALID_FIELD_MARK = "is not a valid field to query"

# Header of `nvidia-smi` ("CUDA Version: 12.8"), `nvidia-smi -q` ("CUDA Version : 12.8") and
# drivers from 610 on, which rename it "CUDA UMD Version" (and "Driver Version" "KMD Version").
CUDA_VERSION_RE = re.compile(r"CUDA (?:UMD )?Version\s*:\s*(\d+\.\d+)")
DRIVER_VERSION_RE = re.compile(r"(?:Driver|KMD) Version\s*:\s*(\d+(?:\.\d+)+)")

ARCHITECTURE_BY_MAJOR = {
    3: "Kepler",
    5: "Maxwell",
    6: "Pascal",
    10: "Blackwell",  # 10.0 B200/GB200, 10.3 B300/GB300
    11: "Blackwell",  # 11.0 Jetson Thor
    12: "Blackwell",  # 12.0 RTX 50xx / RTX PRO 6000 Blackwell, 12.1 GB10
}
ARCHITECTURE_BY_CAPABILITY = {
    "7.0": "Volta",
    "7.2": "Volta",  # Jetson Xavier
    "7.5": "Turing",
    "8.0": "Ampere",
    "8.6": "Ampere",
    "8.7": "Ampere",  # Jetson Orin
    "8.9": "Ada",
    "9.0": "Hopper",
}

# Used only when the driver cannot report compute_cap. Order matters: the first match wins,
# so more specific names come before the ones they contain.
CAPABILITY_BY_NAME = (
    (re.compile(r"\bGB10\b"), "12.1"),
    (re.compile(r"\bG?B300\b"), "10.3"),
    (re.compile(r"\bG?B200\b|\bB100\b"), "10.0"),
    (re.compile(r"RTX PRO \d+.*Blackwell|RTX 50\d0"), "12.0"),
    (re.compile(r"\bG?H100\b|\bG?H200\b|\bH800\b|\bH20\b"), "9.0"),
    (re.compile(r"\bL4\b|\bL40S?\b|\bL20\b|RTX 40\d0|RTX \d+ Ada"), "8.9"),
    (re.compile(r"\bA100\b|\bA800\b|\bA30\b"), "8.0"),
    (re.compile(r"\bA10G?\b|\bA40\b|\bA16\b|\bA2\b|RTX A\d+|RTX 30\d0"), "8.6"),
    (re.compile(r"\bT4\b|RTX 20\d0|Quadro RTX|TITAN RTX|GTX 16\d0"), "7.5"),
    (re.compile(r"\bV100\b|TITAN V\b"), "7.0"),
    (re.compile(r"\bP100\b|\bP40\b|\bP4\b|GTX 10\d0|TITAN Xp?\b"), "6.1"),
)


class NvidiaSmiError(Exception):
    """nvidia-smi ran but could not report GPUs; the message is the reason to show."""


def architecture_for(compute_capability: str | None) -> str:
    """Architecture family for a compute capability such as "8.9" or "12.0"."""
    if not compute_capability:
        return "unknown"
    if compute_capability in ARCHITECTURE_BY_CAPABILITY:
        return ARCHITECTURE_BY_CAPABILITY[compute_capability]
    try:
        major = int(compute_capability.split(".", 1)[0])
    except ValueError:
        return "unknown"
    return ARCHITECTURE_BY_MAJOR.get(major, "unknown")


def capability_from_name(name: str | None) -> str | None:
    """Best guess of the compute capability from the product name; None when unknown."""
    if not name:
        return None
    for pattern, capability in CAPABILITY_BY_NAME:
        if pattern.search(name):
            return capability
    return None


def failure_reason(rc: int, stdout: str, stderr: str) -> str | None:
    """Why an nvidia-smi run produced no usable GPU list; None when it did."""
    text = "\n".join(part for part in (stdout, stderr) if part).strip()
    lowered = text.lower()
    if DRIVER_UNREACHABLE_MARK in lowered:
        return (
            "nvidia-smi could not communicate with the NVIDIA driver: the kernel module is not loaded "
            "or does not match the user-space driver (reboot after a driver upgrade, or install the "
            "driver with the nvidia.nvidia_driver role)"
        )
    if VERSION_MISMATCH_MARK in lowered:
        return (
            "nvidia-smi: the loaded NVIDIA kernel module does not match the user-space driver library "
            "(Driver/library version mismatch, usually a driver upgrade without a reboot): reboot the node"
        )
    if DEVICE_HANDLE_MARK in lowered:
        line = next(line for line in text.splitlines() if DEVICE_HANDLE_MARK in line.lower())
        return (
            "nvidia-smi failed with exit code %d: %s: a GPU has fallen off the bus or is lost; check dmesg for "
            "Xid 79 and reboot or reset that GPU" % (rc, line.strip())
        )
    if NO_DEVICES_MARK in lowered:
        return "nvidia-smi found no NVIDIA devices (none installed, or hidden from this host or container)"
    if rc == 124:
        return "nvidia-smi did not answer in time: the driver or a GPU may be hung (check dmesg for Xid errors)"
    if rc != 0:
        first_line = text.splitlines()[0] if text else "no output"
        return "nvidia-smi failed with exit code %d: %s" % (rc, first_line)
    return None


def is_invalid_field_error(stdout: str, stderr: str) -> bool:
    """True when the driver rejected a --query-gpu field (old drivers and compute_cap)."""
    return INVALID_FIELD_MARK in ("%s\n%s" % (stdout, stderr)).lower()


def _value(raw: str) -> str | None:
    stripped = raw.strip()
    if stripped.lower() in UNAVAILABLE_VALUES:
        return None
    return stripped


def _mib(raw: str) -> int | None:
    value = _value(raw)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def parse_query_gpu(text: str, fields: tuple[str, ...] = QUERY_FIELDS) -> list[dict]:
    """Parse `--query-gpu=<fields> --format=csv,noheader,nounits` into one dict per GPU."""
    gpus = []
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(fields):
            raise NvidiaSmiError(
                "unexpected nvidia-smi output: %d values for %d fields in %r" % (len(row), len(fields), ", ".join(row))
            )
        values = {field: row[position] for position, field in enumerate(fields)}
        index = _value(values["index"])
        name = _value(values["name"])
        capability = _value(values["compute_cap"]) if "compute_cap" in values else None
        capability_source = "nvidia-smi" if capability else None
        if capability is None:
            capability = capability_from_name(name)
            capability_source = "name" if capability else None
        gpus.append(
            {
                "index": int(index) if index is not None and index.isdigit() else len(gpus),
                "name": name,
                "uuid": _value(values["uuid"]),
                "memory_total_mib": _mib(values["memory.total"]),
                "memory_used_mib": _mib(values["memory.used"]),
                "memory_free_mib": _mib(values["memory.free"]),
                "compute_capability": capability,
                "compute_capability_source": capability_source,
                "sm": capability.replace(".", "") if capability else None,
                "architecture": architecture_for(capability),
                "driver_version": _value(values["driver_version"]),
                "pci_bus_id": _value(values["pci.bus_id"]),
            }
        )
    return gpus


def query_gpus(run: Callable[..., tuple[int, str, str]]) -> tuple[list[dict], str | None]:
    """The GPUs from ``--query-gpu``, retried without compute_cap for drivers that lack it.

    ``run(*args)`` runs nvidia-smi with ``args`` and returns (rc, stdout, stderr); the caller owns the
    binary, the timeout and the environment. Returns (gpus, None) or ([], why not), shared by the
    gpu_facts and tabbyapi_vram modules.
    """
    for fields in (QUERY_FIELDS, LEGACY_QUERY_FIELDS):
        rc, out, err = run("--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits")
        if fields is QUERY_FIELDS and is_invalid_field_error(out, err):
            continue
        reason = failure_reason(rc, out, err)
        if reason:
            return [], reason
        try:
            gpus = parse_query_gpu(out, fields)
        except NvidiaSmiError as exc:
            return [], str(exc)
        if not gpus:
            return [], "nvidia-smi listed no GPUs"
        return gpus, None
    return [], "nvidia-smi rejected the GPU query even without compute_cap: the driver is too old"


def parse_cuda_version(text: str) -> str | None:
    """Highest CUDA version the driver supports, from `nvidia-smi` or `nvidia-smi -q` output."""
    match = CUDA_VERSION_RE.search(text or "")
    return match.group(1) if match else None


def parse_driver_version(text: str) -> str | None:
    """Driver version from `nvidia-smi -q` output (used when the query field is missing)."""
    match = DRIVER_VERSION_RE.search(text or "")
    return match.group(1) if match else None


def _total(gpus: list[dict], key: str) -> int | None:
    values = [gpu[key] for gpu in gpus if gpu[key] is not None]
    return sum(values) if values else None


def summarize(gpus: list[dict], driver_version: str | None, cuda_version: str | None, reason: str | None) -> dict:
    """The facts the module returns, all prefixed llmstack_gpu."""
    architectures = sorted({gpu["architecture"] for gpu in gpus})
    capabilities = sorted({gpu["compute_capability"] for gpu in gpus if gpu["compute_capability"]}, key=_capability_key)
    return {
        "llmstack_gpus": gpus,
        "llmstack_gpu_count": len(gpus),
        "llmstack_gpu_memory_total_mib": _total(gpus, "memory_total_mib"),
        "llmstack_gpu_memory_used_mib": _total(gpus, "memory_used_mib"),
        "llmstack_gpu_memory_free_mib": _total(gpus, "memory_free_mib"),
        "llmstack_gpu_driver_version": driver_version,
        "llmstack_gpu_cuda_version": cuda_version,
        "llmstack_gpu_architectures": architectures,
        "llmstack_gpu_compute_capabilities": capabilities,
        # Ready for TORCH_CUDA_ARCH_LIST when building CUDA extensions for exactly these GPUs.
        "llmstack_gpu_cuda_arch_list": ";".join(capabilities),
        "llmstack_gpu_has_blackwell": "Blackwell" in architectures,
        "llmstack_gpu_reason": reason,
    }


def _capability_key(capability: str) -> tuple[int, ...]:
    return tuple(int(part) for part in capability.split(".") if part.isdigit())
