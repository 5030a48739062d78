"""Fake Python environments for the flash_attn_check unit tests.

EMULATORS of CUDA builds of torch and flash-attn, for GPUs and CUDA wheels we lack in CI.
`make_env` writes a real interpreter wrapper (this test's Python run with -S, so nothing but
the fake packages and the standard library is importable) plus minimal `torch` and
`flash_attn` packages that behave like the real ones in the ways the probe observes: version
attributes, dist-info metadata, torch.cuda device queries, the C++11 ABI flag, and the errors
real installations raise (the `undefined symbol: _ZN3c10...` ImportError of a mismatched
flash_attn_2_cuda extension, "no kernel image is available for execution on the device",
flash-attn's Ampere-or-newer refusal, an OSError from a broken torch). The probe code itself
runs unmodified.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

TORCH_TEMPLATE = '''"""Emulated torch {version} (tests only)."""
__version__ = "{version}"
float16 = "float16"


class version:
    cuda = {cuda!r}


class _C:
    _GLIBCXX_USE_CXX11_ABI = {abi!r}


class OutOfMemoryError(RuntimeError):
    pass


class _Tensor:
    def all(self):
        return self

    def item(self):
        return True


def randn(*shape, device=None, dtype=None):
    if device == "cuda" and not cuda.is_available():
        raise RuntimeError("Found no NVIDIA driver on your system.")
    return _Tensor()


def isfinite(tensor):
    return _Tensor()


class cuda:
    _devices = {devices!r}

    @staticmethod
    def is_available():
        return bool(cuda._devices)

    @staticmethod
    def device_count():
        return len(cuda._devices)

    @staticmethod
    def get_device_capability(index=0):
        return tuple(int(part) for part in cuda._devices[index][1].split("."))

    @staticmethod
    def get_device_name(index=0):
        return cuda._devices[index][0]

    @staticmethod
    def synchronize():
        return None
'''

FLASH_ATTN_INIT = '''"""Emulated flash_attn {version} (tests only)."""
__version__ = "{version}"
from flash_attn.flash_attn_interface import flash_attn_func
'''

FLASH_ATTN_INTERFACE = '''"""Emulated flash_attn.flash_attn_interface (tests only)."""
import torch
import flash_attn_2_cuda as flash_attn_gpu


def flash_attn_func(q, k, v, causal=False):
    return flash_attn_gpu.fwd(q, k, v, causal)
'''

KERNEL_WORKS = '''"""Emulated flash_attn_2_cuda extension (tests only): the kernel runs."""
import torch


def fwd(q, k, v, causal):
    return torch._Tensor()
'''

KERNEL_RAISES = '''"""Emulated flash_attn_2_cuda extension (tests only): the kernel launch fails."""
import torch


def fwd(q, k, v, causal):
    raise {error}
'''

EXTENSION_UNLOADABLE = '''"""Emulated flash_attn_2_cuda built against another torch (tests only)."""
raise ImportError(
    "{site}/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
    "_ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE",
    name="flash_attn_2_cuda",
)
'''

NO_KERNEL_IMAGE = (
    'RuntimeError("CUDA error: no kernel image is available for execution on the device\\n'
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be "
    'incorrect.\\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1")'
)
AMPERE_ONLY = 'RuntimeError("FlashAttention only supports Ampere GPUs or newer.")'
OUT_OF_MEMORY = (
    'torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 31.36 GiB '
    'of which 1.06 MiB is free.")'
)


def _dist_info(site: Path, name: str, version: str) -> None:
    info = site / ("%s-%s.dist-info" % (name, version))
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version))


def make_env(
    root: Path,
    torch: str | None = "2.8.0+cu128",
    cuda: str | None = "12.8",
    abi: bool = True,
    devices: tuple = (("NVIDIA GeForce RTX 5090", "12.0"),),
    flash_attn: str | None = "2.8.3",
    kernel: str | None = None,
    unloadable: bool = False,
    torch_import_error: str | None = None,
) -> Path:
    """Build a fake environment under `root` and return the path of its python."""
    site = root / "site-packages"
    site.mkdir(parents=True)
    if torch_import_error:
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text("raise %s\n" % torch_import_error)
    elif torch:
        (site / "torch").mkdir()
        (site / "torch" / "__init__.py").write_text(
            TORCH_TEMPLATE.format(version=torch, cuda=cuda, abi=abi, devices=[list(d) for d in devices])
        )
        _dist_info(site, "torch", torch)
    if flash_attn:
        (site / "flash_attn").mkdir()
        (site / "flash_attn" / "__init__.py").write_text(FLASH_ATTN_INIT.format(version=flash_attn))
        (site / "flash_attn" / "flash_attn_interface.py").write_text(FLASH_ATTN_INTERFACE)
        if unloadable:
            extension = EXTENSION_UNLOADABLE.format(site=site)
        elif kernel:
            extension = KERNEL_RAISES.format(error=kernel)
        else:
            extension = KERNEL_WORKS
        (site / "flash_attn_2_cuda.py").write_text(extension)
        _dist_info(site, "flash_attn", flash_attn)
    return write_interpreter(root / "bin" / "python", 'PYTHONPATH="%s" exec "%s" -S "$@"' % (site, sys.executable))


def write_interpreter(path: Path, body: str) -> Path:
    """An executable shell script standing in for an interpreter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n%s\n" % body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
