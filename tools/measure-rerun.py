# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Time a no-change re-run of playbooks/site.yml on the running lab fleet (`make lab` first).

One run of this tool measures, N times each and interleaved (so that load on a shared machine hits
every variant alike): site.yml limited to one inference node, and site.yml on every lab host. It
prints the medians, the ratio all/one, the changed count of every run (a re-run must report 0) and the
slowest tasks (tools/callback_plugins/task_profile.py), and exits 1 when a run changed, failed or broke.

Variants:
  this checkout                       always
  --base DIR                          another checkout side by side (e.g. `git worktree add ../base REV`)
  --mitogen DIR                       this checkout again with Mitogen's mitogen_linear strategy; DIR holds
                                      the ansible_mitogen package (pip install --target DIR mitogen==0.3.*).
                                      Opt-in only: nothing in the collection needs Mitogen.

  python3 tools/measure-rerun.py                       # 3 x (one node, all hosts)
  python3 tools/measure-rerun.py -n 5 --base ../base --out /tmp/rerun
  python3 tools/measure-rerun.py --base ../base --base-repetitions 1 --mitogen /tmp/mitogen   # a slow baseline once
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CALLBACKS = REPO / "tools" / "callback_plugins"


@dataclass
class Run:
    variant: str
    scope: str
    seconds: float
    rc: int
    changed: int
    failed: int
    load: float
    profile: dict = field(repr=False)


@dataclass
class Variant:
    name: str
    tree: Path
    env: dict[str, str]


def variants(args: argparse.Namespace) -> list[Variant]:
    found = []
    if args.base:
        found.append(Variant("base", Path(args.base).resolve(), {}))
    found.append(Variant("this", REPO, {}))
    if args.mitogen:
        target = Path(args.mitogen).resolve()
        strategy = target / "ansible_mitogen" / "plugins" / "strategy"
        if not strategy.is_dir():
            sys.exit(
                f"--mitogen {target}: no ansible_mitogen/plugins/strategy there; "
                f"`pip install --target {target} mitogen==0.3.54` first"
            )
        found.append(
            Variant(
                "this+mitogen",
                REPO,
                {
                    "ANSIBLE_STRATEGY_PLUGINS": str(strategy),
                    "ANSIBLE_STRATEGY": "mitogen_linear",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH", "")])),
                },
            )
        )
    return found


