# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TabbyAPI config.yml rules shared by tabbyapi_config and model_load, and its api_tokens.yml reader.

The rules mirror TabbyAPI's own config model (common/config_models.py on main and on the
exl2-checkpoint branch): `backend` belongs to the `model` section; cache_mode is FP16/Q8/Q6/Q4,
or for exllamav3 also "K,V" bit pairs (2..8); draft_cache_mode is FP16/Q8/Q6/Q4 only;
cache_size is a multiple of 256. Each error names the key and how to fix it.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
from typing import Any, Dict, List, Optional, Tuple

BACKENDS = ("exllamav2", "exllamav3")
EXL2_CACHE_MODES = ("FP16", "Q8", "Q6", "Q4")
KV_CACHE_MODE = re.compile(r"^[2-8]\s*,\s*[2-8]$")
API_SERVERS = ("oai", "kobold")
# The model folder's quant_method decides which backend can load it.
QUANT_BACKEND = {"exl2": "exllamav2", "gptq": "exllamav2", "exl3": "exllamav3"}


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
            # TabbyAPI would silently raise the cache to max_seq_len, using VRAM nobody planned for.
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
    if model.get("gpu_split") and model.get("gpu_split_auto", True) and not model.get("tensor_parallel"):
        warnings.append("model.gpu_split is ignored while model.gpu_split_auto is true: set gpu_split_auto false")
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
