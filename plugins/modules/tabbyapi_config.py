#!/usr/bin/python
# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tabbyapi_config
short_description: Render and merge TabbyAPI's config.yml
version_added: 0.1.0
description:
  - Merges the options given into TabbyAPI's C(config.yml) and writes it atomically.
  - Keys already in the file that no option manages are kept. The free O(settings) mapping is
    deep-merged for keys this module does not model.
  - Selects the model as O(model_dir) + O(model_name), or splits one full O(model_path) into
    the two, because TabbyAPI loads C(model_dir/model_name).
  - Validates per generation. The exl2 generation uses O(backend=exllamav2) and O(cache_mode)
    V(FP16), V(Q8), V(Q6) or V(Q4). The exl3 generation uses O(backend=exllamav3), which also
    takes C(K,V) bit pairs such as V(8,8). O(cache_size) is checked as a multiple of 256 and at
    least O(max_seq_len); O(gpu_split) against O(gpu_count).
  - The file is rewritten only when its data changes. PyYAML does not keep comments, so a
    rewritten file loses them; use O(backup) to keep the previous copy.
  - TabbyAPI reads the backend from C(model.backend). A C(developer.backend) key, as some guides
    write it, is ignored by TabbyAPI; it is removed when O(backend) is set.
author:
  - llmstack maintainers (@llmstack)
requirements:
  - PyYAML on the managed node
