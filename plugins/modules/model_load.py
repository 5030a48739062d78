#!/usr/bin/python
# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_load
short_description: Load or unload a model in a running TabbyAPI through its admin API
version_added: 0.1.0
description:
  - Reads the loaded model with C(GET /v1/model) first and does nothing when the wanted model
    (and draft model, when given) is already loaded with the given load parameters.
  - Otherwise calls C(POST /v1/model/load) and follows its Server-Sent-Events progress stream
    (one event per loaded module) until the model reports C(finished), or C(POST /v1/model/unload).
  - The request is built for the TabbyAPI O(generation). Keys its load request does not have
    (for example C(max_batch_size), C(draft_cache_mode)) or its backend never reads (rope keys with
    exllamav3) are neither sent nor compared, with a warning naming them; set those in C(config.yml).
  - Only what the model card reports is compared (C(max_seq_len), C(cache_size), C(cache_mode),
    C(chunk_size); with exllamav2 also the rope values and the draft model), as the backend derives
    it from the request (cache_size rounded up to 256 by exllamav2, max_seq_len limited to cache_size).
  - A model is its whole folder path below C(model_dir), but the card reports the folder's last
    component only. When another folder with that name exists below O(model_dir) (or the name is
    nested and O(model_dir) is unknown), generation V(exl3) sends the load anyway; TabbyAPI main
    compares full paths and answers a load of the loaded folder with one finished event and no
    reload, which the module reports as unchanged. Generation V(exl2) compares basenames itself and
    skips such a load, so the module takes the loaded model as the wanted one and warns; O(force)
    reloads it for sure.
  - A load of the loaded model with other parameters unloads it first, because TabbyAPI answers
    such a load as already done at both generations.
  - The admin key is given, or read from the node's C(api_tokens.yml).
  - Runs on the node (or any host that reaches O(url)); needs no Python package beyond Ansible's own.
author:
  - llmstack maintainers (@llmstack)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - llmstack.inference._http
  - llmstack.inference._http.admin_key
attributes:
  check_mode:
    support: full
    details:
      - Reads the loaded model; reports what would change without loading or unloading.
      - Where only a load could prove which of several same-named folders is loaded (generation
        V(exl3)), check mode reports the loaded one as unchanged and warns.
  diff_mode:
    support: full
  platform:
    platforms: posix
options:
  state:
    description: V(loaded) makes O(model_name) the loaded model; V(unloaded) unloads whatever is loaded.
    type: str
    choices: [loaded, unloaded]
    default: loaded
  generation:
    description:
      - TabbyAPI generation on the node, as the tabbyapi role's C(tabbyapi_generation).
      - V(exl3) is TabbyAPI main (backend exllamav3 only); V(exl2) the exl2-checkpoint branch
        (backends exllamav2 and exllamav3).
    type: str
    choices: [exl2, exl3]
    default: exl3
  model_name:
    description: Model folder relative to TabbyAPI's C(model_dir), as in C(config.yml); may be nested
      (C(exl3/Llama-3.1-70B/4.0bpw)). Required for V(loaded).
    type: str
  model_dir:
    description:
      - TabbyAPI's C(model_dir) on this host. Lets the module see other folders with the basename of
        O(model_name), and, for generation V(exl2), the backend a folder's quantization picks.
      - When omitted, read from O(config_file) when given.
    type: path
  config_file:
    description: TabbyAPI's C(config.yml); its C(model.model_dir) (relative to the file's folder) is
      used when O(model_dir) is not given.
    type: path
  draft_model_name:
    description:
      - Draft model folder relative to C(draft_model_dir). When omitted, any draft model (or none) is accepted.
      - The exllamav3 model card does not report the draft model; with exllamav3 the module reads the
        loaded draft from C(GET /v1/model/draft/list) with the C(api_key) of O(api_tokens_file) (the
        admin key gets every draft folder instead). Without it, a loaded model is not reloaded for
        another draft model; use O(force).
    type: str
  draft_params:
    description:
      - Further draft settings as C(config.yml) C(draft_model) keys, for example C(draft_rope_alpha),
        C(draft_gpu_split). TabbyAPI's load request has no C(draft_cache_mode) at either generation.
    type: dict
    default: {}
  load_params:
    description:
      - Further load settings as C(config.yml) C(model) keys, for example C(max_seq_len), C(cache_size),
        C(cache_mode), C(gpu_split), C(gpu_split_auto), C(tensor_parallel), C(backend).
      - Those the model card reports take part in the idempotency check (see above).
    type: dict
    default: {}
  force:
    description: Reload even when the model is already loaded.
    type: bool
    default: false
  timeout:
    description:
      - Seconds allowed for the whole load (large models on slow storage take minutes).
      - The other requests (reading and unloading the model) get 30 seconds each.
    default: 600
