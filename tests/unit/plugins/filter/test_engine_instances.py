# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one instance schema of the llamacpp, vllm and sglang roles, and the argv/env each engine gets."""

from __future__ import annotations

import pytest
import yaml
from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.filter.engine_instances import (
    FilterModule,
    engine_deprecations,
    engine_instances,
)
from ansible_collections.llmstack.inference.plugins.module_utils._devices import (
    DeviceError,
    gpu_group,
    parse_devices,
)

KEY = "sk-test-key-0123456789"
UUID = "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789"
MIG = "MIG-0a1b2c3d-4e5f-6789-abcd-ef0123456789"
SETTINGS = {
    "llamacpp": {"listen_host": "127.0.0.1", "api_key": KEY, "require_api_key": True, "models_dir": "/var/lib/m",
                 "server_impl": "python", "ctx_size": 2048, "binary_path": "/opt/l/bin/llama-server",
                 "venv": "/opt/l/venv"},
    "vllm": {"listen_host": "127.0.0.1", "api_key": "", "require_api_key": True, "state_dir": "/var/lib/v",
             "hf_home": "/var/lib/v/hf", "variant": "cuda", "cpu_kvcache_space_gib": 4},
    "sglang": {"listen_host": "127.0.0.1", "api_key": "", "require_api_key": True, "state_dir": "/var/lib/s",
               "hf_home": "/var/lib/s/hf", "devices": ["0"]},
}


def one(engine: str, settings: dict | None = None, **instance):
    entry = {"name": "a", "model": "/mnt/models/a", "port": 8000, "api_key": KEY, **instance}
    return engine_instances([entry], engine, {**SETTINGS[engine], **(settings or {})})[0]


def env_of(content: str) -> dict[str, str]:
    lines = [line for line in content.splitlines() if line and not line.startswith("#")]
    return {k: v.strip('"') for k, _sep, v in (line.partition("=") for line in lines)}


def args_of(content: str) -> dict:
    return yaml.safe_load(content)


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (None, []),
        ("", []),
        ([], []),
        (0, ["0"]),
        ("0", ["0"]),
        ("0, 1", ["0", "1"]),
        ([0, "1"], ["0", "1"]),
        (UUID, [UUID]),
        (f"{UUID},{MIG}", [UUID, MIG]),
        ([MIG], [MIG]),
    ],
)
def test_devices_are_indexes_or_uuids(value, tokens):
    assert parse_devices(value) == tokens


@pytest.mark.parametrize(("value", "message"), [
    ("gpu0", "neither a GPU index"),
    ("0,0", "twice"),
    (True, "not a device list"),
    ({"gpu": 0}, "not a device list"),
    ([1.5], "neither an index nor a UUID"),
])
def test_bad_devices_name_the_fix(value, message):
    with pytest.raises(DeviceError, match=message):
        parse_devices(value)


@pytest.mark.parametrize(("tokens", "group"), [
    (["0"], ("gpu0", [0])),
    (["0", "1"], ("gpu0-1", [0, 1])),
    ([UUID], None),
    ([], None),
])
def test_only_indexes_make_a_gpu_group(tokens, group):
    assert gpu_group(tokens) == group


@pytest.mark.parametrize("engine", ["llamacpp", "vllm", "sglang"])
def test_the_common_keys_mean_the_same_in_every_engine(engine):
    inst = one(engine, host="0.0.0.0", served_model_name="served", devices=[UUID], env={"EXTRA": 'say "hi"'})
    assert inst["unit"] == f"{engine}@a.service"
    assert inst["probe_host"] == "127.0.0.1"
    assert (inst["state"], inst["enabled"], inst["served_model_name"]) == ("started", True, "served")
    env = env_of(inst["env_content"])
    assert env["CUDA_VISIBLE_DEVICES"] == UUID
    assert 'EXTRA="say \\"hi\\""' in inst["env_content"]
    assert inst["guard"] == {"unit": f"{engine}@a.service", "ports": [8000], "gpus": [UUID],
                             "model_dirs": ["/mnt/models"] if engine == "llamacpp" else ["/mnt/models/a"]}