extends_documentation_fragment:
  - ansible.builtin.files
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: posix
options:
  path:
    description: Path of C(config.yml), normally in TabbyAPI's working directory.
    type: path
    required: true
  model_dir:
    description:
      - Parent folder of the models (C(model.model_dir)).
      - With O(model_path), the folder O(model_path) is taken relative to.
    type: str
  model_name:
    description:
      - Model folder below O(model_dir) (C(model.model_name)); may contain subfolders such as
        C(exl2/Llama-3.1-70B-4.0bpw). Must be relative.
    type: str
  model_path:
    description:
      - Full path of the model folder, split into C(model_dir) and C(model_name).
      - Without O(model_dir), the last folder becomes C(model_name) and its parent C(model_dir).
      - With O(model_dir), C(model_name) is the path relative to O(model_dir).
    type: str
  backend:
    description: C(model.backend). V(exllamav2) loads EXL2 models (TabbyAPI's exl2-checkpoint branch),
      V(exllamav3) EXL3 models.
    type: str
    choices: [exllamav2, exllamav3]
  max_seq_len:
    description: C(model.max_seq_len); V(-1) reads it from the model's config.json.
    type: int
  cache_size:
    description: C(model.cache_size) in tokens; a multiple of 256, at least O(max_seq_len).
    type: int
  cache_mode:
    description: C(model.cache_mode). V(FP16), V(Q8), V(Q6), V(Q4), or with exllamav3 C(K,V) such as V(8,8).
    type: str
  chunk_size:
    description: C(model.chunk_size), prompt ingestion chunk in tokens.
    type: int
  max_batch_size:
    description: C(model.max_batch_size), concurrent generation jobs.
    type: int
  gpu_split_auto:
    description: C(model.gpu_split_auto).
    type: bool
  gpu_split:
    description: C(model.gpu_split), GB of VRAM per GPU.
    type: list
    elements: float
  autosplit_reserve:
    description: C(model.autosplit_reserve), MB of VRAM reserved per GPU during autosplit.
    type: list
    elements: float
  tensor_parallel:
    description: C(model.tensor_parallel).
    type: bool
  draft_model_dir:
    description: C(draft_model.draft_model_dir).
    type: str
  draft_model_name:
    description: C(draft_model.draft_model_name), relative to the draft model folder.
    type: str
  draft_model_path:
    description: Full path of the draft model, split like O(model_path) (relative to O(draft_model_dir) when given).
    type: str
  draft_cache_mode:
    description: C(draft_model.draft_cache_mode); TabbyAPI accepts V(FP16), V(Q8), V(Q6), V(Q4) only.
    type: str
  host:
    description: C(network.host).
    type: str
  port:
    description: C(network.port).
    type: int
  disable_auth:
    description: C(network.disable_auth).
    type: bool
  api_servers:
    description: C(network.api_servers), V(OAI) and/or V(Kobold).
    type: list
    elements: str
  log_prompt:
    description: C(logging.log_prompt).
    type: bool
  log_generation_params:
    description: C(logging.log_generation_params).
    type: bool
  log_requests:
    description: C(logging.log_requests).
    type: bool
  unsafe_launch:
    description: C(developer.unsafe_launch).
    type: bool
  settings:
    description:
      - Further config.yml content, by section, deep-merged into the file (for example C(sampling),
        C(lora), or model keys such as C(rope_alpha)).
      - Options above win; a different value for the same key here is an error.
      - A section or key the O(generation) does not know gets a warning, since TabbyAPI ignores it silently.
    type: dict
    default: {}
  generation:
    description:
      - TabbyAPI generation on the node, as the tabbyapi role's C(tabbyapi_generation); decides which
        keys in O(settings) TabbyAPI knows (C(common/config_models.py) at the pinned commit).
      - V(exl3) is TabbyAPI main (backend exllamav3 only), V(exl2) the exl2-checkpoint branch.
    type: str
    choices: [exl2, exl3]
    default: exl3
  gpu_count:
    description: Number of GPUs on the node; O(gpu_split), O(autosplit_reserve) and C(draft_gpu_split)
      may not have more entries.
    type: int
  check_model:
    description:
      - Check that the model (and draft model) folder exists on the node, holds C(config.json),
        and that its quantization matches O(backend).
      - A relative C(model_dir) is taken relative to the folder of O(path), TabbyAPI's working directory.
    type: bool
    default: false
  backup:
    description: Keep a timestamped copy of the previous file when it changes.
    type: bool
    default: false
seealso:
  - module: llmstack.inference.model_load
  - name: TabbyAPI config_sample.yml
    description: Every key with TabbyAPI's own comments.
    link: https://github.com/theroyallab/tabbyAPI/blob/main/config_sample.yml
"""

EXAMPLES = r"""
- name: Configure an EXL2 model (exl2 generation)
  llmstack.inference.tabbyapi_config:
    path: /opt/llmstack/tabbyapi/app/config.yml
    model_path: /mnt/models/exl2/Llama-3.1-70B-4.0bpw
    backend: exllamav2
    cache_mode: Q4
    max_seq_len: 32768
    cache_size: 32768
    gpu_count: 2
    gpu_split_auto: true
    host: 127.0.0.1
    port: 5000
    owner: root
    group: tabbyapi
    mode: "0640"
    backup: true

- name: Keep model_dir, change only the model (relative model_name with a subfolder)
  llmstack.inference.tabbyapi_config:
    path: /opt/llmstack/tabbyapi/app/config.yml
    model_dir: /mnt/models
    model_name: exl3/Qwen3-32B-4.0bpw
    backend: exllamav3
    cache_mode: "8,8"
    check_model: true

- name: Keys the module does not model
  llmstack.inference.tabbyapi_config:
    path: /opt/llmstack/tabbyapi/app/config.yml
    settings:
      sampling:
        override_preset: safe_defaults
      model:
        rope_alpha: auto
"""

RETURN = r"""
config:
  description: The whole resulting config.yml content.
  returned: success
  type: dict
  sample: {"model": {"model_dir": "/mnt/models/exl2", "model_name": "Llama-3.1-70B-4.0bpw", "backend": "exllamav2"}}
model_dir:
  description: The resulting C(model.model_dir) (null when unset).
  returned: success
  type: str
  sample: /mnt/models/exl2
model_name:
  description: The resulting C(model.model_name) (null when unset).
  returned: success
  type: str
  sample: Llama-3.1-70B-4.0bpw
backup_file:
  description: Path of the backup copy.
  returned: changed and O(backup=true) and the file existed
  type: str
  sample: /opt/llmstack/tabbyapi/app/config.yml.12345.2026-07-01@12:00:00~
diff:
  description: The file before and after as YAML text.
  returned: success
  type: dict
  contains:
    before:
      description: Text before.
      type: str
    after:
      description: Text after.
      type: str
"""

import os
import tempfile
import traceback
from typing import Any, Dict

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi import (
    check_model_folder,
    config_keys,
    conflicts,
    deep_merge,
    split_model_path,
    validate,
)

try:
    import yaml

    YAML_IMPORT_ERROR = None
except ImportError:
    YAML_IMPORT_ERROR = traceback.format_exc()

SECTIONS = {
    "model": (
        "model_dir",
        "model_name",
        "backend",
        "max_seq_len",
        "cache_size",
        "cache_mode",
        "chunk_size",
        "max_batch_size",
        "gpu_split_auto",
        "gpu_split",
        "autosplit_reserve",
        "tensor_parallel",
    ),
    "draft_model": ("draft_model_dir", "draft_model_name", "draft_cache_mode"),
    "network": ("host", "port", "disable_auth", "api_servers"),
    "logging": ("log_prompt", "log_generation_params", "log_requests"),
    "developer": ("unsafe_launch",),
}


def managed_values(params: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    values = {}  # type: Dict[str, Dict[str, Any]]
    for section, keys in SECTIONS.items():
        chosen = {key: params[key] for key in keys if params.get(key) is not None}
        if chosen:
            values[section] = chosen
    return values


def unknown_keys(generation: str, settings: Dict[str, Any]) -> list:
    """Dotted settings keys TabbyAPI at `generation` does not know; it drops them without a word."""
    known = config_keys(generation)
    found = []
    for section, keys in settings.items():
        if section not in known:
            found.append(str(section))
        elif isinstance(keys, dict):
            found.extend("%s.%s" % (section, key) for key in keys if key not in known[section])
    return found


def resolve_paths(module: AnsibleModule, params: Dict[str, Any]) -> None:
    for prefix in ("", "draft_"):
        name_key, dir_key, path_key = prefix + "model_name", prefix + "model_dir", prefix + "model_path"
        if params.get(path_key):
            try:
                params[dir_key], params[name_key] = split_model_path(params[path_key], params.get(dir_key))
            except ValueError as exc:
                module.fail_json(msg="%s: %s" % (path_key, exc))
        elif params.get(name_key, "") and params[name_key].startswith("/"):
            module.fail_json(
                msg="%s %s is absolute: TabbyAPI loads model_dir/model_name, so give the parent as %s and "
                "the folder below it as %s, or pass the full path as %s"
                % (name_key, params[name_key], dir_key, name_key, path_key)
            )


def read_existing(module: AnsibleModule, path: str) -> tuple:
    if not os.path.exists(path):
        if not os.path.isdir(os.path.dirname(path) or "."):
            module.fail_json(
                msg="path %s: folder %s does not exist; create TabbyAPI's directory first"
                % (path, os.path.dirname(path))
            )
        return False, "", {}
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        data = yaml.safe_load(text) if text.strip() else {}
    except (OSError, yaml.YAMLError) as exc:
        module.fail_json(msg="path %s is not readable YAML (%s): fix it or restore a backup" % (path, exc))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        module.fail_json(msg="path %s must hold a YAML mapping of sections, not %s" % (path, type(data).__name__))
    return True, text, data


def check_models(module: AnsibleModule, config: Dict[str, Any], path: str) -> None:
    workdir = os.path.dirname(os.path.abspath(path))
    model = config.get("model") or {}
    draft = config.get("draft_model") or {}
    backend = model.get("backend")
    for kind, folder, name in (
        ("model", model.get("model_dir") or "models", model.get("model_name")),
        ("draft model", draft.get("draft_model_dir") or "models", draft.get("draft_model_name")),
    ):
        if name:
            problem = check_model_folder(kind, os.path.join(workdir, folder), name, backend)
            if problem:
                module.fail_json(msg="check_model: " + problem)


def write_file(module: AnsibleModule, path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".config.yml.", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        module.atomic_move(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dump(config: Dict[str, Any]) -> str:
    return yaml.safe_dump(config, default_flow_style=False, sort_keys=False, allow_unicode=True)


def run(module: AnsibleModule) -> Dict[str, Any]:
    params = dict(module.params)
    path = params["path"]
    resolve_paths(module, params)
    managed = managed_values(params)
    settings = params["settings"] or {}
    clashes = conflicts(settings, managed)
    if clashes:
        module.fail_json(
            msg="settings sets %s, which options also set to other values: set each key once" % ", ".join(clashes)
        )

    unknown = unknown_keys(params["generation"], settings)
    if unknown:
        module.warn(
            "settings holds %s, which TabbyAPI (generation %s) does not know and ignores: check the spelling "
            "against its config_sample.yml, or the generation" % (", ".join(unknown), params["generation"])
        )
    if params["generation"] == "exl3" and params.get("backend") == "exllamav2":
        module.warn("TabbyAPI main (generation exl3) refuses backend exllamav2: use exllamav3, or generation exl2")

    exists, before_text, existing = read_existing(module, path)
    config = deep_merge(deep_merge(existing, settings), managed)
    developer = config.get("developer")
    if params.get("backend") and isinstance(developer, dict) and "backend" in developer:
        del developer["backend"]
        if not developer:
            del config["developer"]

    errors, warnings = validate(config, params.get("gpu_count"))
    if errors:
        module.fail_json(msg="config.yml would be invalid: " + "; ".join(errors), errors=errors)
    for warning in warnings:
        module.warn(warning)
    if params["check_model"]:
        check_models(module, config, path)

    changed = not exists or config != existing
    after_text = dump(config) if changed else before_text
    result = {"changed": changed, "config": config}  # type: Dict[str, Any]
    if changed and not module.check_mode:
        if exists and params["backup"]:
            result["backup_file"] = module.backup_local(path)
        write_file(module, path, after_text)
    file_args = module.load_file_common_arguments(module.params)
    if exists or not module.check_mode:
        result["changed"] = module.set_fs_attributes_if_different(file_args, result["changed"])
    model = config.get("model") or {}
    result["model_dir"] = model.get("model_dir")
    result["model_name"] = model.get("model_name")
    result["diff"] = {"before": before_text, "after": after_text, "before_header": path, "after_header": path}
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            model_dir=dict(type="str"),
            model_name=dict(type="str"),
            model_path=dict(type="str"),
            backend=dict(type="str", choices=["exllamav2", "exllamav3"]),
            max_seq_len=dict(type="int"),
            cache_size=dict(type="int"),
            cache_mode=dict(type="str"),
            chunk_size=dict(type="int"),
            max_batch_size=dict(type="int"),
            gpu_split_auto=dict(type="bool"),
            gpu_split=dict(type="list", elements="float"),
            autosplit_reserve=dict(type="list", elements="float"),
            tensor_parallel=dict(type="bool"),
            draft_model_dir=dict(type="str"),
            draft_model_name=dict(type="str"),
            draft_model_path=dict(type="str"),
            draft_cache_mode=dict(type="str"),
            host=dict(type="str"),
            port=dict(type="int"),
            disable_auth=dict(type="bool"),
            api_servers=dict(type="list", elements="str"),
            log_prompt=dict(type="bool"),
            log_generation_params=dict(type="bool"),
            log_requests=dict(type="bool"),
            unsafe_launch=dict(type="bool"),
            settings=dict(type="dict", default={}),
            generation=dict(type="str", choices=["exl2", "exl3"], default="exl3"),
            gpu_count=dict(type="int"),
            check_model=dict(type="bool", default=False),
            backup=dict(type="bool", default=False),
        ),
        mutually_exclusive=[("model_name", "model_path"), ("draft_model_name", "draft_model_path")],
        add_file_common_args=True,
        supports_check_mode=True,
    )
    if YAML_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("PyYAML"), exception=YAML_IMPORT_ERROR)
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
