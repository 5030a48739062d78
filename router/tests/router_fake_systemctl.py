"""Emulator of the systemctl/journalctl subset the router runs, for tests only (no systemd as PID 1 here).

``router_fake_systemctl.py STATE_DIR start|stop|show ... UNIT`` and
``router_fake_systemctl.py STATE_DIR journal -u UNIT -n N ...``. A unit is
``STATE_DIR/<unit>.json`` (its argv); "starting" spawns it in its own session with output to
``<unit>.log``, its pid in ``<unit>.pid``; every call is appended to ``calls.log``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def main() -> int:
    state = Path(sys.argv[1])
    verb, args = sys.argv[2], sys.argv[3:]
    unit = args[-1] if verb != "journal" else args[args.index("-u") + 1]
    with open(state / "calls.log", "a") as calls:
        calls.write(f"{verb} {unit}\n")
    pid_file, log_file = state / f"{unit}.pid", state / f"{unit}.log"
    pid = int(pid_file.read_text()) if pid_file.exists() else 0
    if verb == "start":
        if pid and alive(pid):
            return 0
        argv = json.loads((state / f"{unit}.json").read_text())
        with open(log_file, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(str(proc.pid))
        return 0
    if verb == "stop":
        if pid and alive(pid):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        return 0
    if verb == "show":
        if pid and alive(pid):
            print(f"ActiveState=active\nSubState=running\nMainPID={pid}\nControlGroup=")
        elif pid:
            print("ActiveState=failed\nSubState=failed\nMainPID=0\nControlGroup=")
        else:
            print("ActiveState=inactive\nSubState=dead\nMainPID=0\nControlGroup=")
        return 0
    if verb == "journal":
        lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
        print("\n".join(lines[-int(args[args.index("-n") + 1]):]))
        return 0
    print(f"unknown verb {verb}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
