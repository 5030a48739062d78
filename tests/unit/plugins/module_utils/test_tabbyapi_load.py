"""Unit tests for the per-generation TabbyAPI API rules in module_utils/_tabbyapi.py: load request,
model card comparison, config keys, folder identity. The expected values come from TabbyAPI's source
at the pinned commits (exl2 = 79126f9, exl3 = e632af4), named per case."""

from __future__ import annotations

import json

import pytest
from ansible_collections.llmstack.inference.plugins.module_utils import _tabbyapi
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi import (
    DRAFT_LOAD_FIELDS,
    MODEL_LOAD_FIELDS,
    card_differences,
    config_keys,
    load_request,
)

SETTINGS = {
    "max_seq_len": 24576,
    "cache_size": 24576,
    "cache_mode": "8,8",
    "gpu_split_auto": False,
    "gpu_split": [30, 22],
    "autosplit_reserve": [1024],
    "tensor_parallel": False,
    "rope_scale": 1.0,
    "rope_alpha": 1.0,
    "chunk_size": 2048,
    "max_batch_size": 16,
}
DRAFT = {"draft_model_name": "exl3/Llama-3.2-1B/4.0bpw", "draft_cache_mode": "Q8", "draft_rope_alpha": 1.0}


def test_load_fields_follow_the_pydantic_models():
    # endpoints/core/types/model.py is the same at both commits: no max_batch_size, no draft_cache_mode.
    for generation in ("exl2", "exl3"):
        assert "max_batch_size" not in MODEL_LOAD_FIELDS[generation]
        assert {"model_name", "cache_size", "gpu_split_auto", "draft_model"} <= MODEL_LOAD_FIELDS[generation]
        assert DRAFT_LOAD_FIELDS[generation] == {
            "draft_model_name",
            "draft_rope_scale",
            "draft_rope_alpha",
            "draft_gpu_split",
        }


@pytest.mark.parametrize(
    ("generation", "backend", "dropped", "draft_keys"),
    [
        # exllamav3 never reads rope (backends/exllamav3/model.py at both commits).
        (
            "exl3",
            None,
            ["draft_cache_mode", "draft_rope_alpha", "max_batch_size", "rope_alpha", "rope_scale"],
            {"draft_model_name"},
        ),
        ("exl2", "exllamav2", ["draft_cache_mode", "max_batch_size"], {"draft_model_name", "draft_rope_alpha"}),
        (
            "exl2",
            "exllamav3",
            ["draft_cache_mode", "draft_rope_alpha", "max_batch_size", "rope_alpha", "rope_scale"],
            {"draft_model_name"},
        ),
        # exl2 without a known backend: nothing is known to be ignored beyond the request model.
        ("exl2", None, ["draft_cache_mode", "max_batch_size"], {"draft_model_name", "draft_rope_alpha"}),
    ],
)
def test_load_request_per_generation(generation, backend, dropped, draft_keys):
    payload, left_out = load_request(generation, "exl3/Llama-3.1-70B/4.0bpw", SETTINGS, DRAFT, backend)
    assert left_out == dropped
    assert payload["model_name"] == "exl3/Llama-3.1-70B/4.0bpw"
    assert set(payload["draft_model"]) == draft_keys
    for key in dropped:
        assert key not in payload
    assert payload["gpu_split"] == [30, 22]
    assert payload["gpu_split_auto"] is False
    assert json.loads(json.dumps(payload)) == payload  # the JSON body as sent


def test_load_request_without_draft_and_none_values():
    payload, dropped = load_request("exl3", "m", {"cache_size": None, "max_seq_len": 4096, "model_name": "x"})
    assert payload == {"model_name": "m", "max_seq_len": 4096}
    assert dropped == []
    assert load_request("exl3", "m", {}, {"draft_rope_alpha": 1.0})[0] == {"model_name": "m"}
    with pytest.raises(ValueError, match="use exl2"):
        load_request("exl4", "m", {})


def card(model_id, backend, draft=None, **params):
    parameters = {"max_seq_len": 4096, "cache_size": 4096, "cache_mode": "FP16", "chunk_size": 2048}
    parameters.update(rope_scale=1.0, rope_alpha=1.0, max_batch_size=128, draft=None)
    parameters.update(params)
    if backend == "exllamav2" and draft:
        parameters["draft"] = {"id": draft, "parameters": {"rope_scale": 1.0, "rope_alpha": 1.0}}
    return {"id": model_id, "parameters": parameters}


