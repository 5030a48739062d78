# Copyright (c) llmstack.inference contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""tabbyapi_models: one declaration read by the tabbyapi role, the router's backends and the gateway."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.llmstack.inference.plugins.filter.litellm_model_list import litellm_model_list
from ansible_collections.llmstack.inference.plugins.filter.router_backends import router_backends, router_config
from ansible_collections.llmstack.inference.plugins.filter.tabbyapi_models import (
    FilterModule,
    tabbyapi_models,
    tabbyapi_selection,
)

GB200 = {
    "tabbyapi_generation": "exl3",
    "tabbyapi_admin_key": "tabby-admin-key-0123456789",
    "tabbyapi_models": [
        {"name": "exl3/Llama-3.1-70B/4.0bpw", "id": "llama-70b", "aliases": ["llama70b"], "startup": True,
         "max_seq_len": 24576, "cache_mode": "8,8", "cache_size": 24576, "vram_mib": 52000},
        {"name": "exl3/Llama-3.1-8B/4.0bpw", "id": "llama-8b", "max_seq_len": 8192,
         "draft": {"name": "exl3/Llama-3.2-1B/4.0bpw", "rope_alpha": 1.0}},
        {"name": "Qwen3-32B-exl3", "gpu_split_auto": False, "gpu_split": [20, 12]},
    ],
}


def by_id(models):
    return {m["id"]: m for m in models}


def test_filters_are_registered():
    assert set(FilterModule().filters()) == {"tabbyapi_models", "tabbyapi_selection"}


def test_identity_is_the_whole_folder_and_the_card_id_its_last_component():
    models = by_id(tabbyapi_models(GB200))
    assert models["llama-70b"]["name"] == "exl3/Llama-3.1-70B/4.0bpw"
    assert models["llama-70b"]["served_name"] == models["llama-8b"]["served_name"] == "4.0bpw"
    # The id defaults to the folder's last component, what TabbyAPI's card reports.
    assert "Qwen3-32B-exl3" in models
    assert [m["startup"] for m in tabbyapi_models(GB200)] == [True, False, False]


def test_each_model_carries_its_own_load_request():
    models = by_id(tabbyapi_models(GB200))
    big = models["llama-70b"]["load"]
    assert big["model_name"] == "exl3/Llama-3.1-70B/4.0bpw"
    assert (big["max_seq_len"], big["cache_mode"], big["cache_size"]) == (24576, "8,8", 24576)
    assert "draft_model" not in big
    small = models["llama-8b"]["load"]
    assert small["max_seq_len"] == 8192
    assert small["draft_model"]["draft_model_name"] == "exl3/Llama-3.2-1B/4.0bpw"
    # exllamav3 reads no rope settings (backends/exllamav3/model.py): left out and named, not sent.
    assert "draft_rope_alpha" not in small["draft_model"]
    assert any("draft_rope_alpha" in key for key in models["llama-8b"]["dropped"])
    exl2 = by_id(tabbyapi_models(dict(GB200, tabbyapi_generation="exl2")))
    assert exl2["llama-8b"]["load"]["draft_model"]["draft_rope_alpha"] == 1.0
    assert "cache_mode" not in small, "a model's load never inherits another model's settings"
    assert models["Qwen3-32B-exl3"]["load"]["gpu_split"] == [20, 12]


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_draft_cache_mode_is_dropped_from_the_load_request_and_named(generation):
    # Neither generation's DraftModelLoadRequest has draft_cache_mode (endpoints/core/types/model.py).
    models = tabbyapi_models({"tabbyapi_generation": generation, "tabbyapi_models": [
        {"name": "a", "draft": {"name": "d", "cache_mode": "Q4"}}]})
    assert "draft_cache_mode" not in models[0]["load"]["draft_model"]
    assert any("draft_cache_mode" in key for key in models[0]["dropped"])
    # config.yml still gets it (the start-up load reads config.yml).
    assert models[0]["draft"]["draft_cache_mode"] == "Q4"


