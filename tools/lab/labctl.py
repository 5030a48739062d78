"""The lab: Debian 12 systemd hosts booted with systemd-nspawn, each in its own network namespace.

Subcommands:
  rootfs       build (or reuse) the cached debootstrap rootfs for the current recipe
  up NAME      boot a fresh host (copy-on-write overlay over the cached rootfs), wait for sshd
  down NAME... tear hosts down side by side (also half-started ones); `down --all` sweeps every lab leftover
  status       list the hosts this controller runs
  check-clean  exit 1 and list leftovers if any lab process, mount, namespace or link remains

Addressing (CONTRIBUTING.md): bridge llmlab0 holds the controller address 198.18.0.1/24, host with
index N is 198.18.0.(10+N) on port 22, user root, key `$LLMSTACK_CACHE/lab/id_ed25519`. Hosts reach
the outside through NAT on the controller. Everything lives under `$LLMSTACK_CACHE` (default
`<repo>/.cache`): `rootfs/<recipe-hash>/` and `lab/state/<name>/`.

Needs root and the Debian packages: debootstrap systemd-container iproute2 nftables openssh-client.
Modules: lab_rootfs (the cached tree), lab_system (bridge, NAT, namespaces, processes, mounts, cgroups),
lab_common (paths, locks, errors); this file holds the host lifecycle and the command line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab_common import LabError, identity_file, lab_dir, locked, log, require_tools, run, state_dir
from lab_rootfs import ensure_rootfs, prune_rootfs
from lab_system import (
    BRIDGE,
    NETNS_PREFIX,
    NFT_TABLE,
    SUBNET,
    VETH_PREFIX,
    cgroup_pids,
    cgroup_roots,
    cmdline,
    descendants,
    ensure_bridge,
    host_cgroups,
    kill_all,
    kill_cgroup,
    lab_cgroups,
    lab_links,
    link_exists,
    mounts_under,
    netns_names,
    netns_pids,
    plumb_host_network,
    process_table,
    remove_bridge,
    remove_cgroup_tree,
    unmount_all,
    wait_gone,
)

FIRST_INDEX = 1
LAST_INDEX = 200
# Indexes below this are kept for hosts that ask for a fixed one (inventory/lab's fleet uses 1-3),
# so molecule hosts allocated meanwhile never take a fleet address.
FIRST_AUTO_INDEX = 20
SSH_PORT = 22
SSH_USER = "root"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
BOOT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


@dataclass
class HostState:
    name: str
    index: int
    hostname: str
    rootfs: str
    bind_ro: list[str] = field(default_factory=list)
    pid: int = 0
    phase: str = "allocated"

    @property
    def address(self) -> str:
        return str(SUBNET.network_address + 10 + self.index)

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.index}"

    @property
    def veth(self) -> str:
        return f"{VETH_PREFIX}{self.index}"

    @property
    def directory(self) -> Path:
        return state_dir() / self.name

    @property
    def merged(self) -> Path:
        return self.directory / "root"

    def save(self) -> None:
        state_dir().mkdir(parents=True, exist_ok=True)
        path = state_dir() / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        tmp.replace(path)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hostname": self.hostname,
            "index": self.index,
            "address": self.address,
            "port": SSH_PORT,
            "user": SSH_USER,
            "identity_file": str(identity_file()),
            "pid": self.pid,
            "running": nspawn_alive(self),
            "phase": self.phase,
            "console_log": str(self.directory / "console.log"),
        }


def load_states() -> list[HostState]:
    states = []
    for path in sorted(state_dir().glob("*.json")) if state_dir().is_dir() else []:
        try:
            states.append(HostState(**json.loads(path.read_text(encoding="utf-8"))))
        except (ValueError, TypeError) as error:
            log(f"ignoring unreadable state {path}: {error}")
    return states


def load_state(name: str) -> HostState | None:
    return next((state for state in load_states() if state.name == name), None)


def lab_lock() -> contextlib.AbstractContextManager[None]:
    return locked(state_dir() / ".lock")


def is_nspawn_of(pid: int, state: HostState) -> bool:
    args = cmdline(pid)
    return bool(args) and "systemd-nspawn" in args[0] and f"--directory={state.merged}" in args


def nspawn_alive(state: HostState) -> bool:
    return state.pid > 0 and is_nspawn_of(state.pid, state)


def nspawn_pids(state: HostState) -> list[int]:
    """By command line, not only the recorded pid: a crash between fork and the state write loses the pid."""
    return [pid for pid in process_table() if is_nspawn_of(pid, state)]


def stop_container(state: HostState) -> None:
    """SIGKILL the container's init, which takes its whole PID namespace with it; nspawn then exits by itself.

    A lab host holds nothing worth an orderly poweroff, and systemd-shutdown inside nspawn waits up to
    90 s for journald here, which would make every molecule destroy slow.
    """
    table = process_table()
    for nspawn in nspawn_pids(state):
        kill_all([pid for pid, parent in table.items() if parent == nspawn])
        if not wait_gone([nspawn], STOP_TIMEOUT_S):
            log(f"{state.name}: systemd-nspawn did not exit within {STOP_TIMEOUT_S}s, killing it")
            tree = [nspawn, *descendants(nspawn)]
            kill_all(tree)
            wait_gone(tree, 5.0)
    # Anything else that entered the namespace (e.g. an `ip netns exec` shell) must not outlive the host.
    if state.netns in netns_names():
        stray = netns_pids(state.netns)
        kill_all(stray)
        wait_gone(stray, 5.0)
    for group in host_cgroups(state.name):
        remaining = cgroup_pids(group)
        if remaining:
            kill_cgroup(group)
            kill_all(remaining)
            wait_gone(remaining, 5.0)
        remove_cgroup_tree(group)


def rootfs_for_hosts() -> Path:
    root, built = ensure_rootfs()
    if built:
        prune_rootfs(keep=root.parent, in_use={state.rootfs for state in load_states()})
    return root


def ensure_identity() -> Path:
    key = identity_file()
    with locked(lab_dir() / ".key.lock"):
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "llmstack-lab", "-f", str(key)])
    return key


def allocate(name: str, hostname: str, index: int | None, rootfs: Path, bind_ro: list[str]) -> HostState:
    with lab_lock():
        states = load_states()
        if any(state.name == name for state in states):
            raise LabError(f"host {name} already exists; run `labctl down {name}` first")
        taken = {state.index for state in states}
        taken |= {int(ns[len(NETNS_PREFIX) :]) for ns in netns_names() if ns[len(NETNS_PREFIX) :].isdigit()}
        if index is None:
            index = next((i for i in range(FIRST_AUTO_INDEX, LAST_INDEX + 1) if i not in taken), None)
            if index is None:
                raise LabError("no free lab index left; run `labctl down --all`")
        elif index in taken:
            owner = next((state.name for state in states if state.index == index), "a leftover namespace")
            raise LabError(f"index {index} is taken by {owner}; pick another --index or run `labctl down {owner}`")
        state = HostState(name=name, index=index, hostname=hostname, rootfs=str(rootfs), bind_ro=bind_ro)
        state.save()
        ensure_bridge()
        return state


def prepare_overlay(state: HostState, public_key: str) -> None:
    upper, work = state.directory / "upper", state.directory / "work"
    for directory in (upper, work, state.merged):
        directory.mkdir(parents=True, exist_ok=True)
    run(
        [
            "mount",
            "-t",
            "overlay",
            f"llmlab-{state.name}",
            "-o",
            f"lowerdir={state.rootfs},upperdir={upper},workdir={work}",
            str(state.merged),
        ]
    )
    ssh_dir = state.merged / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(public_key, encoding="utf-8")
    authorized.chmod(0o600)
    host_key = state.merged / "etc/ssh/ssh_host_ed25519_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{state.hostname}", "-f", str(host_key)])
    # Name resolution for the host's own name without DNS (sudo and some installers look it up).
    hosts = state.merged / "etc/hosts"
    hosts.write_text(
        f"127.0.0.1\tlocalhost\n{state.address}\t{state.hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        encoding="utf-8",
    )


def resolv_conf_mode() -> str:
    """A controller behind systemd-resolved's 127.0.0.53 stub must hand hosts its uplink servers instead."""
    try:
        lines = Path("/etc/resolv.conf").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    servers = [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]
    only_loopback = bool(servers) and all(server.startswith("127.") for server in servers)
    return "copy-uplink" if only_loopback and Path("/run/systemd/resolve/resolv.conf").exists() else "copy-host"


