"""Emulator of the systemctl/journalctl subset the router runs, for tests only (no systemd as PID 1 here).

``router_fake_systemctl.py STATE_DIR start|stop|reset-failed|show ... UNIT`` and
``router_fake_systemctl.py STATE_DIR journal -u UNIT -n N ...``. A unit is ``STATE_DIR/<unit>.json``:
its argv (a list), or ``{"argv": [...], "Restart": ..., "RestartSec": ..., "StartLimitBurst": ...,
"StartLimitIntervalSec": ...}``. Every call is appended to ``calls.log``; output goes to ``<unit>.log``.

It follows real systemd (v252, Debian 12) as closely as the router can observe, and is never kinder:

- States (``ActiveState``/``SubState``/``Result`` strings): src/core/service.c ``state_translation_table``
  (``auto-restart`` is ``activating``, ``failed`` is ``failed``) and src/basic/unit-def.c
  ``service_state_table``; ``service_result_table`` for ``success``, ``exit-code``, ``signal``,
  ``start-limit-hit``.
- Type=simple: the unit is ``active/running`` once its main process is forked (service.c
  ``service_enter_start``), ready or not.
- Main process exit: src/core/service.c ``service_sigchld_event`` → ``service_enter_running`` →
  ``service_enter_stop``: the rest of the cgroup is killed; exit 0 and the clean signals
  (SIGHUP, SIGINT, SIGTERM, SIGPIPE) are ``success``, else ``exit-code``/``signal``.
- ``Restart=`` (no, on-failure, always) and ``RestartSec=`` (default 100 ms): service.c
  ``service_shall_restart`` and ``service_enter_dead``: ``activating/auto-restart`` for RestartSec,
  then a new start, which passes the start limit like any other. ``start`` during
  ``auto-restart`` changes nothing (``service_start`` returns -EAGAIN: the job waits for the timer).
- Start limit: src/core/unit.c ``unit_test_start_limit`` (ratelimit ``StartLimitBurst=`` starts per
  ``StartLimitIntervalSec=``, defaults 5 per 10 s from src/core/main.c): the start is refused and the
  unit is ``failed`` with ``Result=start-limit-hit``. ``systemctl start --no-block`` still exits 0
  (the job was queued); without ``--no-block`` it exits 1 like systemctl's job-failed message.
- ``stop``: SIGTERM to the cgroup, SIGKILL after the timeout (src/core/unit.c ``unit_kill_context``).
  Stopping a unit waiting to auto-restart after a failure leaves it ``failed`` (service.c
  ``service_enter_dead``: the earlier result is kept). Stopping a failed unit keeps it failed.
- ``reset-failed``: src/core/unit.c ``unit_reset_failed``: ``failed`` → ``inactive/dead``, result
  ``success``, and the start-limit counter starts over (``ratelimit_reset``).
- ``ControlGroup``: template instances live under ``/system.slice/system-<prefix>.slice/<unit>``
  (src/core/unit.c ``unit_default_cgroup_path``/slice of the template); the fake keeps a tree under
  ``STATE_DIR/cgroup`` whose ``cgroup.procs`` lists every live process of the unit's session, and
  reports ``ControlGroup=`` empty once the unit has no process left (its cgroup is removed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
DEFAULTS = {"Restart": "no", "RestartSec": 0.1, "StartLimitBurst": 5, "StartLimitIntervalSec": 10.0}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z"


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z" and int(stat[3]) == sid:
                pids.append(int(entry.name))
    return pids


class Unit:
    def __init__(self, state_dir: Path, name: str) -> None:
        self.dir, self.name = state_dir, name
        self.state_file = state_dir / f"{name}.state"
        self.log_file = state_dir / f"{name}.log"
        if "@" in name:
            prefix = name.split("@", 1)[0]
            self.cgroup = f"/system.slice/system-{prefix}.slice/{name}"
        else:
            self.cgroup = f"/system.slice/{name}"

    def settings(self) -> dict:
        raw = json.loads((self.dir / f"{self.name}.json").read_text())
        return {**DEFAULTS, **({"argv": raw} if isinstance(raw, list) else raw)}

    @contextlib.contextmanager
    def locked(self):  # one writer of the state file at a time (CLI calls and the supervisor)
        with open(self.dir / f"{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {"ActiveState": "inactive", "SubState": "dead", "Result": "success", "MainPID": 0,
                    "Session": 0, "Supervisor": 0, "NRestarts": 0, "starts": []}

    def write(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def update(self, **fields) -> dict:
        with self.locked():
            state = {**self.read(), **fields}
            self.write(state)
            return state

    def start_limit_hit(self, state: dict) -> bool:
        """unit.c unit_test_start_limit: count this start; True if over the burst."""
        cfg = self.settings()
        now = time.monotonic()
        starts = [t for t in state["starts"] if now - t < cfg["StartLimitIntervalSec"]]
        if len(starts) >= cfg["StartLimitBurst"]:
            state.update(ActiveState="failed", SubState="failed", Result="start-limit-hit", MainPID=0, starts=starts)
            return True
        state["starts"] = [*starts, now]
        return False


def supervise(unit: Unit) -> int:
    """The unit's life after a start: run, and auto-restart per Restart= (service.c)."""
    stopping = False

    def on_term(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    cfg = unit.settings()
    restarts = 0
    while True:
        with open(unit.log_file, "ab") as log:
            child = subprocess.Popen(cfg["argv"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        unit.update(ActiveState="active", SubState="running", Result="success", MainPID=child.pid,
                    Session=child.pid, NRestarts=restarts)
        while child.poll() is None:
            if stopping:
                kill_session(child.pid, 10.0)
            time.sleep(0.01)
        code = child.returncode
        kill_session(child.pid, 10.0)  # the rest of the cgroup goes with the main process
        if stopping:
            unit.update(ActiveState="inactive", SubState="dead", MainPID=0, Supervisor=0)
            return 0
        clean = code == 0 or (code < 0 and -code in CLEAN_SIGNALS)
        result = "success" if clean else ("signal" if code < 0 else "exit-code")
        restart = cfg["Restart"] == "always" or (cfg["Restart"] == "on-failure" and not clean)
        if not restart:
            failed = result != "success"
            unit.update(ActiveState="failed" if failed else "inactive", SubState="failed" if failed else "dead",
                        Result=result, MainPID=0, Supervisor=0)
            return 0
        unit.update(ActiveState="activating", SubState="auto-restart", Result=result, MainPID=0)
        deadline = time.monotonic() + cfg["RestartSec"]
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.01)
        with unit.locked():
            state = unit.read()
            if stopping:  # service_enter_dead keeps the failure: failed, not dead
                state.update(ActiveState="failed" if result != "success" else "inactive",
                             SubState="failed" if result != "success" else "dead", Supervisor=0)
                unit.write(state)
                return 0
            if unit.start_limit_hit(state):
                state["Supervisor"] = 0
                unit.write(state)
                return 0
            unit.write(state)
        restarts += 1


def kill_session(sid: int, timeout_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, sig)
        deadline = time.monotonic() + timeout_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not session_pids(sid):
            return


def start(unit: Unit, no_block: bool) -> int:
    with unit.locked():
        state = unit.read()
        if state["ActiveState"] in ("active", "activating"):
            return 0  # already running, or auto-restart: the job waits for the restart timer
        if unit.start_limit_hit(state):
            unit.write(state)
            if no_block:
                return 0
            print(f"Job for {unit.name} failed because start of the service was attempted too often.",
                  file=sys.stderr)
            return 1
        state.update(ActiveState="activating", SubState="start", Result="success", MainPID=0)
        supervisor = subprocess.Popen([sys.executable, __file__, str(unit.dir), "supervise", unit.name],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        state["Supervisor"] = supervisor.pid
        unit.write(state)
    deadline = time.monotonic() + 10
    while unit.read()["MainPID"] == 0 and unit.read()["ActiveState"] == "activating" and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


def stop(unit: Unit) -> int:
    state = unit.read()
    supervisor = state.get("Supervisor", 0)
    if supervisor and alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 25
        while alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.01)
    if state.get("Session") and session_pids(state["Session"]):
        kill_session(state["Session"], 10.0)
    if unit.read()["ActiveState"] != "failed":
        unit.update(ActiveState="inactive", SubState="dead", MainPID=0, Supervisor=0)
    return 0


def show(unit: Unit, props: list[str]) -> int:
    state = unit.read()
    pids = session_pids(state["Session"]) if state.get("Session") else []
    procs = unit.dir / "cgroup" / unit.cgroup.lstrip("/") / "cgroup.procs"
    if pids:
        procs.parent.mkdir(parents=True, exist_ok=True)
        procs.write_text("".join(f"{pid}\n" for pid in pids))
    elif procs.exists():
        procs.unlink()
    values = {**state, "ControlGroup": unit.cgroup if pids else "", "Id": unit.name}
    for prop in props or ["ActiveState", "SubState", "Result", "MainPID", "ControlGroup", "NRestarts"]:
        print(f"{prop}={values.get(prop, '')}")
    return 0


def main() -> int:
    state_dir = Path(sys.argv[1])
    verb, args = sys.argv[2], sys.argv[3:]
    name = args[-1] if verb != "journal" else args[args.index("-u") + 1]
    if verb != "supervise":
        with open(state_dir / "calls.log", "a") as calls:
            calls.write(f"{verb} {name}\n")
    unit = Unit(state_dir, name)
    if verb == "supervise":
        return supervise(unit)
    if verb == "start":
        return start(unit, "--no-block" in args)
    if verb == "stop":
        return stop(unit)
    if verb == "reset-failed":
        with unit.locked():
            state = unit.read()
            if state["ActiveState"] == "failed":
                state.update(ActiveState="inactive", SubState="dead", Result="success")
            state["starts"] = []
            unit.write(state)
        return 0
    if verb == "show":
        props = [p for a in args if a.startswith("--property=") for p in a.split("=", 1)[1].split(",")]
        return show(unit, props)
    if verb == "journal":
        lines = unit.log_file.read_text(errors="replace").splitlines() if unit.log_file.exists() else []
        print("\n".join(lines[-int(args[args.index("-n") + 1]):]))
        return 0
    print(f"unknown verb {verb}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
