#!/usr/bin/python
# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: model_probe
short_description: Wait for an OpenAI-compatible LLM server and measure one real chat completion
version_added: 0.1.0
description:
  - Polls C(GET /v1/models) until the server answers. Connection refused, resets, timeouts and
    HTTP 502/503/504 count as "still starting or loading" and are retried until O(timeout).
  - Then sends one chat completion (C(POST /v1/chat/completions)), streamed by default, and
    measures latency, time to first token and generation speed.
  - Fails when a threshold is missed or O(expect_model) is not served; the measurements are
    returned with the failure.
  - Works with TabbyAPI, vLLM, SGLang, llama.cpp's llama-server, Ollama's OpenAI API and LiteLLM.
  - Never changes anything, so never reports C(changed).
  - Needs no Python package beyond Ansible's own on the host it runs on.
author:
  - llmstack maintainers (@llmstack)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - llmstack.inference._http
  - llmstack.inference._http.api_key
attributes:
  check_mode:
    support: full
    details: Probing only reads, so it also runs in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  api_key:
    description: API key, sent as set by O(auth_header). Takes precedence over O(api_tokens_file).
  auth_header:
    description:
      - How the key is sent. V(authorization) sends C(Authorization) with C(Bearer) (every server listed);
        V(x-api-key) sends C(x-api-key) (TabbyAPI). V(none) sends no key even when one is given
        (a server with auth disabled).
    type: str
    choices: [authorization, x-api-key, none]
    default: authorization
  headers:
    description:
      - Extra request headers. Their values are hidden from the results and logs like a key,
        since they often carry credentials.
    type: dict
    default: {}
  model:
    description: Model name sent in the request. Default O(expect_model), else the first id of C(/v1/models).
    type: str
  expect_model:
    description:
      - Fail unless this id is listed by C(/v1/models). TabbyAPI lists only the loaded model for an API key
        (every model folder for the admin key).
    type: str
  prompt:
    description: User message sent.
    type: str
    default: Say hello.
  max_tokens:
    description: Tokens to generate.
    type: int
    default: 32
  stream:
    description: Stream the answer (needed for O(max_ttft_ms) and a decode-only tokens/s figure).
    type: bool
    default: true
  timeout:
    description: Seconds to wait for the server to become ready (model loading included).
    default: 300
  interval:
    description: Seconds between readiness attempts.
    type: float
    default: 2
  request_timeout:
    description: Seconds allowed for the completion request (and each read of its stream).
    type: int
    default: 120
  min_tokens_per_second:
    description: Fail when RV(tokens_per_second) is lower.
    type: float
  max_ttft_ms:
    description: Fail when RV(ttft_ms) is higher. Requires O(stream=true).
    type: float
  min_completion_tokens:
    description: Fail when fewer tokens were generated.
    type: int
    default: 1
seealso:
  - module: llmstack.inference.model_load
"""

EXAMPLES = r"""
- name: Wait for TabbyAPI to finish loading, then check its speed
  llmstack.inference.model_probe:
    url: http://127.0.0.1:5000
    api_tokens_file: /etc/llmstack/tabbyapi/api_tokens.yml
    expect_model: Llama-3.1-70B-exl2-4.0bpw
    timeout: 600
    min_tokens_per_second: 15
    max_ttft_ms: 2000
  become: true
  register: probe

- name: Probe a LiteLLM gateway model without streaming
  llmstack.inference.model_probe:
    url: https://gateway.example.org
    api_key: "{{ vault_litellm_key }}"
    model: fast-chat
    stream: false
  no_log: true

- name: Probe Ollama's OpenAI API
  llmstack.inference.model_probe:
    url: http://127.0.0.1:11434/v1
    model: "llama3.2:1b"
"""

RETURN = r"""
ready_after_s:
  description: Seconds until C(/v1/models) answered.
  returned: always
  type: float
  sample: 41.2
attempts:
  description: Requests made until the server was ready and the completion answered.
  returned: always
  type: int
  sample: 12
models:
  description: Model ids listed by C(/v1/models).
  returned: when the server became ready
  type: list
  elements: str
  sample: ["Llama-3.1-70B-exl2-4.0bpw"]
model:
  description: Model name sent in the completion request.
  returned: when the server became ready
  type: str
text:
  description: Generated text.
  returned: when the completion answered
  type: str
latency_ms:
  description: Milliseconds from sending the request to the last byte of the answer.
  returned: when the completion answered
  type: float
