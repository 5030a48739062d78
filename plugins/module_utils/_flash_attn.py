# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""flash-attn diagnosis for a Python environment (private to this collection).

The probe runs inside the environment under test (a venv's python); everything else here is
pure: diagnosing its report and naming the release wheel that matches it.
"""

from __future__ import annotations

import json
import re

PROBE_MARK = "LLMSTACK_FLASH_ATTN_PROBE="
RELEASE_URL = "https://github.com/Dao-AILab/flash-attention/releases/download/v{version}/{filename}"

# Runs under the interpreter being checked (Python 3.8+), so standard library only. The last
# stdout line carries the report: torch and CUDA libraries may print to stdout while loading.
PROBE_SOURCE = r"""
import json, platform, sys, traceback
report = {
    "python_version": "%d.%d.%d" % sys.version_info[:3],
    "python_tag": "cp%d%d" % sys.version_info[:2],
    "machine": platform.machine(),
}
options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}

def first_line(exc):
    # CUDA errors append advice lines (CUDA_LAUNCH_BLOCKING=1 ...); the cause is the first one.
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__

try:
    from importlib import metadata
    try:
        report["flash_attn_dist_version"] = metadata.version("flash_attn")
    except metadata.PackageNotFoundError:
        report["flash_attn_dist_version"] = None
except ImportError:
    report["flash_attn_dist_version"] = None

try:
    import torch
except Exception as exc:
    report["torch_error"] = first_line(exc)
    report["torch_missing"] = isinstance(exc, ImportError) and getattr(exc, "name", None) == "torch"
else:
    report["torch_version"] = torch.__version__
    report["torch_cuda"] = getattr(torch.version, "cuda", None)
    report["cxx11abi"] = bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False))
    try:
        report["cuda_available"] = bool(torch.cuda.is_available())
    except Exception as exc:
        report["cuda_available"] = False
        report["cuda_error"] = first_line(exc)
    report["devices"] = []
    if report["cuda_available"]:
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            report["devices"].append(
                {"index": index, "name": torch.cuda.get_device_name(index), "capability": "%d.%d" % (major, minor)}
            )

try:
    import flash_attn
except Exception as exc:
    report["flash_attn_error"] = first_line(exc)
    report["flash_attn_missing"] = isinstance(exc, ImportError) and getattr(exc, "name", None) == "flash_attn"
