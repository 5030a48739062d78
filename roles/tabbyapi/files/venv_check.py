"""Reports whether a venv can run at its current path (run by the tabbyapi role on the node).

Prints one JSON object: pyvenv.cfg's `home` and whether a python is there, the scripts in bin/
whose shebang names a python outside this venv (a venv moved from where it was built), and the
sys.prefix the venv's own python reports when started.
"""

import json
import os
import subprocess
import sys


def read_pyvenv_cfg(venv: str) -> dict:
    values = {}
    with open(os.path.join(venv, "pyvenv.cfg"), encoding="utf-8") as handle:
        for line in handle:
            if "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    return values


def script_interpreter(path: str) -> str:
    """The interpreter a script runs with: its shebang, or pip's long-path `'''exec' "..."` trampoline."""
    with open(path, "rb") as handle:
        head = handle.read(1024).decode("utf-8", errors="replace").splitlines()
    if not head or not head[0].startswith("#!"):
        return ""
    parts = head[0][2:].split()
    interpreter = parts[0] if parts else ""
    if interpreter == "/bin/sh" and len(head) > 1 and head[1].startswith("'''exec' "):
        interpreter = head[1].split("'''exec' ", 1)[1].split('"')[1]
    return interpreter


def foreign_shebangs(venv: str) -> dict:
    bindir = os.path.join(venv, "bin")
    own = {os.path.join(bindir, name) for name in os.listdir(bindir) if name.startswith("python")}
    foreign = {}
    for name in sorted(os.listdir(bindir)):
        path = os.path.join(bindir, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        interpreter = script_interpreter(path)
        if "python" in os.path.basename(interpreter) and interpreter not in own:
            foreign[name] = interpreter
    return foreign


def main() -> None:
    venv = os.path.abspath(sys.argv[1])
    cfg = read_pyvenv_cfg(venv)
    home = cfg.get("home", "")
    report = {
        "home": home,
        "home_ok": any(os.access(os.path.join(home, name), os.X_OK) for name in ("python3", "python")),
        "version": cfg.get("version_info", cfg.get("version", "")),
        "bad_shebangs": foreign_shebangs(venv),
        "prefix": "",
    }
    try:
        run = subprocess.run(
            [os.path.join(venv, "bin", "python"), "-c", "import sys; print(sys.prefix)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        report["prefix"] = run.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        report["run_error"] = str(exc)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