ttft_ms:
  description: Milliseconds until the first generated token arrived; null without streaming.
  returned: when the completion answered
  type: float
tokens_per_second:
  description:
    - Generation speed. Streaming, the decode rate between first and last token, (tokens - 1) / time;
      without streaming, tokens / latency (prompt processing included).
  returned: when the completion answered
  type: float
completion_tokens:
  description: Generated tokens, from the server's usage figures, else the number of streamed content chunks.
  returned: when the completion answered
  type: int
prompt_tokens:
  description: Prompt tokens from the usage figures; null when the server sent none.
  returned: when the completion answered
  type: int
usage_reported:
  description: Whether the server reported usage figures.
  returned: when the completion answered
  type: bool
"""

import time
from typing import Any, Dict, List, Optional

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

NOT_READY = (502, 503, 504)


class Probe:
    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.params = module.params
        self.started = time.monotonic()
        self.deadline = self.started + self.params["timeout"]
        self.attempts = 0
        self.result = {"changed": False}  # type: Dict[str, Any]
        try:
            self.client = client_from_params(self.params, self._headers())
        except HttpConfigError as exc:
            self.fail(str(exc))

    def _headers(self) -> Dict[str, str]:
        key = key_from_params(self.module, "api_key", "api_key")
        headers = {}
        if key and self.params["auth_header"] != "none":
            if self.params["auth_header"] == "x-api-key":
                headers["x-api-key"] = str(key)
            else:
                headers["Authorization"] = "Bearer %s" % key
        headers.update({str(k): str(v) for k, v in (self.params["headers"] or {}).items()})
        return headers

    def fail(self, msg: str) -> None:
        self.result["attempts"] = self.attempts
        self.module.fail_json(msg=msg, **self.result)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def wait_or_fail(self, reason: str) -> None:
        if self.remaining() <= 0:
            self.fail(
                "%s not ready after timeout=%ss (%d attempts); last: %s"
                % (self.params["url"], self.params["timeout"], self.attempts, reason)
            )
        time.sleep(max(0.0, min(self.params["interval"], self.remaining())))

    def fail_http(self, what: str, result: HttpResult) -> None:
        hint = ""
        if result.status in (401, 403):
            hint = ": the server refused the key; check api_key/api_tokens_file and auth_header"
        elif result.status == 404:
            hint = ": check url (the server's base URL, with or without /v1) and model"
        self.fail("%s answered HTTP %d: %s%s" % (what, result.status, result.error_detail(), hint))

    def wait_ready(self) -> List[str]:
        while True:
            self.attempts += 1
            try:
                answer = self.client.call("GET", "/v1/models", timeout=max(1.0, min(30.0, self.remaining())))
            except TransportError as exc:
                self.wait_or_fail(str(exc))
                continue
            if answer.status in NOT_READY:
                self.wait_or_fail("HTTP %d %s" % (answer.status, answer.error_detail()))
                continue
            if answer.status != 200:
                self.fail_http("GET /v1/models", answer)
            self.result["ready_after_s"] = round(time.monotonic() - self.started, 3)
            data = answer.json()
            cards = data.get("data") if isinstance(data, dict) else None
            return [str(card.get("id")) for card in cards or [] if isinstance(card, dict)]

    def complete(self, model: str) -> None:
        params = self.params
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": params["prompt"]}],
            "max_tokens": params["max_tokens"],
            "temperature": 0,
            "stream": params["stream"],
        }  # type: Dict[str, Any]
        if params["stream"]:
            payload["stream_options"] = {"include_usage": True}
        while True:
            self.attempts += 1
            sent = time.monotonic()
            try:
                response = self.client.open_stream("POST", "/v1/chat/completions", payload, params["request_timeout"])
            except TransportError as exc:
                self.wait_or_fail(str(exc))
                continue
            if isinstance(response, HttpResult):
                if response.status in NOT_READY:
                    self.wait_or_fail("completion: HTTP %d %s" % (response.status, response.error_detail()))
                    continue
                self.fail_http("POST /v1/chat/completions", response)
            with response:
                if params["stream"]:
                    self.read_stream(response, sent)
                else:
                    self.read_whole(response, sent)
            return

    def read_whole(self, response: Any, sent: float) -> None:
        try:
            body = response.read()
        except (TransportError, OSError) as exc:
            self.fail("completion answer broke off: %s" % exc)
        latency = time.monotonic() - sent
        data = HttpResult(200, {}, body).json()
        if not isinstance(data, dict) or not data.get("choices"):
            self.fail("completion answer has no choices: %s" % body[:300])
        message = data["choices"][0].get("message") or {}
        text = message.get("content") or ""
        usage = data.get("usage") or {}
        tokens = usage.get("completion_tokens")
        self.record(text, latency, None, tokens, usage, tokens / latency if tokens and latency > 0 else None)

    def read_stream(self, response: Any, sent: float) -> None:
        pieces = []  # type: List[str]
        chunks = 0
        first = last = None  # type: Optional[float]
        usage = {}  # type: Dict[str, Any]
        try:
            for event in iter_sse(response):
                if event.data.strip() == "[DONE]":
                    break
                chunk = HttpResult(200, {}, event.data.encode("utf-8")).json()
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    self.fail("server reported an error mid-stream: %s" % chunk["error"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    # Reasoning models stream thoughts first; those are generated tokens too.
                    content = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                    if content:
                        now = time.monotonic()
                        first = first if first is not None else now
                        last = now
                        chunks += 1
                        pieces.append(delta.get("content") or "")
        except TransportError as exc:
            self.fail("completion stream broke off: %s" % exc)
        latency = time.monotonic() - sent
        tokens = usage.get("completion_tokens") or chunks
        ttft = (first - sent) if first is not None else None
        rate = None
        if tokens and tokens > 1 and first is not None and last is not None and last > first:
            rate = (tokens - 1) / (last - first)
        self.record("".join(pieces), latency, ttft, tokens, usage, rate)

    def record(
        self,
        text: str,
        latency: float,
        ttft: Optional[float],
        tokens: Optional[int],
        usage: Dict[str, Any],
        rate: Optional[float],
    ) -> None:
        self.result.update(
            text=text,
            latency_ms=round(latency * 1000, 1),
            ttft_ms=round(ttft * 1000, 1) if ttft is not None else None,
            tokens_per_second=round(rate, 2) if rate is not None else None,
            completion_tokens=tokens,
            prompt_tokens=usage.get("prompt_tokens"),
            usage_reported=bool(usage),
        )

    def check_thresholds(self) -> None:
        params, result = self.params, self.result
        tokens = result.get("completion_tokens") or 0
        if tokens < params["min_completion_tokens"]:
            self.fail(
                "generated %d tokens, fewer than min_completion_tokens=%d" % (tokens, params["min_completion_tokens"])
            )
        rate = result.get("tokens_per_second")
        wanted = params["min_tokens_per_second"]
        if wanted is not None and (rate is None or rate < wanted):
            self.fail("tokens_per_second %s is below min_tokens_per_second=%s" % (rate, wanted))
        ttft, limit = result.get("ttft_ms"), params["max_ttft_ms"]
        if limit is not None and ttft is not None and ttft > limit:
            self.fail("ttft_ms %s is above max_ttft_ms=%s" % (ttft, limit))

    def run(self) -> Dict[str, Any]:
        if self.params["max_ttft_ms"] is not None and not self.params["stream"]:
            self.fail("max_ttft_ms needs stream=true: without streaming the first token is not observable")
        models = self.wait_ready()
        self.result["models"] = models
        expect = self.params["expect_model"]
        if expect and expect not in models:
            self.fail(
                "expect_model %s is not served; /v1/models lists %s: load it (model_load) or fix the name"
                % (expect, models)
            )
        model = self.params["model"] or expect or (models[0] if models else None)
        if not model:
            self.fail("/v1/models lists no model: load one, or give model")
        self.result["model"] = model
        self.complete(str(model))
        self.check_thresholds()
        self.result["attempts"] = self.attempts
        return self.result


def main() -> None:
    argument_spec = http_argument_spec("api_key", timeout=300)
    argument_spec.update(
        auth_header=dict(type="str", choices=["authorization", "x-api-key", "none"], default="authorization"),
        headers=dict(type="dict", default={}, no_log=True),
        model=dict(type="str"),
        expect_model=dict(type="str"),
        prompt=dict(type="str", default="Say hello."),
        max_tokens=dict(type="int", default=32, no_log=False),
        stream=dict(type="bool", default=True),
        interval=dict(type="float", default=2.0),
        request_timeout=dict(type="int", default=120),
        min_tokens_per_second=dict(type="float", no_log=False),
        max_ttft_ms=dict(type="float"),
        min_completion_tokens=dict(type="int", default=1, no_log=False),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        supports_check_mode=True,
    )
    module.exit_json(**Probe(module).run())


if __name__ == "__main__":
    main()
