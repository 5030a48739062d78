# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Per-task wall times of a playbook run, for tools/measure-rerun.py.

ansible-core has no ``profile_tasks`` (that one lives in ansible.posix, which this project does not
need otherwise). This aggregate callback records, for every task, the time from its start until the
last host reported, per host as well, and writes them with the recap counts as JSON to the file named
by ``LLMSTACK_TASK_PROFILE``. With ``LLMSTACK_TASK_PROFILE_TOP=N`` it also prints the N slowest tasks.

Enable it with ``ANSIBLE_CALLBACK_PLUGINS=tools/callback_plugins ANSIBLE_CALLBACKS_ENABLED=task_profile``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: task_profile
type: aggregate
short_description: per-task wall times as JSON
description:
  - Writes every task's wall time (start to the last host's result), per-host times and the recap counts
    as JSON to the file in the environment variable E(LLMSTACK_TASK_PROFILE).
requirements:
  - enable it in C(callbacks_enabled)
"""


def _module_runs(result: dict[str, Any], status: str) -> int:
    items = result.get("results")
    if isinstance(items, list):
        return sum(1 for item in items if isinstance(item, dict) and not item.get("skipped"))
    return 0 if status == "skipped" else 1


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_profile"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.monotonic()
        self._tasks: list[dict[str, Any]] = []
        self._by_uuid: dict[str, dict[str, Any]] = {}
        self._host_start: dict[tuple[str, str], float] = {}

    def _start(self, task: Any, kind: str) -> None:
        role = task._role.get_name() if task._role else ""
        entry = {
            # get_name() would prefix the role again.
            "name": task.name or task.get_name(),
            "role": role,
            "action": task.action,
            "kind": kind,
            "path": task.get_path() or "",
            "start": time.monotonic() - self._t0,
            "end": None,
            "hosts": {},
        }
        self._tasks.append(entry)
        # A task in a loop or an included file starts again under the same uuid: time each start apart.
        self._by_uuid[task._uuid] = entry

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._start(task, "task")

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self._start(task, "handler")

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        self._host_start[(task._uuid, host.get_name())] = time.monotonic()

    def _finish(self, result: Any, status: str) -> None:
        now = time.monotonic()
        entry = self._by_uuid.get(result.task._uuid)
        if entry is None:
            return
        host = result.host.get_name()
        started = self._host_start.pop((result.task._uuid, host), None)
        entry["hosts"][host] = {
            "s": round(now - started, 3) if started is not None else None,
            "status": status,
            "changed": bool(result.is_changed()) if status == "ok" else False,
            # Loop items each cost a module run (a round trip) unless skipped.
            "runs": _module_runs(result._result, status),
        }
        entry["end"] = now - self._t0

    def v2_runner_on_ok(self, result: Any) -> None:
        self._finish(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._finish(result, "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._finish(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._finish(result, "unreachable")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        total = time.monotonic() - self._t0
        for entry in self._tasks:
            entry["s"] = round((entry["end"] if entry["end"] is not None else entry["start"]) - entry["start"], 3)
            entry["start"] = round(entry["start"], 3)
            entry.pop("end")
        recap = {host: stats.summarize(host) for host in sorted(stats.processed)}
        path = os.environ.get("LLMSTACK_TASK_PROFILE")
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump({"total_s": round(total, 3), "recap": recap, "tasks": self._tasks}, handle, indent=1)
        top = int(os.environ.get("LLMSTACK_TASK_PROFILE_TOP", "0") or 0)
        if top:
            self._display.display(f"task_profile: {total:.1f} s in all; slowest tasks:")
            for entry in sorted(self._tasks, key=lambda e: e["s"], reverse=True)[:top]:
                self._display.display(f"  {entry['s']:7.2f} s  {entry['role'] or '-'}: {entry['name']}")
