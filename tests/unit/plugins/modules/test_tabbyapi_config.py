"""Unit tests for llmstack.inference.tabbyapi_config and its module_utils (_tabbyapi)."""

from __future__ import annotations

import json
import os
import pathlib
import stat

import pytest
import yaml
from ansible.module_utils.common import warnings as ansible_warnings
from ansible.module_utils.testing import patch_module_args
from ansible_collections.llmstack.inference.plugins.module_utils import _tabbyapi
from ansible_collections.llmstack.inference.plugins.modules import tabbyapi_config


def run_module(capsys, **args):
    # Warnings are collected per process; a run must only see its own.
    getattr(ansible_warnings, "_global_warnings", {}).clear()
    with patch_module_args(args), pytest.raises(SystemExit) as exited:
        tabbyapi_config.main()
    return exited.value.code, json.loads(capsys.readouterr().out)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def make_model(root, name, quant="exl2"):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": quant}}))
    return folder


@pytest.mark.parametrize(
    ("model_path", "model_dir", "expected"),
    [
        ("/mnt/models/exl2/Llama", None, ("/mnt/models/exl2", "Llama")),
        ("/mnt/models/exl2/Llama/", None, ("/mnt/models/exl2", "Llama")),
        ("/mnt/models/exl2/Llama", "/mnt/models", ("/mnt/models", "exl2/Llama")),
        ("/mnt/models/exl2/Llama", "/mnt/models/", ("/mnt/models", "exl2/Llama")),
        ("exl2/Llama", "/mnt/models", ("/mnt/models", "exl2/Llama")),
        ("/mnt//models/./Llama", None, ("/mnt/models", "Llama")),
    ],
)
def test_split_model_path(model_path, model_dir, expected):
    assert _tabbyapi.split_model_path(model_path, model_dir) == expected


@pytest.mark.parametrize(
    ("model_path", "model_dir", "needle"),
    [
        ("/srv/other/Llama", "/mnt/models", "not inside model_dir"),
        ("/mnt/modelsX/Llama", "/mnt/models", "not inside model_dir"),
        ("/mnt/models", "/mnt/models", "not inside model_dir"),
        ("../Llama", "/mnt/models", "escapes model_dir"),
        ("exl2/Llama", None, "relative"),
        ("/", None, "empty"),
    ],
)
def test_split_model_path_rejects(model_path, model_dir, needle):
    with pytest.raises(ValueError, match=needle):
        _tabbyapi.split_model_path(model_path, model_dir)


@pytest.mark.parametrize(
    ("model", "gpu_count", "needle"),
    [
        ({"backend": "exllamav2", "cache_mode": "8,8"}, None, "model.cache_mode '8,8' is an exllamav3"),
        ({"backend": "exllamav3", "cache_mode": "9,8"}, None, "model.cache_mode '9,8' is not a cache mode"),
        ({"backend": "exllamav3", "cache_mode": "Q5"}, None, "model.cache_mode 'Q5'"),
        ({"cache_mode": "FP8"}, None, "model.cache_mode 'FP8'"),
        ({"backend": "exllamav4"}, None, "model.backend 'exllamav4' is unknown"),
        ({"cache_size": 1000}, None, "multiple of 256 such as 1024"),
        ({"cache_size": 4096, "max_seq_len": 8192}, None, "raise cache_size to at least 8192"),
        ({"max_seq_len": 0}, None, "model.max_seq_len 0"),
        ({"chunk_size": 0}, None, "model.chunk_size 0"),
        ({"gpu_split": [20, 20, 20]}, 2, "model.gpu_split has 3 entries but gpu_count is 2"),
        ({"autosplit_reserve": [96, 96]}, 1, "model.autosplit_reserve has 2 entries"),
        ({"gpu_split": "20,20"}, None, "model.gpu_split must be a list"),
    ],
)
def test_validate_errors_name_key_and_fix(model, gpu_count, needle):
    errors = _tabbyapi.validate({"model": model}, gpu_count)[0]
    assert any(needle in error for error in errors), errors


