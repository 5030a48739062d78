"""Role common's GPU preflight (roles/common/tasks/gpu.yml) against an emulated nvidia-smi.

Runs real ansible-playbook on localhost: the gpu_facts module reads the nvidia-smi EMULATOR from
tests/unit/plugins/nvidia_smi_recordings.py (recorded output of real GPUs; we have no GPU in CI),
and the preflight must pass or fail with a message that names the fix.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit" / "plugins"))

from nvidia_smi_recordings import BOXES, FAILURES, install_fake_nvidia_smi, q_compute  # noqa: E402

PLAYBOOK = """
- name: GPU preflight of role common
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Run the preflight entry tasks
      ansible.builtin.include_role:
        name: llmstack.inference.common
        tasks_from: gpu
"""


def blackwell_with_driver(driver: str, cuda: str) -> dict:
    """The recorded RTX 5090 box with its driver and CUDA versions replaced."""
    answers = copy.deepcopy(BOXES["rtx5090"]["answers"])
    answers["query"]["stdout"] = answers["query"]["stdout"].replace("570.153.02", driver)
    answers["q"]["stdout"] = q_compute(driver, cuda, ["00000000:01:00.0"])
    return answers


def run_preflight(
    localhost_playbook, tmp_path: Path, answers: dict, **extra_vars: object
) -> subprocess.CompletedProcess[str]:
    smi = install_fake_nvidia_smi(tmp_path / "bin", answers)
    playbook = tmp_path / "preflight.yml"
    playbook.write_text(PLAYBOOK)
    return localhost_playbook(playbook, extra_vars={"common_gpu_nvidia_smi_path": str(smi), **extra_vars})


@pytest.mark.parametrize("box", ["rtx5090", "b200x8", "mixed_5090_4090", "h100"])
def test_recorded_gpus_pass(localhost_playbook, tmp_path: Path, box: str) -> None:
    if box not in BOXES:
        pytest.fail(f"recording {box} is missing from nvidia_smi_recordings.BOXES ({sorted(BOXES)})")
    result = run_preflight(localhost_playbook, tmp_path, BOXES[box]["answers"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("driver", "cuda", "ok"),
    [
        ("565.57.01", "12.7", False),
        ("570.86.10", "12.7", False),
        ("570.86.10", "12.8", True),
        ("580.65.06", "13.0", True),
    ],
)
def test_blackwell_needs_driver_570_and_cuda_12_8(
    localhost_playbook, tmp_path: Path, driver: str, cuda: str, ok: bool
) -> None:
    result = run_preflight(localhost_playbook, tmp_path, blackwell_with_driver(driver, cuda))
    assert (result.returncode == 0) is ok, result.stdout + result.stderr
    if not ok:
        assert "has a Blackwell GPU (NVIDIA GeForce RTX 5090)" in result.stdout
        assert f"driver {driver} / CUDA {cuda}" in result.stdout
        assert "Blackwell needs driver >= 570 and CUDA >= 12.8" in result.stdout


def test_older_gpu_with_old_driver_is_not_held_to_blackwell_minimums(localhost_playbook, tmp_path: Path) -> None:
    answers = copy.deepcopy(BOXES["rtx4090"]["answers"])
    driver = answers["query"]["stdout"].split(", ")[7]
    answers["query"]["stdout"] = answers["query"]["stdout"].replace(driver, "535.183.01")
    answers["q"]["stdout"] = q_compute("535.183.01", "12.2", ["00000000:01:00.0"])
    result = run_preflight(localhost_playbook, tmp_path, answers)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("failure", ["driver_unreachable", "no_devices"])
def test_host_without_gpu_fails_unless_allowed(localhost_playbook, tmp_path: Path, failure: str) -> None:
    refused = run_preflight(localhost_playbook, tmp_path, FAILURES[failure]["answers"])
    assert refused.returncode != 0
    assert "has no usable NVIDIA GPU" in refused.stdout
    assert "set common_gpu_required: false" in refused.stdout
    allowed = run_preflight(localhost_playbook, tmp_path, FAILURES[failure]["answers"], common_gpu_required=False)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
