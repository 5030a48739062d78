"""molecule/shared/callback_plugins/check_mode_guard.py: a --check run that reports a change must fail.

Runs real ansible-playbook against localhost with the callback enabled the way the molecule base config
enables it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- name: Write one file
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write the marker
      ansible.builtin.copy:
        content: "converged\\n"
        dest: "{{ marker }}"
        mode: "0644"
"""


def run_playbook(localhost_playbook, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(PLAYBOOK, encoding="utf-8")
    env = {
        "ANSIBLE_CALLBACK_PLUGINS": str(REPO / "molecule/shared/callback_plugins"),
        "ANSIBLE_CALLBACKS_ENABLED": "check_mode_guard",
    }
    return localhost_playbook(playbook, *extra, extra_vars={"marker": str(tmp_path / "marker")}, env=env, timeout=120)


@pytest.mark.parametrize(
    ("converge_first", "check", "expected_rc"),
    [
        pytest.param(False, True, 2, id="check-with-changes-fails"),
        pytest.param(True, True, 0, id="check-on-converged-host-passes"),
        pytest.param(False, False, 0, id="normal-run-with-changes-passes"),
    ],
)
def test_guard(localhost_playbook, tmp_path: Path, converge_first: bool, check: bool, expected_rc: int) -> None:
    if converge_first:
        assert run_playbook(localhost_playbook, tmp_path).returncode == 0
    result = run_playbook(localhost_playbook, tmp_path, *(["--check"] if check else []))
    assert result.returncode == expected_rc, result.stdout + result.stderr
    if expected_rc:
        assert "check mode reported changes on localhost" in result.stderr
        assert "Write the marker" in result.stderr
