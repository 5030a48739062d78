"""The example inventories deploy as far as a host without a GPU allows: `--syntax-check` and `--check`.

tests/inventory_check.sh boots one lab host (`invchk-<host>`) per inventory host, points the inventory at
them through an overlay (tests/inventory_check/<inventory>.yml explains every override), refuses to run
if any host would resolve to anything but a lab address, and tears the hosts down at exit. Needs root
and the lab; each inventory takes 1.5-3 minutes here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests/inventory_check.sh"


@pytest.mark.parametrize("inventory", ["hydra", "gb200"])
def test_site_playbook_checks_clean(inventory: str) -> None:
    assert os.geteuid() == 0, "the lab boots nspawn hosts: needs root"
    result = subprocess.run(
        [str(SCRIPT), inventory], capture_output=True, text=True, timeout=900, check=False, cwd=REPO
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"inventory_check: {inventory}: --check passed" in output
    assert "failed=0" in output
    assert "unreachable=0" in output


@pytest.mark.parametrize("inventory", ["hydra", "gb200"])
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