@pytest.mark.parametrize(
    "model",
    [
        {"backend": "exllamav2", "cache_mode": "Q4", "cache_size": 32768, "max_seq_len": 32768},
        {"backend": "exllamav3", "cache_mode": "8,8"},
        {"backend": "exllamav3", "cache_mode": "4, 6"},
        {"backend": "exllamav3", "cache_mode": "Q6"},
        {"cache_mode": "6,6"},
        {"max_seq_len": -1, "cache_size": 4096},
        {"gpu_split": [28, 24], "gpu_split_auto": False, "autosplit_reserve": [4096, 2048]},
    ],
)
def test_validate_accepts(model):
    assert _tabbyapi.validate({"model": model}, 2) == ([], [])


def test_validate_draft_cache_and_network():
    errors, warnings = _tabbyapi.validate(
        {
            "draft_model": {"draft_cache_mode": "8,8"},
            "network": {"port": 70000, "api_servers": ["OAI", "grpc"]},
            "developer": {"backend": "exllamav2"},
            "model": {"gpu_split": [20], "tensor_parallel": True},
        },
        1,
    )
    assert any("draft_cache_mode '8,8'" in e for e in errors)
    assert any("network.port 70000" in e for e in errors)
    assert any("grpc" in e for e in errors)
    assert any("developer.backend is ignored" in w for w in warnings)
    assert any("tensor_parallel has no effect" in w for w in warnings)


def test_creates_file_with_split_path_and_mode(tmp_path, capsys):
    path = tmp_path / "config.yml"
    code, out = run_module(
        capsys,
        path=str(path),
        model_path="/mnt/models/exl2/Llama-3.1-8B",
        backend="exllamav2",
        cache_mode="Q4",
        host="127.0.0.1",
        port=5000,
        mode="0640",
    )
    assert code == 0, out
    assert out["changed"] is True
    data = yaml.safe_load(path.read_text())
    assert data["model"] == {
        "model_dir": "/mnt/models/exl2",
        "model_name": "Llama-3.1-8B",
        "backend": "exllamav2",
        "cache_mode": "Q4",
    }
    assert data["network"] == {"host": "127.0.0.1", "port": 5000}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert (out["model_dir"], out["model_name"]) == ("/mnt/models/exl2", "Llama-3.1-8B")


def test_merge_keeps_unmanaged_keys_and_is_idempotent(tmp_path, capsys):
    path = write(
        tmp_path / "config.yml",
        "# operator's notes\nmodel:\n  model_dir: /old\n  model_name: x\n  rope_alpha: 2.5\nlora:\n  lora_dir: loras\n",
    )
    args = {
        "path": path,
        "model_dir": "/mnt/models",
        "model_name": "exl3/Qwen",
        "settings": {"sampling": {"override_preset": "safe"}},
    }
    code, first = run_module(capsys, **args)
    assert code == 0
    assert first["changed"] is True
    data = yaml.safe_load(pathlib.Path(path).read_text())
    assert data["model"] == {"model_dir": "/mnt/models", "model_name": "exl3/Qwen", "rope_alpha": 2.5}
    assert data["lora"] == {"lora_dir": "loras"}
    assert data["sampling"] == {"override_preset": "safe"}
    mtime = os.stat(path).st_mtime_ns
    code, second = run_module(capsys, **args)
    assert code == 0
    assert second["changed"] is False
    assert os.stat(path).st_mtime_ns == mtime


def test_unchanged_data_keeps_comments(tmp_path, capsys):
    text = "# keep me\nnetwork:\n  port: 5000  # the router expects this\n"
    path = write(tmp_path / "config.yml", text)
    code, out = run_module(capsys, path=path, port=5000)
    assert code == 0
    assert out["changed"] is False
    assert pathlib.Path(path).read_text() == text


