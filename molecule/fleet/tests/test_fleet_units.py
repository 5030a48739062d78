"""The fleet's units and logs: no secret in the -vvv logs of converge/idempotence, sandbox and start limits.

molecule.yml runs every step at ANSIBLE_VERBOSITY=3 with ANSIBLE_LOG_PATH in the scenario's ephemeral
directory, so this reads the logs of the scenario's own converge (changing) and idempotence (no change)
runs: no extra converge (CI time). Cost: the searches take well under a second.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import testinfra
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))
import unit_checks

INVENTORY_FILE = os.environ["MOLECULE_INVENTORY_FILE"]
LOG = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "ansible-vvv.log"
MOLECULE_YML = Path(__file__).resolve().parents[1] / "molecule.yml"
# Variable names whose values are secrets (router_api_keys, llamacpp_api_key, litellm_master_key, ...).
SECRET_NAME = re.compile(r"(^|_)(key|keys|secret|secrets|token|tokens|password|passwords)$")
# Every Ansible log line starts "<date> <time> p=<pid> u=<user> n=ansible <LEVEL>| ".
LOG_LINE = re.compile(r"^\S+ \S+ p=(\d+) u=\S+ n=\S+ ")
PLAYBOOK = re.compile(r"^\S+ \S+ p=\d+ u=\S+ n=\S+ \S+\| PLAYBOOK: (\S+) ")
RECAP = re.compile(r"\| (\S+)\s+: ok=\d+\s+changed=(\d+)")


def node(name: str):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY_FILE}")


def inventory_secrets(inventory: dict) -> set[str]:
    """The literal values of every secret-named variable in the scenario's group_vars and host_vars."""
    found: set[str] = set()

    def add(value) -> None:
        if isinstance(value, list):
            for item in value:
                add(item)
        elif isinstance(value, str) and value and "{{" not in value:
            found.add(value)

    for section in ("group_vars", "host_vars"):
        for variables in (inventory.get(section) or {}).values():
            for name, value in (variables or {}).items():
                if SECRET_NAME.search(name):
                    add(value)
    return found


def runs(text: str) -> list[dict]:
    """One entry per ansible-playbook run (told apart by pid), in the order the runs started.

    Each: `playbook` (from its "PLAYBOOK: x.yml" line), `first`/`last` (line numbers), `text`. A run another
    run starts (an ansible-playbook called from a prepare playbook) lies inside that run's span.
    """
    found: dict[str, dict] = {}
    pid = None
    for number, line in enumerate(text.splitlines()):
        match = LOG_LINE.match(line)
        if match:
            pid = match.group(1)
        if pid is None:
            continue
        run = found.setdefault(pid, {"playbook": None, "first": number, "lines": []})
        run["last"] = number
        run["lines"].append(line)
        playbook = PLAYBOOK.match(line)
        if playbook and run["playbook"] is None:
            run["playbook"] = playbook.group(1)
    return [dict(run, text="\n".join(run.pop("lines"))) for run in found.values()]


def leaks(text: str, secrets: set[str]) -> dict[str, int]:
    """How often each secret occurs in the text (only the ones that do, each named by its first 6 characters)."""
    return {secret[:6] + "...": text.count(secret) for secret in sorted(secrets) if secret in text}


def changed(text: str) -> int:
    """The sum of changed= over the PLAY RECAP lines of one run."""
    return sum(int(match.group(2)) for match in map(RECAP.search, text.splitlines()) if match)


def converge_runs(log: str) -> list[tuple[str, int]]:
    """(log, total changed) of each converge.yml run after prepare.yml: converge, idempotence, check."""
    every = runs(log)
    prepared = max((run["last"] for run in every if run["playbook"] == "prepare.yml"), default=-1)
    return [
        (run["text"], changed(run["text"]))
        for run in every
        if run["playbook"] == "converge.yml" and run["first"] > prepared
    ]


SECRETS = inventory_secrets(yaml.safe_load(MOLECULE_YML.read_text())["provisioner"]["inventory"])


