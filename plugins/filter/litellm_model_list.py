# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Derive LiteLLM's model_list from the inventory (the variable contract is in DOCUMENTATION)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi_models import ModelsError, startup_model
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi_models import (
    resolve as resolve_tabbyapi_models,
)

DOCUMENTATION = r"""
name: litellm_model_list
short_description: LiteLLM model_list entries for every model the inference hosts serve
version_added: 0.1.0
description:
  - Reads the variables of the inference hosts and returns one LiteLLM C(model_list) entry per model and host,
    so the gateway's configuration is never a hand-kept list.
  - A host with C(router_port) runs the model router; all its models point at the router, which swaps backends
    on demand. Its models are C(router_models) when set, else every model its backend roles serve.
  - A host without a router exposes its backends directly, one entry per instance, at that instance's port.
  - 'Backend variables read per host: C(vllm_instances), C(sglang_instances), C(llamacpp_instances) (each item:
    C(name), C(port), optional C(served_model_name), C(host), C(api_key), C(state)); C(ollama_models) with
    C(ollama_listen_host)/C(ollama_port); TabbyAPI''s start-up model (C(tabbyapi_models) or the C(tabbyapi_model_name)
    shorthand; without a router TabbyAPI cannot switch per request) with C(tabbyapi_host)/C(tabbyapi_port). Behind a
    router every C(tabbyapi_models) id is listed.'
  - 'Per-host overrides: C(litellm_upstream_address) (address the gateway dials; default C(ansible_host), then the
    inventory name), C(litellm_upstream_api_key) (key the gateway sends to that host; default the instance''s own
    C(api_key), else the role-wide C(<role>_api_key), else O(default_api_key)).'
  - Fails, naming host and variable, when an upstream listens on loopback only but the gateway is another host.
positional: hosts
options:
  _input:
    description: C(hostvars).
    type: dict
    required: true
  hosts:
    description: Inventory names of the inference hosts (typically the union of the backend and router groups).
    type: list
    elements: str
    required: true
  gateway:
    description: Inventory name of the host LiteLLM runs on (loopback upstreams are fine there).
    type: str
    default: ""
  default_api_key:
    description: Key sent to upstreams that need none (OpenAI clients insist on one).
    type: str
    default: none
"""

EXAMPLES = r"""
- name: Render LiteLLM's model list
  ansible.builtin.set_fact:
    litellm_models: >-
      {{ hostvars | llmstack.inference.litellm_model_list(groups['router'] | union(groups['ollama']),
                                                          gateway=inventory_hostname) }}
"""

RETURN = r"""
_value:
  description:
    - LiteLLM C(model_list) entries sorted by model name and host; C(model_info) carries C(llmstack_host),
      C(llmstack_backend), C(llmstack_swap_managed) (true behind a router) and
      C(disable_background_health_check) (true behind a router, so LiteLLM's health checks never swap models).
  type: list
  elements: dict
"""

