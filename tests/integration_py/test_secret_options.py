"""Secrets in the roles: every option that carries one is no_log, and no task keeps a backup of a key file.

Free-form environment maps of a service (ollama_environment, tabbyapi_environment, the engines' instance env)
count as secrets: they carry HF_TOKEN and API keys. Their values go only into a 0600 file that systemd reads
(EnvironmentFile=), never into a unit or drop-in, which every user can read (`systemctl show`).

Reads the roles' meta/argument_specs.yml, tasks, vars and templates; no host needed (well under a second).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted(REPO.glob("roles/*/meta/argument_specs.yml"))
TASKS = sorted(REPO.glob("roles/*/tasks/*.yml"))
# Option names that carry a secret: litellm_master_key, vllm_instances[].api_key, router_api_keys, ...
SECRET = re.compile(r"(^|_)(key|keys|secret|token|tokens|password)$")
# Environment maps: vllm_instances[].env, ollama_environment, ...
ENV_MAP = re.compile(r"(^|_)(env|environment)$")


def secret_options(options: dict, path: str = "") -> list[tuple[str, dict]]:
    found = []
    for name, option in (options or {}).items():
        if (SECRET.search(name) and option.get("type") in ("str", "list", "dict", "raw", None)) or (
            ENV_MAP.search(name) and option.get("type") == "dict"
        ):
            found.append((path + name, option))
        found += secret_options(option.get("options"), path + name + "[].")
    return found


def all_secret_options() -> list[tuple[str, str, dict]]:
    found = []
    for spec in SPECS:
        for entry in yaml.safe_load(spec.read_text())["argument_specs"].values():
            found += [(spec.parts[-3], name, option) for name, option in secret_options(entry.get("options"))]
    return found


def test_the_scan_sees_the_known_secrets() -> None:
    names = {name for _role, name, _option in all_secret_options()}
    assert {"litellm_master_key", "vllm_instances[].api_key", "sglang_instances[].api_key", "router_api_keys"} <= names
    assert {"ollama_environment", "tabbyapi_environment", "vllm_instances[].env", "llamacpp_instances[].env"} <= names


def _ids(value: object) -> str:
    return value if isinstance(value, str) else ""


@pytest.mark.parametrize(("role", "name", "option"), all_secret_options(), ids=_ids)
def test_every_secret_option_is_no_log(role: str, name: str, option: dict) -> None:
    where = f"roles/{role}/meta/argument_specs.yml"
    assert option.get("no_log") is True, f"{where}: {name} carries a secret: add no_log: true"


def key_file_tasks() -> list[tuple[str, dict]]:
    """template/copy tasks that write a 0600 file (the mode the roles give every file holding a key)."""
    found = []
    for path in TASKS:
        for task in yaml.safe_load(path.read_text()) or []:
            for module in ("ansible.builtin.template", "ansible.builtin.copy"):
                args = task.get(module)
                if isinstance(args, dict) and str(args.get("mode")) == "0600":
                    found.append((f"{path.relative_to(REPO)}: {task.get('name')}", task | {"_args": args}))
    return found


def test_there_are_key_file_tasks_to_check() -> None:
    assert len(key_file_tasks()) >= 5


@pytest.mark.parametrize(("where", "task"), key_file_tasks(), ids=_ids)
def test_key_files_are_written_no_log_without_backups(where: str, task: dict) -> None:
    assert not task["_args"].get("backup"), f"{where}: a backup keeps a rotated key on the node; drop backup"
    assert task.get("no_log") not in (None, False), f"{where}: the task's arguments hold the key; add no_log: true"


def env_map_options() -> list[tuple[str, str]]:
    """(role, option) of the roles' top-level environment maps; the engines' instance env is their filter's."""
    return [(role, name) for role, name, option in all_secret_options() if ENV_MAP.search(name) and "[]" not in name]


def _jinja(text: str) -> str:
    """The Jinja expressions and statements of a template (comments and unit text name variables freely)."""
    return " ".join(re.findall(r"{{.*?}}|{%.*?%}", text, flags=re.S))


def _values_used(name: str, text: str) -> list[str]:
    """Uses of `name` that read its values: anything but `name | list` (its keys)."""
    return [m.group(0) for m in re.finditer(rf"{name}\b(?!\s*\|\s*list\b)", text)]


@pytest.mark.parametrize(("role", "name"), env_map_options(), ids=_ids)
def test_environment_maps_stay_out_of_world_readable_units(role: str, name: str) -> None:
    vars_file = REPO / f"roles/{role}/vars/main.yml"
    values = [str(v) for v in (yaml.safe_load(vars_file.read_text()) or {}).values()] if vars_file.exists() else []
    for where, text in [(vars_file, " ".join(values))] + [
        (unit, _jinja(unit.read_text()))
        for pattern in ("*.service.j2", "*.conf.j2")
        for unit in (REPO / f"roles/{role}/templates").glob(pattern)
    ]:
        assert not _values_used(name, text), (
            f"{where.relative_to(REPO)} reads the values of {name} into a unit or drop-in (mode 0644, systemctl show"
            " prints Environment= to any user): write them to a 0600 file and point EnvironmentFile= at it"
        )


@pytest.mark.parametrize(("role", "name"), env_map_options(), ids=_ids)
def test_environment_maps_are_written_to_a_root_only_file(role: str, name: str) -> None:
    writers = []
    for path in sorted(REPO.glob(f"roles/{role}/tasks/*.yml")):
        for task in yaml.safe_load(path.read_text()) or []:
            args = task.get("ansible.builtin.template")
            src = REPO / f"roles/{role}/templates" / str(args.get("src")) if isinstance(args, dict) else None
            if src and src.is_file() and _values_used(name, _jinja(src.read_text())):
                writers.append((task, args))
    assert writers, f"roles/{role}: no template task writes {name}"
    for task, args in writers:
        assert (str(args.get("mode")), args.get("owner"), args.get("backup")) == ("0600", "root", None), task
        assert task.get("no_log") is True, task
