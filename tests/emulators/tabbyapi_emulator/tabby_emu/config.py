"""config.yml reading with TabbyAPI's defaults (part of the TabbyAPI emulator, see package doc)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"config.yml: section '{name}' must be a mapping, got {type(value).__name__}")
    return value


@dataclass
class EmuConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    disable_auth: bool = False
    model_dir: str = "models"
    model_name: str | None = None
    draft_model_dir: str = "models"
    draft_model_name: str | None = None
    # Load arguments of the startup model, as TabbyAPI passes config.model to its loader.
    load_args: dict[str, Any] = field(default_factory=dict)
    draft_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: pathlib.Path) -> EmuConfig:
        # TabbyAPI starts with defaults when config.yml is absent; so does the emulator.
        raw: dict[str, Any] = {}
        if path.exists():
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: top level must be a mapping")
        network = _section(raw, "network")
        model = _section(raw, "model")
        draft = _section(raw, "draft_model")
        load_args = {k: v for k, v in model.items() if v is not None and k not in ("model_dir", "model_name")}
        draft_args = {k: v for k, v in draft.items() if v is not None}
        return cls(
            host=str(network.get("host") or "127.0.0.1"),
            port=int(network.get("port") or 5000),
            disable_auth=bool(network.get("disable_auth", False)),
            model_dir=str(model.get("model_dir") or "models"),
            model_name=model.get("model_name") or None,
            draft_model_dir=str(draft.get("draft_model_dir") or "models"),
            draft_model_name=draft.get("draft_model_name") or None,
            load_args=load_args,
            draft_args=draft_args,
        )
