# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.filter.litellm_model_list import (
    FilterModule,
    litellm_model_list,
)

ROUTER_NODE = {
    "ansible_host": "198.51.100.10",
    "router_port": 8002,
    "router_listen_host": "0.0.0.0",
    "litellm_upstream_api_key": "sk-node-a",
    "vllm_instances": [{"name": "qwen", "port": 8000, "served_model_name": "qwen-7b", "api_key": "sk-v"}],
    "sglang_instances": [{"name": "llama", "port": 30000}],
    "tabbyapi_model_path": "/mnt/models/Monstral-123B-exl2/",
}
OLLAMA_NODE = {
    "ansible_host": "198.51.100.11",
    "ollama_listen_host": "0.0.0.0",
    "ollama_models": ["llama3.1:8b", "qwen2.5:14b"],
}


def names(entries):
    return [(e["model_name"], e["model_info"]["llmstack_host"]) for e in entries]


def test_router_host_exposes_every_backend_model_at_the_router():
    entries = litellm_model_list({"a": ROUTER_NODE}, ["a"], gateway="gw")
    assert names(entries) == [("Monstral-123B-exl2", "a"), ("llama", "a"), ("qwen-7b", "a")]
    for entry in entries:
        assert entry["litellm_params"]["api_base"] == "http://198.51.100.10:8002/v1"
        assert entry["litellm_params"]["api_key"] == "sk-node-a"
        assert entry["litellm_params"]["model"] == f"openai/{entry['model_name']}"
        assert entry["model_info"]["llmstack_swap_managed"] is True
        assert entry["model_info"]["disable_background_health_check"] is True
        assert entry["model_info"]["llmstack_backend"] == "router"


@pytest.mark.parametrize(
    ("instance", "expected"),
    [
        ({"name": "smollm2", "port": 8080, "alias": "smollm2-135m", "served_model_name": "smol"}, "smol"),
        ({"name": "smollm2", "port": 8080, "alias": "smollm2-135m"}, "smollm2-135m"),
        ({"name": "smollm2", "port": 8080}, "smollm2"),
    ],
)
def test_model_id_is_the_one_the_router_serves(instance, expected):
    node = {"ansible_host": "198.51.100.12", "router_port": 8002, "router_listen_host": "0.0.0.0",
            "llamacpp_instances": [instance]}
    assert [e["model_name"] for e in litellm_model_list({"n": node}, ["n"], gateway="gw")] == [expected]


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        (["m1", "m2"], ["m1", "m2"]),
        ([{"name": "m1"}, {"id": "m2"}], ["m1", "m2"]),
        ([], []),
    ],
)
def test_declared_router_models_win_over_backend_lists(declared, expected):
    entries = litellm_model_list({"a": {**ROUTER_NODE, "router_models": declared}}, ["a"], gateway="gw")
    assert [e["model_name"] for e in entries] == expected


def test_direct_backends_get_one_entry_per_instance_with_their_own_port_and_key():
    node = {
        "ansible_host": "198.51.100.12",
        "vllm_instances": [
            {"name": "a", "port": 8000, "host": "0.0.0.0", "api_key": "sk-a"},
            {"name": "b", "port": 8001, "host": "198.51.100.99"},
            {"name": "off", "port": 8002, "host": "0.0.0.0", "state": "stopped"},
        ],
    }
    entries = litellm_model_list({"n": node}, ["n"], gateway="gw")
    assert [(e["model_name"], e["litellm_params"]["api_base"], e["litellm_params"]["api_key"]) for e in entries] == [
        ("a", "http://198.51.100.12:8000/v1", "sk-a"),
        ("b", "http://198.51.100.99:8001/v1", "none"),
    ]
    assert all(e["model_info"]["llmstack_swap_managed"] is False for e in entries)
    assert all(e["model_info"]["disable_background_health_check"] is False for e in entries)


def test_direct_backends_fall_back_to_the_role_wide_key():
    # engine_instances gives an instance without api_key its role's <role>_api_key: the gateway must send that one.
    node = {
        "ansible_host": "198.51.100.12",
        "vllm_api_key": "sk-vllm-role-wide-0123",
        "vllm_instances": [{"name": "a", "port": 8000, "host": "0.0.0.0"},
                           {"name": "b", "port": 8001, "host": "0.0.0.0", "api_key": "sk-own-key-0123456"}],
    }
    entries = litellm_model_list({"n": node}, ["n"], gateway="gw")
    assert [(e["model_name"], e["litellm_params"]["api_key"]) for e in entries] == [
        ("a", "sk-vllm-role-wide-0123"),
        ("b", "sk-own-key-0123456"),
    ]


def test_ollama_models_and_upstream_address_override():
    node = {**OLLAMA_NODE, "litellm_upstream_address": "ollama.example.internal"}
    entries = litellm_model_list({"o": node}, ["o"], gateway="gw", default_api_key="not-needed")
    assert [e["litellm_params"]["api_base"] for e in entries] == ["http://ollama.example.internal:11434/v1"] * 2
    assert {e["litellm_params"]["api_key"] for e in entries} == {"not-needed"}


def test_entries_are_sorted_and_the_same_model_on_two_hosts_gives_two_deployments():
    hostvars = {"b": OLLAMA_NODE, "a": {**OLLAMA_NODE, "ansible_host": "198.51.100.13"}}
    entries = litellm_model_list(hostvars, ["b", "a", "a"], gateway="gw")
    assert names(entries) == [("llama3.1:8b", "a"), ("llama3.1:8b", "b"), ("qwen2.5:14b", "a"), ("qwen2.5:14b", "b")]


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"router_port": 8002}, "the router listens on 127.0.0.1 only"),
        ({"router_port": 8002, "router_listen_host": "localhost"}, "router_listen_host"),
        ({"vllm_instances": [{"name": "x", "port": 1}]}, "vllm model x listens on 127.0.0.1 only"),
        ({"ollama_models": ["m"], "ollama_listen_host": "::1"}, "ollama model m listens on ::1 only"),
    ],
)
def test_loopback_upstreams_on_another_host_are_refused(node, message):
    with pytest.raises(AnsibleFilterError, match=message):
        litellm_model_list({"n": node}, ["n"], gateway="gw")


def test_loopback_upstreams_on_the_gateway_itself_are_dialled_on_loopback():
    node = {"ansible_host": "198.51.100.14", "ollama_models": ["m"]}
    entries = litellm_model_list({"gw": node}, ["gw"], gateway="gw")
    assert entries[0]["litellm_params"]["api_base"] == "http://127.0.0.1:11434/v1"


@pytest.mark.parametrize(
    ("hostvars", "hosts", "message"),
    [
        ({}, ["missing"], "missing is not in the inventory"),
        ({"n": {}}, "n", "hosts must be a list"),
        ({"n": {"vllm_instances": [{"name": "x"}]}}, ["n"], r"vllm_instances\[0\] needs name and an integer port"),
        ({"n": {"vllm_instances": [{"name": "x", "port": "http"}]}}, ["n"], "integer port"),
        ({"n": {"router_port": 1, "router_listen_host": "0.0.0.0", "router_models": [{}]}}, ["n"], "has no name"),
    ],
)
def test_bad_input_names_the_fix(hostvars, hosts, message):
    with pytest.raises(AnsibleFilterError, match=message):
        litellm_model_list(hostvars, hosts, gateway="gw")


def test_hosts_without_models_contribute_nothing():
    assert litellm_model_list({"n": {"ansible_host": "198.51.100.1"}}, ["n"]) == []


def test_filter_is_registered():
    assert FilterModule().filters()["litellm_model_list"] is litellm_model_list
