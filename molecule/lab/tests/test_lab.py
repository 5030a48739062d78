"""Lab hosts as molecule sees them: systemd, addressing, reachability, outbound PyPI, read-only model mount."""

from __future__ import annotations

import ipaddress
import os

import testinfra.utils.ansible_runner

INVENTORY = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
LAB_HOSTS = sorted(INVENTORY.get_hosts("lab_fleet"))
CONTROLLER = "198.18.0.1"
CA_BUNDLE = "/etc/ssl/llmstack-lab-controller-ca.crt"

testinfra_hosts = [f"ansible://{name}" for name in LAB_HOSTS]


def address_of(name: str) -> str:
    return str(INVENTORY.get_variables(name)["ansible_host"])


def test_fleet_has_two_hosts_on_distinct_lab_addresses() -> None:
    addresses = [address_of(name) for name in LAB_HOSTS]
    assert len(LAB_HOSTS) == 2
    assert len(set(addresses)) == 2
    for address in addresses:
        assert ipaddress.ip_address(address) in ipaddress.ip_network("198.18.0.0/24")
        assert int(address.rsplit(".", 1)[1]) > 10


def test_systemd_is_pid1_and_settled(host) -> None:
    assert host.run("cat /proc/1/comm").stdout.strip() == "systemd"
    state = host.run("systemctl is-system-running").stdout.strip()
    assert state == "running", host.run("systemctl --failed --no-legend").stdout


def test_hostname_is_the_platform_name(host) -> None:
    assert host.run("hostname").stdout.strip() == host.backend.get_hostname()


def test_sshd_is_active_and_enabled(host) -> None:
    sshd = host.service("ssh")
    assert sshd.is_running
    assert sshd.is_enabled


def test_own_address_is_the_inventory_address(host) -> None:
    own = address_of(host.backend.get_hostname())
    assert own in host.run("ip -4 -o addr show dev eth0").stdout


def test_controller_answers_ping(host) -> None:
    host.run_expect([0], f"ping -c1 -W2 {CONTROLLER}")


def test_hosts_reach_each_other(host) -> None:
    me = host.backend.get_hostname()
    for other in LAB_HOSTS:
        if other != me:
            host.run_expect([0], f"ping -c1 -W2 {address_of(other)}")
            banner = host.run(f"timeout 5 bash -c 'head -c4 < /dev/tcp/{address_of(other)}/22'")
            assert banner.stdout == "SSH-"


def test_dns_resolves_pypi(host) -> None:
    assert host.run("getent hosts pypi.org").rc == 0


def test_pip_reaches_pypi_trusting_the_controller_ca(host) -> None:
    assert host.file(CA_BUNDLE).is_file
    venv = "/root/lab-pip-venv"
    host.run_expect([0], f"test -x {venv}/bin/pip || python3 -m venv {venv}")
    result = host.run(
        f"PIP_CERT={CA_BUNDLE} {venv}/bin/pip download --no-deps --no-cache-dir -d /root/lab-pip-dl "
        "--disable-pip-version-check six==1.17.0"
    )
    assert result.rc == 0, result.stderr
    assert host.file("/root/lab-pip-dl/six-1.17.0-py2.py3-none-any.whl").is_file


def test_model_mount_is_read_only(host) -> None:
    if host.backend.get_hostname() != "lab-a":
        assert not host.file("/mnt/models/README.txt").exists
        return
    assert "read-only /mnt/models" in host.file("/mnt/models/README.txt").content_string
    write = host.run("touch /mnt/models/should-fail")
    assert write.rc != 0
    assert "Read-only file system" in write.stderr
