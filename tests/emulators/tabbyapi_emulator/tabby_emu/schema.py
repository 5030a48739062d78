"""TabbyAPI's pydantic schemas, as data (part of the TabbyAPI emulator, see package doc).

Config sections follow common/config_models.py and the load request endpoints/core/types/model.py
at the two pinned commits (see generation.py). Validation is pydantic v2's lax mode as far as
deployment code can see it: unknown keys are ignored, numeric strings become numbers (env vars and
CLI args arrive as strings), a wrong type is an error list shaped like FastAPI's 422 "detail".
"""

from __future__ import annotations

import re
from typing import Any

# Field spec: "type" or "type|constraint|constraint"; constraints: ge=N, gt=N, multiple_of=N.
# Types: str int float bool list[float] list[str] dict float|auto cache_type cache_sizes
# draft_mode api_servers embeddings_device loras.
_COMMON_MODEL = {
    "model_dir": "str",
    "inline_model_loading": "bool",
    "use_dummy_models": "bool",
    "dummy_model_names": "list[str]",
    "model_name": "str",
    "use_as_default": "list[str]",
    "backend": "str",
    "max_seq_len": "int|ge=-1",
    "cache_size": "int|multiple_of=256|gt=0",
    "cache_mode": "cache_type",
    "tensor_parallel": "bool",
    "tensor_parallel_backend": "str",
    "gpu_split_auto": "bool",
    "autosplit_reserve": "list[float]",
    "gpu_split": "list[float]",
    "rope_scale": "float",
    "rope_alpha": "float|auto",
    "chunk_size": "int|gt=0",
    "output_chunking": "bool",
    "max_batch_size": "int|ge=1",
    "prompt_template": "str",
    "vision": "bool",
    "force_enable_thinking": "bool",
    "reasoning": "bool",
    "reasoning_start_token": "str",
    "reasoning_end_token": "str",
    "tool_format": "str",
}
_COMMON_DRAFT = {
    "draft_mode": "draft_mode",
    "draft_model_dir": "str",
    "draft_model_name": "str",
    "draft_rope_scale": "float",
    "draft_rope_alpha": "float",
    "draft_cache_mode": "cache_sizes",
    "draft_gpu_split": "list[float]",
    "draft_num_tokens": "int",
    "ngram_match_min": "int",
}
_COMMON = {
    "config": {"config": "str"},
    "network": {
        "host": "str",
        "port": "int",
        "disable_auth": "bool",
        "disable_fetch_requests": "bool",
        "send_tracebacks": "bool",
        "api_servers": "api_servers",
    },
    "logging": {
        "log_prompt": "bool",
        "log_generation_params": "bool",
        "log_requests": "bool",
        "log_chat_completion_requests": "bool",
    },
    "lora": {"lora_dir": "str", "loras": "loras"},
    "embeddings": {
        "embedding_model_dir": "str",
        "embeddings_device": "embeddings_device",
        "embedding_model_name": "str",
    },
    "sampling": {"override_preset": "str"},
    "memory": {"sysmem_recurrent_cache": "int", "cuda_malloc_async": "bool"},
    "developer": {
        "unsafe_launch": "bool",
        "disable_request_streaming": "bool",
        "realtime_process_priority": "bool",
        "seqlog": "bool",
        "seqlog_server_url": "str",
        "seqlog_api_key": "str",
    },
}


def _config_schema(generation: str) -> dict[str, dict[str, str]]:
    schema = {section: dict(keys) for section, keys in _COMMON.items()}
    schema["model"] = dict(_COMMON_MODEL)
    schema["draft_model"] = dict(_COMMON_DRAFT)
    if generation == "exl2":
        schema["model"]["reasoning_suppress_header"] = "str"
    else:
        schema["network"]["sse_ping_interval"] = "int"
        schema["model"].update(
            cpu_moe_offload_layers="int",
            template_vars_default="dict",
            template_vars_force="dict",
            start_in_reasoning="str",
            tool_calls_in_reasoning="bool",
            reasoning_budget_tokens="int",
            reasoning_budget_message="str",
            harmony="bool",
            muse_glimmer="bool",
        )
        schema["draft_model"]["dynamic_draft"] = "bool"
        schema["memory"]["sysmem_kv_cache"] = "int"
    return schema


CONFIG_SCHEMA = {gen: _config_schema(gen) for gen in ("exl2", "exl3")}

# Defaults TabbyAPI's config models give (what use_as_default copies when a key is named there but
# unset). Same at both commits for these keys.
MODEL_DEFAULTS: dict[str, Any] = {
    "model_dir": "models",
    "cache_mode": "FP16",
    "tensor_parallel": False,
    "tensor_parallel_backend": "native",
    "gpu_split_auto": True,
    "autosplit_reserve": [96],
    "gpu_split": [],
    "rope_scale": 1.0,
    "chunk_size": 2048,
    "output_chunking": True,
    "vision": False,
}
DRAFT_DEFAULTS: dict[str, Any] = {
    "draft_mode": "model",
    "draft_model_dir": "models",
    "draft_rope_scale": 1.0,
    "draft_cache_mode": "FP16",
    "draft_gpu_split": [],
}