def test_the_search_finds_a_leaked_secret() -> None:
    inventory = {
        "group_vars": {"all": {"litellm_master_key": "sk-x-0123456789", "router_api_keys": ["rk-0123456789"]}},
        "host_vars": {"n": {"llamacpp_api_key": "{{ vault_key }}", "llamacpp_api_key_file": "/k"}},
    }
    secrets = inventory_secrets(inventory)
    assert secrets == {"sk-x-0123456789", "rk-0123456789"}
    log = (
        "2026-01-01 09:00:00,000 p=9 u=root n=ansible INFO| PLAYBOOK: prepare.yml ***\n"
        "2026-01-01 09:00:01,000 p=10 u=root n=ansible INFO| PLAYBOOK: converge.yml ***\n"
        "2026-01-01 09:00:02,000 p=10 u=root n=ansible INFO| gw   : ok=9    changed=5    unreachable=0\n"
        "2026-01-01 09:00:03,000 p=9 u=root n=ansible INFO| gw   : ok=1    changed=0    unreachable=0\n"
        "2026-01-01 10:00:00,000 p=11 u=root n=ansible INFO| PLAYBOOK: converge.yml ***\n"
        '2026-01-01 10:00:01,000 p=11 u=root n=ansible INFO| "content": "LITELLM_MASTER_KEY=sk-x-0123456789"\n'
        "2026-01-01 10:00:01,500 p=11 u=root n=ansible INFO| gw   : ok=9    changed=2    unreachable=0\n"
        "2026-01-01 10:00:02,000 p=12 u=root n=ansible INFO| PLAYBOOK: converge.yml ***\n"
        "2026-01-01 10:00:02,500 p=12 u=root n=ansible INFO| gw   : ok=9    changed=0    unreachable=0\n"
    )
    (first, first_changed), (second, second_changed) = converge_runs(log)
    assert (first_changed, second_changed) == (2, 0)
    assert leaks(first, secrets) == {"sk-x-0...": 1}
    assert leaks(second, secrets) == {}
    assert leaks(log, secrets) == {"sk-x-0...": 1}


def test_the_scenario_inventory_has_secrets_to_look_for() -> None:
    # litellm_master_key, router_api_keys, router_admin_keys, llamacpp_api_key.
    assert len(SECRETS) >= 4, SECRETS


def test_no_secret_in_the_vvv_logs_of_converge_and_idempotence() -> None:
    log = LOG.read_text(encoding="utf-8", errors="replace")
    found = converge_runs(log)
    assert len(found) >= 2, f"{LOG}: expected converge and idempotence runs of converge.yml, found {len(found)}"
    (converge, converge_changed), (idempotence, idempotence_changed) = found[0], found[1]
    assert converge_changed > 0, "the first converge.yml run changed nothing: it is not the changing converge"
    assert idempotence_changed == 0
    for text in (converge, idempotence):
        assert "ESTABLISH" in text, "the log is not at -vvv (no connection lines)"
    steps = [("converge", converge), ("idempotence", idempotence)] + [("check", run[0]) for run in found[2:3]]
    counts = {name: leaks(text, SECRETS) for name, text in steps}
    # Every step the roles ran (prepare, converge, idempotence, check; lines of any process): the log up to the
    # end of the last converge.yml run. What follows is verify's own testinfra commands, which carry the keys on
    # purpose (curl -H "Authorization: Bearer ..."), logged here at -vvv: 6 hits there in the first full run.
    end = max(run["last"] for run in runs(log) if run["playbook"] == "converge.yml")
    counts["all steps before verify"] = leaks("\n".join(log.splitlines()[: end + 1]), SECRETS)
    print(f"secret-leak hits in {LOG} ({len(SECRETS)} secrets, {len(log)} bytes): {counts}")
    assert all(not hits for hits in counts.values()), counts


UNITS = [
    ("gw", "litellm.service", "litellm"),
    ("node1", "llmrouter.service", "router"),
    ("node2", "llmrouter.service", "router"),
    ("node1", "llamacpp@smollm2-node1.service", "engine"),
    ("node2", "llamacpp@smollm2-node2-bin.service", "engine"),
]


@pytest.mark.parametrize(("name", "unit", "kind"), UNITS)
def test_sandbox_exposure(name: str, unit: str, kind: str) -> None:
    assert unit_checks.exposure(node(name), unit) <= unit_checks.MAX_EXPOSURE[kind]


@pytest.mark.parametrize(("name", "unit", "kind"), UNITS)
def test_start_limit_holds_long_loads(name: str, unit: str, kind: str) -> None:
    unit_checks.assert_start_limit_holds_long_loads(node(name), unit)