def run_once(variant: Variant, scope: str, limit: str | None, args: argparse.Namespace, index: int) -> Run:
    out = Path(args.out)
    stem = f"{variant.name.replace('+', '-')}-{scope}-{index}"
    profile_path = out / f"{stem}.json"
    log_path = out / f"{stem}.log"
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(variant.tree / "ansible.cfg"),
            "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS),
            "ANSIBLE_CALLBACKS_ENABLED": "task_profile",
            "LLMSTACK_TASK_PROFILE": str(profile_path),
            "ANSIBLE_NOCOLOR": "1",
        }
    )
    env.update(variant.env)
    cmd = ["ansible-playbook", "-i", args.inventory, args.playbook]
    if limit:
        cmd += ["--limit", limit]
    load = os.getloadavg()[0]
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        rc = subprocess.call(cmd, cwd=variant.tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    load = (load + os.getloadavg()[0]) / 2
    profile = json.loads(profile_path.read_text()) if profile_path.exists() else {"recap": {}, "tasks": []}
    recap = profile["recap"].values()
    changed = sum(h["changed"] for h in recap)
    failed = sum(h["failures"] + h["unreachable"] for h in recap)
    run = Run(variant.name, scope, seconds, rc, changed, failed, load, profile)
    print(
        f"  {variant.name:13} {scope:4} #{index}: {seconds:6.1f} s  rc={rc} changed={changed} "
        f"failed={failed} load={load:.1f}  ({log_path})",
        flush=True,
    )
    return run


def median(runs: list[Run]) -> float:
    return statistics.median(r.seconds for r in runs) if runs else float("nan")


def top_tasks(runs: list[Run], count: int) -> list[tuple[float, int, str]]:
    """(median seconds per run, module runs per run, "role: task") for the slowest tasks."""
    per_run: list[dict[str, tuple[float, int]]] = []
    for run in runs:
        totals: dict[str, tuple[float, int]] = {}
        for task in run.profile["tasks"]:
            key = f"{task['role'] or '-'}: {task['name']}"
            seconds, calls = totals.get(key, (0.0, 0))
            calls += sum(h.get("runs", 0) for h in task["hosts"].values())
            totals[key] = (seconds + task["s"], calls)
        per_run.append(totals)
    keys = {key for totals in per_run for key in totals}
    rows = []
    for key in keys:
        seconds = statistics.median(t.get(key, (0.0, 0))[0] for t in per_run)
        calls = statistics.median(t.get(key, (0.0, 0))[1] for t in per_run)
        rows.append((seconds, int(calls), key))
    return sorted(rows, reverse=True)[:count]


def module_runs(run: Run) -> int:
    return sum(h.get("runs", 0) for task in run.profile["tasks"] for h in task["hosts"].values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--repetitions", type=int, default=3, help="runs per variant and scope (>= 3)")
    parser.add_argument("--one", default="lab-node1", help="the one inference node (default lab-node1)")
    parser.add_argument("--all", default="lab", help="host pattern of the 'all' runs (default: group lab)")
    parser.add_argument("--inventory", default="inventory/lab")
    parser.add_argument("--playbook", default="playbooks/site.yml")
    parser.add_argument("--base", help="another checkout to measure side by side (read only)")
    parser.add_argument(
        "--base-repetitions", type=int, help="runs of the --base variant (default: -n); fewer when it is slow"
    )
    parser.add_argument("--mitogen", help="directory holding the ansible_mitogen package (opt-in variant)")
    parser.add_argument("--top", type=int, default=12, help="slowest tasks to list per variant")
    parser.add_argument("--out", help="directory for logs and profiles (default: a new temporary one)")
    args = parser.parse_args()
    if args.repetitions < 3:
        parser.error("--repetitions must be at least 3: a median of fewer runs hides the noise")
    args.out = args.out or tempfile.mkdtemp(prefix="measure-rerun-")
    Path(args.out).mkdir(parents=True, exist_ok=True)

    chosen = variants(args)
    scopes = [("one", args.one), ("all", args.all)]
    print(
        f"== {args.playbook} re-runs, {args.repetitions} x {len(chosen)} variant(s) x "
        f"(one={args.one}, all={args.all}); "
        f"{os.cpu_count()} CPUs; logs in {args.out}",
        flush=True,
    )
    runs: list[Run] = []
    base_reps = args.base_repetitions or args.repetitions
    for index in range(1, args.repetitions + 1):
        for variant in chosen:
            if variant.name == "base" and index > base_reps:
                continue
            for scope, limit in scopes:
                runs.append(run_once(variant, scope, limit, args, index))

    print()
    print(
        "| variant | runs | one node, median (min-max) | all hosts, median (min-max) | all / one | changed | "
        "module runs one / all | load avg |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant in chosen:
        mine = [r for r in runs if r.variant == variant.name]
        one = [r for r in mine if r.scope == "one"]
        every = [r for r in mine if r.scope == "all"]

        def span(rs: list[Run]) -> str:
            return f"{median(rs):.1f} s ({min(r.seconds for r in rs):.1f}-{max(r.seconds for r in rs):.1f})"

        print(
            f"| {variant.name} | {len(one)} | {span(one)} | {span(every)} | {median(every) / median(one):.2f} | "
            f"{sum(r.changed for r in mine)} | {statistics.median(map(module_runs, one)):.0f} / "
            f"{statistics.median(map(module_runs, every)):.0f} | "
            f"{statistics.mean(r.load for r in mine):.1f} |"
        )
    for variant in chosen:
        for scope in ("one", "all"):
            picked = [r for r in runs if r.variant == variant.name and r.scope == scope]
            print(f"\n{variant.name}, {scope}: slowest tasks (median s per run, module runs per run)")
            for seconds, calls, key in top_tasks(picked, args.top):
                print(f"  {seconds:6.2f} s {calls:4d}  {key}")

    bad = [r for r in runs if r.rc != 0 or r.changed or r.failed]
    for r in bad:
        print(f"FAILED: {r.variant} {r.scope}: rc={r.rc} changed={r.changed} failed={r.failed}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
