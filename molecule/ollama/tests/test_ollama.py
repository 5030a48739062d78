"""The ollama role's install mechanics, with a TEST STAND-IN in place of the Ollama binary.

The archive holds molecule/ollama/files/ollama-standin.sh as bin/ollama (the real release is
unreachable from the lab). Nothing here shows that Ollama runs or pulls models: it checks what the
role does around the binary - the checksum gate, where the archive is unpacked, the user, the unit
and its settings drop-in reaching the process, and which hosts get `ollama pull` at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import testinfra.utils.ansible_runner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))
import unit_checks

INVENTORY = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
testinfra_hosts = [f"ansible://{name}" for name in sorted(INVENTORY.get_hosts("ollama"))]

HOME = "/opt/llmstack/ollama"
VERSION = "0.0.0-standin"
DROPIN = "/etc/systemd/system/ollama.service.d/20-llmstack.conf"
ENV_FILE = "/etc/llmstack/ollama/ollama.env"
CALLS = "/var/lib/ollama-standin/calls.log"


def name_of(host) -> str:
    return host.backend.get_hostname()


def test_service_user(host):
    user = host.user("ollama")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert user.home == "/var/lib/llmstack/ollama"
    assert user.uid < 1000


def test_unpacked_into_versioned_dir(host):
    binary = host.file(f"{HOME}/{VERSION}/bin/ollama")
    assert binary.is_file
    assert (binary.user, binary.group) == ("root", "root")
    assert "TEST STAND-IN - THIS IS NOT OLLAMA" in binary.content_string
    current = host.file(f"{HOME}/current")
    assert current.is_symlink
    assert current.linked_to == f"{HOME}/{VERSION}"
    for path, owner in (("/var/lib/llmstack/ollama", "ollama"), ("/var/lib/llmstack/ollama/models", "ollama")):
        f = host.file(path)
        assert (f.user, f.mode) == (owner, 0o750)


def test_settings_dropin(host):
    content = host.file(DROPIN).content_string
    for line in (
        'Environment="OLLAMA_HOST=127.0.0.1:11434"',
        'Environment="OLLAMA_KEEP_ALIVE=10m"',
        'Environment="OLLAMA_MAX_LOADED_MODELS=2"',
        'Environment="OLLAMA_MODELS=/var/lib/llmstack/ollama/models"',
        f"EnvironmentFile={ENV_FILE}",
    ):
        assert line in content
    assert host.run("systemd-analyze verify ollama.service").rc == 0


def test_environment_map_only_in_a_root_only_file(host):
    """ollama_environment may carry tokens: a 0600 file systemd reads, not the drop-in any user can read."""
    env_file = host.file(ENV_FILE)
    assert (env_file.user, env_file.group, env_file.mode) == ("root", "root", 0o600)
    dropin = host.file(DROPIN).content_string
    assert "LLMSTACK_TEST_TOKEN, OLLAMA_NUM_PARALLEL" in dropin, "the drop-in names the variables"
    assert "lab-token" not in dropin
    assert "lab-token" not in host.run("systemctl show ollama.service").stdout
    assert not host.run(f"ls -d {ENV_FILE}?*~ 2>/dev/null").stdout, "no backups of the env file"
    pid = host.run("systemctl show -p MainPID --value ollama.service").stdout.strip()
    environ = host.run(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout.splitlines()
    assert "OLLAMA_NUM_PARALLEL=2" in environ
    assert 'LLMSTACK_TEST_TOKEN=lab-token "quoted" back\\slash $HOME' in environ


def test_unit_runs_the_binary_unprivileged_with_the_dropin(host):
    unit = host.service("ollama.service")
    assert unit.is_running
    assert unit.is_enabled
    pid = host.run("systemctl show -p MainPID --value ollama.service").stdout.strip()
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == "ollama"
    # The stand-in binds what OLLAMA_HOST says: the drop-in reached the process. Loopback only.
    listeners = host.run("ss -Hltn 'sport = :11434'").stdout.split()
    assert "127.0.0.1:11434" in listeners
    assert "0.0.0.0:11434" not in listeners
    assert host.run("curl -s http://127.0.0.1:11434/").stdout == "ollama test stand-in, not Ollama\n"
    assert "10-service-guard.conf" in host.run("systemctl cat ollama.service").stdout


def test_model_pulls_gated_on_gpu_or_cpu_only(host):
    calls = host.file(CALLS)
    if name_of(host) == "gpu-node":
        # No GPU visible and not declared CPU-only: the role must not even ask for the model list.
        assert not calls.exists, calls.content_string if calls.exists else ""
        return
    lines = calls.content_string.splitlines()
    pulls = [line for line in lines if " pull " in line]
    # Exactly one pull per model over converge + idempotence + check: later runs saw them in `list`.
    assert pulls == [
        "root OLLAMA_HOST=127.0.0.1:11434 pull llama3.2:1b",
        "root OLLAMA_HOST=127.0.0.1:11434 pull nomic-embed-text",
    ]
    assert sum(line.endswith(" list") for line in lines) >= 3


def test_unit_sandbox_exposure_start_limit_and_devices(host):
    unit = "ollama.service"
    assert unit_checks.exposure(host, unit) <= unit_checks.MAX_EXPOSURE["engine"]
    unit_checks.assert_start_limit_holds_long_loads(host, unit)
    props = host.run(f"systemctl show -p DevicePolicy -p DeviceAllow -p PrivateDevices {unit}").stdout
    if name_of(host) == "gpu-node":
        # The GPU path: no device but the NVIDIA nodes (before: PrivateDevices=no, every device open).
        assert "DevicePolicy=closed" in props, props
        assert "char-nvidia-uvm rw" in props, props
    else:
        assert "PrivateDevices=yes" in props, props
