"""Shared plumbing of the lab tools: errors, cache paths, locks, command runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class LabError(Exception):
    """A failure with a message that tells the user what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("LLMSTACK_CACHE", str(REPO_ROOT / ".cache"))).resolve()


def lab_dir() -> Path:
    return cache_dir() / "lab"


def state_dir() -> Path:
    return lab_dir() / "state"


def identity_file() -> Path:
    return lab_dir() / "id_ed25519"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialize concurrent labctl callers (several molecule scenarios boot hosts at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(cmd: list[str], *, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise LabError(
            f"{' '.join(cmd)} failed (rc={result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
        )
    if not quiet and result.returncode != 0:
        log(f"ignored: {' '.join(cmd)}: {result.stderr.strip()}")
    return result


def log(message: str) -> None:
    print(f"labctl: {message}", file=sys.stderr, flush=True)


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise LabError(
            f"missing tools: {', '.join(missing)}; install them with "
            "`apt-get install debootstrap systemd-container iproute2 nftables openssh-client`"
        )
    if os.geteuid() != 0:
        raise LabError("the lab needs root (namespaces, mounts, nspawn); run labctl as root")