INSTANCE_ROLES = ("vllm", "sglang", "llamacpp")
# Bind addresses that mean "every interface": the gateway dials the host's own address.
WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}  # noqa: S104


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _instance_models(hv: Mapping[str, Any], role: str) -> list[dict[str, Any]]:
    models = []
    for index, instance in enumerate(hv.get(f"{role}_instances") or []):
        if instance.get("state", "started") == "stopped":
            continue
        try:
            # The same id the router serves it under (router_backends): served name, alias, name.
            name = instance.get("served_model_name") or instance.get("alias") or instance["name"]
            port = int(instance["port"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AnsibleFilterError(f"{role}_instances[{index}] needs name and an integer port ({exc})") from exc
        models.append(
            {
                "name": str(name),
                "backend": role,
                "bind": str(instance.get("host") or hv.get(f"{role}_listen_host") or "127.0.0.1"),
                "port": port,
                # The instance's own key, else its role-wide default (engine_instances does the same).
                "api_key": instance.get("api_key") or hv.get(f"{role}_api_key") or "",
            }
        )
    return models


def _ollama_models(hv: Mapping[str, Any]) -> list[dict[str, Any]]:
    bind = str(hv.get("ollama_listen_host") or "127.0.0.1")
    port = int(hv.get("ollama_port") or 11434)
    return [
        {"name": str(model), "backend": "ollama", "bind": bind, "port": port, "api_key": ""}
        for model in hv.get("ollama_models") or []
    ]


def _tabbyapi_models(hv: Mapping[str, Any]) -> list[dict[str, Any]]:
    # Without a router TabbyAPI serves whichever model is loaded (it cannot switch per request), so the
    # gateway lists only the start-up model, under the id TabbyAPI's card reports (the folder's last part).
    try:
        startup = startup_model(resolve_tabbyapi_models(hv))
    except ModelsError as exc:
        raise AnsibleFilterError(str(exc)) from None
    if startup is None:
        return []
    return [
        {
            "name": startup["served_name"],
            "backend": "tabbyapi",
            "bind": str(hv.get("tabbyapi_host") or "127.0.0.1"),
            "port": int(hv.get("tabbyapi_port") or 5000),
            "api_key": "",
        }
    ]


def backend_models(hv: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every model the host's backend roles serve, in a stable order."""
    models: list[dict[str, Any]] = []
    for role in INSTANCE_ROLES:
        models += _instance_models(hv, role)
    return models + _ollama_models(hv) + _tabbyapi_models(hv)


def _router_model_names(hv: Mapping[str, Any]) -> list[str]:
    declared = hv.get("router_models")
    if declared is None:
        # The router serves every declared TabbyAPI model (it switches in place), by its id.
        names = [m["name"] for m in backend_models(hv) if m["backend"] != "tabbyapi"]
        try:
            return names + [m["id"] for m in resolve_tabbyapi_models(hv)]
        except ModelsError as exc:
            raise AnsibleFilterError(str(exc)) from None
    names = []
    for index, model in enumerate(declared):
        name = (model.get("name") or model.get("id")) if isinstance(model, Mapping) else model
        if not name:
            raise AnsibleFilterError(f"router_models[{index}] has no name")
        names.append(str(name))
    return names


def _address(host: str, hv: Mapping[str, Any], bind: str) -> str:
    if _is_loopback(bind):
        return "127.0.0.1"
    if bind not in WILDCARDS:
        return bind
    return str(hv.get("litellm_upstream_address") or hv.get("ansible_host") or host)


def _entry(name: str, base: str, api_key: str, host: str, backend: str, swap_managed: bool) -> dict[str, Any]:
    return {
        "model_name": name,
        "litellm_params": {"model": f"openai/{name}", "api_base": base, "api_key": api_key},
        "model_info": {
            "llmstack_host": host,
            "llmstack_backend": backend,
            "llmstack_swap_managed": swap_managed,
            # A health-check completion through a router would load (swap in) the model.
            "disable_background_health_check": swap_managed,
        },
    }


def _check_reachable(host: str, bind: str, gateway: str, what: str, fix: str) -> None:
    if _is_loopback(bind) and host != gateway:
        raise AnsibleFilterError(
            f"host {host}: {what} listens on {bind} only, so the gateway on {gateway or 'another host'} "
            f"cannot reach it: {fix}"
        )


def litellm_model_list(
    hostvars: Mapping[str, Any], hosts: Iterable[str], gateway: str = "", default_api_key: str = "none"
) -> list[dict[str, Any]]:
    if isinstance(hosts, str | bytes) or not isinstance(hosts, Iterable):
        raise AnsibleFilterError("litellm_model_list: hosts must be a list of inventory names")
    entries = []
    for host in sorted(set(hosts)):
        if host not in hostvars:
            raise AnsibleFilterError(f"litellm_model_list: {host} is not in the inventory")
        hv = hostvars[host]
        host_key = hv.get("litellm_upstream_api_key") or ""
        if hv.get("router_port") is not None:
            bind = str(hv.get("router_listen_host") or "127.0.0.1")
            _check_reachable(host, bind, gateway, "the router", "set router_listen_host to the node's address")
            base = f"http://{_address(host, hv, bind)}:{int(hv['router_port'])}/v1"
            for name in _router_model_names(hv):
                entries.append(_entry(name, base, host_key or default_api_key, host, "router", True))
            continue
        for model in backend_models(hv):
            fix = f"put the router in front of it or bind the {model['backend']} backend to the node's address"
            _check_reachable(host, model["bind"], gateway, f"{model['backend']} model {model['name']}", fix)
            base = f"http://{_address(host, hv, model['bind'])}:{model['port']}/v1"
            key = host_key or model["api_key"] or default_api_key
            entries.append(_entry(model["name"], base, key, host, model["backend"], False))
    return sorted(entries, key=lambda e: (e["model_name"], e["model_info"]["llmstack_host"]))


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"litellm_model_list": litellm_model_list}
