"""Unit tests for the nvidia-smi parsers in module_utils/_nvidia_smi.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ansible_collections.llmstack.inference.plugins.module_utils import _nvidia_smi as smi


@pytest.mark.parametrize(
    ("capability", "family"),
    [
        ("7.0", "Volta"),
        ("7.5", "Turing"),
        ("8.0", "Ampere"),
        ("8.6", "Ampere"),
        ("8.7", "Ampere"),
        ("8.9", "Ada"),
        ("9.0", "Hopper"),
        ("10.0", "Blackwell"),
        ("10.3", "Blackwell"),
        ("12.0", "Blackwell"),
        ("12.1", "Blackwell"),
        ("6.1", "Pascal"),
        ("99.0", "unknown"),
        ("garbage", "unknown"),
        (None, "unknown"),
    ],
)
def test_architecture_for(capability, family):
    assert smi.architecture_for(capability) == family


@pytest.mark.parametrize(
    ("name", "capability"),
    [
        ("NVIDIA GeForce RTX 5090", "12.0"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "12.0"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "12.0"),
        ("NVIDIA B200", "10.0"),
        ("NVIDIA GB200", "10.0"),
        ("NVIDIA B300 SXM6 AC", "10.3"),
        ("NVIDIA GB10", "12.1"),
        ("NVIDIA H100 80GB HBM3", "9.0"),
        ("NVIDIA H200", "9.0"),
        ("NVIDIA GeForce RTX 4090", "8.9"),
        ("NVIDIA L40S", "8.9"),
        ("NVIDIA RTX 6000 Ada Generation", "8.9"),
        ("NVIDIA A100-SXM4-80GB", "8.0"),
        ("NVIDIA RTX A6000", "8.6"),
        ("NVIDIA A10G", "8.6"),
        ("NVIDIA GeForce RTX 3090", "8.6"),
        ("Tesla T4", "7.5"),
        ("Tesla V100-SXM2-32GB", "7.0"),
        ("Some Future GPU", None),
        (None, None),
    ],
)
def test_capability_from_name(name, capability):
    assert smi.capability_from_name(name) == capability


@pytest.mark.parametrize(
    "raw", ["[N/A]", "[Not Supported]", "N/A", "[Unknown Error]", "[Insufficient Permissions]", " "]
)
def test_unavailable_fields_become_none(raw):
    line = (
        "0, NVIDIA H100 80GB HBM3, GPU-5e2a7c94-1f0b-d836-4c9e-a07b3f2d6e81, %s, %s, 81008, 9.0, 550.90.07, "
        "00000000:18:00.0"
        % (
            raw,
            raw,
        )
    )
    (gpu,) = smi.parse_query_gpu(line)
    assert gpu["memory_total_mib"] is None
    assert gpu["memory_used_mib"] is None
    assert gpu["memory_free_mib"] == 81008


def test_unknown_compute_cap_falls_back_to_name():
    line = (
        "0, NVIDIA GeForce RTX 5090, GPU-6d3c0b8e-2a9f-7c41-5e1d-93b0a4f7c2e8, 32607, 2, 32111, [N/A], 570.153.02, "
        "00000000:01:00.0"
    )
    (gpu,) = smi.parse_query_gpu(line)
    assert (gpu["compute_capability"], gpu["compute_capability_source"], gpu["architecture"]) == (
        "12.0",
        "name",
        "Blackwell",
    )


def test_wrong_column_count_is_reported():
    with pytest.raises(smi.NvidiaSmiError, match="3 values for 9 fields"):
        smi.parse_query_gpu("0, NVIDIA B200, 183359")


@pytest.mark.parametrize(
    ("text", "cuda", "driver"),
    [
        (
            "| NVIDIA-SMI 570.133.20             Driver Version: 570.133.20     CUDA Version: 12.8     |",
            "12.8",
            "570.133.20",
        ),
        (
            "Driver Version                            : 550.90.07\nCUDA Version                              : 12.4\n",
            "12.4",
            "550.90.07",
        ),
        # Drivers from 610 rename both lines (NVIDIA's nvidia-smi release notes).
        (
            "KMD Version                               : 610.43.03\nCUDA UMD Version                          : 13.2\n",
            "13.2",
            "610.43.03",
        ),
        ("nothing useful", None, None),
    ],
)
def test_versions(text, cuda, driver):
    assert smi.parse_cuda_version(text) == cuda
    assert smi.parse_driver_version(text) == driver


@pytest.mark.parametrize(
    ("rc", "stdout", "expected"),
    [
        (
            9,
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure ...",
            "could not communicate",
        ),
        (6, "No devices were found", "found no NVIDIA devices"),
        (124, "", "did not answer in time"),
        (3, "Insufficient Permissions", "exit code 3: Insufficient Permissions"),
        (0, "0, NVIDIA B200, ...", None),
    ],
)
def test_failure_reason(rc, stdout, expected):
    reason = smi.failure_reason(rc, stdout, "")
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_summary_of_no_gpus():
    facts = smi.summarize([], None, None, "why")
    assert facts["llmstack_gpu_count"] == 0
    assert facts["llmstack_gpu_architectures"] == []
    assert facts["llmstack_gpu_cuda_arch_list"] == ""
    assert facts["llmstack_gpu_reason"] == "why"


# The shared corpus of recorded nvidia-smi outputs (tests/fixtures/nvidia_smi), as the guard and the
# router's VRAM probe read it too.
_CORPUS_DIR = Path(__file__).resolve().parents[4] / "tests" / "fixtures" / "nvidia_smi"
_SPEC = importlib.util.spec_from_file_location("nvidia_smi_corpus", _CORPUS_DIR / "nvidia_smi.py")
corpus = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(corpus)


def _runner(box):
    recording = corpus.load(box)
    return lambda *args: corpus.render(recording, list(args))


@pytest.mark.parametrize(
    ("box", "free"),
    [
        ("h100", [81008]),
        ("rtx5090_4090", [30603, 24060]),
        ("h100x2_uneven", [1000, 80000]),
        ("a100_mig", [26006]),
        ("gb10_na_memory", [None]),
    ],
)
def test_corpus_boxes_parse(box, free):
    gpus, reason = smi.query_gpus(_runner(box))
    assert reason is None
    assert [gpu["memory_free_mib"] for gpu in gpus] == free
    assert all(gpu["uuid"].startswith("GPU-") for gpu in gpus)


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        ("driver_library_mismatch", "does not match the user-space driver library (Driver/library version mismatch"),
        ("fallen_off_bus", "exit code 15: Unable to determine the device handle for GPU 0000:0B:00.0: Unknown Error:"),
        ("gpu_is_lost", "GPU 0000:02:00.0: GPU is lost. Reboot the system to recover this GPU: a GPU has fallen off"),
        ("driver_unreachable", "could not communicate with the NVIDIA driver"),
        ("no_devices", "found no NVIDIA devices"),
    ],
)
def test_corpus_failures_name_their_cause(box, reason):
    gpus, why = smi.query_gpus(_runner(box))
    assert gpus == []
    assert reason in why
