# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TabbyAPI rules shared by tabbyapi_config, model_load and the router's filter: config.yml checks,
the admin API's load request and model card per generation, and the api_tokens.yml reader.

The rules follow TabbyAPI's own source at the two commits the tabbyapi role pins (generation
"exl2" = tip of exl2-checkpoint 79126f9, backends exllamav2 + exllamav3; generation "exl3" = main
e632af4, backend exllamav3 only): common/config_models.py for config keys, `backend` in the `model`
section, cache_mode FP16/Q8/Q6/Q4 or for exllamav3 also "K,V" bit pairs (2..8), cache_size a
multiple of 256; endpoints/core/types/model.py for the load request and the model card; the
backends' model_info() for what the card really reports. Each error names the key and the fix.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
from typing import Any, Dict, List, Optional, Set, Tuple

BACKENDS = ("exllamav2", "exllamav3")
EXL2_CACHE_MODES = ("FP16", "Q8", "Q6", "Q4")
KV_CACHE_MODE = re.compile(r"^[2-8]\s*,\s*[2-8]$")
API_SERVERS = ("oai", "kobold")
# The model folder's quant_method decides which backend can load it.
QUANT_BACKEND = {"exl2": "exllamav2", "gptq": "exllamav2", "exl3": "exllamav3"}
GENERATIONS = ("exl2", "exl3")


def split_model_path(model_path: str, model_dir: Optional[str] = None) -> Tuple[str, str]:
    """Splits one full model path into TabbyAPI's model_dir + model_name.

    TabbyAPI loads model_dir/model_name, so giving the full path as model_name (or the parent
    as model_name) is the classic misconfiguration. With model_dir given, model_name is the path
    relative to it and may hold subfolders (exl2/Model); without, the last component is the name.
    """
    path = model_path.strip()
    if not path or path.rstrip("/") == "":
        raise ValueError("model_path is empty or '/': give the model folder, e.g. /mnt/models/exl2/Llama-3.1-8B")
    if model_dir:
        base = posixpath.normpath(model_dir)
        if not posixpath.isabs(path):
            name = posixpath.normpath(path)
        else:
            full = posixpath.normpath(path)
            if not full.startswith(base.rstrip("/") + "/"):
                raise ValueError(
                    "model_path %s is not inside model_dir %s: drop model_dir to split model_path at its "
                    "last folder, or set model_dir to a parent of model_path" % (path, model_dir)
                )
            name = posixpath.relpath(full, base)
        if name == "." or name.startswith("../") or name == "..":
            raise ValueError("model_path %s escapes model_dir %s: give a folder inside model_dir" % (path, model_dir))
        return base, name
    if not posixpath.isabs(path):
        raise ValueError("model_path %s is relative: give an absolute path, or set model_dir and use model_name" % path)
    full = posixpath.normpath(path)
    return posixpath.dirname(full), posixpath.basename(full)


def deep_merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    """Returns base updated with override; nested mappings merge, everything else replaces."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def conflicts(settings: Dict[str, Any], managed: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys that `settings` sets to a different value than a modelled option does."""
    found = []
    for key, value in settings.items():
        if key not in managed:
            continue
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(managed[key], dict):
            found.extend(conflicts(value, managed[key], dotted + "."))
        elif value != managed[key]:
            found.append(dotted)
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_cache_mode(key: str, value: Any, backend: Optional[str], errors: List[str]) -> None:
    mode = str(value).strip()
    if mode in EXL2_CACHE_MODES:
        return
    if KV_CACHE_MODE.match(mode):
        if backend == "exllamav2":
            errors.append(
                "%s '%s' is an exllamav3 (EXL3) cache mode: with backend exllamav2 use one of %s, "
                "or set backend exllamav3 for an EXL3 model" % (key, mode, ", ".join(EXL2_CACHE_MODES))
            )
        return
    allowed = ", ".join(EXL2_CACHE_MODES)
    if backend != "exllamav2":
        allowed += ", or 'K,V' bit pairs with K and V in 2..8 such as '8,8' (exllamav3)"
    errors.append("%s '%s' is not a cache mode: use %s" % (key, mode, allowed))