def test_check_mode_reports_diff_without_writing(tmp_path, capsys):
    path = write(tmp_path / "config.yml", "model:\n  model_name: old\n")
    code, out = run_module(capsys, path=path, model_name="new", _ansible_check_mode=True, _ansible_diff=True)
    assert code == 0
    assert out["changed"] is True
    assert "model_name: old" in out["diff"]["before"]
    assert "model_name: new" in out["diff"]["after"]
    assert pathlib.Path(path).read_text() == "model:\n  model_name: old\n"


def test_check_mode_on_missing_file_does_not_fail(tmp_path, capsys):
    path = tmp_path / "config.yml"
    code, out = run_module(capsys, path=str(path), port=5000, owner="root", _ansible_check_mode=True)
    assert code == 0
    assert out["changed"] is True
    assert not path.exists()


def test_backup_and_developer_backend_moved(tmp_path, capsys):
    path = write(tmp_path / "config.yml", "developer:\n  backend: exllamav2\nmodel:\n  model_name: a\n")
    code, out = run_module(capsys, path=path, backend="exllamav2", backup=True)
    assert code == 0
    assert out["changed"] is True
    data = yaml.safe_load(pathlib.Path(path).read_text())
    assert "developer" not in data
    assert data["model"]["backend"] == "exllamav2"
    assert pathlib.Path(out["backup_file"]).read_text().startswith("developer:")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"model_name": "/mnt/models/Llama"}, "model_name /mnt/models/Llama is absolute"),
        (
            {"model_path": "/srv/x/Llama", "model_dir": "/mnt/models"},
            "model_path: model_path /srv/x/Llama is not inside",
        ),
        ({"backend": "exllamav2", "cache_mode": "8,8"}, "model.cache_mode '8,8' is an exllamav3"),
        ({"cache_size": 300}, "model.cache_size 300 must be a positive multiple of 256"),
        ({"gpu_split": [20.0, 20.0], "gpu_count": 1}, "model.gpu_split has 2 entries but gpu_count is 1"),
        ({"port": 5000, "settings": {"network": {"port": 5001}}}, "settings sets network.port"),
        ({"draft_model_path": "relative/Draft"}, "draft_model_path: model_path relative/Draft is relative"),
    ],
)
def test_bad_input_fails_with_key_and_fix(tmp_path, capsys, args, needle):
    path = tmp_path / "config.yml"
    code, out = run_module(capsys, path=str(path), **args)
    assert code == 1
    assert needle in out["msg"]
    assert not path.exists()


def test_existing_invalid_values_are_reported(tmp_path, capsys):
    path = write(tmp_path / "config.yml", "model:\n  cache_size: 1000\n")
    code, out = run_module(capsys, path=path, port=5000)
    assert code == 1
    assert "model.cache_size 1000" in out["msg"]


def test_not_a_mapping_fails(tmp_path, capsys):
    path = write(tmp_path / "config.yml", "- just\n- a list\n")
    code, out = run_module(capsys, path=path, port=5000)
    assert code == 1
    assert "must hold a YAML mapping" in out["msg"]


@pytest.mark.parametrize(
    ("layout", "args", "needle"),
    [
        ("none", {"model_name": "Llama"}, "does not exist"),
        ("no_config", {"model_name": "Llama"}, "has no config.json"),
        ("exl2", {"model_name": "Llama", "backend": "exllamav3"}, "needs backend exllamav2, not exllamav3"),
        ("exl3", {"model_name": "Llama", "backend": "exllamav2"}, "needs backend exllamav3, not exllamav2"),
    ],
)
def test_check_model_failures(tmp_path, capsys, layout, args, needle):
    models = tmp_path / "models"
    models.mkdir()
    if layout == "no_config":
        (models / "Llama").mkdir()
    elif layout in ("exl2", "exl3"):
        make_model(models, "Llama", layout)
    code, out = run_module(capsys, path=str(tmp_path / "config.yml"), model_dir=str(models), check_model=True, **args)
    assert code == 1
    assert needle in out["msg"]