def test_shorthand_is_one_startup_model_with_the_role_wide_settings():
    models = tabbyapi_models({
        "tabbyapi_model_path": "/mnt/models/exl2/tiny-exl2", "tabbyapi_model_dir": "/mnt/models",
        "tabbyapi_generation": "exl2", "tabbyapi_cache_mode": "Q4", "tabbyapi_max_seq_len": None,
        "tabbyapi_gpu_split": [], "tabbyapi_draft_model_name": "exl2/tiny-draft", "tabbyapi_draft_cache_mode": "Q8",
    })
    assert len(models) == 1
    model = models[0]
    assert (model["id"], model["name"], model["startup"]) == ("tiny-exl2", "exl2/tiny-exl2", True)
    assert model["settings"] == {"cache_mode": "Q4"}
    assert model["draft"] == {"draft_model_name": "exl2/tiny-draft", "draft_cache_mode": "Q8"}
    assert tabbyapi_models({"tabbyapi_model_name": ""}) == []


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"tabbyapi_models": [{"name": "a"}], "tabbyapi_model_name": "b"}, "both name models"),
        ({"tabbyapi_model_name": "a", "tabbyapi_model_path": "/mnt/models/a"}, "not both"),
        ({"tabbyapi_models": [{"name": "/mnt/models/a"}]}, "must be a folder below tabbyapi_model_dir"),
        ({"tabbyapi_models": [{"name": "../etc"}]}, "without '..'"),
        ({"tabbyapi_models": [{"name": "a/4.0bpw"}, {"name": "b/4.0bpw"}]}, "give same-named folders their own id"),
        ({"tabbyapi_models": [{"name": "a", "aliases": ["b"]}, {"name": "b"}]}, "'b' is used by a and b"),
        ({"tabbyapi_models": [{"name": "a", "startup": True}, {"name": "b", "startup": True}]}, "at most one"),
        ({"tabbyapi_models": [{"name": "a", "max_len": 4}]}, "unknown keys max_len"),
        ({"tabbyapi_models": [{"name": "a", "draft": {"name": "d", "mode": "Q4"}}]}, "draft has unknown keys mode"),
        ({"tabbyapi_models": [{"name": "a", "vram_mib": "lots"}]}, "positive integer"),
        ({"tabbyapi_generation": "exl4", "tabbyapi_models": [{"name": "a"}]}, "exl2 or exl3"),
        ({"tabbyapi_model_path": "/srv/x", "tabbyapi_model_dir": "/mnt/models"}, "is not inside model_dir"),
    ],
)
def test_bad_declarations_name_the_fix(variables, message):
    with pytest.raises(AnsibleFilterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tabbyapi_models(variables)


def test_selection_lists_every_model_and_the_keys_a_model_owns():
    selection = tabbyapi_selection(tabbyapi_models(GB200))
    assert set(selection["models"]) == {"llama-70b", "llama-8b", "Qwen3-32B-exl3"}
    assert selection["models"]["llama-8b"]["model"] == {"model_name": "exl3/Llama-3.1-8B/4.0bpw", "max_seq_len": 8192}
    assert selection["models"]["llama-8b"]["draft_model"]["draft_model_name"] == "exl3/Llama-3.2-1B/4.0bpw"
    assert selection["models"]["llama-70b"]["draft_model"] == {}
    assert {"model_name", "cache_mode", "gpu_split"} <= set(selection["model_keys"])
    assert {"draft_model_name", "draft_cache_mode"} <= set(selection["draft_keys"])


def test_router_serves_every_model_with_its_load_and_record_file():
    backends = {b["name"]: b for b in router_backends(
        dict(GB200, tabbyapi_vram_estimates={
            "llama-8b": {"source": "estimate", "estimate_mib": 9000},
            "llama-70b": {"source": "vram_mib", "estimate_mib": 52000},
            "Qwen3-32B-exl3": {"source": "estimate", "estimate_mib": None}}), "gpu0", {})}
    tabby = backends["tabbyapi"]
    models = {m["id"]: m for m in tabby["models"]}
    assert set(models) == {"llama-70b", "llama-8b", "Qwen3-32B-exl3"}
    assert models["llama-70b"]["aliases"] == ["llama70b"]
    assert models["llama-70b"]["vram_mib"] == 52000, "a declared vram_mib wins"
    assert models["llama-8b"]["vram_mib"] == 9000, "else the estimate"
    assert "vram_mib" not in models["Qwen3-32B-exl3"]
    assert models["llama-8b"]["load"]["model_name"] == "exl3/Llama-3.1-8B/4.0bpw"
    config = router_config(list(backends.values()), "/etc/llmstack/router", {"host": "127.0.0.1", "port": 8002})
    assert config["backends"]["tabbyapi"]["state_file"] == "/var/lib/llmstack/router-active/tabbyapi.json"
    assert config["backends"]["tabbyapi"]["models"][0]["load"]["model_name"]


def test_gateway_lists_all_models_behind_a_router_and_only_the_startup_one_direct():
    direct = dict(GB200, tabbyapi_host="0.0.0.0")
    routed = dict(GB200, router_port=8002, router_listen_host="0.0.0.0")
    names = [e["model_name"] for e in litellm_model_list({"n1": direct}, ["n1"])]
    assert names == ["4.0bpw"], "TabbyAPI alone serves whichever model is loaded, under its card id"
    names = sorted(e["model_name"] for e in litellm_model_list({"n1": routed}, ["n1"]))
    assert names == ["Qwen3-32B-exl3", "llama-70b", "llama-8b"]


def test_vram_request_is_what_the_estimate_reads():
    models = by_id(tabbyapi_models(GB200))
    assert models["llama-70b"]["vram_request"] == {
        "id": "llama-70b", "name": "exl3/Llama-3.1-70B/4.0bpw", "max_seq_len": 24576, "cache_mode": "8,8",
        "cache_size": 24576, "vram_mib": 52000}
    assert models["llama-8b"]["vram_request"]["draft"] == {"name": "exl3/Llama-3.2-1B/4.0bpw"}
