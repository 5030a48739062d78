"""Simulated model container (part of the TabbyAPI emulator, see package doc).

A "model" is a folder holding config.json. Loading validates what TabbyAPI validates (backend
against the folder's quant_method, cache_mode per backend, cache_size rules) and then sleeps per
module, reporting (module, modules, model_type) like TabbyAPI's load generator.
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

log = logging.getLogger("tabby_emu.container")

EXL2_CACHE_MODES = {"FP16", "Q8", "Q6", "Q4"}
KV_BITS = re.compile(r"^([2-8])\s*,\s*([2-8])$")
DEFAULT_BACKENDS = "exllamav2,exllamav3"


class LoadError(Exception):
    """A load failure TabbyAPI would report (startup: exit; API: SSE error event)."""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class LoadedModel:
    path: pathlib.Path
    backend: str
    modules: int
    max_seq_len: int
    cache_size: int
    cache_mode: str
    chunk_size: int
    max_batch_size: int
    draft: LoadedModel | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def card(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_seq_len": self.max_seq_len,
            "cache_size": self.cache_size,
            "cache_mode": self.cache_mode,
            "rope_scale": 1.0,
            "rope_alpha": 1.0,
            "max_batch_size": self.max_batch_size,
            "chunk_size": self.chunk_size,
            "prompt_template": None,
            "use_vision": False,
            "draft": self.draft.card() if self.draft else None,
        }
        return {"id": self.path.name, "object": "model", "owned_by": "tabbyAPI", "parameters": params}


def read_model_config(path: pathlib.Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LoadError(f"Could not find config.json in {path}. Is this a model folder?")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadError(f"{config_file}: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{config_file}: not a JSON object")
    return data


def resolve_backend(requested: str | None, quant_method: str | None, installed: set[str]) -> str:
    backend = requested or ("exllamav3" if quant_method == "exl3" else "exllamav2")
    if backend not in ("exllamav2", "exllamav3"):
        raise LoadError(f"Invalid backend '{backend}'. Available backends: {sorted(installed)}")
    if backend not in installed:
        if backend == "exllamav2":
            raise LoadError("The exllamav2 backend is no longer supported. Please use exllamav3.")
        raise LoadError(f"The {backend} backend is selected, but required dependencies are not installed.")
    if backend == "exllamav3" and quant_method in ("exl2", "gptq"):
        raise LoadError(f"Models quantized with '{quant_method}' require the exllamav2 backend.")
    if backend == "exllamav2" and quant_method == "exl3":
        raise LoadError("Models quantized with 'exl3' require the exllamav3 backend.")
    return backend


def normalize_cache_mode(backend: str, cache_mode: object) -> str:
    mode = str(cache_mode or "FP16").strip()
    if backend == "exllamav2":
        if mode not in EXL2_CACHE_MODES:
            # exllamav2 in TabbyAPI warns and falls back instead of failing.
            log.warning("Provided cache mode '%s' is not a valid choice for exllamav2, using FP16", mode)
            return "FP16"
        return mode
    if mode in EXL2_CACHE_MODES:
        return mode
    match = KV_BITS.match(mode)
    if not match:
        raise LoadError(f"Unsupported cache_mode: {mode} (FP16, Q4, Q6, Q8 or 'k,v' with k, v in 2..8)")
    return f"{match[1]},{match[2]}"


def plan_model(path: pathlib.Path, args: dict[str, Any], installed: set[str], draft: bool = False) -> LoadedModel:
    prefix = "draft_" if draft else ""
    hf = read_model_config(path)
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    backend = resolve_backend(args.get("backend"), quant, installed)
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    cache_size = args.get("cache_size")
    max_seq_len = args.get("max_seq_len")
    if max_seq_len == -1:
        max_seq_len = max_pos
    if max_seq_len is None:
        max_seq_len = min(max_pos, int(cache_size or 4096))
    max_seq_len = int(max_seq_len)
    cache_size = int(cache_size or max_seq_len)
    if cache_size < max_seq_len:
        log.warning("The given cache_size (%s) is smaller than max_seq_len, overriding", cache_size)
        cache_size = max_seq_len
    if cache_size % 256:
        cache_size = (cache_size // 256 + 1) * 256
    return LoadedModel(
        path=path,
        backend=backend,
        modules=int(hf.get("num_hidden_layers") or 1) + 2,
        max_seq_len=max_seq_len,
        cache_size=cache_size,
        cache_mode=normalize_cache_mode(backend, args.get(f"{prefix}cache_mode")),
        chunk_size=int(args.get("chunk_size") or 2048),
        max_batch_size=int(args.get("max_batch_size") or 32),
    )


class ModelManager:
    def __init__(self) -> None:
        self.current: LoadedModel | None = None
        self.lock = asyncio.Lock()
        self.module_load_s = _env_float("TABBY_EMU_MODULE_LOAD_S", 0.02)
        names = os.environ.get("TABBY_EMU_BACKENDS", DEFAULT_BACKENDS)
        self.installed = {name.strip() for name in names.split(",") if name.strip()}

    async def load_gen(
        self,
        model_path: pathlib.Path,
        args: dict[str, Any],
        draft_path: pathlib.Path | None = None,
        draft_args: dict[str, Any] | None = None,
    ) -> AsyncIterator[tuple[int, int, str]]:
        async with self.lock:
            current = self.current
            if current and current.path.resolve() == model_path.resolve():
                # TabbyAPI answers a repeated load with one terminal event, draft changes included.
                yield 1, 1, "model"
                return
            if current:
                log.info("Unloading existing model.")
                self.current = None
            planned = plan_model(model_path, args, self.installed)
            stages: list[tuple[str, LoadedModel]] = []
            if draft_path is not None:
                planned.draft = plan_model(draft_path, draft_args or {}, self.installed, draft=True)
                stages.append(("draft", planned.draft))
            stages.append(("model", planned))
            for model_type, target in stages:
                yield 0, target.modules, model_type
                for module in range(1, target.modules + 1):
                    await asyncio.sleep(self.module_load_s)
                    yield module, target.modules, model_type
            self.current = planned
            log.info("Model %s loaded (%s, cache %s).", planned.path.name, planned.backend, planned.cache_mode)

    async def load(self, *args: Any, **kwargs: Any) -> None:
        async for _progress in self.load_gen(*args, **kwargs):
            pass

    async def unload(self) -> None:
        async with self.lock:
            self.current = None