seealso:
  - module: llmstack.inference.tabbyapi_config
  - module: llmstack.inference.model_probe
"""

EXAMPLES = r"""
- name: Switch TabbyAPI to another model, key read from the node
  llmstack.inference.model_load:
    url: http://127.0.0.1:5000
    api_tokens_file: /etc/llmstack/tabbyapi/api_tokens.yml
    config_file: /opt/llmstack/tabbyapi/app/config.yml
    model_name: exl3/Qwen3-32B/4.0bpw
    load_params:
      max_seq_len: 16384
      cache_mode: "8,8"
  become: true

- name: Load with a draft model on the exl2 generation, key from Vault
  llmstack.inference.model_load:
    generation: exl2
    admin_key: "{{ vault_tabbyapi_admin_key }}"
    model_name: Llama-3.1-70B-exl2-4.0bpw
    draft_model_name: Llama-3.2-1B-Instruct-exl2-4.0bpw
    draft_params:
      draft_rope_alpha: 1.0
  no_log: true

- name: Free the GPU
  llmstack.inference.model_load:
    api_tokens_file: /etc/llmstack/tabbyapi/api_tokens.yml
    state: unloaded
"""

RETURN = r"""
previous_model:
  description: Id (folder name) of the model loaded before, null when none.
  returned: always
  type: str
  sample: Llama-3.1-8B-exl2
current_model:
  description: Id of the model loaded after the module ran (in check mode, the one that would be).
  returned: always
  type: str
  sample: Qwen3-32B-4.0bpw
dropped:
  description: Settings left out of the load request, because the generation's request or backend has no use for them.
  returned: state is loaded
  type: list
  elements: str
  sample: [max_batch_size]
differences:
  description: Fields of the request the loaded model's card did not show before the run.
  returned: state is loaded
  type: list
  elements: str
  sample: [cache_mode]
previous_draft_model:
  description: Id of the draft model loaded before, null when none.
  returned: always
  type: str
current_draft_model:
  description: Id of the draft model loaded after; null with exllamav3, whose model card does not report it.
  returned: always
  type: str
