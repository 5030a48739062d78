"""roles/tabbyapi/files/select_model.py, the tabbyapi unit's ExecStartPre: which config.yml TabbyAPI starts with."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "roles/tabbyapi/files/select_model.py"

BASE = {
    "network": {"host": "127.0.0.1", "port": 5000},
    "model": {"model_dir": "/mnt/models", "backend": "exllamav3", "model_name": "exl3/A/4.0bpw",
              "max_seq_len": 8192, "cache_mode": "8,8", "use_as_default": []},
    "draft_model": {"draft_model_dir": "/mnt/models", "draft_model_name": "exl3/Tiny/4.0bpw"},
}
MODELS = {
    "model_keys": ["model_name", "max_seq_len", "cache_size", "cache_mode", "gpu_split_auto", "gpu_split",
                   "autosplit_reserve", "tensor_parallel", "rope_scale", "rope_alpha", "chunk_size"],
    "draft_keys": ["draft_model_name", "draft_cache_mode", "draft_rope_scale", "draft_rope_alpha", "draft_gpu_split"],
    "models": {
        "a": {"model": {"model_name": "exl3/A/4.0bpw", "max_seq_len": 8192, "cache_mode": "8,8"},
              "draft_model": {"draft_model_name": "exl3/Tiny/4.0bpw"}},
        "b": {"model": {"model_name": "exl3/B/4.0bpw", "cache_size": 4096}, "draft_model": {}},
    },
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"base": tmp_path / "etc/config.yml", "models": tmp_path / "etc/models.json",
             "active": tmp_path / "router-active/tabbyapi.json", "out": tmp_path / "state/config.yml"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    paths["base"].write_text("# operator comment\n" + yaml.safe_dump(BASE), encoding="utf-8")
    paths["models"].write_text(json.dumps(MODELS), encoding="utf-8")
    return paths


def run(files: dict[str, Path]) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)] + [f"--{k}={v}" for k, v in files.items()],
        capture_output=True, text=True, check=True,
    )
    return yaml.safe_load(files["out"].read_text(encoding="utf-8")), proc.stdout


def test_no_record_starts_the_roles_startup_model(files: dict[str, Path]) -> None:
    config, said = run(files)
    assert config == BASE
    assert "exl3/A/4.0bpw" in said
    assert "absent" in said
    assert stat.S_IMODE(os.stat(files["out"]).st_mode) == 0o600


def test_record_switches_model_and_drops_the_startup_models_settings(files: dict[str, Path]) -> None:
    files["active"].write_text(json.dumps({"id": "b", "model_name": "exl3/B/4.0bpw"}), encoding="utf-8")
    config, said = run(files)
    # b's own settings only: the start-up model's max_seq_len, cache_mode and draft do not leak into it.
    assert config["model"] == {"model_dir": "/mnt/models", "backend": "exllamav3", "use_as_default": [],
                               "model_name": "exl3/B/4.0bpw", "cache_size": 4096}
    assert config["draft_model"] == {"draft_model_dir": "/mnt/models"}
    assert config["network"] == BASE["network"]
    assert "the router's last switch" in said


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ('{"id": "gone", "model_name": "exl3/Gone"}', "no longer declares"),
        ('{"id": "b", "model_name": "exl3/Elsewhere/4.0bpw"}', "now has it in"),
        ("not json", "cannot read"),
    ],
)
def test_bad_record_keeps_the_startup_model_and_says_why(files: dict[str, Path], record: str, reason: str) -> None:
    files["active"].write_text(record, encoding="utf-8")
    config, said = run(files)
    assert config == BASE
    assert reason in said


def test_rewrite_is_atomic_and_leaves_no_temp_files(files: dict[str, Path]) -> None:
    files["out"].write_text("old", encoding="utf-8")
    run(files)
    assert sorted(p.name for p in files["out"].parent.iterdir()) == ["config.yml"]


def test_unwritable_output_fails(files: dict[str, Path], tmp_path: Path) -> None:
    files["out"] = tmp_path / "missing-dir/config.yml"
    with pytest.raises(subprocess.CalledProcessError):
        run(files)


def test_print_model_names_the_choice_and_writes_nothing(files: dict[str, Path]) -> None:
    files["active"].write_text(json.dumps({"id": "b", "model_name": "exl3/B/4.0bpw"}), encoding="utf-8")
    args = [f"--{k}={v}" for k, v in files.items()] + ["--print-model"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "exl3/B/4.0bpw"
    assert not files["out"].exists()
