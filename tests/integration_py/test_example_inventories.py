"""The example inventories deploy as far as a host without a GPU allows: `--syntax-check` and `--check`.

tests/inventory_check.sh boots one lab host (`invchk-<host>`) per inventory host, points the inventory at
them through an overlay (tests/inventory_check/<inventory>.yml explains every override), refuses to run
if any host would resolve to anything but a lab address, and tears the hosts down at exit. Needs root
and the lab; each inventory takes 1.5-3 minutes here, and both run side by side (one fixture).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests/inventory_check.sh"


INVENTORIES = ["hydra", "gb200"]


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Both inventories' runs at once: their hosts (invchk-<host>), overlays and work dirs are apart, and
    a run mostly waits on ssh round trips, so side by side they take little more than the longer one."""
    assert os.geteuid() == 0, "the lab boots nspawn hosts: needs root"
    logs = tmp_path_factory.mktemp("inventory_check")
    runs = {}
    for inventory in INVENTORIES:
        # A file, not a pipe: a full pipe of the run not being read would stall it.
        with (logs / f"{inventory}.log").open("w") as log:
            # stdin: a /dev/null of its own; a shared stdin that one run's tools set non-blocking makes the
            # other's ansible-playbook refuse to start ("Ansible requires blocking IO on stdin").
            runs[inventory] = subprocess.Popen(
                [str(SCRIPT), inventory], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                text=True, cwd=REPO,
            )
    results = {}
    for inventory, run in runs.items():
        try:
            run.wait(timeout=900)
        except subprocess.TimeoutExpired:
            run.terminate()  # the script's EXIT trap tears its lab hosts down
            run.wait(timeout=120)
        results[inventory] = (run.returncode, (logs / f"{inventory}.log").read_text())
    return results


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_site_playbook_checks_clean(inventory: str, check_runs: dict[str, tuple[int, str]]) -> None:
    returncode, output = check_runs[inventory]
    assert returncode == 0, output[-6000:]
    assert f"inventory_check: {inventory}: --check passed" in output
    assert "failed=0" in output
    assert "unreachable=0" in output


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_examples_use_documentation_addresses_only(inventory: str) -> None:
    """RFC 5737 placeholders only, never a real LAN address: the check runs must never need them."""
    hosts = yaml.safe_load((REPO / f"inventory/{inventory}/hosts.yml").read_text())
    addresses = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "ansible_host":
                    addresses.append(value)
                else:
                    walk(value)

    walk(hosts)
    assert addresses
    for address in addresses:
        assert address.startswith(("192.0.2.", "198.51.100.", "203.0.113.")), address
