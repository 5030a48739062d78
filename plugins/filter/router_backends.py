# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Derive the router's backends from the backend roles' variables (a model is declared once)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.module_utils._devices import DeviceError, gpu_group, parse_devices
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi_models import (
    ACTIVE_MODEL_DIR,
    ModelsError,
)
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi_models import (
    resolve as resolve_tabbyapi_models,
)

# Documentation: router_backends.yml, router_config.yml, router_key_files.yml (one file per filter).

INSTANCE_ROLES = ("llamacpp", "vllm", "sglang")
SETTING_KEYS = ("co_reside", "ready_timeout_s", "stop_timeout_s", "request_timeout_s")
_INSTANCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _gpu_group(devices: Any, where: str) -> tuple[str, list[int]] | None:
    # The engine roles' own parser: indexes give a group, UUIDs (no index to group by) fall back to the default.
    try:
        return gpu_group(parse_devices(devices))
    except DeviceError as exc:
        raise AnsibleFilterError(f"{where}: {exc}") from None


def _model(model_id: str, served_name: str, *sources: Mapping[str, Any]) -> dict[str, Any]:
    model: dict[str, Any] = {"id": model_id, "served_name": served_name, "aliases": []}
    for source in sources:
        if source.get("aliases") and not model["aliases"]:
            model["aliases"] = [str(a) for a in source["aliases"]]
        if source.get("vram_mib") and "vram_mib" not in model:
            model["vram_mib"] = int(source["vram_mib"])
        if source.get("max_in_flight") and "max_in_flight" not in model:
            model["max_in_flight"] = int(source["max_in_flight"])
    return model


def _backend(
    name: str, engine: str, url: str, unit: str, models: list[dict[str, Any]], source: Mapping[str, Any],
    default_group: str, settings: Mapping[str, Any],
) -> dict[str, Any]:
    own = settings.get(name) or {}
    derived = _gpu_group(source.get("devices"), name)
    group = source.get("router_group") or own.get("group") or (derived[0] if derived else default_group)
    backend: dict[str, Any] = {
        "name": name,
        "engine": engine,
        "group": str(group),
        "gpus": derived[1] if derived and group == derived[0] else [],
        "url": url,
        "unit": unit,
        "models": models,
        "api_key": str(source.get("api_key") or ""),
        "admin_key": str(source.get("admin_key") or ""),
    }
    backend.update({key: own[key] for key in SETTING_KEYS if key in own})
    return backend