def _check_split(key: str, value: Any, gpu_count: Optional[int], errors: List[str]) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        errors.append("%s must be a list of numbers (one per GPU), got %r" % (key, value))
        return
    if gpu_count is not None and len(value) > gpu_count:
        errors.append(
            "%s has %d entries but gpu_count is %d: give at most one entry per GPU" % (key, len(value), gpu_count)
        )


def _section(config: Dict[str, Any], name: str, errors: List[str]) -> Dict[str, Any]:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(
            "section %s must be a mapping, got %s: fix or remove it in config.yml" % (name, type(value).__name__)
        )
        return {}
    return value


def validate(config: Dict[str, Any], gpu_count: Optional[int] = None) -> Tuple[List[str], List[str]]:
    """Checks a whole config.yml mapping; returns (errors, warnings)."""
    errors = []  # type: List[str]
    warnings = []  # type: List[str]
    model = _section(config, "model", errors)
    draft = _section(config, "draft_model", errors)
    network = _section(config, "network", errors)
    developer = _section(config, "developer", errors)

    backend = model.get("backend")
    if backend is not None and backend not in BACKENDS:
        errors.append("model.backend '%s' is unknown: use exllamav2 (EXL2 models) or exllamav3 (EXL3 models)" % backend)
        backend = None
    if model.get("cache_mode") is not None:
        _check_cache_mode("model.cache_mode", model["cache_mode"], backend, errors)
    draft_mode = draft.get("draft_cache_mode")
    if draft_mode is not None and str(draft_mode).strip() not in EXL2_CACHE_MODES:
        errors.append(
            "draft_model.draft_cache_mode '%s' is not accepted by TabbyAPI: use one of %s"
            % (draft_mode, ", ".join(EXL2_CACHE_MODES))
        )

    max_seq_len = model.get("max_seq_len")
    if max_seq_len is not None and (not _is_int(max_seq_len) or max_seq_len < -1 or max_seq_len == 0):
        errors.append(
            "model.max_seq_len %r must be a positive integer, or -1 to read it from the model" % (max_seq_len,)
        )
        max_seq_len = None
    cache_size = model.get("cache_size")
    if cache_size is not None:
        if not _is_int(cache_size) or cache_size <= 0 or cache_size % 256:
            suggestion = ""
            if _is_int(cache_size) and cache_size > 0:
                suggestion = " such as %d" % ((cache_size // 256 + 1) * 256)
            errors.append("model.cache_size %r must be a positive multiple of 256%s" % (cache_size, suggestion))
        elif _is_int(max_seq_len) and max_seq_len > 0 and cache_size < max_seq_len:
            # TabbyAPI would silently cut max_seq_len down to cache_size, so clients get less context
            # than configured: backends/exllamav2/model.py adjust_cache_size/adjust_max_seq_len (exl2
            # branch) and backends/exllamav3/model.py create() (both commits) lower max_seq_len, never
            # raise the cache. config_models.py: "can't be less than max_seq_len".
            errors.append(
                "model.cache_size %d is smaller than model.max_seq_len %d: raise cache_size to at least %d "
                "or lower max_seq_len" % (cache_size, max_seq_len, max_seq_len)
            )
    for key in ("chunk_size", "max_batch_size"):
        value = model.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            errors.append("model.%s %r must be an integer >= 1" % (key, value))

    _check_split("model.gpu_split", model.get("gpu_split"), gpu_count, errors)
    _check_split("model.autosplit_reserve", model.get("autosplit_reserve"), gpu_count, errors)
    _check_split("draft_model.draft_gpu_split", draft.get("draft_gpu_split"), gpu_count, errors)
    # Every backend at both commits (backends/exllamav2/model.py, backends/exllamav3/model.py create())
    # takes a non-empty gpu_split as a manual split and then turns gpu_split_auto off and drops
    # autosplit_reserve; with one GPU neither is used (config_models.py: "Not parsed for single GPU users").
    if model.get("gpu_split"):
        if model.get("gpu_split_auto") is True:
            warnings.append(
                "model.gpu_split_auto true is ignored: TabbyAPI uses the manual model.gpu_split whenever it is "
                "non-empty; set gpu_split_auto false, or drop gpu_split for an automatic split"
            )
        if gpu_count == 1:
            warnings.append("model.gpu_split has no effect with one GPU: TabbyAPI does not split over one GPU")
    if model.get("tensor_parallel") and gpu_count == 1:
        warnings.append("model.tensor_parallel has no effect with one GPU")

    port = network.get("port")
    if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
        errors.append("network.port %r must be an integer between 1 and 65535" % (port,))
    servers = network.get("api_servers")
    if servers is not None:
        bad = (
            [s for s in servers or [] if str(s).lower() not in API_SERVERS] if isinstance(servers, list) else [servers]
        )
        if bad:
            errors.append("network.api_servers %r: allowed values are OAI and Kobold" % (bad,))
    if "backend" in developer:
        warnings.append(
            "developer.backend is ignored by TabbyAPI (the key is model.backend): set the backend option instead"
        )
    return errors, warnings


def check_model_folder(kind: str, model_dir: str, model_name: str, backend: Optional[str]) -> Optional[str]:
    """Checks model_dir/model_name on this host; returns an error message or None."""
    path = os.path.join(model_dir, model_name)
    if not os.path.isdir(path):
        return (
            "%s folder %s does not exist: TabbyAPI loads model_dir/model_name, so check both "
            "(model_dir is the parent folder, model_name the folder below it)" % (kind, path)
        )
    config_json = os.path.join(path, "config.json")
    if not os.path.isfile(config_json):
        return "%s folder %s has no config.json: point model_name at the folder that holds the weights" % (kind, path)
    try:
        with open(config_json, encoding="utf-8") as handle:
            quant = ((json.load(handle) or {}).get("quantization_config") or {}).get("quant_method")
    except (OSError, ValueError, AttributeError) as exc:
        return "%s is not readable JSON (%s): re-download the model" % (config_json, exc)
    needed = QUANT_BACKEND.get(str(quant)) if quant else None
    if backend and needed and needed != backend:
        return "%s %s is quantized as %s, which needs backend %s, not %s: set backend %s" % (
            kind,
            path,
            quant,
            needed,
            backend,
            needed,
        )
    return None


def parse_api_tokens(text: str) -> Dict[str, Any]:
    """Reads api_tokens.yml without needing PyYAML on the node (flat `key: value` lines).

    Raises ValueError for text PyYAML cannot parse or that is not a mapping.
    """
    try:
        import yaml  # pylint: disable=import-outside-toplevel
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError("it is not valid YAML (%s)" % str(exc).replace("\n", " ")) from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError("it holds a YAML %s, not the mapping of api_key and admin_key" % type(data).__name__)
        return data
    data = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.startswith((" ", "#", "-")):
            data[key.strip()] = value.strip().strip("'\"")
    return data


class TokenFileError(ValueError):
    """api_tokens.yml cannot be read, or lacks the key asked for; the message names the fix."""


def read_api_token(path: str, token_key: str, key_option: str) -> str:
    """The `token_key` (api_key or admin_key) of TabbyAPI's api_tokens.yml at `path`.

    TabbyAPI writes the file on its first start; api_key may be a list, of which the first is used.
    `key_option` is the module option that would give the key instead, named in the errors.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise TokenFileError(
            "api_tokens_file %s is not readable (%s): TabbyAPI writes it on its first start; "
            "run the module with become, or give %s" % (path, exc.strerror, key_option)
        ) from exc
    try:
        tokens = parse_api_tokens(text)
    except ValueError as exc:
        raise TokenFileError(
            "api_tokens_file %s cannot be used: %s; restore the file TabbyAPI wrote (delete it and restart "
            "TabbyAPI to get new keys), or give %s" % (path, exc, key_option)
        ) from exc
    value = tokens.get(token_key)
    if isinstance(value, list):
        value = value[0] if value else None
    if not value or not isinstance(value, (str, int)):
        raise TokenFileError(
            "api_tokens_file %s has no %s: restore the file TabbyAPI wrote, or give %s" % (path, token_key, key_option)
        )
    return str(value)


def key_from_params(module: Any, key_option: str, token_key: str) -> Optional[str]:
    """The key a module sends: option `key_option` when given, else `token_key` from api_tokens_file.

    A key read from the file was never a module parameter, so Ansible does not know to hide it;
    it is added to the module's no_log values, masking it in results, errors and logs.
    """
    if module.params[key_option]:
        return module.params[key_option]
    path = module.params["api_tokens_file"]
    if not path:
        return None
    try:
        key = read_api_token(path, token_key, key_option)
    except TokenFileError as exc:
        module.fail_json(msg=str(exc))
    module.no_log_values.add(key)
    return key


# --- the admin API per generation: load request, model card, config keys -------------------------

# endpoints/core/types/model.py ModelLoadRequest, the same at both commits. pydantic ignores any
# other field, so a key outside this set never reaches the loader.
_LOAD_FIELDS = frozenset(
    (
        "model_name",
        "backend",
        "max_seq_len",
        "cache_size",
        "cache_mode",
        "tensor_parallel",
        "tensor_parallel_backend",
        "gpu_split_auto",
        "autosplit_reserve",
        "gpu_split",
        "rope_scale",
        "rope_alpha",
        "chunk_size",
        "output_chunking",
        "prompt_template",
        "vision",
        "draft_model",
        "skip_queue",
    )
)
MODEL_LOAD_FIELDS = {"exl2": _LOAD_FIELDS, "exl3": _LOAD_FIELDS}
# endpoints/core/types/model.py DraftModelLoadRequest, the same at both commits: no draft_cache_mode
# (it only comes from config.yml), and draft_model_dir is always set from config.yml by
# endpoints/core/utils/model.py stream_model_load.
_DRAFT_FIELDS = frozenset(("draft_model_name", "draft_rope_scale", "draft_rope_alpha", "draft_gpu_split"))
DRAFT_LOAD_FIELDS = {"exl2": _DRAFT_FIELDS, "exl3": _DRAFT_FIELDS}
# Accepted by the request, never read by the backend: backends/exllamav3/model.py (both commits)
# has no rope handling at all, so rope keys are dropped where exllamav3 is the backend.
BACKEND_IGNORED = {
    "exllamav2": frozenset(),
    "exllamav3": frozenset(("rope_scale", "rope_alpha", "draft_rope_scale", "draft_rope_alpha")),
}

# common/config_models.py, fields of each section model of TabbyConfigModel at each commit.
_COMMON_KEYS = {
    "config": {"config"},
    "network": {"api_servers", "disable_auth", "disable_fetch_requests", "host", "port", "send_tracebacks"},
    "logging": {"log_chat_completion_requests", "log_generation_params", "log_prompt", "log_requests"},
    "model": {
        "autosplit_reserve", "backend", "cache_mode", "cache_size", "chunk_size", "dummy_model_names",
        "force_enable_thinking", "gpu_split", "gpu_split_auto", "inline_model_loading", "max_batch_size",
        "max_seq_len", "model_dir", "model_name", "output_chunking", "prompt_template", "reasoning",
        "reasoning_end_token", "reasoning_start_token", "rope_alpha", "rope_scale", "tensor_parallel",
        "tensor_parallel_backend", "tool_format", "use_as_default", "use_dummy_models", "vision",
    },
    "draft_model": {
        "draft_cache_mode", "draft_gpu_split", "draft_mode", "draft_model_dir", "draft_model_name",
        "draft_num_tokens", "draft_rope_alpha", "draft_rope_scale", "ngram_match_min",
    },
    "lora": {"lora_dir", "loras"},
    "embeddings": {"embedding_model_dir", "embedding_model_name", "embeddings_device"},
    "sampling": {"override_preset"},
    "memory": {"cuda_malloc_async", "sysmem_recurrent_cache"},
    "developer": {
        "disable_request_streaming", "realtime_process_priority", "seqlog", "seqlog_api_key",
        "seqlog_server_url", "unsafe_launch",
    },
}  # fmt: skip
_ONLY_KEYS = {
    "exl2": {"model": {"reasoning_suppress_header"}},
    "exl3": {
        "network": {"sse_ping_interval"},
        "model": {
            "cpu_moe_offload_layers", "harmony", "muse_glimmer", "reasoning_budget_message",
            "reasoning_budget_tokens", "start_in_reasoning", "template_vars_default", "template_vars_force",
            "tool_calls_in_reasoning",
        },
        "draft_model": {"dynamic_draft"},
        "memory": {"sysmem_kv_cache"},
    },
}  # fmt: skip


def _generation(generation: str) -> str:
    if generation not in GENERATIONS:
        raise ValueError("generation %r is unknown: use exl2 (exl2-checkpoint branch) or exl3 (main)" % (generation,))
    return generation


def config_keys(generation: str) -> Dict[str, Set[str]]:
    """The config.yml keys, by section, that TabbyAPI knows at `generation`; it ignores others silently."""
    only = _ONLY_KEYS[_generation(generation)]
    return {section: set(keys) | only.get(section, set()) for section, keys in _COMMON_KEYS.items()}


def load_backend(generation: str, settings: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """The backend a load uses when known from the request alone: main has only exllamav3
    (common/model.py validate_backend); the exl2 branch takes model.backend, else detects it
    from the folder's quant_method (common/model.py detect_backend), which needs the files."""
    if _generation(generation) == "exl3":
        return "exllamav3"
    backend = (settings or {}).get("backend")
    return backend if backend in BACKENDS else None


def load_request(
    generation: str,
    model_name: str,
    settings: Optional[Dict[str, Any]] = None,
    draft: Optional[Dict[str, Any]] = None,
    backend: Optional[str] = None,
) -> Tuple[Dict[str, Any], List[str]]:
    """The JSON body of POST /v1/model/load for `model_name` and the keys left out of it.

    `settings` are config.yml `model:` keys, `draft` config.yml `draft_model:` keys (with
    draft_model_name). Keys the generation's request model does not have, or the backend never
    reads, are left out and named in the second value, so callers warn instead of comparing them.
    `backend` (optional) names the backend when the caller knows it from the model's files.
    """
    fields = MODEL_LOAD_FIELDS[_generation(generation)]
    backend = backend or load_backend(generation, settings)
    ignored = BACKEND_IGNORED.get(backend or "", frozenset())
    payload = {"model_name": model_name}  # type: Dict[str, Any]
    dropped = []  # type: List[str]
    for key, value in (settings or {}).items():
        if value is None or key in ("model_name", "model_dir", "draft_model"):
            continue
        if key in fields and key not in ignored:
            payload[key] = copy.deepcopy(value)
        else:
            dropped.append(key)
    if draft and draft.get("draft_model_name"):
        draft_fields = DRAFT_LOAD_FIELDS[generation]
        body = {}  # type: Dict[str, Any]
        for key, value in draft.items():
            if value is None:
                continue
            if key in draft_fields and key not in ignored:
                body[key] = copy.deepcopy(value)
            elif key != "draft_model_dir":
                dropped.append(key)
        payload["draft_model"] = body
    return payload, sorted(dropped)


def _round256(value: int) -> int:
    return (value + 255) // 256 * 256


def _cache_mode(value: Any) -> str:
    return str(value).replace(" ", "").upper()


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def expected_card(generation: str, payload: Dict[str, Any], backend: Optional[str] = None) -> Dict[str, Any]:
    """What GET /v1/model's `parameters` will report for the fields `payload` sets, per backend.

    Only fields the backend's model_info() reports truthfully are included; values are those the
    backend derives from the request:
    - exllamav2 (exl2 branch, backends/exllamav2/model.py): cache_size = cache_size or max_seq_len,
      rounded up to 256 (adjust_cache_size); max_seq_len limited to cache_size; a "K,V" cache_mode
      falls back to FP16; chunk_size clamped to 256..max_seq_len and rounded up to 256; rope_scale,
      rope_alpha (unless "auto") reported; the draft is a card with its id and rope values.
    - exllamav3 (both commits, backends/exllamav3/model.py): cache_size as given, else max_seq_len;
      max_seq_len limited to cache_size; cache_mode as given; chunk_size at least 256, rounded up
      to 256 (adjust_chunk_size); rope values and the draft are not reported.
    max_seq_len -1 (read from the model) and unset fields are not predicted.
    """
    backend = backend or load_backend(generation, payload) or "exllamav2"
    card = {}  # type: Dict[str, Any]
    max_seq_len = payload.get("max_seq_len")
    if max_seq_len is not None and max_seq_len <= 0:
        max_seq_len = None
    cache_size = payload.get("cache_size") or max_seq_len
    if cache_size:
        card["cache_size"] = _round256(cache_size) if backend == "exllamav2" else cache_size
    if max_seq_len:
        card["max_seq_len"] = min(max_seq_len, card["cache_size"])
    mode = payload.get("cache_mode")
    if mode is not None:
        mode = _cache_mode(mode)
        card["cache_mode"] = "FP16" if backend == "exllamav2" and not mode.startswith(("FP16", "Q")) else mode
    chunk = payload.get("chunk_size")
    if chunk is not None:
        chunk = max(256, chunk)
        if backend == "exllamav2" and card.get("max_seq_len"):
            chunk = min(chunk, card["max_seq_len"])
        card["chunk_size"] = _round256(chunk)
    if backend == "exllamav2":
        for key in ("rope_scale", "rope_alpha"):
            if payload.get(key) not in (None, "auto"):
                card[key] = float(payload[key])
        draft = payload.get("draft_model")
        if draft:
            card["draft"] = {"id": posixpath.basename(draft["draft_model_name"].rstrip("/"))}
            for key in ("rope_scale", "rope_alpha"):
                if draft.get("draft_" + key) not in (None, "auto"):
                    card["draft"][key] = float(draft["draft_" + key])
    return card


def card_differences(
    generation: str, card: Optional[Dict[str, Any]], payload: Dict[str, Any], backend: Optional[str] = None
) -> List[str]:
    """Requested fields of `payload` that GET /v1/model's `card` does not show as loaded.

    "model_name" when no model is loaded or the card's id (the folder's basename, which is all the
    card says about the path) differs; "draft_model" when the draft differs where the backend reports
    it (exllamav2 only; exllamav3's card never shows the draft). Fields the card does not report are
    not compared. `backend`: see load_request; at exl2 without it, the request's backend, else
    exllamav2, the exl2 branch's choice for any non-EXL3 folder.
    """
    if not card:
        return ["model_name"]
    backend = backend or load_backend(generation, payload) or "exllamav2"
    found = []  # type: List[str]
    if card.get("id") != posixpath.basename(str(payload["model_name"]).rstrip("/")):
        found.append("model_name")
    params = card.get("parameters") or {}
    for key, wanted in expected_card(generation, payload, backend).items():
        if key == "draft":
            continue
        have = params.get(key)
        if (
            key == "chunk_size"
            and backend == "exllamav2"
            and not payload.get("max_seq_len")
            and _is_int(params.get("max_seq_len"))
        ):
            # exllamav2 also caps the chunk at max_seq_len, here the one read from the model.
            wanted = _round256(min(max(256, payload["chunk_size"]), params["max_seq_len"]))
        if key == "cache_mode":
            have = _cache_mode(have)
        elif key in ("rope_scale", "rope_alpha"):
            have = _number(have)
        if have != wanted:
            found.append(key)
    wanted_draft = expected_card(generation, payload, backend).get("draft")
    if wanted_draft:
        have = params.get("draft") or {}
        draft_params = have.get("parameters") or {}
        if have.get("id") != wanted_draft["id"] or any(
            _number(draft_params.get(key)) != value for key, value in wanted_draft.items() if key != "id"
        ):
            found.append("draft_model")
    return found


def detect_backend(folder: str) -> str:
    """The backend the exl2 branch picks for a model folder without model.backend: exllamav3 for an
    EXL3 quant, else exllamav2 (common/model.py detect_backend at 79126f9)."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            quant = ((json.load(handle) or {}).get("quantization_config") or {}).get("quant_method")
    except (OSError, ValueError, AttributeError):
        quant = None
    return "exllamav3" if quant == "exl3" else "exllamav2"


def same_basename(model_dir: str, model_name: str, max_depth: int = 8) -> List[str]:
    """Other folders under model_dir (relative paths) whose basename is model_name's.

    GET /v1/model names the loaded model by its basename only, so these are the folders the card
    cannot tell apart from model_name. Links to model_name's own folder are the same model.
    """
    base = posixpath.basename(model_name.rstrip("/"))
    wanted = os.path.realpath(os.path.join(model_dir, model_name))
    found = []  # type: List[str]
    root_depth = model_dir.rstrip("/").count("/")
    for folder, subdirs, _files in os.walk(model_dir, followlinks=True):
        if folder.rstrip("/").count("/") - root_depth >= max_depth:
            subdirs[:] = []
        for sub in subdirs:
            path = os.path.join(folder, sub)
            if sub == base and os.path.realpath(path) != wanted:
                found.append(os.path.relpath(path, model_dir))
    return sorted(found)
