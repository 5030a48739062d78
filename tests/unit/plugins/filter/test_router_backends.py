# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.filter.litellm_model_list import backend_models
from ansible_collections.llmstack.inference.plugins.filter.router_backends import (
    FilterModule,
    router_backends,
    router_config,
    router_key_files,
)

NODE = {
    "llamacpp_instances": [
        {"name": "smollm", "port": 8081, "served_model_name": "smollm2-135m", "aliases": ["smollm"]},
        {"name": "old", "port": 8083, "state": "stopped"},
    ],
    "vllm_instances": [
        {"name": "qwen", "port": 8000, "served_model_name": "qwen-7b", "api_key": "sk-vllm-key-0123456789",
         "devices": [0, 1], "vram_mib": 30000},
    ],
    # cuda_visible_devices: the previous release's name of devices, still read.
    "sglang_instances": [{"name": "llama", "port": 30000, "cuda_visible_devices": "1"}],
    "tabbyapi_model_path": "/mnt/models/Monstral-123B-exl2/",
    "tabbyapi_admin_key": "tabby-admin-key-0123456789",
    "ollama_models": ["llama3.1:8b"],
}


def by_name(backends):
    return {b["name"]: b for b in backends}


def test_every_backend_role_becomes_a_backend_with_its_unit_and_port():
    backends = by_name(router_backends(NODE, "cpu"))
    assert sorted(backends) == ["llamacpp-smollm", "ollama", "sglang-llama", "tabbyapi", "vllm-qwen"]
    assert backends["llamacpp-smollm"]["unit"] == "llamacpp@smollm.service"
    assert backends["llamacpp-smollm"]["url"] == "http://127.0.0.1:8081"
    assert backends["vllm-qwen"]["unit"] == "vllm@qwen.service"
    assert backends["tabbyapi"]["unit"] == "tabbyapi.service"
    assert backends["ollama"]["url"] == "http://127.0.0.1:11434"


@pytest.mark.parametrize(
    ("backend", "group", "gpus"),
    [("llamacpp-smollm", "cpu", []), ("vllm-qwen", "gpu0-1", [0, 1]), ("sglang-llama", "gpu1", [1]),
     ("tabbyapi", "cpu", [])],
)
def test_group_comes_from_the_pinned_gpus_else_the_default(backend, group, gpus):
    chosen = by_name(router_backends(NODE, "cpu"))[backend]
    assert (chosen["group"], chosen["gpus"]) == (group, gpus)


def test_model_ids_match_what_the_gateway_lists_for_the_same_host():
    ids = sorted(m["id"] for b in router_backends(NODE) for m in b["models"])
    assert ids == sorted(m["name"] for m in backend_models(NODE))


def test_instance_fields_and_settings_feed_the_model():
    settings = {"llamacpp-smollm": {"group": "gpu0", "vram_mib": 400, "ready_timeout_s": 30}}
    backends = by_name(router_backends(NODE, "cpu", settings))
    smollm = backends["llamacpp-smollm"]
    assert smollm["group"] == "gpu0"
    assert smollm["ready_timeout_s"] == 30
    assert smollm["models"] == [{"id": "smollm2-135m", "served_name": "smollm2-135m", "aliases": ["smollm"],
                                 "vram_mib": 400}]
    assert backends["vllm-qwen"]["models"][0]["vram_mib"] == 30000


def test_max_in_flight_from_the_settings_reaches_the_model():
    backends = by_name(router_backends(NODE, "cpu", {"vllm-qwen": {"max_in_flight": 8}}))
    assert backends["vllm-qwen"]["models"][0]["max_in_flight"] == 8
    assert "max_in_flight" not in backends["llamacpp-smollm"]["models"][0]


@pytest.mark.parametrize(
    ("node", "settings", "message"),
    [
        ({"llamacpp_instances": [{"name": "a b", "port": 1}]}, {}, "llamacpp_instances[0].name"),
        ({"vllm_instances": [{"name": "a", "port": "x"}]}, {}, "vllm_instances[0].port"),
        ({"sglang_instances": ["a"]}, {}, "sglang_instances[0] must be a dict"),
        ({"llamacpp_instances": [{"name": "a", "port": 1}]}, {"llamacpp-b": {}}, "llamacpp-b"),
        ({"llamacpp_instances": [{"name": "a", "port": 1}]}, {"llamacpp-a": "gpu0"}, "must be a dict"),
    ],
)
def test_bad_input_names_the_variable(node, settings, message):
    with pytest.raises(AnsibleFilterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        router_backends(node, "gpu0", settings)


def test_config_references_keys_by_file_and_merges_group_settings():
    backends = router_backends(NODE, "cpu")
    config = router_config(backends, "/etc/llmstack/router/", {"host": "127.0.0.1", "port": 8002},
                           {"cpu": {"min_residency_s": 0}}, {"log_level": "INFO"})
    assert config["listen"] == {"host": "127.0.0.1", "port": 8002}
    assert config["log_level"] == "INFO"
    assert config["groups"]["cpu"] == {"gpus": [], "min_residency_s": 0}
    assert config["groups"]["gpu0-1"] == {"gpus": [0, 1]}
    assert config["backends"]["vllm-qwen"]["api_key_file"] == "/etc/llmstack/router/vllm-qwen.api_key"
    assert config["backends"]["tabbyapi"]["admin_key_file"] == "/etc/llmstack/router/tabbyapi.admin_key"
    assert "api_key_file" not in config["backends"]["llamacpp-smollm"]
    assert "sk-vllm-key" not in repr(config)
    files = router_key_files(backends, "/etc/llmstack/router")
    assert {f["path"]: f["key"] for f in files} == {
        "/etc/llmstack/router/tabbyapi.admin_key": "tabby-admin-key-0123456789",
        "/etc/llmstack/router/vllm-qwen.api_key": "sk-vllm-key-0123456789",
    }


@pytest.mark.parametrize(
    ("backends", "groups", "message"),
    [([], {}, "no backends"), (router_backends(NODE, "cpu"), {"gpu7": {}}, "gpu7")],
)
def test_config_errors_name_the_fix(backends, groups, message):
    with pytest.raises(AnsibleFilterError, match=message):
        router_config(backends, "/etc/llmstack/router", {"host": "127.0.0.1", "port": 8002}, groups)


def test_filters_are_registered():
    assert set(FilterModule().filters()) == {"router_backends", "router_config", "router_key_files"}


def test_llamacpp_alias_is_the_model_id_and_the_role_key_goes_upstream():
    node = {"llamacpp_api_key": "llamacpp-key-0123456789",
            "llamacpp_instances": [{"name": "smollm2", "port": 8080, "alias": "smollm2-135m-instruct",
                                    "state": "on_demand"}]}
    (backend,) = router_backends(node, "cpu")
    assert backend["models"][0]["id"] == "smollm2-135m-instruct"
    assert backend["api_key"] == "llamacpp-key-0123456789"


def test_gpu_uuids_are_devices_too_but_give_no_indexed_group():
    node = {"vllm_instances": [{"name": "q", "port": 8000, "devices": "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789"}]}
    backend = router_backends(node, "cpu")[0]
    # A UUID used to be parsed as nothing (or as GPU 0 by the roles); now it is a device without an index.
    assert (backend["group"], backend["gpus"]) == ("cpu", [])


def test_bad_devices_name_the_backend():
    with pytest.raises(AnsibleFilterError, match="vllm-q: device 'gpu0'"):
        router_backends({"vllm_instances": [{"name": "q", "port": 8000, "devices": "gpu0"}]})