else:
    report["flash_attn_version"] = getattr(flash_attn, "__version__", None)
    if options.get("run_kernel") and report.get("cuda_available"):
        try:
            from flash_attn import flash_attn_func
            q, k, v = (torch.randn(1, 128, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
            out = flash_attn_func(q, k, v, causal=True)
            torch.cuda.synchronize()
            report["kernel_ok"] = bool(torch.isfinite(out).all().item())
        except Exception as exc:
            report["kernel_ok"] = False
            report["kernel_error"] = first_line(exc)

print("LLMSTACK_FLASH_ATTN_PROBE=" + json.dumps(report))
"""

# Release wheels each flash-attention tag publishes, read from that tag's
# .github/workflows/publish.yml (Dao-AILab/flash-attention): the build_wheels matrix
# python-version x torch-version x cuda-version x cxx11_abi, minus its `exclude` entries, built
# on `os` (ubuntu-*, x86_64 only) and renamed "+cu<CUDA major>torch<major.minor>cxx11abi<ABI>"
# (the "Build wheel" step, the name setup.py get_wheel_url() asks for; at v2.8.3 publish.yml lines
# 40-56 and 147). Wheels are named after torch's CUDA major from v2.7.0 on ("cu12"), after the
# exact toolkit before. sm_100/sm_120 kernels are only compiled when that toolkit is >= 12.8
# (setup.py, "bare_metal_version >= 12.8").
# "excluded" rows are (torch, python tag or None = any, CUDA major or None = any).
# Not listed on purpose: v2.8.3.post1. Its tag's publish.yml is v2.8.3's matrix unchanged, yet its
# setup.py asks for cu13 wheels that main's _build.yml builds: what that release published cannot
# be read from the tag, so `auto` refuses it and a wheel URL (mode url) is the way to use it.
BOTH_ABIS = ("FALSE", "TRUE")
PY39_313 = ("cp39", "cp310", "cp311", "cp312", "cp313")
RELEASES = {
    "2.6.3": {
        "source": "v2.6.3:.github/workflows/publish.yml",
        "torch": ("2.0", "2.1", "2.2", "2.3", "2.4"),
        "python": ("cp38", "cp39", "cp310", "cp311", "cp312"),
        "cuda_tags": {"11": "118", "12": "123"},
        "build_cuda": "12.3",
        "cxx11abi": BOTH_ABIS,
        "machines": ("x86_64",),
        "excluded": (("2.0", "cp312", None), ("2.1", "cp312", None), ("2.0", None, "12")),
    },
    "2.7.4": {
        "source": "v2.7.4:.github/workflows/publish.yml",
        "torch": ("2.1", "2.2", "2.3", "2.4", "2.5", "2.6"),
        "python": PY39_313,
        "cuda_tags": {"12": "12"},
        "build_cuda": "12.4",
        "cxx11abi": BOTH_ABIS,
        "machines": ("x86_64",),
        "excluded": (
            ("2.1", "cp312", None),
            ("2.1", "cp313", None),
            ("2.2", "cp313", None),
            ("2.3", "cp313", None),
            ("2.4", "cp313", None),
        ),
    },
    "2.7.4.post1": {
        "source": "v2.7.4.post1:.github/workflows/publish.yml",
        "torch": ("2.2", "2.3", "2.4", "2.5", "2.6"),
        "python": PY39_313,
        "cuda_tags": {"12": "12"},
        "build_cuda": "12.4",
        "cxx11abi": BOTH_ABIS,
        "machines": ("x86_64",),
        "excluded": (("2.2", "cp313", None), ("2.3", "cp313", None), ("2.4", "cp313", None)),
    },
}
for _version, _cuda in (("2.8.0", "12.9"), ("2.8.0.post2", "12.9"), ("2.8.1", "12.9"), ("2.8.2", "12.9")):
    RELEASES[_version] = {
        "source": "v%s:.github/workflows/publish.yml" % _version,
        "torch": ("2.4", "2.5", "2.6", "2.7"),
        "python": PY39_313,
        "cuda_tags": {"12": "12"},
        "build_cuda": _cuda,
        "cxx11abi": BOTH_ABIS,
        "machines": ("x86_64",),
        "excluded": (("2.4", "cp313", None),),
    }
# v2.8.3: python 3.9-3.13 x torch 2.4.0/2.5.1/2.6.0/2.7.1/2.8.0 x CUDA 12.9.1 x cxx11abi FALSE/TRUE,
# minus torch 2.4 with Python 3.13, on ubuntu-22.04 (x86_64). No torch 2.9 (TabbyAPI main's floor),
# no CUDA 13, no aarch64.
RELEASES["2.8.3"] = dict(
    RELEASES["2.8.2"], source="v2.8.3:.github/workflows/publish.yml", torch=("2.4", "2.5", "2.6", "2.7", "2.8")
)

DEFAULT_WHEEL_VERSION = "2.8.3"
DEFAULT_MIN_VERSION = "2.5.7"

UNDEFINED_SYMBOL_RE = re.compile(r"undefined symbol: (\S+)")
NO_KERNEL_MARKS = ("no kernel image is available", "FlashAttention only supports Ampere GPUs or newer")

PROBLEMS = (
    "ok",
    "no_torch",
    "no_cuda",
    "missing",
    "abi_or_torch_mismatch",
    "too_old",
    "no_kernel_for_gpu",
    "kernel_failed",
)


def version_key(version: str | None) -> tuple:
    """Sortable key for versions like 2.8.3, 2.7.4.post1 or 2.13.0+cpu (local part ignored)."""
    if not version:
        return ()
    public = version.split("+", 1)[0]
    parts = []
    for piece in public.split("."):
        match = re.match(r"(\d+)(.*)", piece)
        if match:
            parts.append((int(match.group(1)), match.group(2)))
        else:
            parts.append((-1, piece))
    return tuple(parts)


def version_at_least(version: str | None, minimum: str) -> bool:
    return version_key(version) >= version_key(minimum)


def torch_minor(torch_version: str | None) -> str | None:
    match = re.match(r"(\d+)\.(\d+)", torch_version or "")
    return "%s.%s" % match.groups() if match else None


def cuda_major(cuda_version: str | None) -> str | None:
    match = re.match(r"(\d+)", cuda_version or "")
    return match.group(1) if match else None


def parse_probe_output(stdout: str) -> dict | None:
    for line in reversed((stdout or "").splitlines()):
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK) :])
    return None


def _has_blackwell_kernels(release: dict | None) -> bool | None:
    if release is None:
        return None
    return version_at_least(release["build_cuda"], "12.8")


def recommend_wheel(report: dict, wheel_version: str) -> dict | None:
    """The release wheel matching the probed environment; None when torch has no CUDA."""
    torch_mm = torch_minor(report.get("torch_version"))
    cuda = cuda_major(report.get("torch_cuda"))
    if torch_mm is None or cuda is None:
        return None
    release = RELEASES.get(wheel_version)
    python_tag = report["python_tag"]
    machine = report.get("machine") or "x86_64"
    abi = "TRUE" if report.get("cxx11abi") else "FALSE"
    cuda_tag = release["cuda_tags"].get(cuda, cuda) if release else cuda
    if not release and not version_at_least(wheel_version, "2.7.0"):
        cuda_tag = None
    filename = None
    if cuda_tag:
        filename = "flash_attn-%s+cu%storch%scxx11abi%s-%s-%s-linux_%s.whl" % (
            wheel_version,
            cuda_tag,
            torch_mm,
            abi,
            python_tag,
            python_tag,
            machine,
        )
    published, why = _published(release, wheel_version, torch_mm, python_tag, cuda, machine, abi)
    capabilities = [device["capability"] for device in report.get("devices") or []]
    blackwell_kernels = _has_blackwell_kernels(release)
    missing_arches = []
    for capability in capabilities:
        if not kernel_arch_for(capability, blackwell_kernels):
            missing_arches.append(capability)
    return {
        "version": wheel_version,
        "filename": filename,
        "url": RELEASE_URL.format(version=wheel_version, filename=filename) if filename else None,
        "published": published,
        "why_not_published": why,
        "published_per": "Dao-AILab/flash-attention@%s" % release["source"] if release else None,
        "python_tag": python_tag,
        "torch": torch_mm,
        "cuda_major": cuda,
        "cxx11abi": abi,
        "platform": "linux_%s" % machine,
        "built_with_cuda": release["build_cuda"] if release else None,
        "has_blackwell_kernels": blackwell_kernels,
        "lacks_kernels_for": missing_arches,
    }


def _published(release, wheel_version, torch_mm, python_tag, cuda, machine, abi) -> tuple[bool | None, str | None]:
    if release is None:
        return None, (
            "flash-attn %s is not in this module's table of published release wheels (%s), so which wheels it "
            "published is unknown" % (wheel_version, ", ".join(sorted(RELEASES, key=version_key)))
        )
    if machine not in release["machines"]:
        return False, "flash-attn %s publishes Linux wheels for %s only, not %s" % (
            wheel_version,
            ", ".join(release["machines"]),
            machine,
        )
    if cuda not in release["cuda_tags"]:
        return False, "flash-attn %s publishes wheels for CUDA %s torch builds only, not CUDA %s" % (
            wheel_version,
            "/".join(sorted(release["cuda_tags"])),
            cuda,
        )
    if torch_mm not in release["torch"]:
        return False, "flash-attn %s publishes wheels for torch %s only, not %s" % (
            wheel_version,
            ", ".join(release["torch"]),
            torch_mm,
        )
    if python_tag not in release["python"]:
        return False, "flash-attn %s publishes wheels for %s only, not %s" % (
            wheel_version,
            ", ".join(release["python"]),
            python_tag,
        )
    if abi not in release["cxx11abi"]:
        return False, "flash-attn %s publishes cxx11abi%s wheels only, not cxx11abi%s" % (
            wheel_version,
            "/".join(release["cxx11abi"]),
            abi,
        )
    for torch_ex, python_ex, cuda_ex in release["excluded"]:
        if torch_ex == torch_mm and python_ex in (None, python_tag) and cuda_ex in (None, cuda):
            return False, "flash-attn %s has no wheel for torch %s with %s" % (wheel_version, torch_mm, python_tag)
    return True, None


def published_wheels(wheel_version: str) -> list[str]:
    """Every wheel file name the table says that release published (for tests and reports)."""
    release = RELEASES[wheel_version]
    names = []
    for machine in release["machines"]:
        for cuda, cuda_tag in release["cuda_tags"].items():
            for torch_mm in release["torch"]:
                for python_tag in release["python"]:
                    for abi in release["cxx11abi"]:
                        if _published(release, wheel_version, torch_mm, python_tag, cuda, machine, abi)[0]:
                            names.append(
                                "flash_attn-%s+cu%storch%scxx11abi%s-%s-%s-linux_%s.whl"
                                % (wheel_version, cuda_tag, torch_mm, abi, python_tag, python_tag, machine)
                            )
    return names


def kernel_arch_for(capability: str, blackwell_kernels: bool | None) -> str | None:
    """Which compiled flash-attn 2 kernel serves a GPU: a cubin runs on its own major, same or
    higher minor (sm_80 serves 8.6/8.9, sm_100 serves 10.3, sm_120 serves 12.1)."""
    major = int(capability.split(".", 1)[0])
    if major == 8:
        return "sm_80"
    if major == 9:
        return "sm_90"
    if major in (10, 12) and blackwell_kernels is not False:
        return "sm_%d0" % major
    return None


# Source builds, after flash-attention v2.8.3 setup.py (lines as of that tag: cuda_archs() 68-70,
# -gencode flags 180-191, append_nvcc_threads() 123-125, CachedWheelsCommand 471-500, MAX_JOBS 508-521):
# - cuda_archs() reads FLASH_ATTN_CUDA_ARCHS (default "80;90;100;120") and compiles exactly the
#   values 80, 90 (nvcc >= 11.8), 100 and 120 (nvcc >= 12.8) as -gencode flags; any other value is
#   silently skipped. Those flags go into extra_compile_args["nvcc"], and torch's
#   cpp_extension._get_cuda_arch_flags() returns [] once a caller flag names an arch, so
#   TORCH_CUDA_ARCH_LIST is ignored (it only counts when FLASH_ATTN_CUDA_ARCHS selects nothing).
# - A cubin runs on its own major at the same or a higher minor, hence one value per major.
# - NinjaBuildExtension sets MAX_JOBS only when unset, to min(cpu_count // 2, available GB / 9)
#   ("each JOB peak memory cost is ~8-9GB when threads = 4") and imports psutil to do it; the
#   threads are NVCC_THREADS (append_nvcc_threads, default 4). The release CI builds with
#   MAX_JOBS=1 NVCC_THREADS=2 on 16 GB runners with 10 GB swap (publish.yml, "Build wheel").
# - FLASH_ATTENTION_FORCE_BUILD=TRUE skips CachedWheelsCommand, which otherwise downloads the
#   release wheel get_wheel_url() guesses and installs that instead of building.
SOURCE_BUILD_ARCHS = {"8": "80", "9": "90", "10": "100", "12": "120"}
NVCC_THREADS = 4
BUILD_JOB_MIB = 9 * 1024
LOW_MEMORY_NVCC_THREADS = 2


def build_arch(value: str) -> str | None:
    """FLASH_ATTN_CUDA_ARCHS value for a compute capability ("12.0", "8.6") or an arch ("120",
    "sm_90"); None when setup.py would compile nothing for it."""
    text = str(value).strip().lower()
    if text.startswith("sm_"):
        text = text[3:]
    if "." in text:
        return SOURCE_BUILD_ARCHS.get(text.split(".", 1)[0])
    return text if text in SOURCE_BUILD_ARCHS.values() else None


def build_jobs(memory_available_mib: int | None, cpus: int | None, cap: int = 0) -> dict:
    """MAX_JOBS/NVCC_THREADS for a node: setup.py's own rule (one job per 9 GiB available at 4 nvcc
    threads, at most half the CPUs), computed here so it is reported and psutil is not needed,
    then capped by `cap` (0: no cap). Under 9 GiB: one job at 2 threads, like the release CI."""
    cpu_jobs = max(1, (cpus or 2) // 2)
    memory_jobs = (memory_available_mib // BUILD_JOB_MIB) if memory_available_mib is not None else cpu_jobs
    threads = NVCC_THREADS if memory_jobs >= 1 else LOW_MEMORY_NVCC_THREADS
    jobs = max(1, min(cpu_jobs, memory_jobs))
    if cap > 0:
        jobs = min(jobs, cap)
    return {
        "MAX_JOBS": str(jobs),
        "NVCC_THREADS": str(threads),
        "rule": "min(cpus // 2 = %d, MemAvailable %s MiB // %d MiB per job at %d nvcc threads)%s = %d"
        % (cpu_jobs, memory_available_mib, BUILD_JOB_MIB, NVCC_THREADS, " capped at %d" % cap if cap > 0 else "", jobs),
    }


def source_build(
    report: dict,
    wheel_version: str,
    python: str,
    capabilities: list | None = None,
    cuda_archs: list | None = None,
    memory_available_mib: int | None = None,
    cpus: int | None = None,
    max_jobs: int = 0,
) -> dict:
    """Environment and command of a source build limited to this node's GPUs. `cuda_archs` (explicit)
    wins over `capabilities` (gpu_facts), which win over the devices torch reports; `error` names
    the fix when nothing is left to build for."""
    if cuda_archs:
        wanted, origin = [str(arch) for arch in cuda_archs], "cuda_archs"
    elif capabilities:
        wanted, origin = [str(cap) for cap in capabilities], "the GPUs' compute capability"
    else:
        wanted = [device["capability"] for device in report.get("devices") or []]
        origin = "the devices torch sees"
    archs = sorted({build_arch(item) for item in wanted} - {None}, key=int)
    unsupported = sorted({item for item in wanted if build_arch(item) is None})
    error = None
    if not wanted:
        error = (
            "no GPU architecture to build flash-attn for (no compute capability from nvidia-smi or torch): set "
            "tabbyapi_flash_attn_cuda_archs (the module's cuda_archs), e.g. 120 for sm_120, 90 for H100"
        )
    elif not archs or (origin == "cuda_archs" and unsupported):
        error = (
            "flash-attn %s's setup.py compiles FLASH_ATTN_CUDA_ARCHS values 80, 90, 100 and 120 only (sm_80 also "
            "serves 8.6/8.9, sm_100 10.x, sm_120 12.x; flash-attn 2 needs Ampere or newer), and %s gives %s"
            % (wheel_version, origin, ", ".join(unsupported))
        )
    env = {"FLASH_ATTENTION_FORCE_BUILD": "TRUE"}
    jobs = build_jobs(memory_available_mib, cpus, max_jobs)
    env.update(MAX_JOBS=jobs["MAX_JOBS"], NVCC_THREADS=jobs["NVCC_THREADS"])
    if archs:
        env["FLASH_ATTN_CUDA_ARCHS"] = ";".join(archs)
    return {
        "env": env,
        "cuda_archs": archs,
        "arch_origin": origin,
        "skipped_capabilities": unsupported,
        "max_jobs_rule": jobs["rule"],
        "memory_available_mib": memory_available_mib,
        "cpus": cpus,
        "error": error,
        "command": [python, "-m", "pip", "install", "flash-attn==%s" % wheel_version, "--no-build-isolation"],
        "needs": "nvcc from a CUDA toolkit >= 12.8 for sm_100/sm_120 (>= 11.8 for sm_90, >= 11.7 otherwise) "
        "matching torch's CUDA major",
    }


def wheel_refusal(wheel: dict | None, python: str) -> str | None:
    """Why `auto` must not install the recommended wheel, with the three ways out; None when the
    release published it and it carries kernels for every GPU seen."""
    if wheel and wheel["published"] is True and not wheel["lacks_kernels_for"]:
        return None
    if wheel is None:
        why = "torch in %s has no CUDA build, so no flash-attn wheel fits" % python
    elif wheel["published"] is not True:
        why = "%s: %s was never published" % (wheel["why_not_published"], wheel["filename"])
    else:
        why = (
            "flash-attn %s wheels (built with CUDA %s) have no kernels for compute capability %s: use 2.8.0 or newer "
            "(wheel_version, the role's tabbyapi_flash_attn_version) for sm_100/sm_120; sm_80 is the oldest flash-attn "
            "2 supports" % (wheel["version"], wheel["built_with_cuda"], ", ".join(wheel["lacks_kernels_for"]))
        )
    return (
        "%s. Nothing was installed. Ways out: (1) a known-good venv tarball with torch and flash-attn built "
        "together (tabbyapi_install_method: venv_tarball); (2) build it from source on the node "
        "(tabbyapi_flash_attn: source); (3) a wheel you trust for exactly this python/torch/CUDA/ABI "
        "(tabbyapi_flash_attn: url with tabbyapi_flash_attn_url)" % why
    )


def diagnose(report: dict, min_version: str, wheel: dict | None, python: str) -> tuple[str, str]:
    """(problem, message naming the fix) for a probe report."""
    install = _install_hint(wheel, python)
    if "torch_version" not in report:
        if report.get("torch_missing"):
            return (
                "no_torch",
                "torch is not installed in %s: install a CUDA build of torch first, then flash-attn" % python,
            )
        return "no_torch", "torch cannot be imported in %s (%s): repair or reinstall torch" % (
            python,
            report.get("torch_error"),
        )
    torch_version = report["torch_version"]
    if not report.get("torch_cuda"):
        return "no_cuda", (
            "torch %s in %s is a CPU-only build, and flash-attn needs CUDA: install a CUDA build "
            "(%s -m pip install torch==%s --index-url https://download.pytorch.org/whl/cuXYZ, with the cuXYZ your "
            "driver supports, e.g. cu128 for Blackwell), then flash-attn"
            % (torch_version, python, python, torch_version.split("+", 1)[0])
        )
    error = report.get("flash_attn_error")
    if error is not None and (report.get("flash_attn_missing") or report.get("flash_attn_dist_version") is None):
        return "missing", "flash-attn is not installed in %s: %s" % (python, install)
    if error is not None and error.startswith("ModuleNotFoundError"):
        return (
            "missing",
            "flash_attn is installed in %s but a module it needs is not (%s): install it with %s -m pip install"
            % (python, error, python),
        )
    if error is not None:
        symbol = UNDEFINED_SYMBOL_RE.search(error)
        if symbol or "ImportError" in error or "OSError" in error:
            return "abi_or_torch_mismatch", (
                "flash-attn %s does not load with torch %s (cxx11abi %s): %s. It was built for another torch, CUDA "
                "or C++ ABI; reinstall the matching wheel: %s"
                % (
                    report.get("flash_attn_dist_version"),
                    torch_version,
                    "TRUE" if report.get("cxx11abi") else "FALSE",
                    symbol.group(0) if symbol else error,
                    install.replace("pip install", "pip install --force-reinstall --no-deps"),
                )
            )
        return "abi_or_torch_mismatch", "importing flash_attn fails (%s): %s" % (error, install)
    installed = report.get("flash_attn_version") or report.get("flash_attn_dist_version")
    if not version_at_least(installed, min_version):
        return "too_old", "flash-attn %s is older than the required %s: %s" % (installed, min_version, install)
    if not report.get("cuda_available"):
        return "no_cuda", (
            "flash-attn %s and torch %s+CUDA %s are installed, but CUDA is not available at run time (%s): check the "
            "NVIDIA driver (nvidia-smi), CUDA_VISIBLE_DEVICES and device permissions"
            % (installed, torch_version, report.get("torch_cuda"), report.get("cuda_error") or "no GPU visible")
        )
    kernel_error = report.get("kernel_error")
    if kernel_error:
        capabilities = ", ".join("sm_%s" % d["capability"].replace(".", "") for d in report.get("devices") or [])
        if any(mark.lower() in kernel_error.lower() for mark in NO_KERNEL_MARKS):
            return "no_kernel_for_gpu", (
                "flash-attn %s has no kernel for this GPU (%s): %s. Blackwell (sm_100/sm_120) kernels exist only in "
                "builds made with CUDA >= 12.8 (release wheels from 2.8.0 on; 2.7.4.post1 has none); "
                "flash-attn 2 needs "
                "Ampere (sm_80) or newer. Fix: %s" % (installed, capabilities, kernel_error, install)
            )
        return "kernel_failed", "a flash-attn %s test kernel failed on %s: %s" % (installed, capabilities, kernel_error)
    return "ok", "flash-attn %s works with torch %s (CUDA %s)%s" % (
        installed,
        torch_version,
        report.get("torch_cuda"),
        " and ran a kernel" if report.get("kernel_ok") else "",
    )


def _install_hint(wheel: dict | None, python: str) -> str:
    refusal = wheel_refusal(wheel, python)
    return refusal if refusal else "%s -m pip install %s" % (python, wheel["url"])
