# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fail an ``ansible-playbook --check`` run that reports any change.

Molecule's ``check`` action runs the converge playbook with ``--check`` and only fails when a task
fails. On a converged host a check-mode run must report ``changed=0``, so this callback turns any
change into a non-zero exit after the recap. Outside check mode it does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ansible import context
from ansible.plugins.callback import CallbackBase

if TYPE_CHECKING:
    from ansible.executor.stats import AggregateStats
    from ansible.executor.task_result import CallbackTaskResult

DOCUMENTATION = """
name: check_mode_guard
type: aggregate
short_description: fail a check-mode run that reports changes
description:
  - In a C(--check) run, lists every task that reported a change and exits with status 2 after the recap.
requirements:
  - enable it in C(callbacks_enabled); the molecule base config does
"""

HOST_FAILED_EXIT_CODE = 2


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "check_mode_guard"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._changes: list[str] = []

    def _record(self, result: CallbackTaskResult) -> None:
        if context.CLIARGS.get("check") and result.is_changed():
            self._changes.append(f"{result.host.get_name()}: {result.task_name}")

    def v2_runner_on_ok(self, result: CallbackTaskResult) -> None:
        self._record(result)

    def v2_playbook_on_stats(self, stats: AggregateStats) -> None:
        if not context.CLIARGS.get("check"):
            return
        changed_hosts = [host for host in sorted(stats.processed) if stats.summarize(host)["changed"]]
        if not changed_hosts:
            return
        lines = "\n".join(f"  - {change}" for change in self._changes)
        self._display.error(
            f"check mode reported changes on {', '.join(changed_hosts)}; a converged host must report changed=0:\n"
            f"{lines}"
        )
        # Callback exceptions are turned into warnings by ansible; an explicit exit is the only way to fail the run.
        raise SystemExit(HOST_FAILED_EXIT_CODE)
