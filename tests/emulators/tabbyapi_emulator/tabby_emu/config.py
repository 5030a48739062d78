"""Configuration the way common/tabby_config.py loads it (part of the TabbyAPI emulator).

Order, later wins (deep merge, unset values dropped): ./config.yml (symlinks followed), then
TABBY_<SECTION>_<KEY> environment variables, then CLI args (--model-name, --port, ...; the group
per section as common/args.py builds them). `--config PATH` makes the CLI layer that file's
content instead of the other CLI args. A config file that cannot be read or parsed is logged and
skipped (TabbyAPI starts with defaults); a value of the wrong type stops the start (exit 1, like
pydantic's ValidationError). model.use_as_default names the keys API loads take from the config.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from .container import deep_merge
from .generation import Generation
from .schema import CONFIG_SCHEMA, DRAFT_DEFAULTS, MODEL_DEFAULTS, validate

log = logging.getLogger("tabby_emu.config")


class ConfigError(ValueError):
    """The merged config does not validate (TabbyAPI exits with pydantic's error)."""


def build_parser(generation: Generation) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="TabbyAPI server (emulator)")
    for section, keys in CONFIG_SCHEMA[generation.name].items():
        group = parser.add_argument_group(section)
        for key, spec in keys.items():
            kwargs: dict[str, Any] = {"dest": f"{section}.{key}"}
            if spec.startswith("list") or spec == "api_servers":
                kwargs["nargs"] = "+"
            group.add_argument("--" + key.replace("_", "-"), **kwargs)
    return parser


def _args_to_dict(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, _dot, key = dest.partition(".")
        if value is not None:
            sections.setdefault(section, {})[key] = value
    return sections


def _from_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        with open(path.resolve(), encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except FileNotFoundError:
        log.info("The '%s' file cannot be found", path.name)
        return {}
    except (OSError, yaml.YAMLError) as exc:
        log.error("The YAML config from '%s' couldn't load because of the following error:\n\n%s", path.name, exc)
        return {}
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw or {}


def _from_environment(generation: Generation) -> dict[str, dict[str, Any]]:
    env: dict[str, dict[str, Any]] = {}
    for section, keys in CONFIG_SCHEMA[generation.name].items():
        for key in keys:
            value = os.environ.get(f"TABBY_{section}_{key}".upper())
            if value is not None:
                env.setdefault(section, {})[key] = value
    return env


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


@dataclass
class EmuConfig:
    generation: Generation
    host: str = "127.0.0.1"
    port: int = 5000
    disable_auth: bool = False
    sse_ping_interval: int | None = 15
    model: dict[str, Any] = field(default_factory=lambda: dict(MODEL_DEFAULTS))
    draft_model: dict[str, Any] = field(default_factory=lambda: dict(DRAFT_DEFAULTS))
    model_defaults: dict[str, Any] = field(default_factory=dict)
    draft_model_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> str:
        return str(self.model.get("model_dir") or "models")

    @property
    def model_name(self) -> str | None:
        return self.model.get("model_name") or None

    @property
    def draft_model_dir(self) -> str:
        return str(self.draft_model.get("draft_model_dir") or "models")

    @classmethod
    def load(cls, generation: Generation, argv: list[str] | None = None, cwd: pathlib.Path | None = None) -> EmuConfig:
        args = _args_to_dict(build_parser(generation).parse_args(argv))
        override = args.get("config", {}).get("config")
        cli = _from_file(pathlib.Path(override)) if override else args
        if override:
            log.info("Config file override detected in args.")
        layers = [_from_file((cwd or pathlib.Path.cwd()) / "config.yml"), _from_environment(generation), cli]
        merged = deep_merge(*[_drop_none(layer) for layer in layers])
        return cls.from_mapping(generation, merged)

    @classmethod
    def from_mapping(cls, generation: Generation, merged: dict[str, Any]) -> EmuConfig:
        clean: dict[str, dict[str, Any]] = {}
        errors: list[dict[str, Any]] = []
        for section, keys in CONFIG_SCHEMA[generation.name].items():
            raw = merged.get(section) or {}
            if not isinstance(raw, dict):
                errors.append({"loc": [section], "msg": "Input should be a valid dictionary", "input": raw})
                continue
            clean[section], section_errors = validate(keys, raw, (section,))
            errors += section_errors
        if errors:
            lines = [f"{'.'.join(e['loc'])}: {e['msg']} (got {e['input']!r})" for e in errors]
            raise ConfigError(f"{len(errors)} validation error(s) for TabbyConfigModel\n" + "\n".join(lines))
        network = _drop_none(clean["network"])
        model = {**MODEL_DEFAULTS, **_drop_none(clean["model"])}
        draft = {**DRAFT_DEFAULTS, **_drop_none(clean["draft_model"])}
        cfg = cls(
            generation=generation,
            host=network.get("host", "127.0.0.1"),
            port=network.get("port", 5000),
            disable_auth=network.get("disable_auth", False),
            sse_ping_interval=network.get("sse_ping_interval", 15),
            model=model,
            draft_model=draft,
        )
        schema = CONFIG_SCHEMA[generation.name]
        for key in model.get("use_as_default") or []:
            if key in schema["model"]:
                cfg.model_defaults[key] = model.get(key)
            elif key in schema["draft_model"]:
                cfg.draft_model_defaults[key] = draft.get(key)
            else:
                log.error("invalid item %s in config option `model.use_as_default`", key)
        return cfg
