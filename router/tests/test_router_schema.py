"""config.schema.json against config.py, both ways, and against the Ansible filter's output.

- every key config.py reads is in the schema and every schema key is read by config.py;
- each key has the same required-ness, default and type (null included) in both;
- example configs are accepted or refused by both alike;
- what ``router_config`` (plugins/filter/router_backends.py) renders for a sample host is valid.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from llmstack_router import config as cfg
from llmstack_router.config import ConfigError, parse_config
from router_helpers import ADMIN_KEY, API_KEY

SCHEMA = json.loads(resources.files("llmstack_router").joinpath("config.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
REPO = Path(__file__).resolve().parents[2]

# Every key config.py knows, set (two backends: one unit, one spawned command, plus TabbyAPI).
FULL: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 8002},
    "auth": {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY], "allow_unauthenticated": False,
             "metrics_require_key": True},
    "groups": {"gpu0": {"gpus": [0], "queue_size": 8, "min_residency_s": 1.0, "idle_ttl_s": 0.0, "vram_mib": 80000,
                        "vram_release_timeout_s": 5.0, "vram_release_slack_mib": 256}},
    "backends": {
        "tabby": {"engine": "tabbyapi", "group": "gpu0", "url": "http://127.0.0.1:5000", "unit": "tabbyapi.service",
                  "models": [{"id": "big", "served_name": "4.0bpw", "aliases": ["b"], "vram_mib": 60000,
                              "load": {"model_name": "exl3/Big/4.0bpw", "max_seq_len": 4096,
                                       "draft_model": {"draft_model_name": "exl3/Small/4.0bpw"}}},
                             {"id": "small"}],
                  "co_reside": False, "ready_timeout_s": 10.0, "stop_timeout_s": 5.0, "request_timeout_s": 60.0,
                  "api_keys": ["tabby-api-key-0123456789"], "admin_keys": ["tabby-admin-key-0123456789"],
                  "state_file": "/tmp/router-state/tabby.json"},
        "llama": {"engine": "llamacpp", "group": "gpu0", "url": "http://127.0.0.1:8081",
                  "command": ["llama-server", "--port", 8081], "cwd": "/tmp", "env": {"A": "1"},
                  "models": [{"id": "smol", "max_in_flight": 4}]},
    },
    "vram_probe": "none",
    "log_level": "INFO",
    "systemctl": ["systemctl"],
    "journalctl": ["journalctl"],
    "max_body_bytes": 4096,
    "limits": {"max_connections": 256, "header_read_timeout_s": 5.0, "body_read_timeout_s": 5.0,
               "client_write_timeout_s": 5.0, "upstream_total_timeout_s": 60.0},
    "loading_progress_interval_s": 1.0,
    "ready_poll_first_s": 0.002,
    "ready_poll_interval_s": 0.05,
}
MINIMAL: dict[str, Any] = {
    "auth": {"api_keys": [API_KEY]},
    "groups": {"gpu0": {}},
    "backends": {"llama": {"engine": "llamacpp", "group": "gpu0", "url": "http://127.0.0.1:8081",
                           "unit": "llamacpp@smol.service", "models": [{"id": "smol"}]}},
}
# config.py's reader paths -> the schema node describing that mapping.
NODES = [
    (re.compile(r"^$"), SCHEMA),
    (re.compile(r"^listen$"), SCHEMA["properties"]["listen"]),
    (re.compile(r"^auth$"), SCHEMA["properties"]["auth"]),
    (re.compile(r"^limits$"), SCHEMA["properties"]["limits"]),
    (re.compile(r"^groups\.[^.]+$"), SCHEMA["$defs"]["group"]),
    (re.compile(r"^backends\.[^.]+$"), SCHEMA["$defs"]["backend"]),
    (re.compile(r"^backends\.[^.]+\.models\[\d+\]$"), SCHEMA["$defs"]["model"]),
]
# Where a mapping's values land when config.py parsed them: node -> (example path, parsed object).
PARSED = {
    "": ("", lambda c: c),
    "listen": ("listen", lambda c: c),
    "auth": ("auth", lambda c: c.auth),
    "limits": ("limits", lambda c: c.limits),
    "group": ("groups.gpu0", lambda c: c.groups["gpu0"]),
    "backend": ("backends.llama", lambda c: c.backends["llama"]),
    "model": ("backends.llama.models.0", lambda c: c.backends["llama"].models[0]),
}


def node_for(path: str) -> dict[str, Any]:
    for pattern, node in NODES:
        if pattern.match(path):
            return node
    raise AssertionError(f"config.py reads a mapping at {path!r} that the schema does not describe")


def schema_accepts(config: Any) -> bool:
    return VALIDATOR.is_valid(config)


def config_accepts(config: Any) -> bool:
    try:
        parse_config(config)
    except ConfigError:
        return False
    return True


def at(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for key in filter(None, path.split(".")):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def leaves() -> list[tuple[str, str, dict[str, Any]]]:
    """(node name, key, property schema) for every key the schema names."""
    named = {"": SCHEMA, "listen": SCHEMA["properties"]["listen"], "auth": SCHEMA["properties"]["auth"],
             "limits": SCHEMA["properties"]["limits"],
             **{name: SCHEMA["$defs"][name] for name in ("group", "backend", "model")}}
    return [(node, key, prop) for node, schema in named.items() for key, prop in schema["properties"].items()]


def test_the_shipped_schema_is_a_valid_schema_and_full_and_minimal_configs_pass_both() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for config in (FULL, MINIMAL):
        VALIDATOR.validate(config)
        parse_config(config)


def test_every_key_config_py_reads_is_in_the_schema_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    read: dict[str, set[str]] = {}
    finish = cfg._Reader.finish

    def recording(self: cfg._Reader) -> None:
        read.setdefault(self.key, set()).update(self._seen)
        finish(self)

    monkeypatch.setattr(cfg._Reader, "finish", recording)
    parse_config(FULL)
    by_node: dict[int, set[str]] = {}
    for path, keys in read.items():
        by_node.setdefault(id(node_for(path)), set()).update(keys)
    for _pattern, node in NODES:
        assert by_node.get(id(node), set()) == set(node["properties"]), node["description"]
        assert node["additionalProperties"] is False or "$ref" in node["additionalProperties"]


def test_engines_and_name_patterns_are_config_pys() -> None:
    backend = SCHEMA["$defs"]["backend"]["properties"]
    assert backend["engine"]["enum"] == list(cfg.ENGINES)
    assert backend["unit"]["pattern"] == cfg._UNIT_RE.pattern
    assert backend["url"]["pattern"] == cfg._URL_RE.pattern
    assert SCHEMA["$defs"]["model"]["properties"]["id"]["pattern"] == cfg._NAME_RE.pattern
    assert SCHEMA["properties"]["groups"]["propertyNames"]["pattern"] == cfg._NAME_RE.pattern
    one_model, tabby_only = SCHEMA["$defs"]["backend"]["allOf"][1:]
    assert one_model["if"]["properties"]["engine"]["enum"] == [
        kind for kind, engine in cfg.ENGINES.items() if not engine.serves_many_models]
    assert tabby_only["if"]["properties"]["engine"]["not"]["enum"] == [
        kind for kind, engine in cfg.ENGINES.items() if "state_file" in engine.config_keys]
    assert [kind for kind, engine in cfg.ENGINES.items() if "load" in engine.model_keys] == ["tabbyapi"]


@pytest.mark.parametrize(("node", "key", "prop"), leaves(), ids=[f"{n or 'top'}.{k}" for n, k, _p in leaves()])
def test_required_ness_agrees(node: str, key: str, prop: dict[str, Any]) -> None:
    schema_node = SCHEMA if node == "" else SCHEMA["properties"].get(node) or SCHEMA["$defs"][node]
    required = key in schema_node.get("required", [])
    config = copy.deepcopy(FULL if node in ("", "group", "auth", "listen", "limits") else MINIMAL)
    where = PARSED[node][0]
    if node == "model":
        where = "backends.llama.models.0"
    if node == "backend":
        where = "backends.llama"
    parent = at(config, where)
    if key == "command":  # a unit backend has no command; remove it from the spawned one instead
        config, parent = copy.deepcopy(FULL), at(FULL, "backends.llama")
        parent = at(config, "backends.llama")
        for dependent in ("cwd", "env"):
            parent.pop(dependent)
    parent.pop(key, None)
    if key == "api_keys" and node == "auth":
        config["auth"]["allow_unauthenticated"] = True  # the one way an API key is optional
    assert schema_accepts(config) is not required
    assert config_accepts(config) is not required


@pytest.mark.parametrize(("node", "key", "prop"), [leaf for leaf in leaves() if "default" in leaf[2]],
                         ids=[f"{n or 'top'}.{k}" for n, k, p in leaves() if "default" in p])
def test_defaults_agree(node: str, key: str, prop: dict[str, Any]) -> None:
    where, parsed = PARSED[node]
    config = copy.deepcopy(MINIMAL)
    config["listen"] = {}
    config["limits"] = {}
    at(config, where).pop(key, None)
    if node == "auth" and key == "api_keys":
        config["auth"]["allow_unauthenticated"] = True
    value = getattr(parsed(parse_config(config)), key)
    value = list(value) if isinstance(value, tuple) else value
    assert value == prop["default"], f"{where}.{key}: config.py {value!r}, schema {prop['default']!r}"


def test_every_dataclass_default_is_in_the_schema() -> None:
    """The other way round: a default config.py has (a dataclass field's) is documented in the schema."""
    documented = {(node, key) for node, key, prop in leaves() if "default" in prop}
    for node, spec in (("group", cfg.GroupSpec), ("backend", cfg.BackendSpec), ("auth", cfg.AuthSpec),
                       ("limits", cfg.LimitsSpec),
                       ("", cfg.RouterConfig), ("model", cfg.ModelSpec)):
        for f in dataclasses.fields(spec):
            if f.default is dataclasses.MISSING or f.name in ("api_key", "admin_key", "state_file", "load", "control"):
                continue  # secrets default to none; state_file and load: per engine (own tests); control: unit/command
            where = "listen" if f.name in ("host", "port") else node
            assert (where, f.name) in documented, f"{spec.__name__}.{f.name} has a default the schema lacks"


WRONG = {"number": "soon", "integer": "many", "boolean": "yes", "string": 7, "array": "a,b", "object": "x=1"}


@pytest.mark.parametrize(("node", "key", "prop"), leaves(), ids=[f"{n or 'top'}.{k}" for n, k, _p in leaves()])
def test_types_agree_including_null(node: str, key: str, prop: dict[str, Any]) -> None:
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    wrong = WRONG[types[0]]
    base = FULL if node != "model" else MINIMAL
    where = {"": "", "listen": "listen", "auth": "auth", "limits": "limits", "group": "groups.gpu0",
             "model": "backends.llama.models.0",
             "backend": "backends.tabby" if key in ("unit", "state_file", "api_keys", "admin_keys")
             else "backends.llama"}[node]
    for value, expect in ((wrong, False), (None, "null" in types)):
        config = copy.deepcopy(base)
        at(config, where)[key] = value
        if node == "backend" and key == "command" and value is None:
            for dependent in ("cwd", "env"):
                at(config, where).pop(dependent)
        assert schema_accepts(config) is expect, f"schema, {where}.{key} = {value!r}"
        assert config_accepts(config) is expect, f"config.py, {where}.{key} = {value!r}"


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    config = copy.deepcopy(MINIMAL if base is None else base)
    parent_path, _dot, key = path.rpartition(".")
    parent = at(config, parent_path)
    if value is _DROP:
        parent.pop(key)
    else:
        parent[key] = value
    return config


_DROP = object()
EXAMPLES = [
    ("minimal", MINIMAL, True),
    ("full", FULL, True),
    ("unknown top key", _with("colour", "red"), False),
    ("unknown group key", _with("groups.gpu0.colour", 1), False),
    ("unknown model key", _with("backends.llama.models.0.colour", 1), False),
    ("no auth", _with("auth", _DROP), False),
    ("empty api_keys", _with("auth.api_keys", []), False),
    ("short api key", _with("auth.api_keys", ["short"]), False),
    ("unauthenticated", _with("auth", {"allow_unauthenticated": True}), True),
    ("engine unknown", _with("backends.llama.engine", "tgi"), False),
    ("url without scheme", _with("backends.llama.url", "127.0.0.1:8081"), False),
    ("url https with path", _with("backends.llama.url", "https://h.example:8443/base"), True),
    ("unit not a unit", _with("backends.llama.unit", "llama"), False),
    ("unit and command", _with("backends.llama.command", ["x"]), False),
    ("command as a string", _with("backends.llama", {**MINIMAL["backends"]["llama"], "unit": None,
                                                     "command": "llama-server --port 1"}), False),
    ("command with a bool", _with("backends.llama", {**MINIMAL["backends"]["llama"], "unit": None,
                                                     "command": ["x", True]}), False),
    ("cwd without command", _with("backends.llama.cwd", "/tmp"), False),
    ("external backend (no unit, no command)", _with("backends.llama.unit", _DROP), True),
    ("two models on llamacpp", _with("backends.llama.models", [{"id": "a"}, {"id": "b"}]), False),
    ("two models on ollama", _with("backends.llama", {**MINIMAL["backends"]["llama"], "engine": "ollama",
                                                      "models": [{"id": "a"}, {"id": "b"}]}), True),
    ("no models", _with("backends.llama.models", []), False),
    ("model id with a slash start", _with("backends.llama.models.0.id", "/etc"), False),
    ("model id hf style", _with("backends.llama.models.0.id", "org/model-7b:q4"), True),
    ("alias bad", _with("backends.llama.models.0.aliases", ["../x"]), False),
    ("vram_mib 0", _with("backends.llama.models.0.vram_mib", 0), False),
    ("state_file on llamacpp", _with("backends.llama.state_file", "/x.json"), False),
    ("state_file null on llamacpp", _with("backends.llama.state_file", None), True),
    ("state_file relative", _with("backends.tabby.state_file", "tabby.json", FULL), False),
    ("tabby_config is gone", _with("backends.tabby.tabby_config", "/x.yml", FULL), False),
    ("load on a llamacpp model", _with("backends.llama.models.0.load", {"model_name": "x"}), False),
    ("load null on a llamacpp model", _with("backends.llama.models.0.load", None), True),
    ("load without model_name", _with("backends.tabby.models.1.load", {"max_seq_len": 4096}, FULL), False),
    ("load model_name empty", _with("backends.tabby.models.1.load", {"model_name": ""}, FULL), False),
    ("load model_name absolute", _with("backends.tabby.models.1.load", {"model_name": "/models/x"}, FULL), False),
    ("load model_name with ..", _with("backends.tabby.models.1.load", {"model_name": "a/../../x"}, FULL), False),
    ("load model_name nested", _with("backends.tabby.models.1.load", {"model_name": "exl3/A/4.0bpw"}, FULL), True),
    ("load a list", _with("backends.tabby.models.1.load", ["x"], FULL), False),
    ("port 0", _with("listen", {"port": 0}), False),
    ("port 65536", _with("listen", {"port": 65536}), False),
    ("port 65535", _with("listen", {"port": 65535}), True),
    ("group name bad", _with("groups", {"gpu 0": {}}), False),
    ("group null", _with("groups.gpu0", None), True),
    ("no groups", _with("groups", {}), False),
    ("gpus negative", _with("groups.gpu0.gpus", [-1]), False),
    ("gpus bool", _with("groups.gpu0.gpus", [True]), False),
    ("queue_size 0", _with("groups.gpu0.queue_size", 0), False),
    ("min_residency negative", _with("groups.gpu0.min_residency_s", -1), False),
    ("drain_timeout 0", _with("groups.gpu0.drain_timeout_s", 0), False),
    ("drain_timeout 2.5", _with("groups.gpu0.drain_timeout_s", 2.5), True),
    ("queue_max_wait 0", _with("groups.gpu0.queue_max_wait_s", 0), False),
    ("queue_max_wait string", _with("groups.gpu0.queue_max_wait_s", "10"), False),
    ("ready_timeout below 0.1", _with("backends.llama.ready_timeout_s", 0.05), False),
    ("request_timeout below 1", _with("backends.llama.request_timeout_s", 0.5), False),
    ("max_body_bytes small", _with("max_body_bytes", 100), False),
    ("ready_poll tiny", _with("ready_poll_interval_s", 0.001), False),
    ("ready_poll_first tiny", _with("ready_poll_first_s", 0.0001), False),
    ("vram_probe bad", _with("vram_probe", "nvml"), False),
    ("log_level lower case", _with("log_level", "debug"), True),
    ("log_level bad", _with("log_level", "TRACE"), False),
    ("systemctl empty list", _with("systemctl", []), True),
    ("systemctl string", _with("systemctl", "systemctl"), False),
    ("backend key too short", _with("backends.llama.api_keys", ["short"]), False),
    ("limits null", _with("limits", None), True),
    ("unknown limits key", _with("limits", {"max_conns": 10}), False),
    ("max_connections below 16", _with("limits", {"max_connections": 8}), False),
    ("client_write_timeout 0", _with("limits", {"client_write_timeout_s": 0}), False),
    ("max_in_flight 0", _with("backends.llama.models.0.max_in_flight", 0), False),
    ("max_in_flight null", _with("backends.llama.models.0.max_in_flight", None), True),
    ("not a mapping", ["groups"], False),
]


@pytest.mark.parametrize(("config", "valid"), [(c, v) for _n, c, v in EXAMPLES], ids=[n for n, _c, _v in EXAMPLES])
def test_examples_agree(config: Any, valid: bool) -> None:
    assert schema_accepts(config) is valid
    assert config_accepts(config) is valid


def _filter_module() -> Any:
    # The filter imports the collection's module_utils by their collection path, so it is imported the same
    # way, through the .collections/ansible_collections/llmstack/inference link that `make venv` makes.
    collections = REPO / ".collections"
    assert (collections / "ansible_collections" / "llmstack" / "inference").exists(), (
        f"{collections}/ansible_collections/llmstack/inference is missing: run `make venv`"
    )
    if str(collections) not in sys.path:
        sys.path.insert(0, str(collections))
    return importlib.import_module("ansible_collections.llmstack.inference.plugins.filter.router_backends")


def test_the_ansible_filter_renders_a_config_the_schema_accepts() -> None:
    pytest.importorskip("ansible")
    rb = _filter_module()
    hostvars = {
        "llamacpp_instances": [{"name": "smol", "port": 8081, "alias": "smollm2", "cuda_visible_devices": "0"}],
        "llamacpp_api_key": "llamacpp-key-0123456789",
        "vllm_instances": [{"name": "qwen", "port": 8000, "served_model_name": "qwen2.5-7b",
                            "cuda_visible_devices": "0", "api_key": "vllm-key-0123456789"}],
        "sglang_instances": [{"name": "old", "port": 30000, "state": "stopped"}],
        "tabbyapi_model_name": "Big-exl2", "tabbyapi_port": 5000, "tabbyapi_cuda_visible_devices": "1",
        "tabbyapi_api_key": "tabby-key-0123456789", "tabbyapi_admin_key": "tabby-admin-0123456789",
        "ollama_models": ["llama3.2:1b", "qwen2.5:0.5b"],
    }
    backends = rb.router_backends(hostvars, "gpu0", {"vllm-qwen": {"ready_timeout_s": 900, "vram_mib": 70000},
                                                     "ollama": {"co_reside": True}})
    top = {"log_level": "INFO", "vram_probe": "nvidia-smi", "systemctl": ["/usr/bin/systemctl"],
           "journalctl": ["/usr/bin/journalctl"], "max_body_bytes": 8388608,
           "auth": {"api_keys_file": "/etc/llmstack/router/api_keys",
                    "admin_keys_file": "/etc/llmstack/router/admin_keys", "metrics_require_key": True}}
    rendered = rb.router_config(backends, "/etc/llmstack/router", {"host": "127.0.0.1", "port": 8002},
                                {"gpu0": {"min_residency_s": 30, "queue_size": 16}}, top)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(rendered)]
    assert errors == []
    assert set(rendered["backends"]) == {"llamacpp-smol", "vllm-qwen", "tabbyapi", "ollama"}