progress:
  description: Summary of the load's progress stream.
  returned: when a load ran
  type: dict
  contains:
    events:
      description: Progress events received.
      type: int
    model_modules:
      description: Modules of the model.
      type: int
    draft_modules:
      description: Modules of the draft model (0 without one).
      type: int
    finished:
      description: Whether the model reported C(finished).
      type: bool
    reloaded:
      description: False when TabbyAPI answered that the model was loaded already (main's one-module answer).
      type: bool
    seconds:
      description: Wall time of the load request.
      type: float
"""

import os
import time
from typing import Any, Dict, Optional

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llmstack.inference.plugins.module_utils._http import (
    HttpConfigError,
    HttpResult,
    TransportError,
    client_from_params,
    http_argument_spec,
    iter_sse,
)
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi import (
    TokenFileError,
    card_differences,
    detect_backend,
    key_from_params,
    load_backend,
    load_request,
    read_api_token,
    same_basename,
)

CARD_PARAMS = ("max_seq_len", "cache_size", "cache_mode", "chunk_size", "max_batch_size")
REQUEST_TIMEOUT = 30.0


class TabbyAdmin:
    def __init__(self, module: AnsibleModule, key: Optional[str]) -> None:
        self.module = module
        self.url = module.params["url"]
        headers = {}  # type: Dict[str, str]
        if key:
            headers = {"x-admin-key": key, "Authorization": "Bearer " + key}
        try:
            self.client = client_from_params(module.params, headers)
        except HttpConfigError as exc:
            module.fail_json(msg=str(exc))

    def call(self, method: str, path: str, payload: Any = None) -> HttpResult:
        try:
            return self.client.call(method, path, payload, REQUEST_TIMEOUT)
        except TransportError as exc:
            self.module.fail_json(
                msg="TabbyAPI is not reachable (%s): start the service first; "
                "llmstack.inference.model_probe waits until it answers" % exc
            )

    def fail_http(self, what: str, result: HttpResult) -> None:
        hint = ""
        if result.status == 401:
            hint = ": the admin key was refused; give admin_key or the api_tokens_file TabbyAPI uses"
        elif result.status == 400:
            hint = ": model_name is relative to model_dir in TabbyAPI's config.yml"
        self.module.fail_json(
            msg="%s failed with HTTP %d: %s%s" % (what, result.status, result.error_detail(), hint),
            status=result.status,
        )

    def current(self) -> Optional[Dict[str, Any]]:
        result = self.call("GET", "/v1/model")
        if result.status == 503:
            return None
        if result.status != 200:
            self.fail_http("GET /v1/model", result)
        card = result.json()
        if not isinstance(card, dict) or "id" not in card:
            self.module.fail_json(msg="GET /v1/model answered without a model card: is %s TabbyAPI?" % self.url)
        return card

    def load(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        started = time.monotonic()
        progress = {"events": 0, "model_modules": 0, "draft_modules": 0, "finished": False, "seconds": 0.0}
        progress["reloaded"] = True
        timeout = float(self.module.params["timeout"])
        try:
            response = self.client.open_stream("POST", "/v1/model/load", payload, timeout)
        except TransportError as exc:
            self.module.fail_json(msg="POST /v1/model/load: %s" % exc)
        if isinstance(response, HttpResult):
            self.fail_http("POST /v1/model/load", response)
        with response:
            try:
                for event in iter_sse(response):
                    self._record(event.data, progress)
                    if time.monotonic() - started > timeout:
                        self.module.fail_json(
                            msg="model load exceeded timeout=%ss: raise timeout" % timeout, progress=progress
                        )
            except TransportError as exc:
                self.module.fail_json(
                    msg="model load stream broke off: %s; raise timeout if the load is slow" % exc, progress=progress
                )
        progress["seconds"] = round(time.monotonic() - started, 3)
        if not progress["finished"]:
            self.module.fail_json(msg="model load stream ended before the model finished loading", progress=progress)
        # main's answer for the loaded folder is module 1 of 1 (common/model.py load_model_gen); a real
        # load has several modules (embedding, layers, head) per model.
        progress["reloaded"] = not (progress["model_modules"] == 1 and progress["draft_modules"] == 0)
        return progress

    def _record(self, data: str, progress: Dict[str, Any]) -> None:
        try:
            event = HttpResult(200, {}, data.encode("utf-8")).json()
        except ValueError:
            event = None
        if not isinstance(event, dict):
            return
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            self.module.fail_json(msg="TabbyAPI failed to load the model: %s" % message, progress=progress)
        progress["events"] += 1
        kind = event.get("model_type", "model")
        if kind in ("model", "draft"):
            progress[kind + "_modules"] = int(event.get("modules") or 0)
        if kind == "model" and event.get("status") == "finished":
            progress["finished"] = True


def describe(card: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if not card:
        return {"model": None, "draft_model": None, "parameters": {}}
    params = card.get("parameters") or {}
    draft = params.get("draft") or {}
    return {
        "model": card.get("id"),
        "draft_model": draft.get("id"),
        "parameters": {key: params.get(key) for key in CARD_PARAMS if key in params},
    }


def folder_id(name: Optional[str]) -> Optional[str]:
    # TabbyAPI reports a model by its folder's name, whatever the subfolders in model_name.
    return os.path.basename(name.rstrip("/")) if name else None


def resolve_model_dir(module: AnsibleModule) -> Optional[str]:
    """model_dir as given, else config.yml's model.model_dir (relative to the file's folder, which is
    TabbyAPI's working directory), else None: then the module cannot look at the folders."""
    params = module.params
    if params["model_dir"]:
        return params["model_dir"]
    if not params["config_file"]:
        return None
    try:
        import yaml  # pylint: disable=import-outside-toplevel

        with open(params["config_file"], encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except ImportError:
        module.fail_json(msg="config_file needs PyYAML on the node: install it, or give model_dir")
    except (OSError, ValueError) as exc:
        module.fail_json(msg="config_file %s is not readable YAML (%s): give model_dir" % (params["config_file"], exc))
    model_dir = (config.get("model") or {}).get("model_dir") if isinstance(config, dict) else None
    # common/config_models.py: model_dir defaults to "models".
    return os.path.join(os.path.dirname(os.path.abspath(params["config_file"])), model_dir or "models")


def unproven_identity(module: AnsibleModule, model_dir: Optional[str]) -> str:
    """Why a card whose id is model_name's basename may still be another folder ("" when it cannot)."""
    name = module.params["model_name"]
    if model_dir is None:
        return "model_dir is unknown and the name is nested; give model_dir" if "/" in name.strip("/") else ""
    if not os.path.isdir(model_dir):
        module.fail_json(msg="model_dir %s is not a folder on this host: give TabbyAPI's model_dir" % model_dir)
    others = same_basename(model_dir, name)
    return "%s also holds %s" % (model_dir, ", ".join(others)) if others else ""


def load_settings(module: AnsibleModule, model_dir: Optional[str]) -> tuple:
    params = module.params
    generation = params["generation"]
    settings = dict(params["load_params"] or {})
    draft = None
    if params["draft_model_name"]:
        draft = dict(params["draft_params"] or {}, draft_model_name=params["draft_model_name"])
    elif params["draft_params"]:
        module.fail_json(msg="draft_params needs draft_model_name: name the draft model folder")
    backend = load_backend(generation, settings)
    if backend is None and model_dir:
        backend = detect_backend(os.path.join(model_dir, params["model_name"]))
    try:
        payload, dropped = load_request(generation, params["model_name"], settings, draft, backend)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    if dropped:
        module.warn(
            "TabbyAPI (generation %s, backend %s) takes no %s in a load request, so they are neither sent "
            "nor compared: set them in config.yml, which applies them to API loads only when model.use_as_default "
            "names them" % (generation, backend or "detected by TabbyAPI", ", ".join(dropped))
        )
    return payload, dropped, backend


def draft_list(module: AnsibleModule, api: TabbyAdmin) -> Optional[list]:
    """Basenames of the loaded draft model from GET /v1/model/draft/list, or None when unknowable.

    Asked with the API key: with the admin key (or auth disabled) TabbyAPI lists every draft
    folder instead of the loaded one (endpoints/core/router.py list_draft_models, common/auth.py
    get_key_permission, the same at both commits). Needs api_key from api_tokens_file.
    """
    path = module.params["api_tokens_file"]
    if not path:
        return None
    try:
        key = read_api_token(path, "api_key", "api_tokens_file")
    except TokenFileError:
        return None
    module.no_log_values.add(key)
    answers = []
    for client in (client_from_params(module.params, {"x-api-key": key}), api.client):
        try:
            result = client.call("GET", "/v1/model/draft/list", None, REQUEST_TIMEOUT)
            data = result.json() if result.status == 200 else None
        except (TransportError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return None
        answers.append(sorted(str((card or {}).get("id")) for card in data["data"] if isinstance(card, dict)))
    # The same non-empty answer for both keys means the API key got the full listing (auth disabled).
    return None if answers[0] and answers[0] == answers[1] else answers[0]


def unload(api: TabbyAdmin) -> None:
    unloaded = api.call("POST", "/v1/model/unload")
    if unloaded.status not in (200, 503):
        api.fail_http("POST /v1/model/unload", unloaded)


def run_loaded(module: AnsibleModule, api: TabbyAdmin, card: Optional[Dict[str, Any]], result: Dict[str, Any]):
    params = module.params
    generation = params["generation"]
    model_dir = resolve_model_dir(module)
    payload, dropped, backend = load_settings(module, model_dir)
    differences = card_differences(generation, card, payload, backend)
    result.update(dropped=dropped, differences=differences)
    name, draft = folder_id(params["model_name"]), folder_id(params["draft_model_name"])
    wanted = {"model": name, "draft_model": draft, "parameters": {}}
    if draft and backend == "exllamav3" and not differences and not params["force"]:
        loaded = draft_list(module, api)
        if loaded is None:
            module.warn(
                "TabbyAPI's exllamav3 model card does not report the draft model, so draft %s is not checked: "
                "give api_tokens_file (its api_key reads the loaded draft), or set force to reload with it" % draft
            )
        elif loaded != [draft]:
            differences.append("draft_model")
    doubt = "" if differences else unproven_identity(module, model_dir)
    if not (differences or doubt or params["force"]):
        return describe(card)
    if doubt and not params["force"]:
        if generation == "exl2":
            # common/model.py load_model_gen at 79126f9 compares basenames and skips the load, so the
            # server itself holds the loaded folder for the wanted one.
            module.warn(
                "the loaded model %s may not be %s (%s): TabbyAPI exl2 names models by folder basename and "
                "skips a load of the same name; set force to unload and load it" % (name, params["model_name"], doubt)
            )
            return describe(card)
        if module.check_mode:
            module.warn(
                "check mode cannot prove that the loaded %s is %s (%s): a real run sends the load, which TabbyAPI "
                "answers without reloading when it is" % (name, params["model_name"], doubt)
            )
            return describe(card)
        # main's common/model.py load_model_gen compares full resolved paths: the loaded folder
        # answers one finished event without a reload, another folder is really loaded.
        progress = api.load(payload)
        result["progress"] = progress
        result["changed"] = progress["reloaded"]
        return check_after(module, api, payload, backend, result)
    result["changed"] = True
    if module.check_mode:
        return wanted
    if card is not None and (params["force"] or "model_name" not in differences):
        # A load of the loaded name (exl2) or path (main) is answered as done without a reload.
        unload(api)
    result["progress"] = api.load(payload)
    return check_after(module, api, payload, backend, result)


def check_after(module: AnsibleModule, api: TabbyAdmin, payload: Dict[str, Any], backend, result) -> Dict[str, Any]:
    card = api.current()
    after = describe(card)
    name = folder_id(module.params["model_name"])
    if after["model"] != name:
        module.fail_json(msg="load reported finished but /v1/model shows %s, not %s" % (after["model"], name), **result)
    left = card_differences(module.params["generation"], card, payload, backend)
    if left:
        module.warn(
            "%s is loaded, but /v1/model reports %s other than requested: check TabbyAPI's log for the values "
            "it adjusted" % (name, ", ".join(left))
        )
    return after


def run(module: AnsibleModule) -> Dict[str, Any]:
    params = module.params
    api = TabbyAdmin(module, key_from_params(module, "admin_key", "admin_key"))
    card = api.current()
    before = describe(card)
    result = {"changed": False, "previous_model": before["model"], "previous_draft_model": before["draft_model"]}
    after = dict(before)
    if params["state"] == "unloaded":
        if before["model"] is not None:
            result["changed"] = True
            after = describe(None)
            if not module.check_mode:
                unloaded = api.call("POST", "/v1/model/unload")
                if unloaded.status != 200:
                    api.fail_http("POST /v1/model/unload", unloaded)
                after = describe(api.current())
    else:
        after = run_loaded(module, api, card, result)
    result["current_model"] = after["model"]
    result["current_draft_model"] = after["draft_model"]
    result["diff"] = {"before": before, "after": after}
    return result


def main() -> None:
    argument_spec = http_argument_spec("admin_key", timeout=600)
    argument_spec.update(
        state=dict(type="str", choices=["loaded", "unloaded"], default="loaded"),
        generation=dict(type="str", choices=["exl2", "exl3"], default="exl3"),
        model_name=dict(type="str"),
        model_dir=dict(type="path"),
        config_file=dict(type="path"),
        draft_model_name=dict(type="str"),
        draft_params=dict(type="dict", default={}),
        load_params=dict(type="dict", default={}),
        force=dict(type="bool", default=False),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        required_if=[("state", "loaded", ("model_name",))],
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