@pytest.mark.parametrize(("engine", "flags"), [
    ("llamacpp", ["--model", "/mnt/models/a.gguf", "--model_alias", "a", "--host", "127.0.0.1", "--port", "8000",
                  "--n_ctx", "2048", "--n_threads", "2", "--parallel", "1"]),
])
def test_llamacpp_python_argv(engine, flags):
    inst = one(engine, model="/mnt/models/a.gguf", threads=2, extra_args=["--parallel", 1])
    assert inst["args_content"].splitlines()[-1] == "LLAMACPP_ARGS=" + " ".join(flags)
    assert "/opt/l/venv/bin/python -m llama_cpp.server $LLAMACPP_ARGS" in inst["dropin_content"]
    assert KEY not in inst["args_content"]
    assert env_of(inst["env_content"]) == {"API_KEY": KEY, "LLAMA_API_KEY": KEY}


def test_llamacpp_binary_argv_and_url_model():
    inst = one("llamacpp", server_impl="binary", model="https://hf.co/x/y.gguf?download=1",
               model_checksum="sha256:" + "a" * 64, served_model_name="y", ctx_size=512)
    assert inst["model_path"] == "/var/lib/m/y.gguf"
    assert inst["model_url"].startswith("https://")
    assert "--alias y" in inst["args_content"]
    assert "--ctx-size 512" in inst["args_content"]
    assert "--threads" not in inst["args_content"]
    assert "ExecStart=/opt/l/bin/llama-server $LLAMACPP_ARGS" in inst["dropin_content"]
    assert "RequiresMountsFor=/var/lib/m" in inst["dropin_content"]


