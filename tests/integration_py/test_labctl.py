"""The lab for real: labctl boots nspawn hosts from the cached rootfs and must leave nothing behind.

Needs root and the lab's Debian packages (debootstrap systemd-container iproute2 nftables openssh-client);
the first run builds the rootfs (about 2.5 minutes), later runs reuse it. Hosts are named `pytest-*` and
every check of leftovers is scoped to them, so scenarios other people run at the same time are untouched.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
LABCTL = REPO / "tools/lab/labctl.py"


def load(name: str) -> ModuleType:
    """tools/lab is a directory of scripts, not a package: its modules import each other by plain name."""
    if str(LABCTL.parent) not in sys.path:
        sys.path.insert(0, str(LABCTL.parent))
    return importlib.import_module(name)


lab = load("labctl")
lab_rootfs = load("lab_rootfs")
lab_system = load("lab_system")


def labctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(LABCTL), *args], capture_output=True, text=True, timeout=600, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def ssh(host: dict[str, object], command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(host["identity_file"]),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            f"{host['user']}@{host['address']}",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def leftovers_of(name: str, index: int) -> list[str]:
    """Everything a host could leave behind, for this one host only."""
    state = lab.HostState(name=name, index=index, hostname=name, rootfs="")
    found = [f"process {pid}" for pid in lab.nspawn_pids(state)]
    found += [f"mount {target}" for target in lab_system.mounts_under(state.directory)]
    found += [f"netns {state.netns}"] if state.netns in lab_system.netns_names() else []
    found += [f"link {state.veth}"] if lab_system.link_exists(state.veth) else []
    found += [f"state {name}"] if lab.load_state(name) is not None else []
    found += [f"directory {state.directory}"] if state.directory.exists() else []
    found += [f"cgroup {group}" for group in lab_system.host_cgroups(name) if group.exists()]
    return found


@pytest.fixture(scope="module", autouse=True)
def lab_prerequisites() -> None:
    assert os.geteuid() == 0, "the lab tests need root"
    labctl("rootfs")


@pytest.fixture
def hosts() -> Iterator[list[str]]:
    """Names the test boots; torn down afterwards even when the test fails."""
    names: list[str] = []
    yield names
    if names:
        labctl("down", *names, check=False)


def test_rootfs_is_reused_and_keyed_by_its_recipe() -> None:
    reused = json.loads(labctl("rootfs").stdout)
    assert reused["built"] is False
    assert Path(reused["rootfs"], "usr/sbin/sshd").is_file()
    mirrors = lab_rootfs.controller_mirrors()
    recipe = lab_rootfs.rootfs_recipe(mirrors)
    current = lab_rootfs.recipe_hash(recipe)
    assert Path(reused["rootfs"]).parent.name == current
    assert lab_rootfs.recipe_hash({**recipe, "packages": [*recipe["packages"], "htop"]}) != current
    assert lab_rootfs.recipe_hash({**recipe, "mirror": "http://mirror.example/debian"}) != current


def test_two_hosts_boot_concurrently_and_reach_each_other(hosts: list[str]) -> None:
    hosts += ["pytest-a", "pytest-b"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        booted = [json.loads(result.stdout) for result in pool.map(lambda name: labctl("up", name), hosts)]
    a, b = booted
    assert a["address"] != b["address"]
    assert {a["system_state"], b["system_state"]} <= {"running"}
    assert ssh(a, "hostname").stdout.strip() == "pytest-a"
    assert ssh(a, f"ping -c1 -W2 {b['address']}").returncode == 0
    assert ssh(b, f"ping -c1 -W2 {lab_system.CONTROLLER_ADDRESS}").returncode == 0
    assert ssh(b, "getent hosts deb.debian.org").returncode == 0
    # Each host's systemd has a cgroup tree of its own: no unit cgroup is shared between hosts.
    sshd_a, sshd_b = (
        set((group / "payload/system.slice/ssh.service/cgroup.procs").read_text(encoding="utf-8").split())
        for group in (lab_system.host_cgroups("pytest-a")[0], lab_system.host_cgroups("pytest-b")[0])
    )
    assert sshd_a
    assert sshd_b
    assert not sshd_a & sshd_b
    listed = {host["name"]: host for host in json.loads(labctl("status").stdout)}
    assert listed["pytest-a"]["running"] is True
    assert listed["pytest-b"]["address"] == b["address"]
    # One call takes both down (side by side), names one that is not up, and leaves nothing of either.
    assert json.loads(labctl("down", "pytest-a", "pytest-never", "pytest-b").stdout) == {
        "removed": ["pytest-a", "pytest-b"]
    }
    assert leftovers_of("pytest-a", a["index"]) == []
    assert leftovers_of("pytest-b", b["index"]) == []


def test_each_boot_is_fresh_and_the_cached_rootfs_stays_untouched(hosts: list[str]) -> None:
    hosts.append("pytest-fresh")
    first = json.loads(labctl("up", "pytest-fresh", "--index", "197").stdout)
    assert ssh(first, "echo dirty > /etc/llmstack-lab-marker && rm /etc/os-release").returncode == 0
    labctl("down", "pytest-fresh")
    rootfs = Path(json.loads(labctl("rootfs").stdout)["rootfs"])
    assert not (rootfs / "etc/llmstack-lab-marker").exists()
    assert (rootfs / "etc/os-release").exists()
    assert not (rootfs / "root/.ssh/authorized_keys").exists()
    second = json.loads(labctl("up", "pytest-fresh", "--index", "197").stdout)
    assert ssh(second, "test ! -e /etc/llmstack-lab-marker && test -e /etc/os-release").returncode == 0
    # Same address again: with a new MAC per boot, stale ARP entries made this take ~40 s instead of ~2 s.
    assert second["boot_timings"]["sshd_banner"] < 20


def test_bind_ro_mount_is_readable_and_read_only(hosts: list[str], tmp_path: Path) -> None:
    hosts.append("pytest-bind")
    (tmp_path / "model.gguf").write_text("weights", encoding="utf-8")
    host = json.loads(labctl("up", "pytest-bind", "--bind-ro", f"{tmp_path}:/mnt/models").stdout)
    assert ssh(host, "cat /mnt/models/model.gguf").stdout == "weights"
    write = ssh(host, "touch /mnt/models/new")
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_down_leaves_nothing_behind(hosts: list[str]) -> None:
    hosts.append("pytest-down")
    host = json.loads(labctl("up", "pytest-down").stdout)
    assert leftovers_of("pytest-down", host["index"]) != []
    assert json.loads(labctl("down", "pytest-down").stdout) == {"removed": ["pytest-down"]}
    assert leftovers_of("pytest-down", host["index"]) == []
    assert json.loads(labctl("down", "pytest-down").stdout) == {"removed": []}


def test_boot_that_fails_half_way_is_torn_down() -> None:
    # nspawn refuses to bind a file over a directory: it exits after network and overlay are set up.
    failed = labctl("up", "pytest-broken", "--index", "199", "--bind-ro", "/etc/hostname:/etc", check=False)
    assert failed.returncode == 2
    assert "systemd-nspawn exited during boot" in failed.stderr
    assert leftovers_of("pytest-broken", 199) == []


def test_killed_up_is_cleaned_by_down() -> None:
    up = subprocess.Popen(
        [sys.executable, str(LABCTL), "up", "pytest-killed", "--index", "198"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while lab.load_state("pytest-killed") is None or lab.load_state("pytest-killed").pid == 0:
        assert time.monotonic() < deadline, "labctl up never started the container"
        time.sleep(0.05)
    up.send_signal(signal.SIGKILL)
    up.wait(timeout=10)
    assert leftovers_of("pytest-killed", 198) != []
    labctl("down", "pytest-killed")
    assert leftovers_of("pytest-killed", 198) == []


def test_up_rejects_a_taken_name_and_bad_input(hosts: list[str]) -> None:
    hosts.append("pytest-dup")
    labctl("up", "pytest-dup")
    duplicate = labctl("up", "pytest-dup", check=False)
    assert duplicate.returncode == 2
    assert "labctl down pytest-dup" in duplicate.stderr
    bad_name = labctl("up", "Bad_Name", check=False)
    assert bad_name.returncode == 2
    assert "lowercase" in bad_name.stderr
    missing_source = labctl("up", "pytest-nosrc", "--bind-ro", "/nonexistent:/mnt/models", check=False)
    assert missing_source.returncode == 2
    assert leftovers_of("pytest-nosrc", 0) == []
