"""The router's YAML configuration: parsed once at start into frozen dataclasses.

Every error names the offending key as a dotted path (``backends.sglang.models[2].vram_mib``)
so that an operator, or the Ansible role rendering the file, can fix it without reading code.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import yaml

from .engines import ENGINES

# Each default is written once, as the dataclass field's default below; the parser reads it
# back from the class (``GroupSpec.queue_size``), config.schema.json mirrors it (checked by
# tests/test_router_schema.py).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:_.@\\-]{0,250}\.(service|scope|target)$")
_URL_RE = re.compile(r"^https?://[^/\s]+(/\S*)?$")


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the dotted key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ModelSpec:
    id: str
    backend: str
    served_name: str
    aliases: tuple[str, ...] = ()
    vram_mib: int | None = None  # needed on EACH GPU of its group (pre-flight reads the tightest one)
    # Requests for this model accepted at once (queued or being served); beyond it a 429. None: no cap.
    max_in_flight: int | None = None
    # TabbyAPI only: the verbatim body of POST /v1/model/load (holds model_name, the folder under
    # model_dir). On a tabbyapi backend config.py fills it with {"model_name": served_name} when absent.
    load: dict[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class CommandControl:
    argv: tuple[str, ...]
    cwd: str | None = None
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UnitControl:
    unit: str


@dataclass(frozen=True)
class BackendSpec:
    name: str
    engine: str
    group: str
    url: str
    control: CommandControl | UnitControl | None
    models: tuple[ModelSpec, ...]
    co_reside: bool = False
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 60.0
    api_key: str | None = None
    admin_key: str | None = None
    request_timeout_s: float = 600.0
    # TabbyAPI only: where the router records the model it last loaded ({"id", "model_name"}), read at
    # router start; the tabbyapi role's ExecStartPre applies it to TabbyAPI's config. config.py fills it
    # with STATE_DIR/<backend name>.json on a tabbyapi backend when absent.
    state_file: str | None = None
    STATE_DIR: ClassVar[str] = "/var/lib/llmstack/router-active"


@dataclass(frozen=True)
class GroupSpec:
    name: str
    gpus: tuple[int, ...] = ()
    queue_size: int = 64
    min_residency_s: float = 10.0
    idle_ttl_s: float = 0.0
    vram_mib: int | None = None
    vram_release_timeout_s: float = 30.0
    vram_release_slack_mib: int = 512
    # Deadlines that keep one client from stalling the group (scheduler.GroupScheduler).
    drain_timeout_s: float = 300.0
    queue_max_wait_s: float = 900.0


@dataclass(frozen=True)
class AuthSpec:
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    metrics_require_key: bool = True


# ---- limits: what one client may hold (issue 13, the router's HTTP edge) ------------------------
@dataclass(frozen=True)
class LimitsSpec:
    # Open client connections; one more is answered 503 and closed. The unit's LimitNOFILE is sized for it.
    max_connections: int = 4096
    # A new connection must deliver its first request's headers within this, or it is closed (slowloris);
    # between requests of a keep-alive connection, app.KEEPALIVE_TIMEOUT_S applies.
    header_read_timeout_s: float = 10.0
    # A request body must arrive within this (a Content-Length larger than what is sent: 408).
    body_read_timeout_s: float = 30.0
    # A client whose writes stall (it stopped reading) must take data again within this, or it is dropped:
    # every write, streamed or not (app._Client).
    client_write_timeout_s: float = 30.0
    # From forwarding to the last byte of the answer (request_timeout_s is per chunk; this caps a trickle).
    upstream_total_timeout_s: float = 1800.0


def _limits(raw: Any) -> LimitsSpec:
    reader = _Reader(raw or {}, "limits")
    spec = LimitsSpec(
        max_connections=(reader.integer("max_connections", LimitsSpec.max_connections, minimum=16)
                         or LimitsSpec.max_connections),
        header_read_timeout_s=reader.number("header_read_timeout_s", LimitsSpec.header_read_timeout_s, minimum=0.1),
        body_read_timeout_s=reader.number("body_read_timeout_s", LimitsSpec.body_read_timeout_s, minimum=0.1),
        client_write_timeout_s=reader.number("client_write_timeout_s", LimitsSpec.client_write_timeout_s,
                                             minimum=0.1),
        upstream_total_timeout_s=reader.number("upstream_total_timeout_s", LimitsSpec.upstream_total_timeout_s,
                                               minimum=1.0),
    )
    reader.finish()
    return spec
# ---- end limits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8002
    max_body_bytes: int = 4 * 1024 * 1024
    loading_progress_interval_s: float = 5.0
    # Readiness probes while a backend starts: the first sleep, doubling up to the interval (swap.poll_delays).
    ready_poll_first_s: float = 0.001
    ready_poll_interval_s: float = 0.025
    log_level: str = "INFO"
    systemctl: tuple[str, ...] = ("systemctl",)
    journalctl: tuple[str, ...] = ("journalctl",)
    vram_probe: str = "none"
    auth: AuthSpec = field(default_factory=AuthSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    # alias or id -> canonical model id
    names: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> ModelSpec | None:
        model_id = self.names.get(name)
        return self.models[model_id] if model_id is not None else None


class _Reader:
    """Typed accessors over one mapping that remember where they are for error messages."""

    def __init__(self, data: Any, key: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(key, f"must be a mapping, got {type(data).__name__}")
        self.data = data
        self.key = key
        self._seen: set[str] = set()

    def sub(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, default: Any = None) -> Any:
        self._seen.add(name)
        return self.data.get(name, default)

    def require(self, name: str) -> Any:
        self._seen.add(name)
        if name not in self.data or self.data[name] is None:
            raise ConfigError(self.sub(name), "is required")
        return self.data[name]

    def string(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.require(name) if required else self.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(self.sub(name), f"must be a non-empty string, got {value!r}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.sub(name), f"must be a number, got {value!r}")
        if value < minimum:
            raise ConfigError(self.sub(name), f"must be >= {minimum}, got {value!r}")
        return float(value)

    def integer(self, name: str, default: int | None, minimum: int = 0) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.sub(name), f"must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(self.sub(name), f"must be >= {minimum}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.sub(name), f"must be true or false, got {value!r}")
        return value

    def string_list(self, name: str) -> tuple[str, ...]:
        value = self.get(name, [])
        if isinstance(value, str) or not isinstance(value, list):
            raise ConfigError(self.sub(name), "must be a list of strings")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{self.sub(name)}[{index}]", f"must be a non-empty string, got {item!r}")
        return tuple(value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            where = self.sub(unknown[0])
            raise ConfigError(where, f"unknown key (known keys: {', '.join(sorted(self._seen))})")


def read_secret_file(path_text: str, key: str) -> tuple[str, ...]:
    """Read one secret per line, refusing files that others than the owner may read."""
    path = Path(os.path.expandvars(path_text))
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(key, f"{path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                               f"run: chmod 0600 {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    secrets = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not secrets:
        raise ConfigError(key, f"{path} holds no key")
    return secrets


def _keys(reader: _Reader, inline: str, file_key: str) -> tuple[str, ...]:
    inline_keys = reader.string_list(inline)
    path = reader.string(file_key)
    file_keys = read_secret_file(path, reader.sub(file_key)) if path else ()
    for where, keys in ((inline, inline_keys), (file_key, file_keys)):
        if any(len(item) < 16 for item in keys):
            raise ConfigError(reader.sub(where), "every key must be at least 16 characters")
    return inline_keys + file_keys


def _one_key(reader: _Reader, inline: str, file_key: str) -> str | None:
    keys = _keys(reader, inline, file_key) if (reader.get(inline) or reader.get(file_key)) else ()
    return keys[0] if keys else None


def _url(value: str, key: str) -> str:
    if not _URL_RE.match(value):
        raise ConfigError(key, f"must be an http(s) URL like http://127.0.0.1:8080, got {value!r}")
    return value.rstrip("/")


def _control(reader: _Reader, key: str) -> CommandControl | UnitControl | None:
    unit = reader.string("unit")
    command = reader.get("command")
    if unit and command:
        raise ConfigError(key, "set either 'unit' (systemd) or 'command' (spawned), not both")
    if unit:
        if not _UNIT_RE.match(unit):
            raise ConfigError(reader.sub("unit"), f"not a systemd unit name: {unit!r}")
        return UnitControl(unit)
    if command is not None:
        if isinstance(command, str) or not isinstance(command, list) or not command:
            raise ConfigError(reader.sub("command"), "must be a non-empty list of arguments (no shell string)")
        for index, arg in enumerate(command):
            if not isinstance(arg, str | int | float) or isinstance(arg, bool):
                raise ConfigError(f"{reader.sub('command')}[{index}]", f"must be a string, got {arg!r}")
        env = reader.get("env", {}) or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
            raise ConfigError(reader.sub("env"), "must be a mapping of variable names to strings")
        return CommandControl(
            argv=tuple(str(arg) for arg in command),
            cwd=reader.string("cwd"),
            env=tuple((k, str(v)) for k, v in env.items()),
        )
    return None


def _load_body(entry: _Reader, engine: str) -> dict[str, Any] | None:
    """A model's ``load``: the body of TabbyAPI's POST /v1/model/load, kept verbatim."""
    value = entry.get("load")
    key = entry.sub("load")
    if value is None:
        return None
    if "load" not in ENGINES[engine].model_keys:
        raise ConfigError(key, "only the models of a tabbyapi backend have a load request")
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(key, "must be a mapping: the JSON body of TabbyAPI's POST /v1/model/load")
    name = value.get("model_name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}.model_name", "is required: the model's folder under TabbyAPI's model_dir")
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise ConfigError(f"{key}.model_name", f"{name!r} must be a folder relative to model_dir, without '..'")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"must hold JSON values only (strings, numbers, booleans, lists, mappings): {exc}")\
            from exc
    return value


def _models(reader: _Reader, backend: str, engine: str) -> tuple[ModelSpec, ...]:
    raw = reader.require("models")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(reader.sub("models"), "must be a non-empty list")
    models = []
    for index, item in enumerate(raw):
        entry = _Reader(item, f"{reader.sub('models')}[{index}]")
        model_id = entry.string("id", required=True)
        assert model_id is not None
        if not _NAME_RE.match(model_id):
            raise ConfigError(entry.sub("id"), f"{model_id!r} must match {_NAME_RE.pattern}")
        aliases = entry.string_list("aliases")
        for alias_index, alias in enumerate(aliases):
            if not _NAME_RE.match(alias):
                raise ConfigError(f"{entry.sub('aliases')}[{alias_index}]", f"{alias!r} must match {_NAME_RE.pattern}")
        load = _load_body(entry, engine)
        # TabbyAPI's card names the loaded folder's basename: that is the default served_name there.
        served_default = PurePosixPath(load["model_name"]).name if load else model_id
        served_name = entry.string("served_name", served_default) or served_default
        if load is None and "load" in ENGINES[engine].model_keys:
            load = {"model_name": served_name}
        models.append(ModelSpec(
            id=model_id,
            backend=backend,
            served_name=served_name,
            aliases=aliases,
            vram_mib=entry.integer("vram_mib", None, minimum=1),
            max_in_flight=entry.integer("max_in_flight", ModelSpec.max_in_flight, minimum=1),
            load=load,
        ))
        entry.finish()
    return tuple(models)


# Keys that once existed: the error names what replaced them.
_REMOVED_BACKEND_KEYS = {
    "tabby_config": "was removed: the router no longer writes TabbyAPI's config.yml (its sandbox cannot, and "
                    "the file would end up owned by the router's user). The router records the active model in "
                    f"state_file (default {BackendSpec.STATE_DIR}/<backend>.json) and the tabbyapi role's "
                    "ExecStartPre applies it; delete tabby_config (and set state_file if needed)",
}


def _state_file(reader: _Reader, name: str, engine_class: type) -> str | None:
    path = reader.string("state_file")
    if path is not None and "state_file" not in engine_class.config_keys:
        raise ConfigError(reader.sub("state_file"), "only a tabbyapi backend has a state file")
    if path is not None and not os.path.isabs(path):
        raise ConfigError(reader.sub("state_file"), f"must be an absolute path, got {path!r}")
    if path is None and "state_file" in engine_class.config_keys:
        path = f"{BackendSpec.STATE_DIR}/{name}.json"
    return path


def _backend(name: str, raw: Any, groups: dict[str, GroupSpec]) -> BackendSpec:
    key = f"backends.{name}"
    reader = _Reader(raw, key)
    for removed, why in _REMOVED_BACKEND_KEYS.items():
        if removed in reader.data:
            raise ConfigError(reader.sub(removed), why)
    engine = reader.string("engine", required=True)
    if engine not in ENGINES:
        raise ConfigError(reader.sub("engine"), f"{engine!r} is not one of {', '.join(ENGINES)}")
    group = reader.string("group", required=True)
    if group not in groups:
        raise ConfigError(reader.sub("group"), f"{group!r} is not a group under 'groups' ({', '.join(groups)})")
    url_text = reader.string("url", required=True)
    assert url_text is not None
    assert engine is not None
    assert group is not None
    models = _models(reader, name, engine)
    engine_class = ENGINES[engine]
    if len(models) > 1 and not engine_class.serves_many_models:
        raise ConfigError(reader.sub("models"), f"a {engine} process serves one model; declare one backend per model")
    backend = BackendSpec(
        name=name,
        engine=engine,
        group=group,
        url=_url(url_text, reader.sub("url")),
        control=_control(reader, key),
        models=models,
        co_reside=reader.boolean("co_reside", BackendSpec.co_reside),
        ready_timeout_s=reader.number("ready_timeout_s", BackendSpec.ready_timeout_s, minimum=0.1),
        stop_timeout_s=reader.number("stop_timeout_s", BackendSpec.stop_timeout_s, minimum=0.1),
        request_timeout_s=reader.number("request_timeout_s", BackendSpec.request_timeout_s, minimum=1.0),
        api_key=_one_key(reader, "api_keys", "api_key_file"),
        admin_key=_one_key(reader, "admin_keys", "admin_key_file"),
        state_file=_state_file(reader, name, engine_class),
    )
    reader.finish()
    return backend


def _group(name: str, raw: Any) -> GroupSpec:
    reader = _Reader(raw or {}, f"groups.{name}")
    gpus = reader.get("gpus", [])
    if not isinstance(gpus, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus):
        raise ConfigError(reader.sub("gpus"), "must be a list of GPU indexes (integers >= 0)")
    spec = GroupSpec(
        name=name,
        gpus=tuple(gpus),
        queue_size=reader.integer("queue_size", GroupSpec.queue_size, minimum=1) or GroupSpec.queue_size,
        min_residency_s=reader.number("min_residency_s", GroupSpec.min_residency_s),
        idle_ttl_s=reader.number("idle_ttl_s", GroupSpec.idle_ttl_s),
        vram_mib=reader.integer("vram_mib", GroupSpec.vram_mib, minimum=1),
        vram_release_timeout_s=reader.number("vram_release_timeout_s", GroupSpec.vram_release_timeout_s,
                                             minimum=0.1),
        # An explicit null means 0 here (no slack), unlike the other keys, where it means the default.
        vram_release_slack_mib=reader.integer("vram_release_slack_mib", GroupSpec.vram_release_slack_mib) or 0,
        drain_timeout_s=reader.number("drain_timeout_s", GroupSpec.drain_timeout_s, minimum=0.1),
        queue_max_wait_s=reader.number("queue_max_wait_s", GroupSpec.queue_max_wait_s, minimum=0.1),
    )
    reader.finish()
    return spec


def parse_config(data: Any) -> RouterConfig:
    top = _Reader(data, "")
    listen = _Reader(top.get("listen", {}) or {}, "listen")
    host = listen.string("host", RouterConfig.host) or RouterConfig.host
    port = listen.integer("port", RouterConfig.port, minimum=1) or RouterConfig.port
    if port > 65535:
        raise ConfigError("listen.port", f"must be <= 65535, got {port}")
    listen.finish()

    auth_reader = _Reader(top.get("auth", {}) or {}, "auth")
    auth = AuthSpec(
        api_keys=_keys(auth_reader, "api_keys", "api_keys_file"),
        admin_keys=_keys(auth_reader, "admin_keys", "admin_keys_file"),
        allow_unauthenticated=auth_reader.boolean("allow_unauthenticated", AuthSpec.allow_unauthenticated),
        metrics_require_key=auth_reader.boolean("metrics_require_key", AuthSpec.metrics_require_key),
    )
    auth_reader.finish()
    if not auth.api_keys and not auth.allow_unauthenticated:
        raise ConfigError(
            "auth.api_keys_file",
            "no API key configured; give api_keys_file (0600, one key per line) "
            "or set auth.allow_unauthenticated: true",
        )
    overlap = set(auth.api_keys) & set(auth.admin_keys)
    if overlap:
        raise ConfigError("auth.admin_keys", "an admin key must not also be an API key")

    groups_raw = top.require("groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise ConfigError("groups", "must be a non-empty mapping of group name to settings")
    groups = {}
    for name, raw in groups_raw.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"groups.{name}", "group names are letters, digits and . _ - :")
        groups[name] = _group(name, raw)

    backends_raw = top.require("backends")
    if not isinstance(backends_raw, dict) or not backends_raw:
        raise ConfigError("backends", "must be a non-empty mapping of backend name to settings")
    backends: dict[str, BackendSpec] = {}
    models: dict[str, ModelSpec] = {}
    names: dict[str, str] = {}
    for name, raw in backends_raw.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"backends.{name}", "backend names are letters, digits and . _ - :")
        backend = _backend(name, raw, groups)
        backends[name] = backend
        for index, model in enumerate(backend.models):
            for alias in (model.id, *model.aliases):
                if alias in names:
                    raise ConfigError(f"backends.{name}.models[{index}]",
                                      f"model id or alias {alias!r} is already used by model {names[alias]!r}")
                names[alias] = model.id
            models[model.id] = model

    vram_probe = top.string("vram_probe", RouterConfig.vram_probe)
    if vram_probe not in ("none", "nvidia-smi"):
        raise ConfigError("vram_probe", f"must be 'none' or 'nvidia-smi', got {vram_probe!r}")
    log_level = (top.string("log_level", RouterConfig.log_level) or RouterConfig.log_level).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    systemctl = top.string_list("systemctl") or RouterConfig.systemctl
    journalctl = top.string_list("journalctl") or RouterConfig.journalctl
    ready_poll_interval_s = top.number("ready_poll_interval_s", RouterConfig.ready_poll_interval_s, minimum=0.005)
    ready_poll_first_s = top.number("ready_poll_first_s", RouterConfig.ready_poll_first_s, minimum=0.0005)
    if ready_poll_first_s > ready_poll_interval_s:
        raise ConfigError("ready_poll_first_s", f"must be <= ready_poll_interval_s ({ready_poll_interval_s}), "
                                                f"got {ready_poll_first_s}: lower it, or raise the interval")
    config = RouterConfig(
        host=host,
        port=port,
        max_body_bytes=(top.integer("max_body_bytes", RouterConfig.max_body_bytes, minimum=1024)
                        or RouterConfig.max_body_bytes),
        loading_progress_interval_s=top.number("loading_progress_interval_s", RouterConfig.loading_progress_interval_s,
                                               minimum=0.05),
        ready_poll_first_s=ready_poll_first_s,
        ready_poll_interval_s=ready_poll_interval_s,
        log_level=log_level,
        systemctl=systemctl,
        journalctl=journalctl,
        vram_probe=vram_probe,
        auth=auth,
        limits=_limits(top.get("limits")),
        groups=groups,
        backends=backends,
        models=models,
        names=names,
    )
    top.finish()
    return config


def load_config(path: str | os.PathLike[str]) -> RouterConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from exc
    return parse_config(data)
