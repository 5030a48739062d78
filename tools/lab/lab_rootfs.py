"""The lab's Debian 12 rootfs: a debootstrap tree cached per recipe hash under `$LLMSTACK_CACHE/rootfs/`.

The recipe is the suite, the controller's apt mirrors, the package list, the masked units and the source of
`customize_rootfs`: change any of them and the next `labctl rootfs` (or `up`) builds a new tree.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab_common import LabError, cache_dir, locked, log, require_tools
from lab_system import unmount_all

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

# What every lab host has before any role runs: systemd + sshd + what Ansible modules need
# (python3-apt for ansible.builtin.apt, acl for become_user to unprivileged service users),
# venv/git/unzip/libgomp for the roles' installs, and small tools the tests lean on.
ROOTFS_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",
    "sudo",
    "acl",
    "ca-certificates",
    "iproute2",
    "iputils-ping",
    "procps",
    "psmisc",
    "lsof",
    "curl",
    "git",
    "unzip",
    "xz-utils",
    "libgomp1",
    "netbase",
)

# Timers that would grab the dpkg lock or churn the disk behind a role's back.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-networkd-wait-online.service",
    # The console is a read-only log file; a getty there would only respawn.
    "console-getty.service",
)


@dataclass(frozen=True)
class Mirrors:
    debian: str
    security: str


def controller_mirrors() -> Mirrors:
    """The apt mirror this controller already uses, so the lab works wherever the controller's apt does."""
    debian = os.environ.get("LLMSTACK_LAB_MIRROR", "")
    security = os.environ.get("LLMSTACK_LAB_SECURITY_MIRROR", "")
    for uri, suites in _apt_sources():
        if not debian and SUITE in suites:
            debian = uri
        if not security and f"{SUITE}-security" in suites:
            security = uri
    return Mirrors(
        debian=(debian or DEFAULT_MIRROR).rstrip("/"), security=(security or DEFAULT_SECURITY_MIRROR).rstrip("/")
    )


def _apt_sources() -> Iterator[tuple[str, list[str]]]:
    sources_dir = Path("/etc/apt/sources.list.d")
    for path in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for stanza in path.read_text(encoding="utf-8").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split()
    legacy = [Path("/etc/apt/sources.list"), *sorted(sources_dir.glob("*.list"))] if sources_dir.is_dir() else []
    for path in legacy:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb":
                yield words[1], [words[2]]


def customize_rootfs(root: Path, mirrors: Mirrors) -> None:
    """Recipe steps after debootstrap. Its source is part of the recipe hash: edit it and the rootfs rebuilds."""
    sources = root / "etc/apt/sources.list.d/debian.sources"
    sources.parent.mkdir(parents=True, exist_ok=True)
    sources.write_text(
        f"Types: deb\nURIs: {mirrors.debian}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {mirrors.security}\nSuites: {SUITE}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        encoding="utf-8",
    )
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    # Every instance gets its own host key and machine id at boot; none may be shared through the cache.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("", encoding="utf-8")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "etc/hostname").unlink(missing_ok=True)
    sshd_drop_in = root / "etc/ssh/sshd_config.d/50-llmstack-lab.conf"
    sshd_drop_in.write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n",
        encoding="utf-8",
    )
    units = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True, capture_output=True)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)


def rootfs_recipe(mirrors: Mirrors) -> dict[str, object]:
    return {
        "suite": SUITE,
        "variant": "minbase",
        "mirror": mirrors.debian,
        "security_mirror": mirrors.security,
        "packages": sorted(ROOTFS_PACKAGES),
        "masked_units": sorted(MASKED_UNITS),
        "customize": inspect.getsource(customize_rootfs),
    }


def recipe_hash(recipe: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def ensure_rootfs() -> tuple[Path, bool]:
    """Return the current recipe's rootfs and whether this call built it.

    The cached tree is only ever a read-only lower layer of the hosts' overlays.
    """
    mirrors = controller_mirrors()
    recipe = rootfs_recipe(mirrors)
    target = cache_dir() / "rootfs" / recipe_hash(recipe)
    root = target / "root"
    if (target / "complete").is_file():
        return root, False
    require_tools("debootstrap", "chroot")
    with locked(cache_dir() / "rootfs" / ".lock"):
        if (target / "complete").is_file():
            return root, False
        # An interrupted debootstrap leaves /proc and /sys mounted inside its target.
        unmount_all(target)
        shutil.rmtree(target, ignore_errors=True)
        root.mkdir(parents=True)
        log(f"building rootfs {target.name} from {mirrors.debian} (several minutes, once per recipe)")
        started = time.monotonic()
        cmd = [
            "debootstrap",
            "--variant=minbase",
            "--components=main",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            SUITE,
            str(root),
            mirrors.debian,
        ]
        build_log = target / "debootstrap.log"
        with build_log.open("w") as out:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            tail = build_log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise LabError(f"debootstrap failed (rc={result.returncode}); log {build_log}:\n{tail}")
        customize_rootfs(root, mirrors)
        seconds = round(time.monotonic() - started, 1)
        (target / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True), encoding="utf-8")
        (target / "build_seconds").write_text(f"{seconds}\n", encoding="utf-8")
        (target / "complete").write_text("", encoding="utf-8")
        log(f"rootfs {target.name} built in {seconds}s")
    return root, True


def prune_rootfs(keep: Path, in_use: set[str]) -> None:
    """Drop rootfs trees of older recipes that no running host uses as its lower layer."""
    for candidate in (cache_dir() / "rootfs").iterdir():
        if candidate.is_dir() and candidate != keep and str(candidate / "root") not in in_use:
            log(f"removing rootfs of an older recipe: {candidate.name}")
            shutil.rmtree(candidate, ignore_errors=True)
