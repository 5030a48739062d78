"""Unit tests for llmstack.inference.tabbyapi_vram: real model folders in tmp_path, GPUs given or read
from the nvidia-smi emulator (tests/unit/plugins/nvidia_smi_recordings.py, recorded 5090 + 4090 box)."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args
from ansible_collections.llmstack.inference.plugins.modules import tabbyapi_vram
from ansible_collections.llmstack.inference.tests.unit.plugins.module_utils.test_exl_vram import (
    LLAMA_31_70B,
    LLAMA_32_1B,
    exl,
)
from ansible_collections.llmstack.inference.tests.unit.plugins.nvidia_smi_recordings import (
    BOXES,
    FAILURES,
    QUERY_ARGS,
    install_fake_nvidia_smi,
    recorded_calls,
)


def run_module(capsys, **args):
    with patch_module_args(args), pytest.raises(SystemExit) as exited:
        tabbyapi_vram.main()
    return exited.value.code, json.loads(capsys.readouterr().out)


@pytest.fixture
def model_dir(tmp_path):
    root = tmp_path / "models"
    for name, config in (
        ("exl2/Llama-3.1-70B/3.5bpw", exl(LLAMA_31_70B, "exl2", 3.5)),
        ("exl2/Llama-3.1-70B/4.0bpw", exl(LLAMA_31_70B, "exl2", 4.0)),
        ("exl2/Llama-3.2-1B/4.0bpw", exl(LLAMA_32_1B, "exl2", 4.0)),
        ("exl3/Llama-3.2-1B/4.0bpw", exl(LLAMA_32_1B, "exl3", 4.0)),
    ):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    return root


DAILY = {
    "name": "exl2/Llama-3.1-70B/3.5bpw",
    "id": "llama70b",
    "max_seq_len": 32768,
    "cache_mode": "FP16",
    "draft": {"name": "exl2/Llama-3.2-1B/4.0bpw"},
}


@pytest.mark.parametrize("check_mode", [False, True])
def test_estimates_with_given_gpus(capsys, model_dir, check_mode):
    args = {"model_dir": str(model_dir), "models": [DAILY], "gpus": [32607, 24564]}
    if check_mode:
        args["_ansible_check_mode"] = True
    code, out = run_module(capsys, **args)
    assert code == 0, out
    assert out["changed"] is False
    model = out["models"]["llama70b"]
    assert model["source"] == "estimate"
    assert model["per_gpu_mib"] == [32405, 11024]
    assert (model["weights_mib"], model["cache_mib"], model["draft_mib"]) == (29387, 10240, 1718)
    assert model["fits"] is True
    assert model["fits_free"] is None  # no free memory known without nvidia-smi
    assert model["detail"]["backend"] == "exllamav2"
    assert [g["total_mib"] for g in out["gpus"]] == [32607, 24564]


def test_misfit_fails_before_any_load_with_the_numbers(capsys, model_dir):
    model = dict(DAILY, name="exl2/Llama-3.1-70B/4.0bpw", max_seq_len=65536, id="big")
    code, out = run_module(capsys, model_dir=str(model_dir), models=[model], gpus=[32607, 24564])
    assert code == 1
    assert out["failed"] is True
    assert out["msg"].startswith("big does not fit: weights 33467 + cache 20480 (65536 tokens FP16) + draft ")
    assert "GPU 0" in out["msg"]
    assert "of 32607" in out["msg"]
    assert "of 24564" in out["msg"]
    assert out["models"]["big"]["fits"] is False


def test_misfit_only_reported_when_asked(capsys, model_dir):
    model = dict(DAILY, max_seq_len=131072, id="big")
    code, out = run_module(capsys, model_dir=str(model_dir), models=[model], gpus=[32607, 24564], fail_on_misfit=False)
    assert code == 0
    assert out["models"]["big"]["fits"] is False
    # ansible-core 2.19 wraps warnings in structured summaries; older cores give strings.
    assert "big does not fit" in json.dumps(out.get("warnings", []))


def test_vram_mib_is_reported_not_estimated(capsys, model_dir):
    models = [{"name": "not/downloaded/yet", "id": "declared", "vram_mib": 52000}]
    code, out = run_module(capsys, model_dir=str(model_dir), models=models, gpus=[32607, 24564])
    assert code == 0, out
    assert out["models"]["declared"]["source"] == "vram_mib"
    assert out["models"]["declared"]["estimate_mib"] == 52000
    assert out["models"]["declared"]["weights_mib"] is None
    code, out = run_module(
        capsys, model_dir=str(model_dir), models=[dict(models[0], vram_mib=60000)], gpus=[32607, 24564]
    )
    assert code == 1
    assert "vram_mib 60000 exceeds the GPUs' 57171 MiB" in out["msg"]


@pytest.mark.parametrize(
    ("name", "match"),
    [("missing/folder", "No such file"), ("broken", "Expecting property name")],
)
def test_unreadable_config_names_folder_and_fix(capsys, model_dir, name, match):
    code, out = run_module(capsys, model_dir=str(model_dir), models=[{"name": name}], gpus=[24564])
    assert code == 1
    assert str(model_dir / name) in out["msg"]
    assert match in out["msg"]
    assert "set vram_mib for this model to skip the estimate" in out["msg"]


def test_missing_draft_folder_is_named(capsys, model_dir):
    model = dict(DAILY, draft={"name": "exl2/none"})
    code, out = run_module(capsys, model_dir=str(model_dir), models=[model], gpus=[32607, 24564])
    assert code == 1
    assert "model llama70b: draft folder %s" % (model_dir / "exl2/none") in out["msg"]


def test_gpus_from_nvidia_smi_report_free_memory(tmp_path, capsys, model_dir):
    smi = install_fake_nvidia_smi(tmp_path / "bin", BOXES["mixed_5090_4090"]["answers"])
    code, out = run_module(capsys, model_dir=str(model_dir), models=[DAILY], nvidia_smi_path=str(smi))
    assert code == 0, out
    assert recorded_calls(smi)[0] == QUERY_ARGS
    assert [(g["name"], g["total_mib"], g["free_mib"]) for g in out["gpus"]] == [
        ("NVIDIA GeForce RTX 5090", 32607, 30603),
        ("NVIDIA GeForce RTX 4090", 24564, 24060),
    ]
    model = out["models"]["llama70b"]
    # fits the GPUs' size, but not what is free now (1.5 GiB of the 5090 is taken by something else)
    assert model["fits"] is True
    assert model["fits_free"] is False
    assert [g["free_mib"] for g in model["detail"]["per_gpu"]] == [30603, 24060]
    # A model too big for the GPUs is not reported as fitting their free memory (it was, before the fix).
    huge = dict(DAILY, id="huge", max_seq_len=131072)
    code, out = run_module(
        capsys, model_dir=str(model_dir), models=[huge], nvidia_smi_path=str(smi), fail_on_misfit=False
    )
    assert code == 0, out
    assert out["models"]["huge"]["fits"] is False
    assert out["models"]["huge"]["fits_free"] is False


def test_devices_select_and_order_gpus(tmp_path, capsys, model_dir):
    smi = install_fake_nvidia_smi(tmp_path / "bin", BOXES["mixed_5090_4090"]["answers"])
    small = {"name": "exl3/Llama-3.2-1B/4.0bpw", "max_seq_len": 8192}
    code, out = run_module(
        capsys,
        model_dir=str(model_dir),
        models=[small],
        nvidia_smi_path=str(smi),
        devices=["GPU-0c5d9e3b-8a17-f24c-6e0d-b3a9c1f7e528"],
    )
    assert code == 0, out
    assert [g["name"] for g in out["gpus"]] == ["NVIDIA GeForce RTX 4090"]
    assert out["models"]["4.0bpw"]["detail"]["split"] == "single"
    code, out = run_module(capsys, model_dir=str(model_dir), models=[small], nvidia_smi_path=str(smi), devices=["7"])
    assert code == 1
    assert "device 7 is not among the GPUs nvidia-smi lists (0, 1)" in out["msg"]


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_nvidia_smi_failures_say_to_give_gpus(tmp_path, capsys, model_dir, failure):
    smi = install_fake_nvidia_smi(tmp_path / "bin", FAILURES[failure]["answers"])
    code, out = run_module(capsys, model_dir=str(model_dir), models=[DAILY], nvidia_smi_path=str(smi), timeout=1)
    assert code == 1
    assert FAILURES[failure]["reason_contains"] in out["msg"]
    assert "give gpus" in out["msg"]


def test_exl2_model_on_main_generation_is_refused(capsys, model_dir):
    code, out = run_module(capsys, model_dir=str(model_dir), models=[DAILY], gpus=[32607, 24564], generation="exl3")
    assert code == 1
    assert "cannot load on TabbyAPI main" in out["msg"]
