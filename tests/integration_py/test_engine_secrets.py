"""The shared engine instance path never prints an instance's API key or env values, even at -vvv.

The same run gives instances the keys the model router reads from them (aliases, vram_mib, router_group,
see plugins/filter/router_backends.py): the roles' argument specs must accept them.

A loop item is printed in verbose output whatever its ``loop_control.label`` (the default callback dumps the
whole result, ``item`` included), so tasks that loop over the engine_instances entries (which carry the key
and the env file's text) leak them. This runs the vllm and llamacpp roles in check mode on the controller
(nothing is written: every path points into a temporary directory or is only compared) and searches the
output for every secret of the inventory.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "vllm key": "vllm-key-0123456789abcdef",
    "llamacpp role key": "llamacpp-role-key-0123456789",
    "llamacpp own key": "llamacpp-own-key-0123456789",
    "env value": "hf-token-0123456789abcdef",
}


def _playbook(tmp: Path) -> str:
    model = tmp / "model.gguf"
    model.write_bytes(b"GGUF")
    return textwrap.dedent(f"""\
        - name: vllm instances
          hosts: localhost
          connection: local
          gather_facts: false
          vars:
            vllm_install: false
            vllm_probe: false
            vllm_home: {tmp}/vllm/opt
            vllm_venv: {tmp}/vllm/opt/venv
            vllm_config_dir: {tmp}/vllm/etc
            vllm_state_dir: {tmp}/vllm/state
            vllm_hf_home: {tmp}/vllm/state/hf
            vllm_api_key: {SECRETS["vllm key"]}
            vllm_instances:
              - {{name: a, model: {tmp}, port: 18000, env: {{HF_TOKEN: {SECRETS["env value"]}}}}}
              - {{name: b, model: {tmp}, port: 18001, state: on_demand,
                 vram_mib: 4000, router_group: g1, aliases: [b2]}}
          roles:
            - role: llmstack.inference.vllm

        - name: llamacpp instances
          hosts: localhost
          connection: local
          # The role's argument spec names the architecture fact.
          gather_facts: true
          vars:
            llamacpp_probe: false
            # Not a secret: the wheel's recorded hash, which a controller without the built wheel lacks.
            llamacpp_python_wheel_sha256: "{"0" * 64}"
            llamacpp_api_key: {SECRETS["llamacpp role key"]}
            llamacpp_instances:
              - {{name: one, model: {model}, port: 18010, env: {{HF_TOKEN: {SECRETS["env value"]}}}}}
              - {{name: two, model: {model}, port: 18011, api_key: {SECRETS["llamacpp own key"]}, vram_mib: 100}}
          roles:
            - role: llmstack.inference.llamacpp
        """)


def test_no_secret_in_verbose_output_of_a_check_run(tmp_path: Path) -> None:
    playbook = tmp_path / "play.yml"
    playbook.write_text(_playbook(tmp_path))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    ansible_playbook = REPO / ".venv" / "bin" / "ansible-playbook"
    if not ansible_playbook.exists():
        pytest.fail(f"{ansible_playbook} is missing: run `make venv`")
    run = subprocess.run(
        [str(ansible_playbook), "--check", "-vvv", str(playbook)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    # The run must have reached the shared path's loops, or the search below proves nothing.
    for task in ("Write each instance's argument file", "Set each instance's boot and run state",
                 "Look for the local model files"):
        assert task in output, f"the check run never reached {task!r}"
    leaks = {what: output.count(value) for what, value in SECRETS.items() if value in output}
    assert leaks == {}, f"secrets in -vvv output (count per secret): {leaks}"
