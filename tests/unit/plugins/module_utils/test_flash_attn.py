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


# Published wheels (the table follows each tag's .github/workflows/publish.yml) and auto's refusals.
PY310_313 = ("cp310", "cp311", "cp312", "cp313")


@pytest.mark.parametrize("abi", [True, False])
@pytest.mark.parametrize("python_tag", PY310_313)
@pytest.mark.parametrize("cuda", ["12.8", "13.0"])
@pytest.mark.parametrize("torch_mm", ["2.9", "2.8", "2.7"])
def test_auto_recommends_only_published_wheels(torch_mm, cuda, python_tag, abi):
    probed = report(
        torch_version="%s.1+cu%s" % (torch_mm, cuda.replace(".", "")),
        torch_cuda=cuda,
        python_tag=python_tag,
        cxx11abi=abi,
    )
    wheel = fa.recommend_wheel(probed, "2.8.3")
    # v2.8.3 publish.yml: torch 2.4-2.8 x CUDA 12.9.1 x cp39-cp313 x both ABIs (torch 2.4 not on cp313).
    published = torch_mm in ("2.7", "2.8") and cuda.startswith("12.")
    assert wheel["published"] is published
    assert wheel["cxx11abi"] == ("TRUE" if abi else "FALSE")
    assert wheel["published_per"] == "Dao-AILab/flash-attention@v2.8.3:.github/workflows/publish.yml"
    refusal = fa.wheel_refusal(wheel, "/venv/bin/python")
    problem, message = fa.diagnose(
        dict(probed, flash_attn_missing=True, flash_attn_error="ImportError"), "2.5.7", wheel, "/venv/bin/python"
    )
    assert problem == "missing"
    if published:
        assert refusal is None
        assert message.endswith("/venv/bin/python -m pip install %s" % wheel["url"])
    else:
        assert wheel["filename"] in refusal
        for way_out in (
            "tabbyapi_install_method: venv_tarball",
            "tabbyapi_flash_attn: source",
            "tabbyapi_flash_attn: url with tabbyapi_flash_attn_url",
        ):
            assert way_out in refusal
        assert "Nothing was installed" in refusal
        assert ("not CUDA 13" if cuda == "13.0" else "torch 2.4, 2.5, 2.6, 2.7, 2.8 only, not 2.9") in refusal
        assert "pip install" not in message
        assert refusal in message


def test_v2_8_3_table_is_the_release_matrix():
    names = fa.published_wheels("2.8.3")
    # 5 pythons x 5 torch x 2 ABIs, minus torch 2.4 on cp313 (both ABIs).
    assert len(names) == len(set(names)) == 48
    assert "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp313-cp313-linux_x86_64.whl" in names
    assert "flash_attn-2.8.3+cu12torch2.4cxx11abiFALSE-cp39-cp39-linux_x86_64.whl" in names
    assert "flash_attn-2.8.3+cu12torch2.4cxx11abiFALSE-cp313-cp313-linux_x86_64.whl" not in names
    assert not [name for name in names if "torch2.9" in name or "cu13" in name or "aarch64" in name]


@pytest.mark.parametrize(
    ("overrides", "version", "why"),
    [
        ({}, "2.8.3.post1", "not in this module's table of published release wheels"),
        ({"machine": "aarch64"}, "2.8.3", "for x86_64 only, not aarch64"),
        (
            {"torch_version": "2.4.1+cu124", "torch_cuda": "12.4", "python_tag": "cp313"},
            "2.8.3",
            "no wheel for torch 2.4 with cp313",
        ),
        (
            {"torch_version": "2.6.0+cu124", "torch_cuda": "12.4"},
            "2.7.4.post1",
            "no kernels for compute capability 12.0: use 2.8.0 or newer",
        ),
    ],
)
def test_auto_refuses_unknown_unpublished_and_kernelless_wheels(overrides, version, why):
    refusal = fa.wheel_refusal(fa.recommend_wheel(report(**overrides), version), "/venv/bin/python")
    assert why in refusal
    assert "tabbyapi_flash_attn: source" in refusal


def test_cpu_torch_is_refused_too():
    assert "no CUDA build" in fa.wheel_refusal(None, "/venv/bin/python")


# Source builds: FLASH_ATTN_CUDA_ARCHS values setup.py compiles (80, 90, 100, 120), MAX_JOBS from memory.
@pytest.mark.parametrize(
    ("value", "arch"),
    [
        ("12.0", "120"),
        ("12.1", "120"),
        ("10.0", "100"),
        ("10.3", "100"),
        ("9.0", "90"),
        ("8.0", "80"),
        ("8.6", "80"),
        ("8.9", "80"),
        ("7.5", None),
        ("11.0", None),
        ("120", "120"),
        ("sm_90", "90"),
        ("89", None),
    ],
)
def test_build_arch(value, arch):
    assert fa.build_arch(value) == arch


@pytest.mark.parametrize(
    ("memory_mib", "cpus", "cap", "jobs", "threads"),
    [
        (8 * 1024, 16, 0, "1", "2"),  # under one job's 9 GiB: one job at 2 threads, like the release CI
        (9 * 1024, 16, 0, "1", "4"),
        (40 * 1024, 16, 0, "4", "4"),
        (400 * 1024, 16, 0, "8", "4"),  # half the CPUs
        (400 * 1024, 16, 3, "3", "4"),  # the cap
        (20 * 1024, 16, 6, "2", "4"),  # a cap never raises it past memory
        (None, 8, 0, "4", "4"),
    ],
)
def test_build_jobs(memory_mib, cpus, cap, jobs, threads):
    got = fa.build_jobs(memory_mib, cpus, cap)
    assert (got["MAX_JOBS"], got["NVCC_THREADS"]) == (jobs, threads)
    assert got["rule"].endswith("= %s" % jobs)


@pytest.mark.parametrize(
    ("kwargs", "archs", "skipped", "error"),
    [
        ({"capabilities": ["12.0", "10.0", "12.0"]}, ["100", "120"], [], None),
        ({"capabilities": ["7.5", "9.0"]}, ["90"], ["7.5"], None),
        ({"capabilities": ["9.0"], "cuda_archs": ["120"]}, ["120"], [], None),
        ({"capabilities": ["7.5"]}, [], ["7.5"], "compiles FLASH_ATTN_CUDA_ARCHS values 80, 90, 100 and 120 only"),
        ({"cuda_archs": ["89", "90"]}, ["90"], ["89"], "cuda_archs gives 89"),
        ({}, ["120"], [], None),  # the devices torch sees (an RTX 5090 in report())
    ],
)
def test_source_build_archs(kwargs, archs, skipped, error):
    build = fa.source_build(report(), "2.8.3", "/venv/bin/python", memory_available_mib=64 * 1024, cpus=32, **kwargs)
    assert build["cuda_archs"] == archs
    assert build["skipped_capabilities"] == skipped
    assert build["env"].get("FLASH_ATTN_CUDA_ARCHS") == (";".join(archs) or None)
    assert "TORCH_CUDA_ARCH_LIST" not in build["env"]
    assert build["env"]["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    assert build["env"]["MAX_JOBS"] == "7"
    if error:
        assert error in build["error"]
    else:
        assert build["error"] is None


def test_source_build_without_any_gpu_names_the_variable():
    build = fa.source_build(report(devices=[]), "2.8.3", "/venv/bin/python")
    assert "tabbyapi_flash_attn_cuda_archs" in build["error"]
