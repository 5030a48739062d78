"""Unit tests for llmstack.inference.model_probe against in-process OpenAI-compatible fakes.

Each fake "flavour" reproduces how one server family frames its answers (CRLF vs LF SSE,
ping comments, usage chunk or none, 503 while loading, reasoning deltas), so the parser and
the measurements are exercised against every shape the module claims to support.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from ansible.module_utils.testing import patch_module_args
from ansible_collections.llmstack.inference.plugins.modules import model_probe
from ansible_collections.llmstack.inference.tests.unit.plugins.json_http import JsonHandler

KEY = "k" * 32
WORDS = ["Hello", " there", ",", " operator", "!"]

FLAVOURS = {
    # TabbyAPI: sse-starlette CRLF framing, ping comments, usage chunk on include_usage.
    "tabbyapi": {"eol": "\r\n", "ping": True, "usage": True, "space": True},
    # vLLM / SGLang: LF framing, final usage chunk with empty choices.
    "vllm": {"eol": "\n", "usage": True, "usage_empty_choices": True, "space": True},
    # llama.cpp's llama-server: 503 while loading, no usage chunk asked for.
    "llamacpp": {"eol": "\n", "usage": False, "loading": 2, "space": True},
    # A server that omits the optional space after "data:".
    "ollama": {"eol": "\n", "usage": True, "space": False},
    # Reasoning model behind LiteLLM: reasoning_content deltas before content.
    "litellm_reasoning": {"eol": "\n", "usage": True, "space": True, "reasoning": 3},
}


class FakeServer:
    def __init__(self, **behaviour):
        self.behaviour = {
            "eol": "\n",
            "usage": True,
            "space": True,
            "models": ["test-model"],
            "header": "authorization",
        }
        self.behaviour.update(behaviour)
        self.loading = self.behaviour.get("loading", 0)
        self.requests = []


def make_handler(fake):
    class Handler(JsonHandler):
        def gate(self, body=None):
            fake.requests.append((self.command, self.path, dict(self.headers), body))
            if fake.loading > 0:
                fake.loading -= 1
                self.reply(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
                return False
            if fake.behaviour["header"] == "x-api-key":
                ok = self.headers.get("x-api-key") == KEY
            else:
                ok = self.headers.get("Authorization") == "Bearer " + KEY
            if not ok:
                self.reply(401, {"detail": "Invalid API key"})
            return ok

        def do_GET(self):
            if not self.gate():
                return
            if self.path != "/v1/models":
                return self.reply(404, {"detail": "Not Found"})
            self.reply(
                200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.behaviour["models"]]}
            )

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if not self.gate(body):
                return
            b = fake.behaviour
            time.sleep(b.get("prefill_s", 0))
            words = WORDS[: body["max_tokens"]]
            if b.get("echo"):
                # Answers with request header values, as a misbehaving proxy or log might.
                words = [" ".join(self.headers.get(name, "") for name in b["echo"])]
            usage = {"prompt_tokens": 7, "completion_tokens": len(words) + b.get("reasoning", 0), "total_tokens": 0}
            if not body.get("stream"):
                time.sleep(b.get("token_s", 0) * len(words))
                message = {"role": "assistant", "content": "".join(words)}
                answer = {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}
                if b["usage"]:
                    answer["usage"] = usage
                return self.reply(200, answer)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            sep = "data: " if b["space"] else "data:"
            eol = b["eol"]

            def send(obj):
                payload = obj if isinstance(obj, str) else json.dumps(obj)
                self.wfile.write(("%s%s%s%s" % (sep, payload, eol, eol)).encode())
                self.wfile.flush()

            if b.get("ping"):
                self.wfile.write((": ping - now%s%s" % (eol, eol)).encode())
            for _step in range(b.get("reasoning", 0)):
                send({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]})
            for word in words:
                time.sleep(b.get("token_s", 0))
                send({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
            if b["usage"] and (body.get("stream_options") or {}).get("include_usage"):
                choices = [] if b.get("usage_empty_choices") else [{"index": 0, "delta": {}, "finish_reason": "stop"}]
                send({"choices": choices, "usage": usage})
            send("[DONE]")

    return Handler


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(fake, port=0, delay=0.0):
    def start():
        time.sleep(delay)
        fake.server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(fake))
        fake.server.serve_forever(poll_interval=0.05)

    threading.Thread(target=start, daemon=True).start()
    if not delay:
        while not hasattr(fake, "server"):
            time.sleep(0.01)
    return "http://127.0.0.1:%d" % (port or fake.server.server_address[1])


@pytest.fixture
def servers():
    started = []
    yield started
    for fake in started:
        if hasattr(fake, "server"):
            fake.server.shutdown()
            fake.server.server_close()


def start_fake(servers, **behaviour):
    fake = FakeServer(**behaviour)
    servers.append(fake)
    return fake, serve(fake)


def run_module(capsys, **args):
    args.setdefault("interval", 0.05)
    with patch_module_args(args), pytest.raises(SystemExit) as exited:
        model_probe.main()
    return exited.value.code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_streamed_probe_per_server_flavour(servers, capsys, flavour):
    behaviour = dict(FLAVOURS[flavour], token_s=0.01)
    fake, url = start_fake(servers, **behaviour)
    code, out = run_module(capsys, url=url, api_key=KEY, expect_model="test-model", timeout=10)
    assert code == 0, out
    assert out["changed"] is False
    assert out["text"] == "".join(WORDS)
    assert out["models"] == ["test-model"]
    assert out["model"] == "test-model"
    expected_tokens = len(WORDS) + behaviour.get("reasoning", 0)
    assert out["completion_tokens"] == expected_tokens
    assert out["usage_reported"] is behaviour["usage"]
    assert out["ttft_ms"] is not None
    assert out["ttft_ms"] < out["latency_ms"]
    # tokens arrive ~10 ms apart, so the decode rate is near 100/s and well above 20/s.
    assert 20 < out["tokens_per_second"] < 150
    sent = fake.requests[-1][3]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert out["attempts"] == 2 + behaviour.get("loading", 0)


def test_non_streamed_probe(servers, capsys):
    fake, url = start_fake(servers, token_s=0.01)
    code, out = run_module(capsys, url=url + "/v1/", api_key=KEY, stream=False, model="other-name")
    assert code == 0, out
    assert out["ttft_ms"] is None
    assert out["completion_tokens"] == 5
    assert out["prompt_tokens"] == 7
    assert out["model"] == "other-name"
    assert "stream_options" not in fake.requests[-1][3]


def test_waits_for_connection_refused_then_ready(servers, capsys):
    fake = FakeServer()
    servers.append(fake)
    port = free_port()
    url = serve(fake, port=port, delay=0.6)
    code, out = run_module(capsys, url=url, api_key=KEY, timeout=10)
    assert code == 0, out
    assert out["ready_after_s"] >= 0.5
    assert out["attempts"] > 3


def test_retries_503_while_loading(servers, capsys):
    _fake, url = start_fake(servers, loading=4)
    code, out = run_module(capsys, url=url, api_key=KEY, timeout=10)
    assert code == 0, out
    assert out["attempts"] == 6


def test_gives_up_after_timeout(capsys):
    started = time.monotonic()
    code, out = run_module(capsys, url="http://127.0.0.1:%d" % free_port(), timeout=1, interval=0.2)
    assert code == 1
    assert "not ready after timeout=1s" in out["msg"]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"expect_model": "missing"}, "expect_model missing is not served; /v1/models lists ['test-model']"),
        ({"min_tokens_per_second": 100000}, "below min_tokens_per_second=100000"),
        ({"max_ttft_ms": 50}, "above max_ttft_ms=50"),
        ({"max_tokens": 0, "min_completion_tokens": 1}, "fewer than min_completion_tokens=1"),
        ({"max_ttft_ms": 50, "stream": False}, "max_ttft_ms needs stream=true"),
        ({"api_key": "wrong"}, "HTTP 401: Invalid API key: the server refused the key"),
    ],
)
def test_threshold_and_auth_failures(servers, capsys, args, needle):
    _fake, url = start_fake(servers, prefill_s=0.2, token_s=0.005)
    params = {"url": url, "api_key": KEY, "timeout": 10}
    params.update(args)
    code, out = run_module(capsys, **params)
    assert code == 1
    assert needle in out["msg"]
    if "min_tokens_per_second" in args:
        assert out["tokens_per_second"] > 0
        assert out["text"]


def test_x_api_key_header_from_api_tokens_file_and_extra_headers(servers, capsys, tmp_path):
    fake, url = start_fake(servers, header="x-api-key")
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text("admin_key: %s\napi_key:\n- %s\n- other\n" % ("z" * 32, KEY))
    code, out = run_module(
        capsys,
        url=url,
        api_tokens_file=str(tokens),
        auth_header="x-api-key",
        headers={"X-Trace": "probe-1"},
        _ansible_check_mode=True,
    )
    assert code == 0, out
    assert out["changed"] is False
    assert all(request[2].get("X-Trace") == "probe-1" for request in fake.requests)


@pytest.mark.parametrize(("auth_header", "expected"), [("none", 401), ("authorization", 200)])
def test_auth_header_none_sends_no_key(servers, capsys, auth_header, expected):
    fake, url = start_fake(servers)
    code, out = run_module(capsys, url=url, api_key=KEY, auth_header=auth_header, timeout=5)
    assert code == (0 if expected == 200 else 1), out
    assert ("Authorization" in fake.requests[0][2]) is (auth_header == "authorization")


def test_empty_model_list_fails(servers, capsys):
    url = start_fake(servers, models=[])[1]
    code, out = run_module(capsys, url=url, api_key=KEY)
    assert code == 1
    assert "lists no model" in out["msg"]


def test_keys_and_headers_are_masked_in_results(servers, capsys, tmp_path):
    secret = "s3cr3t-header-value"
    _fake, url = start_fake(servers, echo=["Authorization", "X-Secret"])
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text("api_key: %s\n" % KEY)
    code, out = run_module(
        capsys, url=url, api_tokens_file=str(tokens), headers={"X-Secret": secret}, stream=False, timeout=5
    )
    assert code == 0, out
    # The key read from the file and the no_log headers never leave the module in clear.
    assert KEY not in json.dumps(out)
    assert secret not in json.dumps(out)
    assert out["text"] == "Bearer ******** ********"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"ca_path": "/nonexistent/ca.pem"}, "ca_path /nonexistent/ca.pem is not a file"),
        ({"client_cert": "/nonexistent/cert.pem"}, "client_cert /nonexistent/cert.pem is not a file"),
        ({"url": "file:///etc/passwd"}, "only http:// and https:// URLs are supported"),
    ],
)
def test_unusable_settings_fail_at_once(capsys, args, needle):
    # Not retried as "not up yet" until timeout: no wait fixes a missing file.
    started = time.monotonic()
    params = {"url": "https://127.0.0.1:%d" % free_port(), "timeout": 30}
    params.update(args)
    code, out = run_module(capsys, **params)
    assert code == 1
    assert needle in out["msg"]
    assert out["attempts"] == 0
    assert time.monotonic() - started < 5


def test_probe_over_a_unix_socket(capsys, tmp_path):
    import socketserver

    class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    class Handler(make_handler(FakeServer())):
        def address_string(self):
            return "unix"

    path = str(tmp_path / "engine.sock")
    server = UnixServer(path, Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        code, out = run_module(capsys, url="http://engine", unix_socket=path, api_key=KEY, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, out
    assert out["text"] == "".join(WORDS)