def launch(state: HostState) -> subprocess.Popen[bytes]:
    cmd = [
        "systemd-nspawn",
        "--quiet",
        f"--directory={state.merged}",
        "--boot",
        "--register=no",
        "--keep-unit",
        f"--machine={state.hostname}",
        f"--network-namespace-path=/run/netns/{state.netns}",
        f"--resolv-conf={resolv_conf_mode()}",
        "--timezone=copy",
        "--link-journal=no",
        "--console=read-only",
        *[f"--bind-ro={spec}" for spec in state.bind_ro],
    ]
    groups = host_cgroups(state.name)
    for group in groups:
        group.mkdir(parents=True, exist_ok=True)

    def enter_host_cgroups() -> None:
        for group in groups:
            (group / "cgroup.procs").write_text(str(os.getpid()), encoding="utf-8")

    console = (state.directory / "console.log").open("w")
    process = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=console,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=enter_host_cgroups,
    )
    console.close()
    state.pid = process.pid
    state.phase = "booting"
    state.save()
    return process


def ssh_command(state: HostState, remote: str, timeout: int = 10) -> subprocess.CompletedProcess[str]:
    cmd = [
        "ssh",
        "-i",
        str(identity_file()),
        "-p",
        str(SSH_PORT),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        f"ConnectTimeout={timeout}",
        f"{SSH_USER}@{state.address}",
        remote,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, check=False)