def _instances(hv: Mapping[str, Any], role: str, default_group: str, settings: Mapping[str, Any]) -> list[dict]:
    backends = []
    for index, instance in enumerate(hv.get(f"{role}_instances") or []):
        where = f"{role}_instances[{index}]"
        if not isinstance(instance, Mapping):
            raise AnsibleFilterError(f"{where} must be a dict")
        if instance.get("state", "started") == "stopped":
            continue
        name = str(instance.get("name") or "")
        if not _INSTANCE_NAME.match(name):
            raise AnsibleFilterError(f"{where}.name {name!r} must be letters, digits, - and _ (it names a unit)")
        try:
            port = int(instance["port"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AnsibleFilterError(f"{where}.port must be an integer ({exc})") from exc
        backend_name = f"{role}-{name}"
        # alias, cuda_visible_devices: the previous release's names (the roles warn about them).
        model_id = str(instance.get("served_model_name") or instance.get("alias") or name)
        own = settings.get(backend_name) or {}
        models = [_model(model_id, model_id, instance, own)]
        # An instance's own key, else its role's default (<role>_api_key), as the roles write it.
        devices = instance.get("devices", instance.get("cuda_visible_devices"))
        source = {**instance, "devices": devices,
                  "api_key": instance.get("api_key") or hv.get(f"{role}_api_key") or ""}
        backends.append(_backend(backend_name, role, f"http://127.0.0.1:{port}", f"{role}@{name}.service",
                                 models, source, default_group, settings))
    return backends


def _tabbyapi(hv: Mapping[str, Any], default_group: str, settings: Mapping[str, Any]) -> list[dict]:
    # Every declared model (tabbyapi_models or the shorthand), each with its own load request.
    try:
        declared = resolve_tabbyapi_models(hv)
    except ModelsError as exc:
        raise AnsibleFilterError(str(exc)) from None
    if not declared:
        return []
    own = settings.get("tabbyapi") or {}
    estimates = hv.get("tabbyapi_vram_estimates") or {}
    models = []
    for entry in declared:
        model = _model(entry["id"], entry["served_name"], entry, own)
        estimate = estimates.get(entry["id"])
        # An int, or the tabbyapi_vram module's entry (only an estimate counts, not an echoed vram_mib).
        if isinstance(estimate, Mapping):
            estimate = estimate.get("estimate_mib") if estimate.get("source") == "estimate" else None
        if "vram_mib" not in model and estimate:
            model["vram_mib"] = int(estimate)
        model["load"] = dict(entry["load"])
        models.append(model)
    source = {
        "devices": hv.get("tabbyapi_cuda_visible_devices"),
        "api_key": hv.get("tabbyapi_api_key"),
        "admin_key": hv.get("tabbyapi_admin_key"),
    }
    port = int(hv.get("tabbyapi_port") or 5000)
    backend = _backend("tabbyapi", "tabbyapi", f"http://127.0.0.1:{port}", "tabbyapi.service", models, source,
                       default_group, settings)
    # The router records its in-place switches here; the tabbyapi unit's ExecStartPre reads it back.
    backend["state_file"] = f"{ACTIVE_MODEL_DIR}/tabbyapi.json"
    return [backend]


def _ollama(hv: Mapping[str, Any], default_group: str, settings: Mapping[str, Any]) -> list[dict]:
    names = [str(m) for m in hv.get("ollama_models") or []]
    if not names:
        return []
    port = int(hv.get("ollama_port") or 11434)
    models = [_model(n, n) for n in names]
    return [_backend("ollama", "ollama", f"http://127.0.0.1:{port}", "ollama.service", models, {},
                     default_group, settings)]


def router_backends(
    hostvars: Mapping[str, Any], default_group: str = "gpu0", settings: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    if not isinstance(hostvars, Mapping):
        raise AnsibleFilterError("router_backends: the input must be a host's variables (a dict)")
    settings = settings or {}
    for name, own in settings.items():
        if not isinstance(own, Mapping):
            raise AnsibleFilterError(f"router_backend_settings.{name} must be a dict of router settings")
    backends: list[dict[str, Any]] = []
    for role in INSTANCE_ROLES:
        backends += _instances(hostvars, role, default_group, settings)
    backends += _tabbyapi(hostvars, default_group, settings) + _ollama(hostvars, default_group, settings)
    unknown = sorted(set(settings) - {b["name"] for b in backends})
    if unknown:
        raise AnsibleFilterError(
            f"router_backend_settings names backends this host does not serve: {', '.join(unknown)} "
            f"(known: {', '.join(b['name'] for b in backends) or 'none'})"
        )
    return sorted(backends, key=lambda b: b["name"])


def _key_file(config_dir: str, backend: str, kind: str) -> str:
    return f"{config_dir.rstrip('/')}/{backend}.{kind}"


def router_config(
    backends: list[Mapping[str, Any]], config_dir: str, listen: Mapping[str, Any],
    groups: Mapping[str, Any] | None = None, top: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The router's config.yml (without secrets: keys are referenced by file) for :func:`router_backends`."""
    if not backends:
        raise AnsibleFilterError(
            "the router has no backends: declare models in llamacpp_instances, vllm_instances, sglang_instances, "
            "tabbyapi_models (or tabbyapi_model_name) or ollama_models on this host"
        )
    group_settings = dict(groups or {})
    config_groups: dict[str, Any] = {}
    for backend in backends:
        derived = {"gpus": list(backend.get("gpus") or [])}
        config_groups.setdefault(backend["group"], derived)
    unknown = sorted(set(group_settings) - set(config_groups))
    if unknown:
        raise AnsibleFilterError(
            f"router_groups names groups no backend is in: {', '.join(unknown)} (in use: {', '.join(config_groups)})"
        )
    for name, own in group_settings.items():
        config_groups[name] = {**config_groups[name], **dict(own or {})}
    config_backends: dict[str, Any] = {}
    for backend in backends:
        entry: dict[str, Any] = {
            "engine": backend["engine"],
            "group": backend["group"],
            "url": backend["url"],
            "unit": backend["unit"],
            "models": [dict(m) for m in backend["models"]],
        }
        entry.update({key: backend[key] for key in SETTING_KEYS if key in backend})
        if backend.get("state_file"):
            entry["state_file"] = backend["state_file"]
        if backend.get("api_key"):
            entry["api_key_file"] = _key_file(config_dir, backend["name"], "api_key")
        if backend.get("admin_key"):
            entry["admin_key_file"] = _key_file(config_dir, backend["name"], "admin_key")
        config_backends[backend["name"]] = entry
    config: dict[str, Any] = dict(top or {})
    config.update({
        "listen": {"host": str(listen["host"]), "port": int(listen["port"])},
        "groups": config_groups,
        "backends": config_backends,
    })
    return config


def router_key_files(backends: list[Mapping[str, Any]], config_dir: str) -> list[dict[str, str]]:
    """``{path, key}`` for every backend secret the config references (log nothing of it)."""
    files = []
    for backend in backends:
        for kind in ("api_key", "admin_key"):
            if backend.get(kind):
                files.append({"path": _key_file(config_dir, backend["name"], kind), "key": str(backend[kind])})
    return files


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"router_backends": router_backends, "router_config": router_config,
                "router_key_files": router_key_files}
