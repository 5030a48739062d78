# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The TabbyAPI models of one node, declared once: ``tabbyapi_models`` or the one-model shorthand.

The tabbyapi role (config.yml, models.json for the start-up selection, the VRAM check), the router's
backends and the gateway's model list all read the same list through :func:`resolve`, so a model is
declared in one place. Each entry's ``load`` is the exact body of ``POST /v1/model/load`` for the
node's TabbyAPI generation (``_tabbyapi.load_request``), so the router sends what the role would.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Dict, List, Mapping, Optional

from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi import load_request, split_model_path

GENERATIONS = ("exl2", "exl3")
# config.yml `model:` keys an entry may set (TabbyAPI's own names; common/config_models.py ModelConfig).
MODEL_KEYS = (
    "max_seq_len", "cache_size", "cache_mode", "gpu_split_auto", "gpu_split", "autosplit_reserve",
    "tensor_parallel", "rope_scale", "rope_alpha", "chunk_size",
)
# `draft:` keys, each the config.yml `draft_model:` key without its draft_ prefix.
DRAFT_KEYS = ("name", "cache_mode", "rope_scale", "rope_alpha", "gpu_split")
ENTRY_KEYS = ("name", "id", "aliases", "startup", "vram_mib", "draft", *MODEL_KEYS)
# The one-model shorthand: role variable -> entry key.
SHORTHAND = {
    "tabbyapi_max_seq_len": "max_seq_len", "tabbyapi_cache_size": "cache_size",
    "tabbyapi_cache_mode": "cache_mode", "tabbyapi_gpu_split_auto": "gpu_split_auto",
    "tabbyapi_gpu_split": "gpu_split", "tabbyapi_tensor_parallel": "tensor_parallel",
}
# Where the router records the model it switched TabbyAPI to (host layout, CONTRIBUTING.md): a directory
# of its own that the tabbyapi user can read, so neither service writes the other's files.
ACTIVE_MODEL_DIR = "/var/lib/llmstack/router-active"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


class ModelsError(ValueError):
    """tabbyapi_models is invalid; the message names the entry and the fix."""


def _unset(value: Any) -> bool:
    return value is None or value == "" or value == []


def _folder(where: str, name: Any) -> str:
    text = str(name or "").strip()
    norm = posixpath.normpath(text) if text else ""
    if not text or text.startswith("/") or norm in (".", "..") or norm.startswith("../"):
        raise ModelsError(
            "%s.name %r must be a folder below tabbyapi_model_dir, such as exl3/Llama-3.1-70B/4.0bpw "
            "(relative, without '..')" % (where, name)
        )
    return norm


def _shorthand(hv: Mapping[str, Any]) -> List[Dict[str, Any]]:
    name = str(hv.get("tabbyapi_model_name") or "")
    path = str(hv.get("tabbyapi_model_path") or "")
    if not name and not path:
        return []
    if name and path:
        raise ModelsError("give tabbyapi_model_name or tabbyapi_model_path, not both")
    if path:
        try:
            name = split_model_path(path, str(hv.get("tabbyapi_model_dir") or "/mnt/models"))[1]
        except ValueError as exc:
            raise ModelsError("tabbyapi_model_path: %s" % exc) from None
    entry: Dict[str, Any] = {"name": name, "startup": True}
    for var, key in SHORTHAND.items():
        if not _unset(hv.get(var)):
            entry[key] = hv[var]
    if hv.get("tabbyapi_draft_model_name"):
        entry["draft"] = {"name": hv["tabbyapi_draft_model_name"]}
        if not _unset(hv.get("tabbyapi_draft_cache_mode")):
            entry["draft"]["cache_mode"] = hv["tabbyapi_draft_cache_mode"]
    return [entry]


def _draft(where: str, draft: Any) -> Optional[Dict[str, Any]]:
    if _unset(draft):
        return None
    if not isinstance(draft, Mapping):
        raise ModelsError("%s.draft must be a dict such as {name: exl3/Llama-3.2-1B/4.0bpw}" % where)
    unknown = sorted(set(draft) - set(DRAFT_KEYS))
    if unknown:
        raise ModelsError("%s.draft has unknown keys %s: use %s" % (where, ", ".join(unknown), ", ".join(DRAFT_KEYS)))
    config = {"draft_model_name": _folder(where + ".draft", draft.get("name"))}
    for key in DRAFT_KEYS[1:]:
        if not _unset(draft.get(key)):
            config["draft_" + key] = draft[key]
    return config