# endpoints/core/types/model.py ModelLoadRequest / DraftModelLoadRequest: identical at both
# commits. No max_batch_size, no draft_cache_mode: a request carrying them has them dropped.
LOAD_REQUEST = {
    "model_name": "str",
    "backend": "str",
    "max_seq_len": "int",
    "cache_size": "int",
    "cache_mode": "str",
    "tensor_parallel": "bool",
    "tensor_parallel_backend": "str",
    "gpu_split_auto": "bool",
    "autosplit_reserve": "list[float]",
    "gpu_split": "list[float]",
    "rope_scale": "float",
    "rope_alpha": "float|auto",
    "chunk_size": "int",
    "output_chunking": "bool",
    "prompt_template": "str",
    "vision": "bool",
    "skip_queue": "bool",
}
DRAFT_LOAD_REQUEST = {
    "draft_model_name": "str",
    "draft_rope_scale": "float",
    "draft_rope_alpha": "float|auto",
    "draft_gpu_split": "list[float]",
}
# Defaults the request models fill in (model_dump(exclude_none=True) keeps them).
LOAD_REQUEST_DEFAULTS = {
    "tensor_parallel_backend": "native",
    "gpu_split": [],
    "output_chunking": True,
    "skip_queue": False,
}
DRAFT_REQUEST_DEFAULTS = {"draft_gpu_split": []}

CACHE_SIZES = ("FP16", "Q8", "Q6", "Q4")
KV_BITS = re.compile(r"^[2-8]\s*,\s*[2-8]$")
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


class Invalid(Exception):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise Invalid("int_from_float", "Input should be a valid integer, got a number with a fractional part")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        raise Invalid("int_parsing", "Input should be a valid integer, unable to parse string as an integer")
    raise Invalid("int_type", "Input should be a valid integer")


def _float(value: Any) -> float:
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
        raise Invalid("float_parsing", "Input should be a valid number, unable to parse string as a number")
    raise Invalid("float_type", "Input should be a valid number")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise Invalid("bool_parsing", "Input should be a valid boolean")


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Invalid("string_type", "Input should be a valid string")


def _list(value: Any, item) -> list:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise Invalid("list_type", "Input should be a valid list")
    return [item(v) for v in value]


def _choice(value: Any, choices: tuple[str, ...]) -> str:
    if value in choices:
        return value
    raise Invalid("literal_error", "Input should be " + " or ".join(repr(c) for c in choices))


def coerce(spec: str, value: Any) -> Any:
    kind, *constraints = spec.split("|")
    if kind == "float" and constraints == ["auto"]:
        return "auto" if value == "auto" else _float(value)
    converters = {
        "str": _str,
        "int": _int,
        "float": _float,
        "bool": _bool,
        "list[float]": lambda v: _list(v, _float),
        "list[str]": lambda v: _list(v, _str),
        "draft_mode": lambda v: _choice(v, ("model", "disabled", "mtp", "ngram")),
        "embeddings_device": lambda v: _choice(v, ("cpu", "auto", "cuda")),
        "api_servers": lambda v: [_choice(_str(s).lower(), ("oai", "kobold")) for s in _list(v, _str)],
        "cache_sizes": lambda v: _choice(v, CACHE_SIZES),
    }
    if kind == "cache_type":
        if value in CACHE_SIZES or (isinstance(value, str) and KV_BITS.match(value)):
            return value
        raise Invalid("string_pattern_mismatch", "Unsupported cache_mode: use FP16, Q8, Q6, Q4 or 'k,v' with 2..8")
    if kind in ("dict", "loras"):
        if kind == "dict" and not isinstance(value, dict):
            raise Invalid("dict_type", "Input should be a valid dictionary")
        return value
    result = converters[kind](value)
    for constraint in constraints:
        name, _eq, number = constraint.partition("=")
        limit = int(number)
        if name == "ge" and result < limit:
            raise Invalid("greater_than_equal", f"Input should be greater than or equal to {limit}")
        if name == "gt" and result <= limit:
            raise Invalid("greater_than", f"Input should be greater than {limit}")
        if name == "multiple_of" and result % limit:
            raise Invalid("multiple_of", f"Input should be a multiple of {limit}")
    return result


def validate(fields: dict[str, str], data: dict[str, Any], loc: tuple[str, ...]) -> tuple[dict[str, Any], list]:
    """Known keys coerced (None kept as None: every field is Optional), unknown keys dropped."""
    clean: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for key, value in data.items():
        if key not in fields:
            continue
        if value is None:
            clean[key] = None
            continue
        try:
            clean[key] = coerce(fields[key], value)
        except Invalid as exc:
            errors.append({"type": exc.kind, "loc": [*loc, key], "msg": exc.msg, "input": value})
    return clean, errors
