# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The unit-file lines the roles' unit templates share: start limit and GPU device allow-list."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.filter.systemd_unit import (
    FilterModule,
    unit_device_allow,
    unit_start_limit,
)


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _sep, value = line.partition("=")
            found.setdefault(name, []).append(value)
    return found


def test_the_window_holds_burst_starts_that_each_fail_after_a_full_load() -> None:
    # vLLM: 600 s load, RestartSec=30. A crash after a 4-minute load restarts every 270 s; the old fixed 300 s
    # window never held 5 of them, so the unit looped forever.
    lines = directives(unit_start_limit(600, 30))
    assert lines == {"StartLimitIntervalSec": ["3150"], "StartLimitBurst": ["5"]}
    assert int(lines["StartLimitIntervalSec"][0]) >= 5 * (240 + 30)


def test_burst_and_string_numbers_from_the_inventory() -> None:
    lines = directives(unit_start_limit("900", "5", "3"))
    assert lines == {"StartLimitIntervalSec": ["2715"], "StartLimitBurst": ["3"]}


@pytest.mark.parametrize(
    ("args", "words"),
    [(("ten", 30), "whole number"), ((600, -1), "negative"), ((600, 30, 0), "at least 1")],
)
def test_bad_numbers_are_refused_by_name(args: tuple, words: str) -> None:
    with pytest.raises(AnsibleFilterError, match=words):
        unit_start_limit(*args)


def test_gpu_units_get_a_closed_device_policy_with_the_nvidia_nodes() -> None:
    lines = directives(unit_device_allow("nvidia"))
    assert lines["DevicePolicy"] == ["closed"]
    assert lines["DeviceAllow"] == ["char-nvidia* rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"]
    assert "PrivateDevices" not in lines


def test_an_unknown_vendor_is_refused() -> None:
    with pytest.raises(AnsibleFilterError, match="only 'nvidia'"):
        unit_device_allow("amd")


def test_the_filters_are_registered() -> None:
    assert set(FilterModule().filters()) == {"unit_start_limit", "unit_device_allow"}