def test_vllm_arguments_and_environment():
    inst = one("vllm", model="/mnt/models/tiny", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.9,
               extra_args={"max-num-seqs": 4})
    assert args_of(inst["args_content"]) == {
        "model": "/mnt/models/tiny", "host": "127.0.0.1", "port": 8000, "served-model-name": "a",
        "tensor-parallel-size": 1, "max-model-len": 512, "gpu-memory-utilization": 0.9, "enforce-eager": True,
        "max-num-seqs": 4,
    }
    env = env_of(inst["env_content"])
    assert env["VLLM_API_KEY"] == KEY
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env
    cpu = one("vllm", {"variant": "cpu"}, model="org/hub-model", gpu_memory_utilization=0.9)
    assert "gpu-memory-utilization" not in args_of(cpu["args_content"])
    assert env_of(cpu["env_content"])["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "HF_HUB_OFFLINE" not in env_of(cpu["env_content"])
    assert cpu["guard"]["model_dirs"] == []


def test_sglang_takes_its_key_as_an_option_and_pins_gpu0_by_default():
    inst = one("sglang", model="Qwen/Qwen2.5-0.5B-Instruct", context_length=4096)
    assert args_of(inst["args_content"]) == {
        "model-path": "Qwen/Qwen2.5-0.5B-Instruct", "host": "127.0.0.1", "port": 8000, "served-model-name": "a",
        "tp-size": 1, "mem-fraction-static": 0.88, "chunked-prefill-size": 8192, "attention-backend": "triton",
        "context-length": 4096, "api-key": KEY,
    }
    assert env_of(inst["env_content"])["CUDA_VISIBLE_DEVICES"] == "0"
    assert one("sglang", devices=[])["devices"] == []


@pytest.mark.parametrize(("old", "new", "value", "field", "expected"), [
    ("alias", "served_model_name", "smol", "served_model_name", "smol"),
    ("cuda_visible_devices", "devices", "1", "devices", ["1"]),
])
def test_old_instance_keys_still_work_and_are_reported(old, new, value, field, expected):
    engine = "llamacpp" if old == "alias" else "sglang"
    assert one(engine, **{old: value})[field] == expected
    messages = engine_deprecations([], engine, [{"name": "a", old: value}])
    assert messages == [f"deprecated: use {new} instead of {old} in {engine}_instances[0] (a) "
                        "(the old key is removed in the next release)"]


def test_old_role_variables_are_reported():
    names = ["llamacpp_bind_address", "llamacpp_service_guard", "llamacpp_instances"]
    tail = " (the old name is removed in the next release)"
    assert engine_deprecations(names, "llamacpp") == [
        "deprecated: use llamacpp_listen_host instead of llamacpp_bind_address" + tail,
        "deprecated: use llamacpp_guard instead of llamacpp_service_guard" + tail,
    ]
    assert engine_deprecations(["vllm_instances"], "vllm", [{"name": "a", "served_model_name": "x"}]) == []


def test_on_demand_instances_share_a_port_and_keep_their_boot_state_off():
    out = engine_instances(
        [{"name": "a", "model": "/m/a", "port": 9000, "state": "on_demand", "api_key": KEY},
         {"name": "b", "model": "/m/b", "port": 9000, "state": "on_demand", "api_key": KEY},
         {"name": "c", "model": "/m/c", "port": 9000, "state": "stopped", "api_key": KEY}],
        "vllm", SETTINGS["vllm"])
    assert [(i["state"], i["enabled"]) for i in out] == [("on_demand", False), ("on_demand", False), ("stopped", False)]


@pytest.mark.parametrize(("engine", "instances", "settings", "message"), [
    ("vllm", [{"model": "/m", "port": 1, "api_key": KEY}], {}, r"vllm_instances\[0\]: name '' must be"),
    ("vllm", [{"name": "a b", "model": "/m", "port": 1, "api_key": KEY}], {}, "name 'a b' must be"),
    ("vllm", [{"name": "a", "port": 1, "api_key": KEY}], {}, r"\(a\): model is required"),
    ("vllm", [{"name": "a", "model": "/m", "port": 70000, "api_key": KEY}], {}, "port must be within 1-65535"),
    ("vllm", [{"name": "a", "model": "/m", "port": "x", "api_key": KEY}], {}, "port must be a whole number"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1, "api_key": KEY, "state": "on"}], {}, "state must be one of"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1}], {}, "needs an api_key: set vllm_api_key"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1, "api_key": "changeme"}], {}, "placeholder"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1, "api_key": KEY, "devices": "gpu1"}], {}, "device 'gpu1'"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1, "api_key": KEY, "ctx_size": 1}], {}, "unknown key.*ctx_size"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1, "api_key": KEY, "extra_args": ["--x"]}], {}, "dict of long"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1, "api_key": KEY}] * 2, {}, "names must be unique"),
    ("vllm", [{"name": "a", "model": "/m", "port": 1, "api_key": KEY},
              {"name": "b", "model": "/m", "port": 1, "api_key": KEY, "state": "on_demand"}], {}, r"port\(s\) \[1\]"),
    ("vllm", {"name": "a"}, {}, "must be a list"),
    ("llamacpp", [{"name": "a", "model": "m.gguf", "port": 1}], {}, "absolute path on the host or an http"),
    ("llamacpp", [{"name": "a", "model": "https://x/m.gguf", "port": 1}], {}, "needs model_checksum"),
    ("llamacpp", [{"name": "a", "model": "/m", "port": 1, "extra_args": ["--a b"]}], {}, "may not contain whitespace"),
    ("llamacpp", [{"name": "a", "model": "/m", "port": 1, "server_impl": "rust"}], {}, "python or binary"),
    ("llamacpp", [{"name": "a", "model": "/m", "port": 1, "extra_args": {"a": 1}}], {}, "list of words"),
    ("llamacpp", [{"name": "a", "model": "/m", "port": 1}], {"api_key": "short"}, "at least 16 characters"),
])
def test_bad_instances_name_the_instance_and_the_fix(engine, instances, settings, message):
    with pytest.raises(AnsibleFilterError, match=message):
        engine_instances(instances, engine, {**SETTINGS[engine], **settings})


def test_keyless_instances_are_allowed_when_auth_is_not_required():
    inst = one("vllm", {"require_api_key": False}, api_key="")
    assert "VLLM_API_KEY" not in env_of(inst["env_content"])


def test_api_keys_never_appear_in_errors():
    with pytest.raises(AnsibleFilterError) as error:
        one("vllm", api_key="has a space in it 0123456789")
    assert "space" not in str(error.value)


def test_filters_are_registered():
    assert set(FilterModule().filters()) == {"engine_instances", "engine_deprecations"}


def test_tagged_inventory_strings_reach_the_argument_file():
    # Inventory values arrive as Ansible's tagged strings, which yaml.safe_dump refuses ("cannot represent").
    from ansible.template import trust_as_template

    inst = one("sglang", model=trust_as_template("/m/a"), extra_args={trust_as_template("enable-metrics"): True})
    assert args_of(inst["args_content"])["enable-metrics"] is True