def _vram_request(model_id: str, name: str, settings: Dict[str, Any], draft: Optional[Dict[str, Any]],
                  vram: Optional[int]) -> Dict[str, Any]:
    """One entry of the tabbyapi_vram module's `models` (what the estimate reads; rope keys cost no VRAM)."""
    request: Dict[str, Any] = {"id": model_id, "name": name}
    request.update({k: v for k, v in settings.items() if k not in ("rope_scale", "rope_alpha")})
    if vram is not None:
        request["vram_mib"] = vram
    if draft:
        request["draft"] = {"name": draft["draft_model_name"]}
        request["draft"].update({k: draft["draft_" + k] for k in ("cache_mode", "gpu_split") if "draft_" + k in draft})
    return request


def _entry(index: int, raw: Any, generation: str) -> Dict[str, Any]:
    where = "tabbyapi_models[%d]" % index
    if not isinstance(raw, Mapping):
        raise ModelsError("%s must be a dict with at least name (the folder below tabbyapi_model_dir)" % where)
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        raise ModelsError("%s has unknown keys %s: use %s" % (where, ", ".join(unknown), ", ".join(ENTRY_KEYS)))
    name = _folder(where, raw.get("name"))
    served = posixpath.basename(name)
    model_id = str(raw.get("id") or served)
    if not _ID.match(model_id):
        raise ModelsError("%s.id %r: use letters, digits and . _ : @ / - (at most 128)" % (where, model_id))
    aliases = raw.get("aliases") or []
    if not isinstance(aliases, list):
        raise ModelsError("%s.aliases must be a list of model ids" % where)
    settings = {key: raw[key] for key in MODEL_KEYS if not _unset(raw.get(key))}
    draft = _draft(where, raw.get("draft"))
    payload, dropped = load_request(generation, name, settings, draft)
    vram = raw.get("vram_mib")
    if vram is not None and (isinstance(vram, bool) or not isinstance(vram, int) or vram <= 0):
        raise ModelsError("%s.vram_mib %r must be a positive integer (MiB)" % (where, vram))
    return {
        "id": model_id, "name": name, "served_name": served, "aliases": [str(a) for a in aliases],
        "startup": bool(raw.get("startup")), "vram_mib": vram, "settings": settings, "draft": draft,
        "load": payload, "dropped": dropped, "vram_request": _vram_request(model_id, name, settings, draft, vram),
    }


def resolve(hv: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The node's TabbyAPI models from its variables (``hostvars[host]`` or the role's own)."""
    generation = str(hv.get("tabbyapi_generation") or "exl3")
    if generation not in GENERATIONS:
        raise ModelsError("tabbyapi_generation %r must be exl2 or exl3" % generation)
    declared = hv.get("tabbyapi_models") or []
    if not isinstance(declared, list):
        raise ModelsError("tabbyapi_models must be a list of dicts (name, id, aliases, startup, load settings)")
    if declared and (hv.get("tabbyapi_model_name") or hv.get("tabbyapi_model_path")):
        raise ModelsError(
            "tabbyapi_models and tabbyapi_model_name/tabbyapi_model_path both name models: declare the start-up "
            "model in tabbyapi_models with startup: true and drop the shorthand"
        )
    models = [_entry(i, raw, generation) for i, raw in enumerate(declared or _shorthand(hv))]
    seen: Dict[str, str] = {}
    for model in models:
        for name in [model["id"]] + model["aliases"]:
            if name in seen:
                raise ModelsError(
                    "model id or alias %r is used by %s and %s: TabbyAPI reports only the folder's last "
                    "component, so give same-named folders their own id" % (name, seen[name], model["name"])
                )
            seen[name] = model["name"]
    startup = [m["name"] for m in models if m["startup"]]
    if len(startup) > 1:
        raise ModelsError("tabbyapi_models marks %s as startup: at most one model loads at start" % ", ".join(startup))
    return models


def startup_model(models: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return next((m for m in models if m["startup"]), None)


def selection(models: List[Dict[str, Any]]) -> Dict[str, Any]:
    """models.json: what the unit's ExecStartPre needs to start TabbyAPI with the router's last model.

    ``model_keys``/``draft_keys`` are the config.yml keys an entry owns: the start-up script removes
    them from config.yml's sections before it applies the chosen model's, so nothing of the start-up
    model's settings leaks into another model.
    """
    return {
        "model_keys": ["model_name", *MODEL_KEYS],
        "draft_keys": ["draft_model_name"] + ["draft_" + key for key in DRAFT_KEYS[1:]],
        "models": {
            m["id"]: {"model": dict({"model_name": m["name"]}, **m["settings"]), "draft_model": dict(m["draft"] or {})}
            for m in models
        },
    }
