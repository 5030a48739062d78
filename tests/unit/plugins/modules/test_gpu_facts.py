"""Unit tests for llmstack.inference.gpu_facts, run against an emulated nvidia-smi.

The emulator (tests/unit/plugins/nvidia_smi_recordings.py) replays output recorded on real
GPUs, so the module's real code path runs: binary lookup, run_command, retry without
compute_cap, CUDA version from `-q` or the table header, and the timeout guard.
"""

from __future__ import annotations

import json
import re

import pytest
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.testing import patch_module_args
from ansible_collections.llmstack.inference.plugins.modules import gpu_facts
from ansible_collections.llmstack.inference.tests.unit.plugins.nvidia_smi_recordings import (
    BOXES,
    FAILURES,
    QUERY_ARGS,
    install_fake_nvidia_smi,
    recorded_calls,
)


def run_module(capsys, **args):
    with patch_module_args(args), pytest.raises(SystemExit) as exited:
        gpu_facts.main()
    return exited.value.code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("box", sorted(BOXES))
@pytest.mark.parametrize("check_mode", [False, True])
def test_recorded_boxes(tmp_path, capsys, box, check_mode):
    smi = install_fake_nvidia_smi(tmp_path / "bin", BOXES[box]["answers"])
    args = {"nvidia_smi_path": str(smi)}
    if check_mode:
        args["_ansible_check_mode"] = True
    code, out = run_module(capsys, **args)
    expect = BOXES[box]["expect"]
    facts = out["ansible_facts"]

    assert code == 0, out
    assert out["changed"] is False
    assert facts["llmstack_gpu_count"] == expect["count"]
    assert [gpu["name"] for gpu in facts["llmstack_gpus"]] == expect["names"]
    assert [gpu["index"] for gpu in facts["llmstack_gpus"]] == list(range(expect["count"]))
    assert facts["llmstack_gpu_compute_capabilities"] == expect["capabilities"]
    assert facts["llmstack_gpu_architectures"] == expect["architectures"]
    assert facts["llmstack_gpu_memory_total_mib"] == expect["total"]
    assert facts["llmstack_gpu_memory_used_mib"] == expect["used"]
    assert facts["llmstack_gpu_memory_free_mib"] == expect["free"]
    assert facts["llmstack_gpu_driver_version"] == expect["driver"]
    assert facts["llmstack_gpu_cuda_version"] == expect["cuda"]
    assert facts["llmstack_gpu_has_blackwell"] is expect["blackwell"]
    assert facts["llmstack_gpu_cuda_arch_list"] == expect["arch_list"]
    assert facts["llmstack_gpu_reason"] is None
    for gpu in facts["llmstack_gpus"]:
        assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", gpu["uuid"])
        assert gpu["compute_capability_source"] == expect.get("capability_source", "nvidia-smi")
        assert gpu["sm"] == gpu["compute_capability"].replace(".", "")
    calls = recorded_calls(smi)
    assert calls[0] == QUERY_ARGS, "the full query comes first"
    assert all(not call or call[0] in ("-q",) or call[0].startswith("--query-gpu=") for call in calls)


def test_legacy_driver_retries_without_compute_cap(tmp_path, capsys):
    smi = install_fake_nvidia_smi(tmp_path / "bin", BOXES["v100_legacy_driver"]["answers"])
    run_module(capsys, nvidia_smi_path=str(smi))
    calls = recorded_calls(smi)
    assert calls[1][0] == "--query-gpu=index,name,uuid,memory.total,memory.used,memory.free,driver_version,pci.bus_id"


def test_mixed_box_keeps_per_gpu_details(tmp_path, capsys):
    smi = install_fake_nvidia_smi(tmp_path / "bin", BOXES["mixed_5090_4090"]["answers"])
    _code, out = run_module(capsys, nvidia_smi_path=str(smi))
    first, second = out["ansible_facts"]["llmstack_gpus"]
    assert (first["architecture"], first["memory_total_mib"], first["pci_bus_id"]) == (
        "Blackwell",
        32607,
        "00000000:01:00.0",
    )
    assert (second["architecture"], second["memory_used_mib"], second["uuid"]) == (
        "Ada",
        18,
        "GPU-0c5d9e3b-8a17-f24c-6e0d-b3a9c1f7e528",
    )


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failures_give_zero_gpus_and_a_reason(tmp_path, capsys, failure):
    smi = install_fake_nvidia_smi(tmp_path / "bin", FAILURES[failure]["answers"])
    code, out = run_module(capsys, nvidia_smi_path=str(smi), timeout=1)
    facts = out["ansible_facts"]
    assert code == 0, out
    assert facts["llmstack_gpu_count"] == 0
    assert facts["llmstack_gpus"] == []
    assert facts["llmstack_gpu_has_blackwell"] is False
    assert facts["llmstack_gpu_memory_total_mib"] is None
    assert FAILURES[failure]["reason_contains"] in facts["llmstack_gpu_reason"]


def test_missing_binary_at_given_path(tmp_path, capsys):
    code, out = run_module(capsys, nvidia_smi_path=str(tmp_path / "nowhere" / "nvidia-smi"))
    assert code == 0
    assert out["ansible_facts"]["llmstack_gpu_count"] == 0
    assert "not found at" in out["ansible_facts"]["llmstack_gpu_reason"]


def test_not_in_path(monkeypatch, capsys):
    real_get_bin_path = AnsibleModule.get_bin_path

    def no_nvidia_smi(self, arg, *args, **kwargs):
        return None if arg == "nvidia-smi" else real_get_bin_path(self, arg, *args, **kwargs)

    monkeypatch.setattr(AnsibleModule, "get_bin_path", no_nvidia_smi)
    code, out = run_module(capsys)
    assert code == 0
    assert "nvidia-smi was not found on this host" in out["ansible_facts"]["llmstack_gpu_reason"]


def test_require_gpu_fails_with_the_reason(tmp_path, capsys):
    smi = install_fake_nvidia_smi(tmp_path / "bin", FAILURES["driver_unreachable"]["answers"])
    code, out = run_module(capsys, nvidia_smi_path=str(smi), require_gpu=True)
    assert code == 1
    assert out["failed"] is True
    assert "could not communicate with the NVIDIA driver" in out["msg"]
    assert out["ansible_facts"]["llmstack_gpu_count"] == 0


def test_not_executable(tmp_path, capsys):
    smi = install_fake_nvidia_smi(tmp_path / "bin", BOXES["rtx5090"]["answers"])
    smi.chmod(0o644)
    _code, out = run_module(capsys, nvidia_smi_path=str(smi))
    assert "is not executable" in out["ansible_facts"]["llmstack_gpu_reason"]