def sshd_banner(address: str) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, SSH_PORT), timeout=1.0) as sock:
        sock.settimeout(2.0)
        return sock.recv(16).startswith(b"SSH-")
    return False


def console_tail(state: HostState) -> str:
    path = state.directory / "console.log"
    return path.read_text(encoding="utf-8", errors="replace")[-3000:] if path.exists() else "(no console log)"


def wait_for_ssh(state: HostState, nspawn: subprocess.Popen[bytes], started: float, timings: dict[str, float]) -> str:
    deadline = started + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise LabError(f"{state.name}: systemd-nspawn exited during boot; console:\n{console_tail(state)}")
        if sshd_banner(state.address):
            timings.setdefault("sshd_banner", round(time.monotonic() - started, 2))
            # The unit manager may still be starting units; roles expect a settled system.
            settled = ssh_command(state, "timeout 60 systemctl is-system-running --wait")
            if settled.returncode == 255:
                time.sleep(0.5)
                continue
            return settled.stdout.strip() or settled.stderr.strip()
        time.sleep(0.25)
    raise LabError(f"{state.name}: sshd did not answer within {BOOT_TIMEOUT_S}s; console:\n{console_tail(state)}")


def host_up(name: str, hostname: str, index: int | None, bind_ro: list[str]) -> dict[str, object]:
    require_tools("systemd-nspawn", "ip", "nft", "ssh", "ssh-keygen", "mount")
    if not NAME_PATTERN.match(name) or not NAME_PATTERN.match(hostname):
        raise LabError(f"bad host name {name!r}/{hostname!r}: use lowercase letters, digits and '-'")
    for spec in bind_ro:
        source, target = [*spec.split(":", 1), ""][:2]
        if not target.startswith("/") or not Path(source).is_absolute() or not Path(source).exists():
            raise LabError(f"--bind-ro {spec!r}: give SRC:DST with an existing absolute SRC and an absolute DST")
    rootfs = rootfs_for_hosts()
    public_key = ensure_identity().with_suffix(".pub").read_text(encoding="utf-8")
    state = allocate(name, hostname, index, rootfs, bind_ro)
    # A killed `up` (molecule timeout, CI cancel) must still tear down what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        started = time.monotonic()
        timings: dict[str, float] = {}
        plumb_host_network(state.netns, state.veth, state.address)
        prepare_overlay(state, public_key)
        nspawn = launch(state)
        timings["launched"] = round(time.monotonic() - started, 2)
        system_state = wait_for_ssh(state, nspawn, started, timings)
        state.phase = "running"
        state.save()
    except BaseException:
        log(f"{name}: boot failed, tearing down what was started")
        teardown(state)
        raise
    described = state.describe()
    described["boot_seconds"] = round(time.monotonic() - started, 2)
    described["boot_timings"] = timings
    described["system_state"] = system_state
    return described


def teardown(state: HostState) -> None:
    stop_container(state)
    unmount_all(state.directory)
    if state.netns in netns_names():
        run(["ip", "netns", "del", state.netns], check=False)
    if link_exists(state.veth):
        run(["ip", "link", "del", state.veth], check=False, quiet=True)
    if nspawn_pids(state) or mounts_under(state.directory):
        # A container still running on the overlay would lose its files under it: keep the evidence.
        log(f"{state.name}: processes or mounts remain under {state.directory}; see `labctl check-clean`")
    else:
        shutil.rmtree(state.directory, ignore_errors=True)
    with lab_lock():
        (state_dir() / f"{state.name}.json").unlink(missing_ok=True)
        if not load_states():
            remove_bridge()


def hosts_down(names: list[str]) -> list[str]:
    """The names that were up, now torn down (a molecule destroy passes all of a scenario's hosts at once)."""
    states = {state.name: state for state in load_states()}
    for name in names:
        if name not in states:
            log(f"{name}: not running")
    found = [states[name] for name in dict.fromkeys(names) if name in states]
    teardown_all(found)
    return [state.name for state in found]


def teardown_all(states: list[HostState]) -> None:
    """Side by side: most of a teardown is waiting (1.5-2.5 s a host) for the kernel to empty the host's PID
    namespace and for nspawn to clean up after it, and those waits overlap. lab_lock serializes the
    state-file writes."""
    if not states:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(states)) as pool:
        list(pool.map(teardown, states))


