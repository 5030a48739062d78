"""Shared by the integration tests: the one way they run a real ansible-playbook against this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

LocalhostPlaybook = Callable[..., subprocess.CompletedProcess[str]]


def run_localhost_playbook(
    playbook: Path,
    *args: str,
    extra_vars: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess[str]:
    """`ansible-playbook -i localhost, -c local PLAYBOOK ARGS`, from the checkout, never raising on failure.

    The checkout's ansible.cfg (llmstack.inference.* from this tree), this venv's Python as the target's
    interpreter (it has what the modules import), its tools first on PATH (uv), no colours in the output
    the tests read; `extra_vars` go in as one JSON -e, `env` adds to or replaces the environment.
    """
    command = [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local"]
    command += ["-e", json.dumps({"ansible_python_interpreter": sys.executable, **(extra_vars or {})})]
    environment = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        **(env or {}),
    }
    return subprocess.run(
        [*command, str(playbook), *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def localhost_playbook() -> LocalhostPlaybook:
    """run_localhost_playbook, for tests that run roles or callbacks on this machine."""
    return run_localhost_playbook
