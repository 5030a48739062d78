"""Unit tests for llmstack.inference.flash_attn_check.

Most cases run the module's real probe under fake environments (tests/unit/plugins/
fake_python_envs.py emulates CUDA torch and flash-attn builds we cannot install without a
GPU). test_real_cpu_torch_venv runs it against a real venv holding the real CPU torch wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args
from ansible_collections.llmstack.inference.plugins.modules import flash_attn_check
from ansible_collections.llmstack.inference.tests.unit.plugins.fake_python_envs import (
    AMPERE_ONLY,
    NO_KERNEL_IMAGE,
    OUT_OF_MEMORY,
    make_env,
    write_interpreter,
)

RELEASES = "https://github.com/Dao-AILab/flash-attention/releases/download"


def run_module(capsys, **args):
    with patch_module_args(args), pytest.raises(SystemExit) as exited:
        flash_attn_check.main()
    return exited.value.code, json.loads(capsys.readouterr().out)


CASES = {
    "ok_with_kernel": {
        "env": {},
        "args": {"run_kernel": True},
        "problem": "ok",
        "wheel": "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl",
        "message": ["flash-attn 2.8.3 works with torch 2.8.0+cu128", "ran a kernel"],
        "kernel_ok": True,
    },
    "missing": {
        "env": {"torch": "2.7.1+cu126", "cuda": "12.6", "abi": False, "flash_attn": None},
        "args": {},
        "problem": "missing",
        "wheel": "flash_attn-2.8.3+cu12torch2.7cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
        "message": ["not installed", "-m pip install %s/v2.8.3/flash_attn-2.8.3+cu12torch2.7cxx11abiFALSE" % RELEASES],
    },
    "abi_or_torch_mismatch": {
        "env": {"unloadable": True},
        "args": {"run_kernel": True},
        "problem": "abi_or_torch_mismatch",
        "wheel": "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl",
        "message": ["undefined symbol: _ZN3c105Error", "--force-reinstall --no-deps", "cxx11abi TRUE"],
    },
    "too_old": {
        "env": {"torch": "2.3.1+cu121", "cuda": "12.1", "abi": False, "flash_attn": "2.5.6"},
        "args": {},
        "problem": "too_old",
        "wheel": "flash_attn-2.8.3+cu12torch2.3cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
        "message": [
            "2.5.6 is older than the required 2.5.7",
            "publishes wheels for torch 2.4, 2.5, 2.6, 2.7, 2.8 only",
        ],
        "published": False,
    },
    "no_kernel_for_blackwell": {
        "env": {
            "torch": "2.6.0+cu124",
            "cuda": "12.4",
            "abi": False,
            "flash_attn": "2.7.4.post1",
            "kernel": NO_KERNEL_IMAGE,
        },
        "args": {"run_kernel": True},
        "problem": "no_kernel_for_gpu",
        "wheel": "flash_attn-2.8.3+cu12torch2.6cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
        "message": ["no kernel image is available", "sm_120", "CUDA >= 12.8", "pip install %s/v2.8.3/" % RELEASES],
        "kernel_ok": False,
    },
    "no_kernel_for_turing": {
        "env": {"devices": (("Tesla T4", "7.5"),), "kernel": AMPERE_ONLY},
        "args": {"run_kernel": True},
        "problem": "no_kernel_for_gpu",
        "wheel": "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl",
        "message": ["sm_75", "Ampere (sm_80) or newer"],
    },
    "kernel_failed": {
        "env": {"kernel": OUT_OF_MEMORY},
        "args": {"run_kernel": True},
        "problem": "kernel_failed",
        "wheel": "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl",
        "message": ["OutOfMemoryError: CUDA out of memory"],
    },
    "cpu_only_torch": {
        "env": {"torch": "2.13.0+cpu", "cuda": None, "abi": True, "devices": (), "flash_attn": None},
        "args": {},
        "problem": "no_cuda",
        "wheel": None,
        "message": [
            "torch 2.13.0+cpu",
            "CPU-only build",
            "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu",
        ],
    },
    "cuda_unavailable_at_run_time": {
        "env": {"devices": ()},
        "args": {"run_kernel": True},
        "problem": "no_cuda",
        "wheel": "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_x86_64.whl",
        "message": ["CUDA is not available at run time", "nvidia-smi"],
    },
    "no_torch": {
        "env": {"torch": None, "flash_attn": None},
        "args": {},
        "problem": "no_torch",
        "wheel": None,
        "message": ["torch is not installed"],
    },
    "broken_torch": {
        "env": {
            "torch_import_error": 'OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")'
        },
        "args": {},
        "problem": "no_torch",
        "wheel": None,
        "message": ["torch cannot be imported", "libcudnn.so.9"],
    },
    "torch_without_wheels_in_release": {
        "env": {"torch": "2.10.0+cu130", "cuda": "13.0", "abi": True, "flash_attn": None},
        "args": {},
        "problem": "missing",
        "wheel": "flash_attn-2.8.3+cu13torch2.10cxx11abiTRUE-cp311-cp311-linux_x86_64.whl",
        "message": ["CUDA 12 torch builds only, not CUDA 13", "build it from source"],
        "published": False,
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outcomes(tmp_path, capsys, case):
    spec = CASES[case]
    python = make_env(tmp_path / "venv", **spec["env"])
    code, out = run_module(capsys, python=str(python), **spec["args"])

    assert code == 0, out
    assert out["changed"] is False
    assert out["problem"] == spec["problem"], out["message"]
    for fragment in spec["message"]:
        assert fragment in out["message"]
    assert out["python_tag"] == "cp%d%d" % sys.version_info[:2]
    wheel = out["recommended_wheel"]
    if spec["wheel"] is None:
        assert wheel is None
    else:
        assert wheel["filename"] == spec["wheel"].replace("cp311", out["python_tag"])
        assert wheel["url"] == "%s/v2.8.3/%s" % (RELEASES, wheel["filename"])
        assert wheel["published"] is spec.get("published", True)
    if "kernel_ok" in spec:
        assert out["kernel_ok"] is spec["kernel_ok"]


def test_reported_environment_details(tmp_path, capsys):
    python = make_env(
        tmp_path / "venv", devices=(("NVIDIA GeForce RTX 5090", "12.0"), ("NVIDIA GeForce RTX 4090", "8.9"))
    )
    _code, out = run_module(capsys, python=str(python))
    assert out["torch_version"] == "2.8.0+cu128"
    assert out["torch_cuda_version"] == "12.8"
    assert out["cxx11abi"] is True
    assert out["cuda_available"] is True
    assert out["device_capability"] == "12.0"
    assert [d["name"] for d in out["devices"]] == ["NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 4090"]
    assert out["flash_attn_version"] == "2.8.3"
    assert out["kernel_ok"] is None, "no kernel runs unless asked"
    # One value per major (sm_80 serves 8.9); TORCH_CUDA_ARCH_LIST is not set: setup.py ignores it.
    env = out["source_build"]["env"]
    assert env["FLASH_ATTN_CUDA_ARCHS"] == "80;120"
    assert "TORCH_CUDA_ARCH_LIST" not in env
    assert env["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    assert out["source_build"]["arch_origin"] == "the devices torch sees"
    assert out["source_build"]["cpus"] == os.cpu_count()
    assert int(env["MAX_JOBS"]) == max(1, min(os.cpu_count() // 2, out["source_build"]["memory_available_mib"] // 9216))
    assert out["source_build"]["command"][-2:] == ["flash-attn==2.8.3", "--no-build-isolation"]


def test_old_wheel_version_lacks_blackwell_kernels(tmp_path, capsys):
    python = make_env(tmp_path / "venv", torch="2.6.0+cu124", cuda="12.4", abi=False, flash_attn=None)
    _code, out = run_module(capsys, python=str(python), wheel_version="2.7.4.post1")
    wheel = out["recommended_wheel"]
    assert wheel["filename"].startswith("flash_attn-2.7.4.post1+cu12torch2.6cxx11abiFALSE-")
    assert wheel["has_blackwell_kernels"] is False
    assert wheel["lacks_kernels_for"] == ["12.0"]
    assert "have no kernels for compute capability 12.0: use 2.8.0 or newer" in out["message"]


def test_blackwell_with_pre_2_8_build_warns_without_kernel_run(tmp_path, capsys):
    python = make_env(tmp_path / "venv", torch="2.6.0+cu124", cuda="12.4", abi=False, flash_attn="2.7.4.post1")
    _code, out = run_module(capsys, python=str(python))
    assert out["problem"] == "ok"
    # ansible-core 2.19 wraps warnings in structured summaries; older cores give strings.
    assert "run_kernel=true" in json.dumps(out.get("warnings", []))


def test_check_mode_gives_the_same_answer(tmp_path, capsys):
    python = make_env(tmp_path / "venv", flash_attn=None)
    _code, normal = run_module(capsys, python=str(python))
    _code, checked = run_module(capsys, python=str(python), _ansible_check_mode=True)
    assert checked["problem"] == normal["problem"] == "missing"
    assert checked["recommended_wheel"] == normal["recommended_wheel"]
    assert checked["changed"] is False


def test_fail_on_problem(tmp_path, capsys):
    python = make_env(tmp_path / "venv", flash_attn=None)
    code, out = run_module(capsys, python=str(python), fail_on_problem=True)
    assert code == 1
    assert out["failed"] is True
    assert out["problem"] == "missing"
    assert out["msg"] == out["message"]


def test_environment_reaches_the_probe(tmp_path, capsys):
    python = make_env(tmp_path / "venv", flash_attn=None)
    wrapper = write_interpreter(
        tmp_path / "wrapped" / "python",
        '[ "$PROBE_MARKER" = "set-by-module" ] || { echo "PROBE_MARKER missing" >&2; exit 3; }\nexec "%s" "$@"'
        % python,
    )
    code, out = run_module(capsys, python=str(wrapper), environment={"PROBE_MARKER": "set-by-module"})
    assert code == 0, out
    assert out["problem"] == "missing"


def test_missing_interpreter_names_the_fix(tmp_path, capsys):
    code, out = run_module(capsys, python=str(tmp_path / "venv" / "bin" / "python"))
    assert code == 1
    assert "does not exist: create the environment first" in out["msg"]


def test_non_executable_interpreter(tmp_path, capsys):
    python = make_env(tmp_path / "venv")
    python.chmod(0o644)
    code, out = run_module(capsys, python=str(python))
    assert code == 1
    assert "is not executable: chmod +x" in out["msg"]


def test_interpreter_that_cannot_start(tmp_path, capsys):
    # What a venv copied to a host without its base Python prints.
    python = write_interpreter(
        tmp_path / "venv" / "bin" / "python",
        "echo '%s: error while loading shared libraries: libpython3.11.so.1.0: cannot open shared object file: "
        "No such file or directory' >&2\nexit 127" % (tmp_path / "venv" / "bin" / "python"),
    )
    code, out = run_module(capsys, python=str(python))
    assert code == 1
    assert "could not run the probe" in out["msg"]
    assert "exit code 127" in out["msg"]
    assert "libpython3.11.so.1.0" in out["msg"]


def test_probe_timeout(tmp_path, capsys):
    python = write_interpreter(tmp_path / "venv" / "bin" / "python", "sleep 30")
    code, out = run_module(capsys, python=str(python), timeout=1)
    assert code == 1
    assert "the probe timed out" in out["msg"]


def _cache_dir() -> Path:
    configured = os.environ.get("LLMSTACK_CACHE")
    if configured:
        return Path(configured)
    # tests/unit/plugins/modules/<this file> -> collection root; tools/ansible-test.sh links
    # the checkout's .cache into its temporary collection tree so the venv is built once.
    return Path(__file__).resolve().parents[4] / ".cache"


def cpu_torch_venv() -> Path:
    """A real venv with the real torch CPU wheel (/opt/wheels here, PyPI elsewhere), cached."""
    venv = _cache_dir() / "venvs" / ("flash-attn-check-torch-2.13.0-cpu-cp%d%d" % sys.version_info[:2])
    python = venv / "bin" / "python"
    if (venv / ".complete").exists() and python.exists():
        return python
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "torch==2.13.0"],
        check=True,
        timeout=1200,
    )
    (venv / ".complete").write_text("torch==2.13.0\n")
    return python


def test_real_cpu_torch_venv(capsys):
    python = cpu_torch_venv()
    code, out = run_module(capsys, python=str(python), run_kernel=True)
    assert code == 0, out
    assert out["problem"] == "no_cuda", out["message"]
    assert out["torch_version"].startswith("2.13.0")
    assert out["torch_cuda_version"] is None
    assert out["cuda_available"] is False
    assert isinstance(out["cxx11abi"], bool)
    assert out["flash_attn_version"] is None
    assert out["python_tag"] == "cp%d%d" % sys.version_info[:2]
    assert out["recommended_wheel"] is None
    assert "torch %s in %s is a CPU-only build" % (out["torch_version"], python) in out["message"]


@pytest.mark.parametrize(
    ("torch", "cuda", "abi", "why"),
    [
        ("2.9.1+cu128", "12.8", True, "torch 2.4, 2.5, 2.6, 2.7, 2.8 only, not 2.9"),
        ("2.9.1+cu130", "13.0", True, "CUDA 12 torch builds only, not CUDA 13"),
        ("2.7.1+cu126", "12.6", False, None),
    ],
)
def test_wheel_refusal_for_torch_without_release_wheels(tmp_path, capsys, torch, cuda, abi, why):
    # TabbyAPI main pins torch >= 2.9; flash-attn 2.8.3 published wheels up to torch 2.8 only.
    python = make_env(tmp_path / "venv", torch=torch, cuda=cuda, abi=abi, flash_attn=None)
    code, out = run_module(capsys, python=str(python))
    assert code == 0
    assert out["problem"] == "missing"
    if why is None:
        assert out["wheel_refusal"] is None
        assert out["recommended_wheel"]["published"] is True
        return
    assert why in out["wheel_refusal"]
    assert out["recommended_wheel"]["published"] is False
    for way_out in ("venv_tarball", "tabbyapi_flash_attn: source", "tabbyapi_flash_attn_url"):
        assert way_out in out["wheel_refusal"]
    assert out["wheel_refusal"] in out["message"]


def test_source_build_follows_the_nodes_gpus_and_memory(tmp_path, capsys, monkeypatch):
    python = make_env(tmp_path / "venv", flash_attn=None)
    monkeypatch.setattr(flash_attn_check, "memory_available_mib", lambda: 30 * 1024)
    monkeypatch.setattr(flash_attn_check.os, "cpu_count", lambda: 64)
    _code, out = run_module(capsys, python=str(python), capabilities=["10.0", "10.0", "12.0"])
    build = out["source_build"]
    assert build["env"]["FLASH_ATTN_CUDA_ARCHS"] == "100;120"
    assert build["arch_origin"] == "the GPUs' compute capability"
    assert (build["env"]["MAX_JOBS"], build["env"]["NVCC_THREADS"]) == ("3", "4")  # 30 GiB // 9 GiB
    assert build["memory_available_mib"] == 30 * 1024
    _code, out = run_module(capsys, python=str(python), capabilities=["12.0"], max_jobs=2)
    assert out["source_build"]["env"]["MAX_JOBS"] == "2"


def test_deprecated_arch_list_maps_to_cuda_archs(tmp_path, capsys):
    python = make_env(tmp_path / "venv", flash_attn=None)
    _code, out = run_module(capsys, python=str(python), arch_list="12.0;9.0")
    assert out["source_build"]["env"]["FLASH_ATTN_CUDA_ARCHS"] == "90;120"
    assert out["source_build"]["arch_origin"] == "cuda_archs"
    assert "tabbyapi_flash_attn_cuda_archs" in json.dumps(out.get("deprecations", []))


def test_memory_available_reads_proc_meminfo():
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        line = next(line for line in meminfo if line.startswith("MemAvailable:"))
    assert abs(flash_attn_check.memory_available_mib() - int(line.split()[1]) // 1024) < 2048
