"""Starting and stopping backends: a systemd unit, or a command the router spawns and supervises."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Protocol

from .config import BackendSpec, CommandControl, RouterConfig, UnitControl

log = logging.getLogger("llmstack_router.control")
_PR_SET_PDEATHSIG = 1


class ControlError(RuntimeError):
    pass


class Controller(Protocol):
    description: str

    async def start(self) -> None: ...

    async def stop(self, timeout_s: float) -> None:
        """Return only once every process of the backend is gone; raise ControlError otherwise."""

    async def failure(self, loading: bool = False) -> str | None:
        """Why the backend is known to be down (exited, unit failed), else None. ``loading``: the
        router is starting it (a unit waiting to auto-restart is then on its way up)."""

    async def last_logs(self, lines: int = 20) -> str: ...


class ExternalController:
    """A backend managed elsewhere: the router only probes it."""

    description = "external"

    async def start(self) -> None:
        return None

    async def stop(self, timeout_s: float) -> None:
        return None

    async def failure(self, loading: bool = False) -> str | None:
        return None

    async def last_logs(self, lines: int = 20) -> str:
        return "(backend managed outside the router: no logs)"


def _die_with_parent() -> None:
    # Covers the router being SIGKILLed (no chance to clean up); the process group kill on
    # normal exit covers grandchildren, which PDEATHSIG does not reach (llama-swap #100).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class CommandController:
    """Spawns ``argv`` in its own process group and keeps its last output lines."""

    live: ClassVar[set[CommandController]] = set()

    def __init__(self, spec: CommandControl, name: str, on_exit: Callable[[int], None] | None = None) -> None:
        self.spec = spec
        self.name = name
        self.description = f"command {spec.argv[0]}"
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.pgid: int | None = None
        self.output: deque[str] = deque(maxlen=200)
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            return
        if self._group_alive():  # children of a leader that died (kill -9) must not hold the GPU
            self._signal_group(signal.SIGKILL)
        self._stopping = False
        self.output.clear()
        env = {**os.environ, **dict(self.spec.env)}
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.spec.argv, cwd=self.spec.cwd, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise ControlError(f"cannot run {self.spec.argv[0]}: {exc}") from exc
        self.pgid = self.proc.pid
        CommandController.live.add(self)
        self._tasks = [asyncio.create_task(self._read(self.proc)), asyncio.create_task(self._watch(self.proc))]

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            self.output.append(line.decode(errors="replace").rstrip())

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if not self._stopping and self.on_exit is not None and proc is self.proc:
            self.on_exit(code)

    def _group_alive(self) -> bool:
        if self.pgid is None:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, signum: int) -> None:
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signum)

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        proc = self.proc
        if proc is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout_s)
        # The leader may exit while children linger; poll the whole group, then SIGKILL it.
        while self._group_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._group_alive():
            log.warning("backend %s ignored SIGTERM for %.0fs, sending SIGKILL", self.name, timeout_s)
            self._signal_group(signal.SIGKILL)
            kill_deadline = time.monotonic() + 5.0
            while self._group_alive() and time.monotonic() < kill_deadline:
                await asyncio.sleep(0.02)
        if proc.returncode is None:
            await proc.wait()
        if self._group_alive():
            raise ControlError(f"processes of {self.name} (group {self.pgid}) survive SIGKILL")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        CommandController.live.discard(self)
        self.pgid = None

    def kill_now(self) -> None:
        self._stopping = True
        self._signal_group(signal.SIGKILL)

    async def failure(self, loading: bool = False) -> str | None:
        if self.proc is not None and self.proc.returncode is not None:
            return f"process exited with code {self.proc.returncode}"
        return None

    async def last_logs(self, lines: int = 20) -> str:
        return "\n".join(list(self.output)[-lines:])


async def _run(argv: list[str], timeout_s: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"{argv[0]} timed out after {timeout_s}s"
    return proc.returncode or 0, out.decode(errors="replace").strip()


class UnitController:
    """``systemctl start/stop`` of one unit named in the config (never from a request)."""

    # Where the cgroup tree is mounted; the tests point it at their fake systemctl's tree.
    cgroup_root: ClassVar[Path] = Path("/sys/fs/cgroup")

    def __init__(self, spec: UnitControl, systemctl: tuple[str, ...], journalctl: tuple[str, ...]) -> None:
        self.unit = spec.unit
        self.description = f"unit {spec.unit}"
        self.systemctl = list(systemctl)
        self.journalctl = list(journalctl)
        # The unit's state as last seen (systemctl show), for /status. Writer: show().
        self.last_state: dict[str, str] = {}
        self.resets = 0  # how often the router cleared a start limit (reset-failed). Writer: start().

    async def start(self) -> None:
        # A unit that hit its start limit refuses every start until reset-failed; the router's
        # next try (a new request) clears it once, so one crash loop does not lock the model out.
        props = await self.show()
        if props.get("Result") == "start-limit-hit":
            code, out = await _run([*self.systemctl, "reset-failed", self.unit], 30.0)
            if code != 0:
                raise ControlError(f"{self.unit} hit its start limit and systemctl reset-failed failed ({code}): {out}")
            self.resets += 1
            log.warning("cleared the start limit of %s (reset-failed) before starting it again", self.unit)
        code, out = await _run([*self.systemctl, "start", "--no-block", self.unit], 60.0)
        if code != 0:
            raise ControlError(f"systemctl start {self.unit} failed ({code}): {out}")

    async def show(self) -> dict[str, str]:
        code, out = await _run([*self.systemctl, "show",
                                "--property=ActiveState,SubState,Result,MainPID,ControlGroup,NRestarts",
                                self.unit], 30.0)
        if code != 0:
            raise ControlError(f"systemctl show {self.unit} failed ({code}): {out}")
        self.last_state = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return self.last_state

    async def stop(self, timeout_s: float) -> None:
        # systemd itself escalates to SIGKILL after the unit's TimeoutStopSec; we confirm the
        # cgroup is empty because "inactive" alone has lied with KillMode=process units.
        code, out = await _run([*self.systemctl, "stop", self.unit], timeout_s + 30.0)
        if code != 0:
            raise ControlError(f"systemctl stop {self.unit} failed ({code}): {out}")
        deadline = time.monotonic() + timeout_s
        while True:
            props = await self.show()
            gone = props.get("ActiveState") in ("inactive", "failed") and props.get("MainPID", "0") == "0"
            if gone and not _cgroup_has_processes(props.get("ControlGroup", "")):
                return
            if time.monotonic() >= deadline:
                raise ControlError(f"{self.unit} still has processes {timeout_s:.0f}s after stop: {props}")
            await asyncio.sleep(0.1)

    async def failure(self, loading: bool = False) -> str | None:
        """Lost, not ready: failed, dead, or crashed and waiting to auto-restart (``activating
        (auto-restart)``: its main process is gone; whatever comes back has lost our requests).
        While the router loads it, auto-restart is systemd bringing it up (our start job waits for
        the restart timer); ready_timeout_s and the start limit bound that."""
        props = await self.show()
        active, sub, result = props.get("ActiveState"), props.get("SubState"), props.get("Result", "")
        if result == "start-limit-hit":
            return (f"unit {self.unit} is {active}/{sub}, Result=start-limit-hit: systemd refuses to start it "
                    f"until reset-failed (the router clears it on the next try; see the unit's journal)")
        if active == "failed" or (active == "activating" and sub == "auto-restart" and not loading) or (
            active == "inactive" and sub in ("dead", "failed") and props.get("MainPID", "0") == "0"
        ):
            why = f", Result={result}" if result not in ("", "success") else ""
            return f"unit {self.unit} is {active}/{sub}{why}"
        return None

    def status(self) -> dict[str, str]:
        return {k: self.last_state[k] for k in ("ActiveState", "SubState", "Result", "NRestarts")
                if k in self.last_state}

    async def last_logs(self, lines: int = 20) -> str:
        code, out = await _run([*self.journalctl, "-u", self.unit, "-n", str(lines), "--no-pager", "-o", "cat"], 15.0)
        return out if code == 0 else f"(journalctl failed: {out})"


def _cgroup_has_processes(control_group: str) -> bool:
    if not control_group:
        return False
    procs = UnitController.cgroup_root / control_group.lstrip("/") / "cgroup.procs"
    try:
        return bool(procs.read_text().strip())
    except OSError:
        return False


def kill_all_spawned() -> None:
    """Last resort on router exit: no spawned backend may outlive the router."""
    for controller in list(CommandController.live):
        controller.kill_now()


def make_controller(spec: BackendSpec, config: RouterConfig, on_exit: Callable[[int], None]) -> Controller:
    """The controller the backend's config asks for: none (external), a unit, or a spawned command."""
    control = spec.control
    if control is None:
        return ExternalController()
    if isinstance(control, UnitControl):
        return UnitController(control, config.systemctl, config.journalctl)
    return CommandController(control, spec.name, on_exit=on_exit)
