"""Unit tests for llmstack.inference.model_load against an in-process fake of TabbyAPI's admin API.

The fake answers like TabbyAPI (status codes, FastAPI 'detail' errors, SSE framing with CRLF and
ping comments) and records every request, so tests can assert which calls a run made.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import ThreadingHTTPServer

import pytest
from ansible.module_utils.testing import patch_module_args
from ansible_collections.llmstack.inference.plugins.modules import model_load
from ansible_collections.llmstack.inference.tests.unit.plugins.json_http import JsonHandler

ADMIN = "a" * 32


class FakeTabby:
    def __init__(self):
        self.model = None  # (id, draft_id, params)
        self.calls = []
        self.load_script = None  # list of SSE data strings overriding the normal progress
        self.models = {"Small": 3, "Big": 5, "Draft": 2}

    def card(self):
        assert self.model is not None
        model_id, draft_id, params = self.model  # pylint: disable=unpacking-non-sequence
        parameters = {
            "max_seq_len": 4096,
            "cache_size": 4096,
            "cache_mode": "FP16",
            "chunk_size": 2048,
            "max_batch_size": 32,
        }
        parameters.update(params)
        parameters["draft"] = {"id": draft_id, "object": "model"} if draft_id else None
        return {"id": model_id, "object": "model", "owned_by": "tabbyAPI", "parameters": parameters}


def make_handler(fake):
    class Handler(JsonHandler):
        def authorized(self, admin):
            key = self.headers.get("x-admin-key") if admin else self.headers.get("x-api-key")
            bearer = (self.headers.get("authorization") or "").partition(" ")[2]
            return ADMIN in (key, bearer)

        def do_GET(self):
            fake.calls.append(("GET", self.path, None))
            if not self.authorized(admin=False):
                return self.reply(401, {"detail": "Invalid API key"})
            if self.path == "/v1/model":
                if fake.model is None:
                    return self.reply(503, {"detail": "No models are currently loaded."})
                return self.reply(200, fake.card())
            return self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            fake.calls.append(("POST", self.path, body))
            if not self.authorized(admin=True):
                return self.reply(401, {"detail": "Invalid admin key"})
            if self.path == "/v1/model/unload":
                if fake.model is None:
                    return self.reply(503, {"detail": "No models are currently loaded."})
                fake.model = None
                return self.reply(200, None)
            if self.path != "/v1/model/load":
                return self.reply(404, {"detail": "Not Found"})
            name = body["model_name"].rsplit("/", 1)[-1]
            if name not in fake.models:
                return self.reply(
                    400, {"detail": "Could not find the model path for load. Check model name or config.yml?"}
                )
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for data in self.progress(name, body):
                self.wfile.write(data.encode())
                self.wfile.flush()

        def progress(self, name, body):
            if fake.load_script is not None:
                yield from fake.load_script
                return
            if fake.model and fake.model[0] == name:
                yield 'data: {"model_type": "model", "module": 1, "modules": 1, "status": "finished"}\r\n\r\n'
                return
            draft = (body.get("draft_model") or {}).get("draft_model_name")
            yield ": ping - 2026-07-01 00:00:00\r\n\r\n"
            for kind, total in ([("draft", fake.models[draft])] if draft else []) + [("model", fake.models[name])]:
                for module in range(1, total + 1):
                    event = {"model_type": kind, "module": module, "modules": total, "status": "processing"}
                    yield "data: %s\r\n\r\n" % json.dumps(event)
                event = {"model_type": kind, "module": total, "modules": total, "status": "finished"}
                yield "data: %s\r\n\r\n" % json.dumps(event)
            params = {k: body[k] for k in ("cache_mode", "max_seq_len") if k in body}
            fake.model = (name, draft, params)

    return Handler


@pytest.fixture
def tabby():
    fake = FakeTabby()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = "http://127.0.0.1:%d" % server.server_address[1]
    yield fake
    server.shutdown()
    server.server_close()


def run_module(capsys, **args):
    with patch_module_args(args), pytest.raises(SystemExit) as exited:
        model_load.main()
    return exited.value.code, json.loads(capsys.readouterr().out)


def posts(fake):
    return [(path, body) for method, path, body in fake.calls if method == "POST"]


@pytest.mark.parametrize(
    ("loaded", "args", "changed", "expected_posts"),
    [
        (("Small", None, {}), {"model_name": "Small"}, False, []),
        (("Small", None, {}), {"model_name": "exl2/Small"}, False, []),
        (("Small", "Draft", {}), {"model_name": "Small"}, False, []),
        (None, {"model_name": "Small"}, True, ["/v1/model/load"]),
        (("Small", None, {}), {"model_name": "Big"}, True, ["/v1/model/load"]),
        (("Small", None, {}), {"model_name": "Small", "force": True}, True, ["/v1/model/unload", "/v1/model/load"]),
        (
            ("Small", None, {}),
            {"model_name": "Small", "load_params": {"cache_mode": "Q4"}},
            True,
            ["/v1/model/unload", "/v1/model/load"],
        ),
        (
            ("Small", None, {"cache_mode": "8,8"}),
            {"model_name": "Small", "load_params": {"cache_mode": "8, 8"}},
            False,
            [],
        ),
        (
            ("Small", None, {}),
            {"model_name": "Small", "draft_model_name": "Draft"},
            True,
            ["/v1/model/unload", "/v1/model/load"],
        ),
        (("Small", None, {}), {"state": "unloaded"}, True, ["/v1/model/unload"]),
        (None, {"state": "unloaded"}, False, []),
    ],
)
def test_idempotent_load_and_unload(tabby, capsys, loaded, args, changed, expected_posts):
    tabby.model = loaded
    code, out = run_module(capsys, url=tabby.url, admin_key=ADMIN, **args)
    assert code == 0, out
    assert out["changed"] is changed
    assert [post[0] for post in posts(tabby)] == expected_posts
    if args.get("state") == "unloaded":
        assert tabby.model is None
        assert out["current_model"] is None
    else:
        assert tabby.model[0] == out["current_model"] == args["model_name"].rsplit("/", 1)[-1]


def test_load_reports_progress_and_payload(tabby, capsys):
    tabby.model = ("Small", None, {})
    code, out = run_module(
        capsys,
        url=tabby.url,
        admin_key=ADMIN,
        model_name="exl3/Big",
        draft_model_name="Draft",
        load_params={"max_seq_len": 8192},
        _ansible_diff=True,
    )
    assert code == 0, out
    assert out["previous_model"] == "Small"
    assert out["current_model"] == "Big"
    assert out["current_draft_model"] == "Draft"
    assert out["progress"]["model_modules"] == 5
    assert out["progress"]["draft_modules"] == 2
    assert out["progress"]["events"] == 5 + 1 + 2 + 1
    assert out["progress"]["finished"] is True
    body = posts(tabby)[-1][1]
    assert body == {"model_name": "exl3/Big", "max_seq_len": 8192, "draft_model": {"draft_model_name": "Draft"}}
    assert out["diff"]["before"]["model"] == "Small"
    assert out["diff"]["after"]["model"] == "Big"


@pytest.mark.parametrize("state", ["loaded", "unloaded"])
def test_check_mode_never_posts(tabby, capsys, state):
    tabby.model = ("Small", None, {})
    code, out = run_module(
        capsys, url=tabby.url, admin_key=ADMIN, model_name="Big", state=state, _ansible_check_mode=True
    )
    assert code == 0
    assert out["changed"] is True
    assert posts(tabby) == []
    assert tabby.model[0] == "Small"
    assert out["current_model"] == ("Big" if state == "loaded" else None)


@pytest.mark.parametrize(
    ("script", "needle"),
    [
        (
            ['data: {"error": {"message": "Insufficient VRAM for model and cache", "trace": null}}\r\n\r\n'],
            "TabbyAPI failed to load the model: Insufficient VRAM",
        ),
        (
            ['data: {"model_type": "model", "module": 1, "modules": 4, "status": "processing"}\r\n\r\n'],
            "ended before the model finished",
        ),
        ([], "ended before the model finished"),
    ],
)
def test_load_stream_failures(tabby, capsys, script, needle):
    tabby.load_script = script
    code, out = run_module(capsys, url=tabby.url, admin_key=ADMIN, model_name="Big")
    assert code == 1
    assert needle in out["msg"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"model_name": "Nope", "admin_key": ADMIN}, "HTTP 400: Could not find the model path for load"),
        ({"model_name": "Big", "admin_key": "wrong"}, "HTTP 401: Invalid API key: the admin key was refused"),
    ],
)
def test_http_errors_name_the_fix(tabby, capsys, args, needle):
    tabby.model = ("Small", None, {})
    code, out = run_module(capsys, url=tabby.url, **args)
    assert code == 1
    assert needle in out["msg"]


def test_admin_key_from_api_tokens_file(tabby, capsys, tmp_path):
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text("admin_key: %s\napi_key: %s\n" % (ADMIN, "b" * 32))
    code, out = run_module(capsys, url=tabby.url + "/v1", api_tokens_file=str(tokens), model_name="Small")
    assert code == 0
    assert out["changed"] is True
    assert tabby.model[0] == "Small"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "is not readable"),
        ("api_key: x\n", "has no admin_key"),
        ("", "has no admin_key"),
        ("admin_key: [x\n", "is not valid YAML"),
    ],
)
def test_bad_api_tokens_file(tabby, capsys, tmp_path, content, needle):
    tokens = tmp_path / "api_tokens.yml"
    if content is not None:
        tokens.write_text(content)
    code, out = run_module(capsys, url=tabby.url, api_tokens_file=str(tokens), model_name="Small")
    assert code == 1
    assert needle in out["msg"]


def test_admin_key_from_api_tokens_file_is_masked(tabby, capsys, tmp_path):
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text("admin_key: %s\n" % ADMIN)
    tabby.load_script = ['data: {"error": {"message": "key %s refused"}}\r\n\r\n' % ADMIN]
    code, out = run_module(capsys, url=tabby.url, api_tokens_file=str(tokens), model_name="Big")
    assert code == 1
    assert ADMIN not in json.dumps(out)
    assert "key ******** refused" in out["msg"]


def test_unreachable_server(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out = run_module(capsys, url="http://127.0.0.1:%d" % port, admin_key=ADMIN, model_name="Small")
    assert code == 1
    assert "TabbyAPI is not reachable" in out["msg"]


def test_model_name_required_when_loaded(capsys):
    code, out = run_module(capsys, admin_key=ADMIN)
    assert code == 1
    assert "model_name" in out["msg"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("admin_key: abc\napi_key: def\n", {"admin_key": "abc", "api_key": "def"}),
        ("# comment\nadmin_key: 'abc'\napi_key:\n- one\n", {"admin_key": "abc", "api_key": ""}),
        ("", {}),
    ],
)
def test_api_tokens_parse_without_pyyaml(monkeypatch, text, expected):
    # Nodes may lack PyYAML; the flat fallback must still find admin_key.
    from ansible_collections.llmstack.inference.plugins.module_utils import _tabbyapi

    monkeypatch.setitem(__import__("sys").modules, "yaml", None)
    assert _tabbyapi.parse_api_tokens(text) == expected