def sweep_orphans() -> None:
    """What no state file accounts for any more: namespaces, links, mounts and nspawn processes of the lab."""
    for pid in lab_processes():
        tree = [pid, *descendants(pid)]
        kill_all(tree)
        wait_gone(tree, 5.0)
    for netns in netns_names():
        if netns.startswith(NETNS_PREFIX):
            kill_all(netns_pids(netns))
            run(["ip", "netns", "del", netns], check=False)
    for link in lab_links():
        if link != BRIDGE:
            run(["ip", "link", "del", link], check=False)
    for group in lab_cgroups():
        kill_cgroup(group)
        kill_all(cgroup_pids(group))
        wait_gone(cgroup_pids(group), 5.0)
        remove_cgroup_tree(group)
    # Hosts booted by labctl before per-host cgroups shared these; they go once empty.
    for legacy in legacy_shared_cgroups():
        remove_cgroup_tree(legacy)
    unmount_all(state_dir())
    if state_dir().is_dir():
        for leftover in state_dir().iterdir():
            if leftover.is_dir() and not mounts_under(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
    with lab_lock():
        if not load_states():
            remove_bridge()


def legacy_shared_cgroups() -> list[Path]:
    return [root / name for root in cgroup_roots() for name in ("payload", "supervisor") if (root / name).is_dir()]


def lab_processes() -> list[int]:
    marker = str(state_dir()) + "/"
    return [
        pid
        for pid in process_table()
        if (args := cmdline(pid)) and "systemd-nspawn" in args[0] and any(marker in arg for arg in args)
    ]


def leftovers() -> list[str]:
    found = [f"process {pid}: {' '.join(cmdline(pid))}" for pid in lab_processes()]
    found += [f"mount {target}" for target in mounts_under(state_dir())]
    found += [f"netns {ns} (pids {netns_pids(ns)})" for ns in netns_names() if ns.startswith(NETNS_PREFIX)]
    found += [f"link {link}" for link in lab_links()]
    found += [f"cgroup {group} (pids {cgroup_pids(group)})" for group in lab_cgroups()]
    if run(["nft", "list", "table", "ip", NFT_TABLE], check=False, quiet=True).returncode == 0:
        found.append(f"nft table ip {NFT_TABLE}")
    found += [f"state {state.name} (index {state.index})" for state in load_states()]
    if state_dir().is_dir():
        found += [f"directory {path}" for path in state_dir().iterdir() if path.is_dir()]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labctl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("rootfs", help="build or reuse the cached rootfs; prints its path and build time")
    up = commands.add_parser("up", help="boot a fresh host and print its connection as JSON")
    up.add_argument("name")
    up.add_argument("--hostname", help="host name inside the host (default: NAME)")
    up.add_argument(
        "--index",
        type=int,
        help=f"address 198.18.0.(10+N), {FIRST_INDEX}..{LAST_INDEX}; default: first free from {FIRST_AUTO_INDEX}",
    )
    up.add_argument("--bind-ro", action="append", default=[], metavar="SRC:DST", help="read-only bind mount")
    down = commands.add_parser("down", help="tear hosts down (several at once)")
    down.add_argument("names", nargs="*", metavar="NAME")
    down.add_argument("--all", action="store_true", help="every host plus any orphaned lab leftovers")
    commands.add_parser("status", help="list hosts as JSON")
    commands.add_parser("check-clean", help="exit 1 if any lab leftover remains")
    args = parser.parse_args(argv)
    try:
        if args.command == "rootfs":
            root, built = ensure_rootfs()
            if built:
                prune_rootfs(keep=root.parent, in_use={state.rootfs for state in load_states()})
            seconds = float((root.parent / "build_seconds").read_text(encoding="utf-8"))
            print(json.dumps({"rootfs": str(root), "built": built, "build_seconds": seconds}))
        elif args.command == "up":
            if args.index is not None and not FIRST_INDEX <= args.index <= LAST_INDEX:
                raise LabError(f"--index must be {FIRST_INDEX}..{LAST_INDEX}")
            print(json.dumps(host_up(args.name, args.hostname or args.name, args.index, args.bind_ro), indent=2))
        elif args.command == "down":
            if args.all:
                states = load_states()
                removed = [state.name for state in states]
                teardown_all(states)
                sweep_orphans()
            elif args.names:
                removed = hosts_down(args.names)
            else:
                parser.error("down needs NAME or --all")
            print(json.dumps({"removed": removed}))
        elif args.command == "status":
            print(json.dumps([state.describe() for state in load_states()], indent=2))
        elif args.command == "check-clean":
            found = leftovers()
            for item in found:
                print(f"leftover: {item}")
            return 1 if found else 0
    except LabError as error:
        log(str(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
