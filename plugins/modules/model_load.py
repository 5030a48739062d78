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
  - TabbyAPI answers a load of the model already loaded with "finished" whatever the draft model
    or parameters asked, so a reload of the same model unloads it first.
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
    details: Reads the loaded model; reports what would change without loading or unloading.
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
  model_name:
    description: Model folder relative to TabbyAPI's C(model_dir), as in C(config.yml). Required for V(loaded).
    type: str
  draft_model_name:
    description:
      - Draft model folder relative to C(draft_model_dir). When omitted, any draft model (or none) is accepted.
    type: str
  load_params:
    description:
      - Further load request fields, for example C(max_seq_len), C(cache_size), C(cache_mode),
        C(gpu_split), C(backend).
      - Those TabbyAPI reports in the model card (C(max_seq_len), C(cache_size), C(cache_mode),
        C(chunk_size), C(max_batch_size)) take part in the idempotency check.
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
    model_name: exl3/Qwen3-32B-4.0bpw
    load_params:
      max_seq_len: 16384
      cache_mode: "8,8"
  become: true

- name: Load with a draft model, key from Vault
  llmstack.inference.model_load:
    admin_key: "{{ vault_tabbyapi_admin_key }}"
    model_name: Llama-3.1-70B-exl2-4.0bpw
    draft_model_name: Llama-3.2-1B-Instruct-exl2-4.0bpw
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
previous_draft_model:
  description: Id of the draft model loaded before, null when none.
  returned: always
  type: str
current_draft_model:
  description: Id of the draft model loaded after.
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
from ansible_collections.llmstack.inference.plugins.module_utils._tabbyapi import key_from_params

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


def needs_load(state: Dict[str, Any], name: str, draft: Optional[str], load_params: Dict[str, Any]) -> bool:
    if state["model"] != name:
        return True
    if draft is not None and state["draft_model"] != draft:
        return True
    for key in CARD_PARAMS:
        wanted = load_params.get(key)
        if wanted is not None and str(wanted).replace(" ", "") != str(state["parameters"].get(key)).replace(" ", ""):
            return True
    return False


def folder_id(name: Optional[str]) -> Optional[str]:
    # TabbyAPI reports a model by its folder's name, whatever the subfolders in model_name.
    return os.path.basename(name.rstrip("/")) if name else None


def run(module: AnsibleModule) -> Dict[str, Any]:
    params = module.params
    api = TabbyAdmin(module, key_from_params(module, "admin_key", "admin_key"))
    before = describe(api.current())
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
        name, draft = folder_id(params["model_name"]), folder_id(params["draft_model_name"])
        load_params = params["load_params"] or {}
        if params["force"] or needs_load(before, name, draft, load_params):
            result["changed"] = True
            after = {"model": name, "draft_model": draft if draft else None, "parameters": {}}
            if not module.check_mode:
                if before["model"] is not None and (params["force"] or before["model"] == name):
                    unloaded = api.call("POST", "/v1/model/unload")
                    if unloaded.status not in (200, 503):
                        api.fail_http("POST /v1/model/unload", unloaded)
                payload = dict(load_params)
                payload["model_name"] = params["model_name"]
                if params["draft_model_name"]:
                    payload["draft_model"] = {"draft_model_name": params["draft_model_name"]}
                result["progress"] = api.load(payload)
                after = describe(api.current())
                if after["model"] != name:
                    module.fail_json(
                        msg="load reported finished but /v1/model shows %s, not %s" % (after["model"], name), **result
                    )
    result["current_model"] = after["model"]
    result["current_draft_model"] = after["draft_model"]
    result["diff"] = {"before": before, "after": after}
    return result


def main() -> None:
    argument_spec = http_argument_spec("admin_key", timeout=600)
    argument_spec.update(
        state=dict(type="str", choices=["loaded", "unloaded"], default="loaded"),
        model_name=dict(type="str"),
        draft_model_name=dict(type="str"),
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
