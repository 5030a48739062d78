# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One instance schema for the llamacpp, vllm and sglang roles: validate, fill defaults, build each file.

Documentation: engine_instances.yml, engine_deprecations.yml (one file per filter). The roles keep no Jinja
programs: each calls engine_instances once and hands the result to roles/common/tasks/engine_instances.yml.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from ansible.errors import AnsibleFilterError
from ansible.parsing.yaml.dumper import AnsibleDumper
from ansible.utils.display import Display
from ansible_collections.llmstack.inference.plugins.module_utils._devices import (
    DeviceError,
    parse_devices,
    visible_devices,
)

ENGINES = ("llamacpp", "vllm", "sglang")
STATES = ("started", "stopped", "on_demand")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{16,}$")
_PLACEHOLDER = re.compile(r"^(changeme|change-me|secret|password)$", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Wildcard binds (never chosen here: only recognized, to probe them on loopback).
_WILDCARD = ("0.0.0.0", "::", "")  # noqa: S104
# Keys router_backends and litellm_model_list read from the same entries.
ROUTER_KEYS = {"aliases", "vram_mib", "router_group"}
COMMON_KEYS = {"name", "model", "served_model_name", "port", "host", "api_key", "state", "enabled", "devices",
               "extra_args", "env"}
# Instance keys of the previous release: old -> new.
RENAMED_KEYS = {"alias": "served_model_name", "cuda_visible_devices": "devices"}
# Role variables of the previous release: old -> new.
RENAMED_VARS = {
    "llamacpp": {
        "llamacpp_bind_address": "llamacpp_listen_host",
        "llamacpp_auth_enabled": "llamacpp_require_api_key",
        "llamacpp_service_guard": "llamacpp_guard",
        "llamacpp_service_guard_require_mountpoint": "llamacpp_guard_require_mountpoint",
    },
    "vllm": {"vllm_service_guard": "vllm_guard"},
    "sglang": {"sglang_service_guard": "sglang_guard"},
}
_HEADER = "# Managed by Ansible (llmstack.inference.{engine}); local changes are overwritten.\n"


class _Instance:
    """Typed reads of one raw entry, each error naming the entry and the fix."""

    def __init__(self, engine: str, index: int, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.where = f"{engine}_instances[{index}]" + (f" ({raw['name']})" if raw.get("name") else "")

    def fail(self, message: str) -> AnsibleFilterError:
        return AnsibleFilterError(f"{self.where}: {message}")

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key)
        if value is None:
            old = next((o for o, n in RENAMED_KEYS.items() if n == key and self.raw.get(o) is not None), None)
            value = self.raw.get(old) if old else None
        return default if value is None else value

    def int(self, key: str, default: Any = None, low: int = 0, high: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or value is None:
            raise self.fail(f"{key} must be a whole number (got {value!r})")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise self.fail(f"{key} must be a whole number (got {value!r})") from None
        if number < low or (high is not None and number > high):
            raise self.fail(f"{key} must be within {low}-{high if high is not None else 'inf'} (got {number})")
        return number

    def float(self, key: str, default: float) -> float:
        value = self.get(key, default)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise self.fail(f"{key} must be a number (got {value!r})") from None

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false (got {value!r})")
        return value

    def str(self, key: str, default: str = "") -> str:
        value = self.get(key, default)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise self.fail(f"{key} must be a string (got {value!r})")
        return str(value)


def _env_file(engine: str, env: Mapping[str, Any]) -> str:
    """systemd EnvironmentFile: double quotes keep spaces, backslashes and quotes literal."""
    lines = [_HEADER.format(engine=engine)]
    for key in sorted(env):
        value = str(env[key]).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{key}="{value}"\n')
    return "".join(lines)


def _yaml_file(engine: str, title: str, args: Mapping[str, Any]) -> str:
    # AnsibleDumper (as to_nice_yaml): the values are Ansible's tagged strings, which safe_dump refuses.
    body = yaml.dump(dict(args), Dumper=AnsibleDumper, default_flow_style=False, sort_keys=False, indent=2, width=1000)
    note = f"# {title} reads this through --config: each key is a long option, true is a bare flag.\n"
    return _HEADER.format(engine=engine) + note + body


def _llamacpp(inst: _Instance, base: dict[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    model = base["model"]
    is_url = bool(re.match(r"^https?://", model))
    if not (is_url or model.startswith("/")):
        raise inst.fail(f"model {model!r} must be an absolute path on the host or an http(s) URL")
    checksum = inst.str("model_checksum")
    if is_url and not re.match(r"^(sha256|sha512):[0-9a-fA-F]+$", checksum):
        raise inst.fail("a model URL needs model_checksum: sha256:<hex> (or sha512:<hex>)")
    basename = model.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    model_path = f"{s['models_dir'].rstrip('/')}/{basename}" if is_url else model
    impl = inst.str("server_impl", s["server_impl"])
    if impl not in ("python", "binary"):
        raise inst.fail(f"server_impl must be python or binary (got {impl!r})")
    extra = inst.get("extra_args", [])
    if not isinstance(extra, list):
        raise inst.fail("extra_args must be a list of words for llamacpp, e.g. [--parallel, '2']")
    extra = [str(word) for word in extra]
    ctx = inst.int("ctx_size", s["ctx_size"], low=1)
    threads = inst.get("threads")
    if impl == "binary":
        flags = ("--alias", "--ctx-size", "--threads")
        command = s["binary_path"]
    else:
        flags = ("--model_alias", "--n_ctx", "--n_threads")
        command = f"{s['venv']}/bin/python -m llama_cpp.server"
    args = ["--model", model_path, flags[0], base["served_model_name"], "--host", base["host"],
            "--port", str(base["port"]), flags[1], str(ctx)]
    if threads is not None:
        args += [flags[2], str(inst.int("threads", low=1))]
    args += extra
    spaced = [word for word in args if re.search(r"\s", word)]
    if spaced:
        raise inst.fail(f"model, served_model_name and extra_args may not contain whitespace ({spaced}): "
                        "give each word as its own list item")
    model_dir = model_path.rsplit("/", 1)[0] or "/"
    env = {}
    if base["api_key"]:
        # API_KEY: llama-cpp-python's server; LLAMA_API_KEY: llama-server.
        env.update(API_KEY=base["api_key"], LLAMA_API_KEY=base["api_key"])
    return {
        "impl": impl,
        "model_url": model if is_url else "",
        "model_checksum": checksum,
        "model_path": model_path,
        "model_dirs": [model_dir],
        "args_content": _HEADER.format(engine="llamacpp")
        + f"# {base['unit']} ({impl} server); the unit splits LLAMACPP_ARGS at whitespace.\n"
        + f"LLAMACPP_ARGS={' '.join(args)}\n",
        "env": env,
        "dropin_content": _HEADER.format(engine="llamacpp")
        + f"[Unit]\nRequiresMountsFor={model_dir}\n\n[Service]\nExecStart=\nExecStart={command} $LLAMACPP_ARGS\n",
    }


def _hf_env(base: dict[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    env = {"HOME": s["state_dir"], "XDG_CACHE_HOME": f"{s['state_dir']}/cache", "HF_HOME": s["hf_home"],
           "DO_NOT_TRACK": "1"}
    if base["model"].startswith("/"):
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _dict_args(inst: _Instance) -> dict[str, Any]:
    extra = inst.get("extra_args", {})
    if not isinstance(extra, Mapping):
        raise inst.fail("extra_args must be a dict of long options (without --), e.g. {enable-metrics: true}")
    return dict(extra)


def _vllm(inst: _Instance, base: dict[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"model": base["model"], "host": base["host"], "port": base["port"],
                            "served-model-name": base["served_model_name"],
                            "tensor-parallel-size": inst.int("tensor_parallel_size", 1, low=1)}
    if inst.int("max_model_len", 0) > 0:
        args["max-model-len"] = inst.int("max_model_len", 0)
    memory = inst.float("gpu_memory_utilization", 0)
    if s["variant"] == "cuda" and memory > 0:
        args["gpu-memory-utilization"] = memory
    if inst.bool("enforce_eager", False):
        args["enforce-eager"] = True
    if inst.str("dtype"):
        args["dtype"] = inst.str("dtype")
    args.update(_dict_args(inst))
    env = _hf_env(base, s)
    env["VLLM_NO_USAGE_STATS"] = "1"
    if s["variant"] == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(s["cpu_kvcache_space_gib"])
    if base["api_key"]:
        env["VLLM_API_KEY"] = base["api_key"]
    return {"args_content": _yaml_file("vllm", "vLLM", args), "env": env,
            "model_dirs": [base["model"]] if base["model"].startswith("/") else []}


def _sglang(inst: _Instance, base: dict[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    # Defaults from the Blackwell runbook.
    args: dict[str, Any] = {
        "model-path": base["model"], "host": base["host"], "port": base["port"],
        "served-model-name": base["served_model_name"], "tp-size": inst.int("tp_size", 1, low=1),
        "mem-fraction-static": inst.float("mem_fraction_static", 0.88),
        "chunked-prefill-size": inst.int("chunked_prefill_size", 8192, low=1),
        "attention-backend": inst.str("attention_backend", "triton"),
    }
    if inst.int("context_length", 0) > 0:
        args["context-length"] = inst.int("context_length", 0)
    if base["api_key"]:
        # SGLang takes its key only as an option: this file is the secret one (0600, service user).
        args["api-key"] = base["api_key"]
    args.update(_dict_args(inst))
    env = _hf_env(base, s)
    env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    return {"args_content": _yaml_file("sglang", "SGLang", args), "env": env,
            "model_dirs": [base["model"]] if base["model"].startswith("/") else []}


_ENGINE_KEYS: dict[str, tuple[set[str], Callable[..., dict[str, Any]]]] = {
    "llamacpp": ({"ctx_size", "threads", "server_impl", "model_checksum"}, _llamacpp),
    "vllm": ({"max_model_len", "gpu_memory_utilization", "enforce_eager", "tensor_parallel_size", "dtype"}, _vllm),
    "sglang": ({"context_length", "mem_fraction_static", "chunked_prefill_size", "attention_backend", "tp_size"},
               _sglang),
}
_SETTINGS = {
    "llamacpp": ("models_dir", "server_impl", "ctx_size", "binary_path", "venv"),
    "vllm": ("state_dir", "hf_home", "variant", "cpu_kvcache_space_gib"),
    "sglang": ("state_dir", "hf_home"),
}


def _one(engine: str, index: int, raw: Any, s: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise AnsibleFilterError(f"{engine}_instances[{index}] must be a dict with at least name, model and port")
    inst = _Instance(engine, index, raw)
    own, build = _ENGINE_KEYS[engine]
    unknown = sorted(set(raw) - COMMON_KEYS - ROUTER_KEYS - set(RENAMED_KEYS) - own)
    if unknown:
        raise inst.fail(f"unknown key(s) {', '.join(unknown)}; an instance takes "
                        f"{', '.join(sorted(COMMON_KEYS | own))} (see the {engine} role's meta/argument_specs.yml)")
    name = inst.str("name")
    if not _NAME.match(name):
        raise inst.fail(f"name {name!r} must be 1-64 letters, digits, - and _ (it names the unit {engine}@<name>)")
    model = inst.str("model")
    if not model:
        raise inst.fail("model is required (a path on the host, a Hugging Face id, or for llamacpp a URL)")
    state = inst.str("state", "started")
    if state not in STATES:
        raise inst.fail(f"state must be one of {', '.join(STATES)} (got {state!r})")
    try:
        devices = parse_devices(inst.get("devices", s.get("devices")))
    except DeviceError as exc:
        raise inst.fail(f"devices: {exc}") from None
    api_key = inst.str("api_key", s.get("api_key") or "")
    if api_key and (_PLACEHOLDER.match(api_key) or not _KEY.match(api_key)):
        # Never echo the key itself.
        raise inst.fail("api_key is a placeholder or not at least 16 characters of [A-Za-z0-9._~+/=-]: put a real "
                        "key into Vault (e.g. `openssl rand -hex 24`)")
    if s.get("require_api_key") and not api_key:
        raise inst.fail(f"needs an api_key: set {engine}_api_key or the instance's api_key from Vault, or set "
                        f"{engine}_require_api_key: false for localhost-only instances behind an authenticating router")
    host = inst.str("host", s.get("listen_host") or "127.0.0.1")
    base = {
        "name": name,
        "unit": f"{engine}@{name}.service",
        "model": model,
        "served_model_name": inst.str("served_model_name", name),
        "port": inst.int("port", low=1, high=65535),
        "host": host,
        # A wildcard bind is reachable on loopback.
        "probe_host": "127.0.0.1" if host in _WILDCARD else host,
        "api_key": api_key,
        "state": state,
        "enabled": inst.bool("enabled", state == "started"),
        "devices": devices,
    }
    user_env = inst.get("env", {})
    if not isinstance(user_env, Mapping) or any(not _ENV_NAME.match(str(k)) for k in user_env):
        raise inst.fail("env must be a dict of environment variable names ([A-Za-z_][A-Za-z0-9_]*) to values")
    built = {"dropin_content": "", **build(inst, base, s)}
    env = built.pop("env")
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(devices)
    env.update({str(k): v for k, v in user_env.items()})
    out = {**base, **built, "env_content": _env_file(engine, env)}
    out["guard"] = {"unit": out["unit"], "ports": [out["port"]], "gpus": devices, "model_dirs": out["model_dirs"]}
    return out


def engine_instances(instances: Any, engine: str, settings: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Validate ``<engine>_instances`` and return each instance with every default filled in and its files built."""
    if engine not in ENGINES:
        raise AnsibleFilterError(f"engine_instances: engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    s = dict(settings or {})
    missing = [key for key in _SETTINGS[engine] if key not in s]
    if missing:
        raise AnsibleFilterError(f"engine_instances({engine}): settings lack {', '.join(missing)}")
    if instances is None:
        instances = []
    if not isinstance(instances, list):
        raise AnsibleFilterError(f"{engine}_instances must be a list of dicts (got {type(instances).__name__})")
    out = [_one(engine, index, raw, s) for index, raw in enumerate(instances)]
    names = [i["name"] for i in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AnsibleFilterError(f"{engine}_instances: names must be unique ({', '.join(twice)} twice)")
    # on_demand instances take turns on one port (the router swaps them), but never a started one's.
    started = [i["port"] for i in out if i["state"] == "started"]
    on_demand = {i["port"] for i in out if i["state"] == "on_demand"}
    clash = sorted({p for p in started if started.count(p) > 1} | (set(started) & on_demand))
    if clash:
        raise AnsibleFilterError(f"{engine}_instances: port(s) {clash} are used twice; ports are unique among started "
                                 "instances (on_demand instances may share one port with each other only)")
    return out


def engine_deprecations(varnames: Any, engine: str, instances: Any = None) -> list[str]:
    """Messages for the previous release's names still in use (each is also shown as a warning)."""
    messages = [
        f"deprecated: use {new} instead of {old} (the old name is removed in the next release)"
        for old, new in RENAMED_VARS.get(engine, {}).items()
        if old in (varnames or [])
    ]
    for index, raw in enumerate(instances or []):
        if isinstance(raw, Mapping):
            messages += [
                f"deprecated: use {new} instead of {old} in {engine}_instances[{index}] ({raw.get('name', '?')}) "
                "(the old key is removed in the next release)"
                for old, new in RENAMED_KEYS.items()
                if old in raw
            ]
    display = Display()
    for message in messages:
        display.warning(message)
    return messages


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"engine_instances": engine_instances, "engine_deprecations": engine_deprecations}
