"""Unit tests for the wheel naming and diagnosis in module_utils/_flash_attn.py."""

from __future__ import annotations

import pytest
from ansible_collections.llmstack.inference.plugins.module_utils import _flash_attn as fa


def report(**overrides):
    base = {
        "python_tag": "cp311",
        "machine": "x86_64",
        "torch_version": "2.8.0+cu128",
        "torch_cuda": "12.8",
        "cxx11abi": False,
        "cuda_available": True,
        "devices": [{"index": 0, "name": "NVIDIA GeForce RTX 5090", "capability": "12.0"}],
        "flash_attn_version": "2.8.3",
        "flash_attn_dist_version": "2.8.3",
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("overrides", "version", "filename", "published"),
    [
        ({}, "2.8.3", "flash_attn-2.8.3+cu12torch2.8cxx11abiFALSE-cp311-cp311-linux_x86_64.whl", True),
        (
            {"cxx11abi": True, "python_tag": "cp312"},
            "2.8.3",
            "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl",
            True,
        ),
        (
            {"python_tag": "cp310", "torch_version": "2.3.1+cu118", "torch_cuda": "11.8"},
            "2.6.3",
            "flash_attn-2.6.3+cu118torch2.3cxx11abiFALSE-cp310-cp310-linux_x86_64.whl",
            True,
        ),
        (
            {"torch_version": "2.4.1+cu124", "torch_cuda": "12.4"},
            "2.6.3",
            "flash_attn-2.6.3+cu123torch2.4cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
            True,
        ),
        (
            {"python_tag": "cp313", "torch_version": "2.4.0+cu124", "torch_cuda": "12.4"},
            "2.8.3",
            "flash_attn-2.8.3+cu12torch2.4cxx11abiFALSE-cp313-cp313-linux_x86_64.whl",
            False,
        ),
        (
            {"machine": "aarch64", "cxx11abi": True},
            "2.8.3",
            "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp311-cp311-linux_aarch64.whl",
            False,
        ),
        (
            {"torch_version": "2.6.0+cu124", "torch_cuda": "12.4"},
            "2.7.4.post1",
            "flash_attn-2.7.4.post1+cu12torch2.6cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
            True,
        ),
        (
            {"torch_version": "2.9.1+cu128"},
            "2.8.3",
            "flash_attn-2.8.3+cu12torch2.9cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
            False,
        ),
        ({}, "2.9.0", "flash_attn-2.9.0+cu12torch2.8cxx11abiFALSE-cp311-cp311-linux_x86_64.whl", None),
    ],
)
def test_recommended_wheel(overrides, version, filename, published):
    wheel = fa.recommend_wheel(report(**overrides), version)
    assert wheel["filename"] == filename
    assert wheel["url"] == "https://github.com/Dao-AILab/flash-attention/releases/download/v%s/%s" % (version, filename)
    assert wheel["published"] is published
    assert (wheel["why_not_published"] is None) is (published is True)


@pytest.mark.parametrize(
    ("version", "capability", "lacks"),
    [
        ("2.7.4.post1", "12.0", ["12.0"]),
        ("2.7.4.post1", "10.0", ["10.0"]),
        ("2.7.4.post1", "9.0", []),
        ("2.8.0", "12.0", []),
        ("2.8.3", "10.3", []),
        ("2.8.3", "12.1", []),
        ("2.8.3", "7.5", ["7.5"]),
        ("2.8.3", "11.0", ["11.0"]),
        ("2.8.3", "8.6", []),
    ],
)
def test_kernels_per_release_and_gpu(version, capability, lacks):
    devices = [{"index": 0, "name": "gpu", "capability": capability}]
    assert fa.recommend_wheel(report(devices=devices), version)["lacks_kernels_for"] == lacks


def test_cpu_torch_has_no_wheel():
    assert fa.recommend_wheel(report(torch_version="2.13.0+cpu", torch_cuda=None), "2.8.3") is None


@pytest.mark.parametrize(
    ("left", "right", "at_least"),
    [
        ("2.8.3", "2.5.7", True),
        ("2.5.6", "2.5.7", False),
        ("2.7.4.post1", "2.7.4", True),
        ("2.10.0", "2.9.9", True),
        ("2.13.0+cpu", "2.13.0", True),
        (None, "2.5.7", False),
    ],
)
def test_version_at_least(left, right, at_least):
    assert fa.version_at_least(left, right) is at_least


def test_probe_output_takes_the_marked_line():
    noise = 'torch prints this\nLLMSTACK_FLASH_ATTN_PROBE={"python_tag": "cp312"}\n'
    assert fa.parse_probe_output(noise) == {"python_tag": "cp312"}
    assert fa.parse_probe_output("Segmentation fault\n") is None


def test_missing_dependency_of_flash_attn():
    problem, message = fa.diagnose(
        report(
            flash_attn_version=None,
            flash_attn_error="ModuleNotFoundError: No module named 'einops'",
            flash_attn_missing=False,
        ),
        "2.5.7",
        fa.recommend_wheel(report(), "2.8.3"),
        "/venv/bin/python",
    )
    assert problem == "missing"
    assert "No module named 'einops'" in message


def test_every_problem_is_documented():
    documented = fa.PROBLEMS
    from ansible_collections.llmstack.inference.plugins.modules import flash_attn_check

    for problem in documented:
        assert "V(%s)" % problem in flash_attn_check.RETURN
