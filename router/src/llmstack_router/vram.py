"""How much GPU memory is free, behind an interface that tests replace with a fake."""

from __future__ import annotations

import asyncio
from typing import Protocol


class VramProbeError(RuntimeError):
    pass


class VramProbe(Protocol):
    async def free_mib(self, gpus: tuple[int, ...]) -> int | None:
        """Free MiB of the tightest of ``gpus`` (all GPUs when empty); None when unknown.

        The least, never the sum: a model needs its VRAM on each GPU it uses (1000 + 80000 MiB free
        does not hold a 40000-MiB model; the service guard checks each GPU the same way)."""


class NoVramProbe:
    """No GPU telemetry: pre-flight falls back to the group's declared capacity."""

    async def free_mib(self, gpus: tuple[int, ...]) -> int | None:
        return None


class NvidiaSmiProbe:
    """Reads ``nvidia-smi --query-gpu``; NVML would avoid the fork but adds a binding dependency."""

    def __init__(self, binary: str = "nvidia-smi", timeout_s: float = 10.0) -> None:
        self.binary = binary
        self.timeout_s = timeout_s

    async def free_mib(self, gpus: tuple[int, ...]) -> int | None:
        proc = await asyncio.create_subprocess_exec(
            self.binary, "--query-gpu=index,memory.free", "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise VramProbeError(f"{self.binary} did not answer within {self.timeout_s}s") from exc
        if proc.returncode != 0:
            # nvidia-smi prints its errors ("Failed to initialize NVML: Driver/library version mismatch",
            # "Unable to determine the device handle for GPU ...") on stdout, not stderr.
            text = "\n".join(part.decode(errors="replace").strip() for part in (out, err)).strip()
            first = text.splitlines()[0] if text else "no output"
            raise VramProbeError(f"{self.binary} failed ({proc.returncode}): {first}")
        return parse_nvidia_smi(out.decode(errors="replace"), gpus)


def parse_nvidia_smi(text: str, gpus: tuple[int, ...]) -> int | None:
    """Free MiB of the tightest of ``gpus`` from ``--query-gpu=index,memory.free``; None when a GPU shows
    no number ([N/A] on unified-memory parts such as GB10, [Not Supported], [GPU is lost])."""
    free: dict[int, int | None] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        index_text, _comma, free_text = (part.strip() for part in line.partition(","))
        if not index_text.isdigit() or not free_text:
            raise VramProbeError(f"unexpected nvidia-smi output: {line.strip()[:200]!r}")
        try:
            free[int(index_text)] = int(float(free_text))
        except ValueError:
            free[int(index_text)] = None
    wanted = gpus or tuple(free)
    missing = [gpu for gpu in wanted if gpu not in free]
    if missing:
        raise VramProbeError(f"GPU(s) {missing} not reported by nvidia-smi (have {sorted(free)})")
    values = [free[gpu] for gpu in wanted]
    if any(value is None for value in values):
        return None
    return min((value for value in values if value is not None), default=0)


def make_probe(kind: str) -> VramProbe:
    return NvidiaSmiProbe() if kind == "nvidia-smi" else NoVramProbe()
