"""The ollama role's checksum gate on the local (air-gapped) archive, on one lab host.

The archive is the scenario's TEST STAND-IN (not Ollama); what is checked is that a sha256 that does not
match the archive stops the role before anything is unpacked, with a message naming the fix.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCENARIO_DIR = Path(__file__).resolve().parents[1]
HOME = "/opt/llmstack/ollama"
VERSION = "0.0.0-standin"
# One host is enough: the gate does not depend on the host's GPU status.
testinfra_hosts = ["ansible://gpu-node"]


def test_wrong_checksum_is_refused(host):
    """A run with a sha256 that does not match the archive fails before anything is unpacked."""
    bad_version = "0.0.1-badsum"
    result = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            os.environ["MOLECULE_INVENTORY_FILE"],
            "--limit",
            "gpu-node",
            "-e",
            "ollama_archive_sha256=" + "0" * 64,
            "-e",
            f"ollama_version={bad_version}",
            # The gate sits in the install tasks; the rest of the role has nothing to say about it.
            "--tags",
            "ollama_validate,ollama_install",
            str(SCENARIO_DIR / "converge.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"),
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "replace the archive or fix ollama_archive_sha256" in output, output[-3000:]
    assert not host.file(f"{HOME}/{bad_version}/bin/ollama").exists
    # The running install is untouched.
    assert host.file(f"{HOME}/current").linked_to == f"{HOME}/{VERSION}"
    assert host.service("ollama.service").is_running
