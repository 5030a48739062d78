"""SGLang as the sglang role leaves a lab host without a GPU.

Nothing here runs SGLang: the venv holds the pinned wheel without its dependencies (no CUDA torch), and
the host has no GPU. What is checked is real: the files the units read, systemd's own verdict on the
units (`systemd-analyze verify`), that no instance was started or enabled, and that a start attempt is
refused by the service guard, before SGLang runs, for the reasons this host really has.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))
import unit_checks

INVENTORY = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
testinfra_hosts = [f"ansible://{name}" for name in sorted(INVENTORY.get_hosts("sglang"))]

CONFIG_DIR = "/etc/llmstack/sglang"
VENV = "/opt/llmstack/sglang/venv"
INSTANCES = ("qwen", "local")


def read_env(host, name: str) -> dict[str, str]:
    pairs = {}
    for line in host.file(f"{CONFIG_DIR}/{name}.env").content_string.splitlines():
        if line and not line.startswith("#"):
            key, _sep, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_pinned_wheel_in_venv(host):
    show = host.run(f"{VENV}/bin/python -m pip show sglang")
    assert show.rc == 0, show.stderr
    assert "Version: 0.5.23" in show.stdout
    # --no-deps: the CUDA stack was deliberately left out, so SGLang cannot import torch here.
    assert host.run(f"{VENV}/bin/python -c 'import torch'").rc != 0


@pytest.mark.parametrize("name", INSTANCES)
def test_instance_files_are_private(host, name):
    for suffix in ("yaml", "env"):
        f = host.file(f"{CONFIG_DIR}/{name}.{suffix}")
        assert f.is_file
        assert (f.user, f.group, f.mode) == ("sglang", "sglang", 0o600)


def test_argument_files_carry_the_runbook_settings(host):
    qwen = yaml.safe_load(host.file(f"{CONFIG_DIR}/qwen.yaml").content_string)
    assert qwen == {
        "model-path": "Qwen/Qwen2.5-0.5B-Instruct",
        "host": "127.0.0.1",
        "port": 30000,
        "served-model-name": "qwen",
        "tp-size": 1,
        "mem-fraction-static": 0.88,
        "chunked-prefill-size": 8192,
        "attention-backend": "triton",
        "context-length": 4096,
        "api-key": "sk-lab-sglang-qwen-0123456789",
    }
    local = yaml.safe_load(host.file(f"{CONFIG_DIR}/local.yaml").content_string)
    assert local["enable-metrics"] is True
    assert "context-length" not in local


def test_env_files(host):
    qwen = read_env(host, "qwen")
    # A hub id: SGLang may look it up in the HF cache, so the offline switches are off.
    assert "HF_HUB_OFFLINE" not in qwen
    assert qwen["CUDA_VISIBLE_DEVICES"] == '"0"'
    assert qwen["HF_HOME"] == '"/var/lib/llmstack/sglang/hf"'
    local = read_env(host, "local")
    assert local["HF_HUB_OFFLINE"] == '"1"'
    assert local["CUDA_VISIBLE_DEVICES"] == '"1"'
    assert local["SGLANG_LAB_MARKER"] == r'"quoted \"value\""'


def test_guard_dropin_and_configs(host):
    dropin = host.file("/etc/systemd/system/sglang@.service.d/10-service-guard.conf")
    assert dropin.is_file
    assert "ExecStartPre=+/usr/local/libexec/llmstack/prestart /etc/llmstack/service_guard/%N.conf" in (
        dropin.content_string
    )
    qwen = host.file("/etc/llmstack/service_guard/sglang@qwen.conf").content_string.splitlines()
    assert {"user=sglang", "port=30000", "gpu=0", "min_free_vram_mib=16000"} <= set(qwen)
    assert not any(line.startswith("model_dir=") for line in qwen)
    local = host.file("/etc/llmstack/service_guard/sglang@local.conf").content_string.splitlines()
    assert {"port=30001", "gpu=1", "model_dir=/mnt/models/tiny-awq", "require_mountpoint=true"} <= set(local)


@pytest.mark.parametrize("name", INSTANCES)
def test_units_verify(host, name):
    result = host.run(f"systemd-analyze verify sglang@{name}.service")
    assert result.rc == 0, result.stdout + result.stderr
    cat = host.run(f"systemctl cat sglang@{name}.service").stdout
    assert "10-service-guard.conf" in cat
    assert f"--config {CONFIG_DIR}/%i.yaml" in cat


@pytest.mark.parametrize("name", INSTANCES)
def test_not_started_nor_enabled(host, name):
    unit = host.service(f"sglang@{name}.service")
    assert not unit.is_running
    assert not unit.is_enabled


def test_sandboxing_exposure(host):
    result = host.run("systemd-analyze security --no-pager sglang@qwen.service")
    assert result.rc == 0, result.stderr
    # systemd's scale: 0 is tightest, 10 unprotected; PrivateDevices=no (GPU nodes) keeps it above 1.
    match = re.search(r"exposure level for sglang@qwen\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-400:]
    level = float(match.group(1))
    print(f"systemd-analyze security sglang@qwen.service: {level}")
    assert level <= 3.0, result.stdout[-400:]
    assert level <= unit_checks.MAX_EXPOSURE["engine"]


@pytest.mark.parametrize("name", INSTANCES)
def test_start_limit_holds_long_loads(host, name):
    unit_checks.assert_start_limit_holds_long_loads(host, f"sglang@{name}.service")


def test_ip_filter_admits_loopback_only(host):
    # Failed before: sglang@ had no IP filter.
    unit_checks.assert_ip_filter_loopback_only(host, "sglang@qwen.service")


def test_gpu_devices_only(host):
    # DevicePolicy=closed with the NVIDIA nodes (before: PrivateDevices=no, every device node open).
    props = host.run("systemctl show -p DevicePolicy -p DeviceAllow sglang@qwen.service").stdout
    assert "DevicePolicy=closed" in props, props
    for device in ("char-nvidia* rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"):
        assert device in props, props


def start_refused(host, name: str) -> str:
    cursor = host.run("journalctl -n0 --show-cursor --quiet").stdout.strip().split("cursor: ")[-1]
    try:
        start = host.run(f"systemctl start sglang@{name}.service")
        assert start.rc != 0, f"sglang@{name} started on a host without a GPU"
        assert host.run(f"systemctl show -p ExecMainPID --value sglang@{name}.service").stdout.strip() == "0"
        assert not host.service(f"sglang@{name}.service").is_running
        return host.run(f"journalctl --no-pager -o cat -u sglang@{name}.service --after-cursor='{cursor}'").stdout
    finally:
        host.run(f"systemctl reset-failed sglang@{name}.service")


def test_guard_refuses_start_without_gpu(host):
    journal = start_refused(host, "qwen")
    # Fail closed: the guard names what it could not check and the fix (roles/service_guard/files/prestart.sh).
    assert ("could not check the GPUs of sglang@qwen.service (0): it needs 16000 MiB free VRAM but "
            "'nvidia-smi' is not installed") in journal, journal
    assert "start of sglang@qwen.service refused: 1 problem(s) above" in journal
    # The guard stopped it: the server command never ran.
    assert "sglang.launch_server" not in journal


def test_guard_names_every_problem(host):
    journal = start_refused(host, "local")
    assert "needs 16000 MiB free VRAM" in journal
    assert "model directory /mnt/models/tiny-awq does not exist" in journal
    assert "start of sglang@local.service refused: 2 problem(s) above" in journal
