"""Simulated model container (part of the TabbyAPI emulator, see package doc).

A "model" is a folder holding config.json. Loading follows common/model.py load_model_gen and the
backends' create() at the playing generation (generation.py): the repeated-load rule, unload of
the old model before the new one is checked, load defaults (use_as_default, the folder's
tabby_config.yml), backend choice, max_seq_len/cache_size/chunk_size defaults read from the
folder's config.json, and the model card each backend reports. No weights: loading sleeps per
"module" (num_hidden_layers + 2) and reports (module, modules, model_type) like TabbyAPI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from .generation import Generation, installed_backends

log = logging.getLogger("tabby_emu.container")

KV_BITS = re.compile(r"^([2-8])\s*,\s*([2-8])$")
PAGE_SIZE = 256
# exllamav2's dynamic generator picks max_batch_size itself when TabbyAPI passes None; the value
# lives in exllamav2, not in TabbyAPI's source, so it is the emulator's assumption.
EXLLAMAV2_GENERATOR_BATCH = 16


class LoadError(Exception):
    """A load failure TabbyAPI would report (startup: exit 1; API: SSE error event)."""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def deep_merge(*dicts: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for item in dicts:
        for key, value in item.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def rope_alpha_for(base_seq_len: int | None, target_seq_len: int) -> float:
    # common/utils.py calculate_rope_alpha (used by the exllamav2 backend only).
    ratio = target_seq_len / (base_seq_len or target_seq_len)
    return 1.0 if ratio <= 1.0 else -0.13436 + 0.80541 * ratio + 0.28833 * ratio**2


def _round_up(value: int, step: int = PAGE_SIZE) -> int:
    return (value + step - 1) // step * step


def read_hf_config(path: pathlib.Path) -> dict[str, Any]:
    # common/transformers_utils.py HFModel.from_directory: a model must have config.json.
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LoadError(f"Failed to load config.json from {path}") from exc
    if not isinstance(data, dict):
        raise LoadError(f"Failed to load config.json from {path}")
    return data


def max_position_embeddings(hf: dict[str, Any], default: int | None = 4096) -> int | None:
    text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
    return text.get("max_position_embeddings") or hf.get("max_position_embeddings") or default


def quant_method(hf: dict[str, Any]) -> str | None:
    quant = hf.get("quantization_config")
    return quant.get("quant_method") if isinstance(quant, dict) else None


def _modules(hf: dict[str, Any]) -> int:
    return int(hf.get("num_hidden_layers") or 1) + 2


@dataclass
class LoadedModel:
    path: pathlib.Path
    backend: str
    modules: int
    card_params: dict[str, Any]
    draft_path: pathlib.Path | None = None
    draft_modules: int = 0
    draft_card_params: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_seq_len(self) -> int:
        return int(self.card_params["max_seq_len"])

    def card(self) -> dict[str, Any]:
        # endpoints/core/types/model.py ModelCard/ModelCardParameters, every field dumped.
        params = _card_defaults() | self.card_params
        if self.draft_card_params is not None and self.draft_path is not None:
            params["draft"] = {
                "id": self.draft_path.name,
                "object": "model",
                "owned_by": "tabbyAPI",
                "logging": None,
                "parameters": _card_defaults() | self.draft_card_params,
            }
        return {"id": self.path.name, "object": "model", "owned_by": "tabbyAPI", "logging": None, "parameters": params}


def _card_defaults() -> dict[str, Any]:
    return {
        "max_seq_len": None,
        "cache_size": None,
        "cache_mode": "FP16",
        "rope_scale": 1.0,
        "rope_alpha": 1.0,
        "max_batch_size": 1,
        "chunk_size": 2048,
        "prompt_template": None,
        "prompt_template_content": None,
        "use_vision": False,
        "draft": None,
    }


def _draft_path(draft_args: dict[str, Any]) -> pathlib.Path:
    return pathlib.Path(draft_args.get("draft_model_dir") or "models") / str(draft_args["draft_model_name"])


def create_exllamav3(path: pathlib.Path, hf: dict[str, Any], kwargs: dict[str, Any]) -> LoadedModel:
    """backends/exllamav3/model.py create() (same rules at both commits)."""
    if quant_method(hf) in ("exl2", "gptq"):
        # exllamav3 itself cannot read these; the wording is the emulator's.
        raise LoadError(f"Models quantized with '{quant_method(hf)}' require the exllamav2 backend.")
    draft_args = kwargs.get("draft_model") or {}
    draft_mode = draft_args.get("draft_mode") or "model"
    if draft_mode not in ("model", "disabled", "mtp", "ngram"):
        raise LoadError(f"Unknown exllamav3 draft mode: {draft_mode}")
    use_draft = draft_mode == "mtp" or (draft_mode == "model" and bool(draft_args.get("draft_model_name")))
    if draft_mode == "model" and draft_args and not draft_args.get("draft_model_name"):
        log.warning("Draft model is disabled because a model name wasn't provided. Please check your config.yml!")

    max_seq_len_user = kwargs.get("max_seq_len")
    max_seq_len = max_seq_len_user or max_position_embeddings(hf, default=None) or 8192
    cache_size = kwargs.get("cache_size") or max_seq_len
    if max_seq_len > cache_size:
        log.warning("The given max_seq_len (%s) is larger than the cache size, limited to %s.", max_seq_len, cache_size)
        max_seq_len = cache_size
    if cache_size % PAGE_SIZE:
        # TabbyAPI passes cache_size through; exllamav3's cache layers assert the page multiple.
        raise LoadError(f"max_num_tokens must be a multiple of {PAGE_SIZE}.")
    chunk_size = _round_up(max(256, int(kwargs.get("chunk_size") or 2048)))
    loaded = LoadedModel(
        path=path,
        backend="exllamav3",
        modules=_modules(hf),
        # model_info(): rope_scale/rope_alpha and the draft are not reported (card defaults).
        card_params={
            "max_seq_len": max_seq_len,
            "cache_size": cache_size,
            "cache_mode": kwargs.get("cache_mode") or "FP16",
            "max_batch_size": kwargs.get("max_batch_size") or 128,
            "chunk_size": chunk_size,
            "use_vision": False,
        },
    )
    if use_draft:
        draft_path = path if draft_mode == "mtp" else _draft_path(draft_args)
        loaded.draft_path = draft_path
        loaded.draft_modules = _modules(read_hf_config(draft_path)) if draft_mode != "mtp" else 1
        loaded.extra["draft_cache_mode"] = draft_args.get("draft_cache_mode") or "FP16"
    return loaded


def _exl2_cache_mode(mode: str, what: str) -> str:
    if mode != "FP16" and not mode.startswith("Q"):
        log.warning("Provided %s '%s' is not a valid choice for exllamav2, Defaulting to FP16.", what, mode)
        return "FP16"
    return mode


def create_exllamav2(path: pathlib.Path, hf: dict[str, Any], kwargs: dict[str, Any]) -> LoadedModel:
    """backends/exllamav2/model.py create() at 79126f9 (paged mode, i.e. an Ampere or newer GPU)."""
    if quant_method(hf) == "exl3":
        raise LoadError("Models quantized with 'exl3' require the exllamav3 backend.")
    draft_args = kwargs.get("draft_model") or {}
    use_draft = bool(draft_args) and bool(draft_args.get("draft_model_name"))
    cache_mode = _exl2_cache_mode(str(kwargs.get("cache_mode") or "FP16"), "cache mode")
    user_max_seq_len = kwargs.get("max_seq_len")
    cache_size = _round_up(int(kwargs.get("cache_size") or user_max_seq_len or 4096))
    max_pos = max_position_embeddings(hf)
    max_seq_len = min(user_max_seq_len, cache_size) if user_max_seq_len else min(max_pos, cache_size)
    scaling = hf.get("rope_scaling") if isinstance(hf.get("rope_scaling"), dict) else {}
    model_scale = float(scaling.get("factor", 1.0)) if scaling.get("type") == "linear" else 1.0
    rope_alpha = kwargs.get("rope_alpha") or "auto"
    if rope_alpha == "auto":
        rope_alpha = rope_alpha_for(hf.get("max_position_embeddings"), max_seq_len)
    chunk_size = _round_up(sorted((256, int(kwargs.get("chunk_size") or 2048), max_seq_len))[1])
    loaded = LoadedModel(
        path=path,
        backend="exllamav2",
        modules=_modules(hf),
        card_params={
            "max_seq_len": max_seq_len,
            "cache_size": cache_size,
            "cache_mode": cache_mode,
            "rope_scale": kwargs.get("rope_scale") or model_scale,
            "rope_alpha": rope_alpha,
            "max_batch_size": kwargs.get("max_batch_size") or EXLLAMAV2_GENERATOR_BATCH,
            "chunk_size": chunk_size,
            "use_vision": False,
        },
    )
    if use_draft:
        draft_path = _draft_path(draft_args)
        loaded.draft_path = draft_path
        loaded.draft_modules = _modules(read_hf_config(draft_path))
        draft_alpha = draft_args.get("draft_rope_alpha") or "auto"
        if draft_alpha == "auto":
            # TabbyAPI uses the main model's max_position_embeddings here.
            draft_alpha = rope_alpha_for(hf.get("max_position_embeddings"), max_seq_len)
        loaded.draft_card_params = {
            "max_seq_len": max_seq_len,
            "rope_scale": draft_args.get("draft_rope_scale") or 1.0,
            "rope_alpha": draft_alpha,
            "cache_mode": _exl2_cache_mode(str(draft_args.get("draft_cache_mode") or "FP16"), "draft cache mode"),
        }
    elif draft_args and draft_args.get("draft_model_name") is None:
        log.warning("Draft model is disabled because a model name wasn't provided. Please check your config.yml!")
    return loaded


CREATE = {"exllamav2": create_exllamav2, "exllamav3": create_exllamav3}


class ModelManager:
    def __init__(self, generation: Generation, model_defaults: dict[str, Any], draft_defaults: dict[str, Any]) -> None:
        self.generation = generation
        self.model_defaults = model_defaults
        self.draft_defaults = draft_defaults
        self.current: LoadedModel | None = None
        self.lock = asyncio.Lock()
        self.module_load_s = _env_float("TABBY_EMU_MODULE_LOAD_S", 0.02)
        self.installed = installed_backends(generation)

    def _is_loaded(self, model_path: pathlib.Path) -> bool:
        current = self.current
        if current is None:
            return False
        if self.generation.same_model_by_path:
            return current.path.resolve() == model_path.resolve()
        return current.path.name == model_path.name

    def apply_load_defaults(self, model_path: pathlib.Path, kwargs: dict[str, Any]) -> dict[str, Any]:
        """common/model.py apply_load_defaults."""
        inline: dict[str, Any] = {}
        inline_draft: dict[str, Any] = {}
        override_file = model_path / "tabby_config.yml"
        if override_file.exists():
            raw = yaml.safe_load(override_file.read_text(encoding="utf-8")) or {}
            inline = dict(raw.get("model") or {})
            inline_draft = dict(raw.get("draft_model") or {})
        if self.generation.inline_config_wins:
            defaults = {**self.model_defaults, "draft_model": dict(self.draft_defaults)}
            return deep_merge(defaults, kwargs, {**inline, "draft_model": inline_draft})
        overrides = {"draft_model": inline_draft, **inline}
        overrides = {**overrides, **self.model_defaults}
        overrides["draft_model"] = {**overrides.get("draft_model", {}), **self.draft_defaults}
        return deep_merge(overrides, kwargs)

    def _backend(self, requested: str | None, hf: dict[str, Any]) -> str:
        quant = quant_method(hf)
        if self.generation.name == "exl3":
            # common/model.py validate_backend at e632af4.
            if requested == "exllamav2":
                raise LoadError("The exllamav2 backend is no longer supported. Please use exllamav3.")
            if requested and requested != "exllamav3":
                raise LoadError(f"Invalid backend '{requested}'. Available backends: ['exllamav3']")
            if quant in ("exl2", "gptq"):
                raise LoadError(
                    f"Models quantized with '{quant}' require the exllamav2 backend, "
                    "which is no longer supported. Please use an exl3 or unquantized model."
                )
            if "exllamav3" not in self.installed:
                raise LoadError("The exllamav3 backend is selected, but required dependencies are not installed.")
            return "exllamav3"
        # common/model.py detect_backend + _BACKEND_REGISTRY at 79126f9.
        backend = requested or ("exllamav3" if quant == "exl3" else "exllamav2")
        if backend not in self.installed:
            if backend in ("exllamav2", "exllamav3"):
                raise LoadError(f"Backend '{backend}' selected, but required dependencies are not installed.")
            raise LoadError(f"Invalid backend '{backend}'. Available backends: {sorted(self.installed)}")
        return backend

    async def load_gen(self, model_path: pathlib.Path, kwargs: dict[str, Any]) -> AsyncIterator[tuple[int, int, str]]:
        async with self.lock:
            if self._is_loaded(model_path):
                log.info('Model "%s" is already loaded', model_path.name)
                if self.generation.repeat_load_event:
                    yield 1, 1, "model"
                return
            if self.current is not None:
                # Unloaded before the new model is even read: a failed load leaves none loaded.
                log.info("Unloading existing model.")
                self.current = None
            kwargs = self.apply_load_defaults(model_path, {k: v for k, v in kwargs.items() if k != "model_dir"})
            hf = read_hf_config(model_path)
            if kwargs.get("max_seq_len") == -1:
                kwargs["max_seq_len"] = max_position_embeddings(hf)
            backend = self._backend(kwargs.get("backend"), hf)
            log.info("Using backend %s", backend)
            planned = CREATE[backend](model_path.resolve(), hf, kwargs)
            stages = [("draft", planned.draft_modules)] if planned.draft_path else []
            stages.append(("model", planned.modules))
            for model_type, modules in stages:
                yield 0, modules, model_type
                for module in range(1, modules + 1):
                    await asyncio.sleep(self.module_load_s)
                    yield module, modules, model_type
            self.current = planned
            log.info("Model %s loaded (%s).", planned.path.name, backend)

    async def load(self, model_path: pathlib.Path, kwargs: dict[str, Any]) -> None:
        async for _progress in self.load_gen(model_path, kwargs):
            pass

    async def unload(self) -> None:
        async with self.lock:
            self.current = None
