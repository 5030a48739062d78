"""Secrets in the roles: every option that carries one is no_log, and no task keeps a backup of a key file.

Reads the roles' meta/argument_specs.yml and tasks; no host needed (well under a second).
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


def secret_options(options: dict, path: str = "") -> list[tuple[str, dict]]:
    found = []
    for name, option in (options or {}).items():
        if SECRET.search(name) and option.get("type") in ("str", "list", "dict", "raw", None):
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
