"""Config validation: every error names the key at fault; the README example parses."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from llmstack_router.config import ConfigError, load_config, parse_config
from llmstack_router.vram import VramProbeError, parse_nvidia_smi
from router_helpers import API_KEY

ROUTER_DIR = Path(__file__).resolve().parents[1]
BASE: dict[str, Any] = {
    "auth": {"api_keys": [API_KEY]},
    "groups": {"gpu0": {}},
    "backends": {"smol": {"engine": "llamacpp", "group": "gpu0", "url": "http://127.0.0.1:8081",
                          "command": ["llama-server", "--port", "8081"], "models": [{"id": "smol"}]}},
}


def variant(path: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    node = config
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[keys[-1]]
    elif isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value
    return config


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "key", "fragment"), [
    ("backends.smol.engine", "tgi", "backends.smol.engine", "not one of"),
    ("backends.smol.group", "gpu9", "backends.smol.group", "not a group"),
    ("backends.smol.url", "127.0.0.1:8081", "backends.smol.url", "http(s) URL"),
    ("backends.smol.unit", "llama.service", "backends.smol", "either 'unit'"),
    ("backends.smol.command", "llama-server --port 8081", "backends.smol.command", "list of arguments"),
    ("backends.smol.models", [], "backends.smol.models", "non-empty list"),
    ("backends.smol.models.0.vram_mib", "lots", "backends.smol.models[0].vram_mib", "integer"),
    ("backends.smol.models.0.id", "../etc", "backends.smol.models[0].id", "must match"),
    ("backends.smol.models.0.aliases", ["smol"], "backends.smol.models[0]", "already used"),
    ("backends.smol.models.0.colour", "red", "backends.smol.models[0].colour", "unknown key"),
    ("backends.smol.ready_timeout_s", -1, "backends.smol.ready_timeout_s", ">= 0.1"),
    ("backends.smol.co_reside", "yes", "backends.smol.co_reside", "true or false"),
    ("backends.smol.tabby_config", "/x.yml", "backends.smol.tabby_config", "state_file"),
    ("backends.smol.state_file", "/x.json", "backends.smol.state_file", "only a tabbyapi"),
    ("backends.smol.models.0.load", {"model_name": "x"}, "backends.smol.models[0].load", "only the models of"),
    ("groups.gpu0.queue_size", 0, "groups.gpu0.queue_size", ">= 1"),
    ("groups.gpu0.gpus", ["0"], "groups.gpu0.gpus", "GPU indexes"),
    ("auth.api_keys", [], "auth.api_keys_file", "no API key"),
    ("auth.api_keys", ["short"], "auth.api_keys", "at least 16"),
    ("auth.admin_keys", [API_KEY], "auth.admin_keys", "must not also be"),
    ("listen", {"port": 70000}, "listen.port", "<= 65535"),
    ("vram_probe", "nvml", "vram_probe", "'none' or 'nvidia-smi'"),
    ("ready_poll_first_s", 0.05, "ready_poll_first_s", "<= ready_poll_interval_s"),
    ("groups", _DELETE, "groups", "is required"),
    ("backends.smol.models.0", {"id": "a"}, "", ""),  # valid: control case
])
def test_errors_name_the_key(path: str, value: Any, key: str, fragment: str) -> None:
    if not key:
        assert parse_config(variant(path, value)).models["a"].backend == "smol"
        return
    with pytest.raises(ConfigError) as error:
        parse_config(variant(path, value))
    assert error.value.key == key
    assert fragment in str(error.value)


def test_second_model_on_a_llamacpp_backend_is_refused() -> None:
    config = copy.deepcopy(BASE)
    config["backends"]["smol"]["models"].append({"id": "other"})
    with pytest.raises(ConfigError, match="one backend per model"):
        parse_config(config)


@pytest.mark.parametrize(("mode", "ok"), [(0o600, True), (0o400, True), (0o640, False), (0o644, False)])
def test_key_files_must_be_private(tmp_path: Path, mode: int, ok: bool) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text(f"# comment\n{API_KEY}\n\nsecond-key-0123456789\n")
    keys.chmod(mode)
    config = copy.deepcopy(BASE)
    config["auth"] = {"api_keys_file": "${KEYDIR}/api_keys"}
    os.environ["KEYDIR"] = str(tmp_path)
    try:
        if ok:
            assert parse_config(config).auth.api_keys == (API_KEY, "second-key-0123456789")
        else:
            with pytest.raises(ConfigError, match="chmod 0600"):
                parse_config(config)
    finally:
        del os.environ["KEYDIR"]


def test_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (ROUTER_DIR / "README.md").read_text()
    example = re.search(r"## Configuration.*?```yaml\n(.*?)```", readme, re.S).group(1)
    data = yaml.safe_load(example)
    for name in ("api_keys", "admin_keys", "smollm.key", "tabby_admin.key", "tabby_api.key"):
        path = tmp_path / name
        path.write_text(("k" * 20 + name) + "\n")
        path.chmod(0o600)
    data["auth"]["api_keys_file"] = str(tmp_path / "api_keys")
    data["auth"]["admin_keys_file"] = str(tmp_path / "admin_keys")
    data["backends"]["smollm"]["api_key_file"] = str(tmp_path / "smollm.key")
    data["backends"]["tabby"]["admin_key_file"] = str(tmp_path / "tabby_admin.key")
    data["backends"]["tabby"]["api_key_file"] = str(tmp_path / "tabby_api.key")
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert config.resolve("smollm").id == "smollm2-135m"
    assert config.backends["tabby"].models[0].vram_mib == 70000
    env = {**os.environ, "PYTHONPATH": str(ROUTER_DIR / "src")}
    ok = subprocess.run([sys.executable, "-m", "llmstack_router.cli", "--config", str(path), "--check"],
                        capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "config ok: 2 models in 1 groups" in ok.stdout
    data["groups"]["gpu0"]["queue_size"] = "many"
    path.write_text(yaml.safe_dump(data))
    bad = subprocess.run([sys.executable, "-m", "llmstack_router.cli", "--config", str(path), "--check"],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2
    assert "groups.gpu0.queue_size: must be an integer" in bad.stderr


@pytest.mark.parametrize(("text", "gpus", "expected"), [
    ("0, 81000\n1, 1000\n", (), 1000),  # the tightest GPU, never the sum
    ("0, 81000\n1, 1000\n", (1,), 1000),
    ("0, 512.0\n", (0,), 512),
])
def test_nvidia_smi_parsing(text: str, gpus: tuple[int, ...], expected: int) -> None:
    assert parse_nvidia_smi(text, gpus) == expected


def test_nvidia_smi_missing_gpu_is_an_error() -> None:
    with pytest.raises(VramProbeError, match=r"GPU\(s\) \[3\]"):
        parse_nvidia_smi("0, 100\n", (3,))
