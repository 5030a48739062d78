"""Host-side system plumbing of the lab: the bridge, NAT, network namespaces, processes and mounts."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from lab_common import lab_dir, run

SUBNET = ipaddress.IPv4Network("198.18.0.0/24")
CONTROLLER_ADDRESS = "198.18.0.1"
BRIDGE = "llmlab0"
NETNS_PREFIX = "llmlab-"
VETH_PREFIX = "llv"
NFT_TABLE = "llmstack_lab"
CGROUP_PARENT = "llmlab"


def uplink_mtu() -> int:
    """Match the uplink MTU so large TLS records from hosts are not black-holed behind the NAT."""
    route = run(["ip", "-j", "route", "show", "default"], check=False, quiet=True)
    with contextlib.suppress(ValueError, IndexError, KeyError):
        device = json.loads(route.stdout)[0]["dev"]
        return int(Path(f"/sys/class/net/{device}/mtu").read_text(encoding="utf-8"))
    return 1500


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def netns_names() -> list[str]:
    result = run(["ip", "-j", "netns", "list"], check=False, quiet=True)
    with contextlib.suppress(ValueError):
        return [entry["name"] for entry in json.loads(result.stdout or "[]")]
    return []


def ensure_bridge() -> None:
    """The controller side of the lab: bridge + NAT. Caller holds the lab lock."""
    mtu = str(uplink_mtu())
    if not link_exists(BRIDGE):
        run(["ip", "link", "add", BRIDGE, "mtu", mtu, "type", "bridge"])
        run(["ip", "addr", "add", f"{CONTROLLER_ADDRESS}/{SUBNET.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    saved = lab_dir() / "ip_forward.saved"
    if not saved.exists():
        saved.write_text(forward.read_text(encoding="utf-8"), encoding="utf-8")
    forward.write_text("1\n", encoding="utf-8")
    if run(["nft", "list", "table", "ip", NFT_TABLE], check=False, quiet=True).returncode != 0:
        ruleset = (
            f"table ip {NFT_TABLE} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    ip saddr {SUBNET} oifname != "{BRIDGE}" masquerade\n'
            "  }\n"
            "}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True, capture_output=True)


def remove_bridge() -> None:
    """Last host gone: remove the bridge and NAT and restore ip_forward. Caller holds the lab lock."""
    if link_exists(BRIDGE):
        run(["ip", "link", "del", BRIDGE], check=False)
    if run(["nft", "list", "table", "ip", NFT_TABLE], check=False, quiet=True).returncode == 0:
        run(["nft", "delete", "table", "ip", NFT_TABLE], check=False)
    saved = lab_dir() / "ip_forward.saved"
    if saved.exists():
        Path("/proc/sys/net/ipv4/ip_forward").write_text(saved.read_text(encoding="utf-8"), encoding="utf-8")
        saved.unlink()


def host_mac(address: str) -> str:
    """A fixed, locally administered MAC per lab address.

    A random MAC per boot leaves the previous host's entry in the controller's and the other hosts' ARP
    caches, and a host re-using the address is unreachable for up to ~40 s.
    """
    packed = ipaddress.IPv4Address(address).packed
    return "02:4c:4c:{:02x}:{:02x}:{:02x}".format(*packed[1:])


def plumb_host_network(netns: str, veth: str, address: str) -> None:
    """veth pair: `veth` on the bridge, its peer as eth0 with `address` inside `netns`."""
    mtu = str(uplink_mtu())
    peer = f"{veth}c"
    run(["ip", "netns", "add", netns])
    run(["ip", "link", "add", veth, "mtu", mtu, "type", "veth", "peer", "name", peer, "mtu", mtu])
    run(["ip", "link", "set", peer, "address", host_mac(address)])
    run(["ip", "neigh", "flush", "to", address, "dev", BRIDGE], check=False, quiet=True)
    run(["ip", "link", "set", peer, "netns", netns])
    run(["ip", "-n", netns, "link", "set", peer, "name", "eth0"])
    run(["ip", "-n", netns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    run(["ip", "-n", netns, "link", "set", "eth0", "up"])
    run(["ip", "-n", netns, "route", "add", "default", "via", CONTROLLER_ADDRESS])
    run(["ip", "link", "set", veth, "master", BRIDGE])
    run(["ip", "link", "set", veth, "up"])


def _proc_stat_ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_table() -> dict[int, int]:
    table: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                table[int(entry.name)] = _proc_stat_ppid(int(entry.name))
    return table


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, parent in process_table().items():
        children.setdefault(parent, []).append(child)
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def netns_pids(netns: str) -> list[int]:
    result = run(["ip", "netns", "pids", netns], check=False, quiet=True)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.1)
    return False


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(prefix) or target == str(directory):
            found.append(target)
    return found


def unmount_all(directory: Path) -> None:
    for target in sorted(mounts_under(directory), key=len, reverse=True):
        if run(["umount", target], check=False, quiet=True).returncode != 0:
            run(["umount", "-l", target], check=False)


def lab_links() -> list[str]:
    net = Path("/sys/class/net")
    return sorted(
        link.name for link in net.iterdir() if link.name == BRIDGE or re.fullmatch(rf"{VETH_PREFIX}\d+", link.name)
    )


def cgroup_roots() -> list[Path]:
    """The cgroup hierarchies systemd (and so nspawn) keeps its tree in: name=systemd and/or cgroup2."""
    hybrid_or_legacy = [
        root for root in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")) if root.is_dir()
    ]
    if hybrid_or_legacy:
        return hybrid_or_legacy
    return [Path("/sys/fs/cgroup")] if Path("/sys/fs/cgroup/cgroup.procs").exists() else []


def host_cgroups(name: str) -> list[Path]:
    """One cgroup per host, so that no two hosts' systemd share a unit's cgroup.

    nspawn with --keep-unit puts the container's tree under the caller's cgroup; started from the same
    cgroup, every host's ssh.service (and every other unit) would share one directory, and systemd in one
    host would wait on, or count, processes of another.
    """
    return [root / CGROUP_PARENT / name for root in cgroup_roots()]


def remove_cgroup_tree(top: Path) -> None:
    """rmdir bottom-up: cgroup directories hold only virtual files and go once their processes are gone."""
    if not top.is_dir():
        return
    for directory, _subdirs, _files in sorted(os.walk(top, topdown=False), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            Path(directory).rmdir()
    with contextlib.suppress(OSError):
        top.parent.rmdir()


def kill_cgroup(group: Path) -> None:
    """cgroup2's cgroup.kill SIGKILLs every process in the subtree, whatever namespace it sits in."""
    kill_file = group / "cgroup.kill"
    if kill_file.exists():
        with contextlib.suppress(OSError):
            kill_file.write_text("1", encoding="utf-8")


def cgroup_pids(group: Path) -> list[int]:
    pids: list[int] = []
    for directory, _subdirs, _files in os.walk(group) if group.is_dir() else []:
        with contextlib.suppress(OSError):
            text = (Path(directory) / "cgroup.procs").read_text(encoding="utf-8")
            pids += [int(pid) for pid in text.split()]
    return pids


def lab_cgroups() -> list[Path]:
    return sorted(
        group
        for root in cgroup_roots()
        if (root / CGROUP_PARENT).is_dir()
        for group in (root / CGROUP_PARENT).iterdir()
        if group.is_dir()
    )