@pytest.mark.parametrize(
    ("generation", "backend", "card_", "payload", "expected"),
    [
        ("exl3", None, None, {"model_name": "a"}, ["model_name"]),
        # The card id is the basename (model_info: id=self.model_dir.name).
        ("exl3", None, card("4.0bpw", "exllamav3"), {"model_name": "exl3/A/4.0bpw"}, []),
        ("exl3", None, card("4.0bpw", "exllamav3"), {"model_name": "exl3/A/5.0bpw"}, ["model_name"]),
        # "8, 8" and "8,8" are the same mode.
        ("exl3", None, card("m", "exllamav3", cache_mode="8, 8"), {"model_name": "m", "cache_mode": "8,8"}, []),
        # exllamav3: cache_size defaults to max_seq_len; max_seq_len is limited to cache_size.
        (
            "exl3",
            None,
            card("m", "exllamav3", max_seq_len=8192, cache_size=8192),
            {"model_name": "m", "max_seq_len": 8192},
            [],
        ),
        (
            "exl3",
            None,
            card("m", "exllamav3", max_seq_len=4096, cache_size=4096),
            {"model_name": "m", "max_seq_len": 8192, "cache_size": 4096},
            [],
        ),
        ("exl3", None, card("m", "exllamav3"), {"model_name": "m", "cache_size": 8192}, ["cache_size"]),
        # adjust_chunk_size: at least 256, rounded up to 256.
        ("exl3", None, card("m", "exllamav3", chunk_size=1024), {"model_name": "m", "chunk_size": 1000}, []),
        ("exl3", None, card("m", "exllamav3", chunk_size=256), {"model_name": "m", "chunk_size": 100}, []),
        # exllamav3's card shows neither rope nor the draft: never compared.
        (
            "exl3",
            None,
            card("m", "exllamav3"),
            {"model_name": "m", "rope_alpha": 2.5, "draft_model": {"draft_model_name": "d"}},
            [],
        ),
        # max_seq_len -1 is read from the model: not predicted.
        ("exl3", None, card("m", "exllamav3", max_seq_len=131072), {"model_name": "m", "max_seq_len": -1}, []),
        # exllamav2: cache_size rounded up to 256 (adjust_cache_size), "K,V" falls back to FP16.
        (
            "exl2",
            "exllamav2",
            card("m", "exllamav2", cache_size=3072, max_seq_len=3000),
            {"model_name": "m", "max_seq_len": 3000},
            [],
        ),
        ("exl2", "exllamav2", card("m", "exllamav2"), {"model_name": "m", "cache_mode": "8,8"}, []),
        ("exl2", "exllamav2", card("m", "exllamav2"), {"model_name": "m", "cache_mode": "Q4"}, ["cache_mode"]),
        ("exl2", "exllamav2", card("m", "exllamav2", rope_alpha=2.5), {"model_name": "m", "rope_alpha": 2.5}, []),
        ("exl2", "exllamav2", card("m", "exllamav2"), {"model_name": "m", "rope_alpha": 2.5}, ["rope_alpha"]),
        ("exl2", "exllamav2", card("m", "exllamav2"), {"model_name": "m", "rope_alpha": "auto"}, []),
        # exllamav2 caps the chunk at max_seq_len, also the one read from the model.
        (
            "exl2",
            "exllamav2",
            card("m", "exllamav2", max_seq_len=512, chunk_size=512),
            {"model_name": "m", "chunk_size": 2048},
            [],
        ),
        # The draft card (exllamav2 only).
        (
            "exl2",
            "exllamav2",
            card("m", "exllamav2", draft="d"),
            {"model_name": "m", "draft_model": {"draft_model_name": "x/d"}},
            [],
        ),
        (
            "exl2",
            "exllamav2",
            card("m", "exllamav2"),
            {"model_name": "m", "draft_model": {"draft_model_name": "d"}},
            ["draft_model"],
        ),
        (
            "exl2",
            "exllamav2",
            card("m", "exllamav2", draft="e"),
            {"model_name": "m", "draft_model": {"draft_model_name": "d"}},
            ["draft_model"],
        ),
        (
            "exl2",
            "exllamav2",
            card("m", "exllamav2", draft="d"),
            {"model_name": "m", "draft_model": {"draft_model_name": "d", "draft_rope_alpha": 2.0}},
            ["draft_model"],
        ),
        # exl2 with backend exllamav3 in the request: exllamav3's card rules.
        ("exl2", None, card("m", "exllamav3"), {"model_name": "m", "backend": "exllamav3", "rope_alpha": 2.0}, []),
        # exl2 without a backend: exllamav2, the branch's choice for non-EXL3 folders.
        ("exl2", None, card("m", "exllamav2"), {"model_name": "m", "rope_alpha": 2.0}, ["rope_alpha"]),
    ],
)
def test_card_differences(generation, backend, card_, payload, expected):
    assert card_differences(generation, card_, payload, backend) == expected


def test_config_keys_per_generation():
    exl2, exl3 = config_keys("exl2"), config_keys("exl3")
    assert set(exl2) == set(exl3) == {
        "config", "network", "logging", "model", "draft_model", "lora", "embeddings", "sampling", "memory",
        "developer",
    }  # fmt: skip
    assert "reasoning_suppress_header" in exl2["model"]
    assert "reasoning_suppress_header" not in exl3["model"]
    assert "harmony" in exl3["model"]
    assert "harmony" not in exl2["model"]
    assert "sse_ping_interval" in exl3["network"]
    assert "sse_ping_interval" not in exl2["network"]
    assert "draft_cache_mode" in exl2["draft_model"]
    assert "draft_cache_mode" in exl3["draft_model"]
    # Every load field but the request-only ones is a config.yml model key at both generations.
    for generation, keys in (("exl2", exl2), ("exl3", exl3)):
        request_only = {"model_name", "draft_model", "skip_queue"}
        assert MODEL_LOAD_FIELDS[generation] - request_only <= keys["model"]
    config_keys("exl2")["model"].add("x")
    assert "x" not in config_keys("exl2")["model"]


def test_same_basename_and_detect_backend(tmp_path):
    for name, quant in (("exl3/A/4.0bpw", "exl3"), ("exl3/B/4.0bpw", "exl3"), ("exl2/C/4.0bpw", "exl2")):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": quant}}))
    (tmp_path / "link").symlink_to(tmp_path / "exl3" / "A")
    assert _tabbyapi.same_basename(str(tmp_path), "exl3/A/4.0bpw") == ["exl2/C/4.0bpw", "exl3/B/4.0bpw"]
    assert _tabbyapi.same_basename(str(tmp_path), "exl3/A") == []
    assert _tabbyapi.detect_backend(str(tmp_path / "exl3/A/4.0bpw")) == "exllamav3"
    assert _tabbyapi.detect_backend(str(tmp_path / "exl2/C/4.0bpw")) == "exllamav2"
    assert _tabbyapi.detect_backend(str(tmp_path / "missing")) == "exllamav2"