def test_check_model_relative_dir_and_draft(tmp_path, capsys):
    make_model(tmp_path / "models", "exl3/Main", "exl3")
    make_model(tmp_path / "models", "Draft", "exl3")
    code, out = run_module(
        capsys,
        path=str(tmp_path / "config.yml"),
        model_dir="models",
        model_name="exl3/Main",
        draft_model_dir="models",
        draft_model_name="Draft",
        backend="exllamav3",
        cache_mode="8,8",
        check_model=True,
    )
    assert code == 0, out
    code, out = run_module(capsys, path=str(tmp_path / "config.yml"), draft_model_name="Missing", check_model=True)
    assert code == 1
    assert "draft model folder" in out["msg"]


def warned(out, *needles):
    # ansible-core 2.19 wraps warnings in structured summaries; older cores give strings.
    return any(all(needle in json.dumps(warning) for needle in needles) for warning in out.get("warnings", []))


@pytest.mark.parametrize(
    ("generation", "settings", "unknown", "known"),
    [
        # model.harmony and draft_model.dynamic_draft exist on main only (common/config_models.py).
        ("exl2", {"model": {"harmony": True, "rope_alpha": 1.0}}, ["model.harmony"], ["rope_alpha"]),
        ("exl3", {"model": {"harmony": True, "rope_alpha": 1.0}}, [], ["model.harmony"]),
        ("exl2", {"draft_model": {"dynamic_draft": True}}, ["draft_model.dynamic_draft"], []),
        # model.reasoning_suppress_header exists on the exl2 branch only.
        ("exl3", {"model": {"reasoning_suppress_header": True}}, ["model.reasoning_suppress_header"], []),
        (
            "exl3",
            {"sampler": {"override_preset": "x"}, "model": {"max_seqlen": 4096}},
            ["sampler", "model.max_seqlen"],
            [],
        ),
        ("exl3", {"sampling": {"override_preset": "x"}, "memory": {"sysmem_kv_cache": 1}}, [], ["sampling"]),
    ],
)
def test_settings_unknown_to_the_generation_warn(tmp_path, capsys, generation, settings, unknown, known):
    code, out = run_module(capsys, path=str(tmp_path / "config.yml"), generation=generation, settings=settings)
    assert code == 0, out
    for key in unknown:
        assert warned(out, key, "does not know", generation), out.get("warnings")
    for key in known:
        assert not warned(out, key)
    if not unknown:
        assert not warned(out, "does not know")
    # The keys are still written: the warning says TabbyAPI ignores them, the module keeps them.
    assert yaml.safe_load((tmp_path / "config.yml").read_text()) == settings


def test_exl3_generation_warns_on_exllamav2(tmp_path, capsys):
    code, out = run_module(capsys, path=str(tmp_path / "config.yml"), backend="exllamav2")
    assert code == 0
    assert warned(out, "refuses backend exllamav2")
    code, out = run_module(capsys, path=str(tmp_path / "c2.yml"), backend="exllamav2", generation="exl2")
    assert code == 0
    assert not warned(out, "refuses")


@pytest.mark.parametrize(
    ("model", "gpu_count", "needle"),
    [
        # backends/*/model.py: a non-empty gpu_split wins and turns gpu_split_auto off.
        ({"gpu_split": [20, 20], "gpu_split_auto": True}, 2, "gpu_split_auto true is ignored"),
        ({"gpu_split": [20], "gpu_split_auto": False}, 1, "gpu_split has no effect with one GPU"),
    ],
)
def test_gpu_split_warnings_say_what_tabbyapi_does(model, gpu_count, needle):
    errors, warnings = _tabbyapi.validate({"model": model}, gpu_count)
    assert errors == []
    assert any(needle in w for w in warnings), warnings


def test_gpu_split_without_auto_flag_is_no_warning():
    # gpu_split_auto defaults to true, yet a given gpu_split is used: nothing to warn about (the old
    # warning said gpu_split would be ignored, which backends/*/model.py contradicts).
    assert _tabbyapi.validate({"model": {"gpu_split": [20, 20]}}, 2) == ([], [])
