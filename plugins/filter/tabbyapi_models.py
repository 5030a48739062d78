# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TabbyAPI's models of one node (tabbyapi_models or the shorthand) and the start-up selection file.

Documentation: tabbyapi_models.yml, tabbyapi_selection.yml. The rules live in module_utils/_tabbyapi_models.py,
shared with router_backends and litellm_model_list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi_models import (
    ModelsError,
    resolve,
    selection,
)


def tabbyapi_models(variables: Mapping[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(variables, Mapping):
        raise AnsibleFilterError("tabbyapi_models: the input must be the host's tabbyapi_* variables (a dict)")
    try:
        return resolve(variables)
    except ModelsError as exc:
        raise AnsibleFilterError(str(exc)) from None


def tabbyapi_selection(models: list[Mapping[str, Any]]) -> dict[str, Any]:
    return selection([dict(m) for m in models])


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"tabbyapi_models": tabbyapi_models, "tabbyapi_selection": tabbyapi_selection}
