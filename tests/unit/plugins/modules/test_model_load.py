"""Unit tests for llmstack.inference.model_load against an in-process fake of TabbyAPI's admin API.

The fake answers like TabbyAPI (status codes, FastAPI 'detail' errors, SSE framing with CRLF and
ping comments) and records every request, so tests can assert which calls a run made. It follows
the real server per generation (exl2 = exl2-checkpoint 79126f9, exl3 = main e632af4):
- the card (GET /v1/model) is the backend's model_info(): backends/exllamav2/model.py reports rope
  values and a draft card, backends/exllamav3/model.py neither (rope stays at ModelCardParameters'
  1.0 defaults, endpoints/core/types/model.py); the id is the folder's basename;
- values are derived as the backends do (cache_size rounded to 256 by exllamav2, max_seq_len limited
  to cache_size, chunk_size rounded up to 256, "K,V" cache modes fall back to FP16 with exllamav2);
- a load of the loaded model (common/model.py load_model_gen): exl2 compares basenames and returns
  no event at all; main compares full paths and yields module 1 of 1, which
  endpoints/core/utils/model.py stream_model_load sends as "processing" then "finished".
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import ThreadingHTTPServer

import pytest
from ansible.module_utils.common import warnings as ansible_warnings
from ansible.module_utils.testing import patch_module_args
from ansible_collections.llmstack.inference.plugins.modules import model_load
from ansible_collections.llmstack.inference.tests.unit.plugins.json_http import JsonHandler

ADMIN = "a" * 32
API = "b" * 32
MODEL_MAX_SEQ_LEN = 4096  # what every fake model's config.json says


def up256(value):
    return (value + 255) // 256 * 256


class FakeTabby:
    def __init__(self, generation="exl3", backend=None):
        self.generation = generation
        self.backend = backend or ("exllamav3" if generation == "exl3" else "exllamav2")
        self.model = None  # (folder relative to model_dir, draft folder, card parameter overrides)
        self.derived = {}
        self.calls = []
        self.load_script = None  # list of SSE data strings overriding the normal progress
        self.models = {"Small": 3, "Big": 5, "Draft": 2, "4.0bpw": 4}

    def derive(self, body):
        """The card parameters the backend derives from a load request (see the module docstring)."""
        max_seq_len, cache_size = body.get("max_seq_len"), body.get("cache_size")
        if self.backend == "exllamav2":
            cache_size = up256(cache_size or max_seq_len or 4096)
        else:
            cache_size = cache_size or max_seq_len or MODEL_MAX_SEQ_LEN
        max_seq_len = min(max_seq_len or MODEL_MAX_SEQ_LEN, cache_size)
        mode = body.get("cache_mode", "FP16")
        chunk = max(256, body.get("chunk_size", 2048))
        params = {"max_seq_len": max_seq_len, "cache_size": cache_size, "max_batch_size": 128}
        if self.backend == "exllamav2":
            params["cache_mode"] = mode if mode == "FP16" or mode.startswith("Q") else "FP16"
            params["chunk_size"] = up256(min(chunk, max_seq_len))
            params["rope_scale"] = float(body.get("rope_scale", 1.0))
            params["rope_alpha"] = float(body.get("rope_alpha", 1.0))
            draft = body.get("draft_model") or {}
            if draft.get("draft_model_name"):
                params["draft"] = {
                    "id": draft["draft_model_name"].rsplit("/", 1)[-1],
                    "object": "model",
                    "parameters": {
                        "max_seq_len": max_seq_len,
                        "rope_scale": float(draft.get("draft_rope_scale", 1.0)),
                        "rope_alpha": float(draft.get("draft_rope_alpha", 1.0)),
                        "cache_mode": "FP16",
                    },
                }
        else:
            params["cache_mode"] = mode
            params["chunk_size"] = up256(chunk)
        return params

    def card(self):
        assert self.model is not None
        path, draft, overrides = self.model  # pylint: disable=unpacking-non-sequence
        parameters = {"cache_mode": "FP16", "rope_scale": 1.0, "rope_alpha": 1.0, "draft": None}
        body = {"draft_model": {"draft_model_name": draft}} if draft else {}
        parameters.update(self.derived or self.derive(body))
        parameters.update(overrides)
        if self.backend == "exllamav3":
            parameters.update(rope_scale=1.0, rope_alpha=1.0, draft=None)
        elif draft and not parameters.get("draft"):
            parameters["draft"] = {"id": draft.rsplit("/", 1)[-1], "object": "model", "parameters": {}}
        return {"id": path.rsplit("/", 1)[-1], "object": "model", "owned_by": "tabbyAPI", "parameters": parameters}

    def already_loaded(self, path):
        if self.model is None:
            return False
        if self.generation == "exl2":
            return self.model[0].rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1]
        return self.model[0] == path


def make_handler(fake):
    class Handler(JsonHandler):
        def permission(self):
            # common/auth.py get_key_permission: x-admin-key, else x-api-key, else the bearer token.
            key = self.headers.get("x-admin-key") or self.headers.get("x-api-key")
            key = key or (self.headers.get("authorization") or "").partition(" ")[2]
            return {ADMIN: "admin", API: "api"}.get(key)

        def authorized(self, admin):
            return self.permission() == "admin" if admin else self.permission() is not None

        def do_GET(self):
            fake.calls.append(("GET", self.path, None))
            if not self.authorized(admin=False):
                return self.reply(401, {"detail": "Invalid API key"})
            if self.path == "/v1/model":
                if fake.model is None:
                    return self.reply(503, {"detail": "No models are currently loaded."})
                return self.reply(200, fake.card())
            if self.path == "/v1/model/draft/list":
                # endpoints/core/router.py list_draft_models: admin sees every draft folder, api the loaded one.
                if self.permission() == "admin":
                    names = sorted(set(fake.models) - {fake.model[0] if fake.model else None})
                else:
                    names = [fake.model[1].rsplit("/", 1)[-1]] if fake.model and fake.model[1] else []
                return self.reply(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            return self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            fake.calls.append(("POST", self.path, body))
            if not self.authorized(admin=True):
                return self.reply(401, {"detail": "Invalid admin key"})
            if self.path == "/v1/model/unload":
                if fake.model is None:
                    return self.reply(503, {"detail": "No models are currently loaded."})
                fake.model, fake.derived = None, {}
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
            if fake.already_loaded(body["model_name"]):
                if fake.generation == "exl3":
                    for status in ("processing", "finished"):
                        event = {"model_type": "model", "module": 1, "modules": 1, "status": status}
                        yield "data: %s\r\n\r\n" % json.dumps(event)
                return
            draft = (body.get("draft_model") or {}).get("draft_model_name")
            yield ": ping - 2026-07-01 00:00:00\r\n\r\n"
            for kind, total in ([("draft", fake.models[draft])] if draft else []) + [("model", fake.models[name])]:
                for module in range(1, total + 1):
                    event = {"model_type": kind, "module": module, "modules": total, "status": "processing"}
                    yield "data: %s\r\n\r\n" % json.dumps(event)
                event = {"model_type": kind, "module": total, "modules": total, "status": "finished"}
                yield "data: %s\r\n\r\n" % json.dumps(event)
            fake.model = (body["model_name"], draft, {})
            fake.derived = fake.derive(body)

    return Handler


@pytest.fixture
def tabby_for():
    """Starts fakes of a given generation and backend; stops them after the test."""
    servers = []

    def start(generation="exl3", backend=None):
        fake = FakeTabby(generation, backend)
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append(server)
        fake.url = "http://127.0.0.1:%d" % server.server_address[1]
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tabby(tabby_for):
    return tabby_for()


def run_module(capsys, **args):
    # Warnings are collected per process; a run must only see its own.
    getattr(ansible_warnings, "_global_warnings", {}).clear()
    with patch_module_args(args), pytest.raises(SystemExit) as exited:
        model_load.main()
    return exited.value.code, json.loads(capsys.readouterr().out)


def posts(fake):
    return [(path, body) for method, path, body in fake.calls if method == "POST"]


@pytest.mark.parametrize(
    ("loaded", "args", "changed", "expected_posts"),
    [
        (("Small", None, {}), {"model_name": "Small"}, False, []),
        # exl2 names a model by basename and skips a load of the same name (common/model.py at 79126f9).
        (("Small", None, {}), {"model_name": "exl2/Small", "generation": "exl2"}, False, []),
        # main compares full paths: Small and exl2/Small are two folders, so it really loads.
        (("Small", None, {}), {"model_name": "exl2/Small"}, True, ["/v1/model/load"]),
        (("exl2/Small", None, {}), {"model_name": "exl2/Small"}, False, ["/v1/model/load"]),
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
        # Only exllamav2's card shows the draft (backends/exllamav2/model.py model_info).
        (
            ("Small", None, {}),
            {"model_name": "Small", "draft_model_name": "Draft", "generation": "exl2"},
            True,
            ["/v1/model/unload", "/v1/model/load"],
        ),
        (("Small", None, {}), {"state": "unloaded"}, True, ["/v1/model/unload"]),
        (None, {"state": "unloaded"}, False, []),
    ],
)
def test_idempotent_load_and_unload(tabby_for, capsys, loaded, args, changed, expected_posts):
    tabby = tabby_for(args.get("generation", "exl3"))
    tabby.model = loaded
    code, out = run_module(capsys, url=tabby.url, admin_key=ADMIN, **args)
    assert code == 0, out
    assert out["changed"] is changed
    assert [post[0] for post in posts(tabby)] == expected_posts
    if args.get("state") == "unloaded":
        assert tabby.model is None
        assert out["current_model"] is None
    else:
        assert tabby.model[0].rsplit("/", 1)[-1] == out["current_model"] == args["model_name"].rsplit("/", 1)[-1]


def test_load_reports_progress_and_payload(tabby_for, capsys):
    # exl2 generation: exllamav2's card is the one that reports the draft model.
    tabby = tabby_for("exl2")
    tabby.model = ("Small", None, {})
    code, out = run_module(
        capsys,
        url=tabby.url,
        admin_key=ADMIN,
        generation="exl2",
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


# --- per generation: repeated runs, dropped fields, folders with the same basename ----------------

SETTINGS = {
    "exllamav2": {"max_seq_len": 3000, "cache_mode": "Q4", "chunk_size": 1000, "rope_alpha": 1.5},
    "exllamav3": {"max_seq_len": 3072, "cache_size": 8192, "cache_mode": "8, 8", "chunk_size": 1000},
}


def warned(out, *needles):
    # ansible-core 2.19 wraps warnings in structured summaries; older cores give strings.
    return any(all(needle in json.dumps(warning) for needle in needles) for warning in out.get("warnings", []))


def models_tree(tmp_path, *names):
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text('{"quantization_config": {"quant_method": "exl3"}}')
    return str(tmp_path)


@pytest.mark.parametrize(
    ("generation", "backend"), [("exl2", "exllamav2"), ("exl2", "exllamav3"), ("exl3", "exllamav3")]
)
@pytest.mark.parametrize("draft", [None, "Draft"])
@pytest.mark.parametrize("model_name", ["Big", "exl3/Big"])
def test_repeated_run_is_unchanged(tabby_for, capsys, generation, backend, draft, model_name):
    tabby = tabby_for(generation, backend)
    load_params = dict(SETTINGS[backend], backend=backend) if generation == "exl2" else dict(SETTINGS[backend])
    load_params["max_batch_size"] = 8  # config-only: dropped with a warning
    args = dict(url=tabby.url, admin_key=ADMIN, generation=generation, model_name=model_name, load_params=load_params)
    if draft:
        args.update(draft_model_name=draft, draft_params={"draft_rope_alpha": 2.0, "draft_cache_mode": "Q8"})
    code, first = run_module(capsys, **args)
    assert code == 0, first
    assert first["changed"] is True
    assert not warned(first, "other than requested"), first["warnings"]
    sent = posts(tabby)[-1][1]
    assert "max_batch_size" not in sent
    assert "draft_cache_mode" not in (sent.get("draft_model") or {})
    assert "max_batch_size" in first["dropped"]
    assert warned(first, "max_batch_size", "draft_cache_mode" if draft else "max_batch_size")
    if backend == "exllamav3":
        assert "rope_alpha" not in sent
        assert "draft_rope_alpha" not in (sent.get("draft_model") or {})
    tabby.calls.clear()
    code, again = run_module(capsys, **args)
    assert code == 0, again
    assert again["changed"] is False, again
    assert again["differences"] == []
    if generation == "exl3" and "/" in model_name:
        # main's card cannot prove the nested path; the load is sent and answered as done (1 of 1).
        assert [post[0] for post in posts(tabby)] == ["/v1/model/load"]
        assert again["progress"]["reloaded"] is False
    else:
        assert posts(tabby) == []
    code, checked = run_module(capsys, _ansible_check_mode=True, **args)
    assert code == 0
    assert checked["changed"] is False


@pytest.mark.parametrize(("generation", "changed"), [("exl2", True), ("exl3", True)])
def test_changed_setting_reloads(tabby_for, capsys, generation, changed):
    tabby = tabby_for(generation)
    args = dict(url=tabby.url, admin_key=ADMIN, generation=generation, model_name="Big")
    assert run_module(capsys, load_params={"cache_size": 4096}, **args)[1]["changed"] is True
    tabby.calls.clear()
    code, out = run_module(capsys, load_params={"cache_size": 8192}, **args)
    assert code == 0
    assert out["changed"] is changed
    assert out["differences"] == ["cache_size"]
    # Both generations answer a load of the loaded model as done, so the module unloads first.
    assert [post[0] for post in posts(tabby)] == ["/v1/model/unload", "/v1/model/load"]
    assert tabby.card()["parameters"]["cache_size"] == 8192


def test_exl3_same_basename_loads_the_other_folder(tabby_for, capsys, tmp_path):
    model_dir = models_tree(tmp_path, "exl3/A/4.0bpw", "exl3/B/4.0bpw")
    tabby = tabby_for("exl3")
    tabby.model = ("exl3/A/4.0bpw", None, {})
    args = dict(url=tabby.url, admin_key=ADMIN, model_dir=model_dir)
    code, out = run_module(capsys, model_name="exl3/B/4.0bpw", **args)
    assert code == 0
    assert out["changed"] is True
    assert out["progress"]["reloaded"] is True
    assert tabby.model[0] == "exl3/B/4.0bpw"
    tabby.calls.clear()
    code, out = run_module(capsys, model_name="exl3/B/4.0bpw", **args)
    assert code == 0
    assert out["changed"] is False
    assert [post[0] for post in posts(tabby)] == ["/v1/model/load"]
    tabby.calls.clear()
    code, out = run_module(capsys, model_name="exl3/A/4.0bpw", _ansible_check_mode=True, **args)
    assert code == 0
    assert out["changed"] is False
    assert posts(tabby) == []
    assert warned(out, "check mode cannot prove", "exl3/B/4.0bpw")


def test_exl2_same_basename_follows_the_servers_rule(tabby_for, capsys, tmp_path):
    model_dir = models_tree(tmp_path, "exl3/A/4.0bpw", "exl3/B/4.0bpw")
    tabby = tabby_for("exl2", "exllamav3")
    tabby.model = ("exl3/A/4.0bpw", None, {})
    args = dict(url=tabby.url, admin_key=ADMIN, model_dir=model_dir, generation="exl2", model_name="exl3/B/4.0bpw")
    code, out = run_module(capsys, **args)
    assert code == 0
    assert out["changed"] is False
    assert posts(tabby) == []
    assert warned(out, "set force", "exl3/A/4.0bpw")
    code, out = run_module(capsys, force=True, **args)
    assert code == 0
    assert out["changed"] is True
    assert [post[0] for post in posts(tabby)] == ["/v1/model/unload", "/v1/model/load"]
    assert tabby.model[0] == "exl3/B/4.0bpw"


def test_model_dir_from_config_file(tabby_for, capsys, tmp_path):
    models_tree(tmp_path / "models", "x/4.0bpw", "y/4.0bpw")
    (tmp_path / "config.yml").write_text("model:\n  model_dir: models\n")
    tabby = tabby_for("exl2")
    tabby.model = ("x/4.0bpw", None, {})
    code, out = run_module(
        capsys,
        url=tabby.url,
        admin_key=ADMIN,
        generation="exl2",
        config_file=str(tmp_path / "config.yml"),
        model_name="x/4.0bpw",
    )
    assert code == 0
    assert out["changed"] is False
    assert warned(out, "y/4.0bpw")


@pytest.mark.parametrize(("loaded_draft", "changed"), [("Draft", False), ("Other", True), (None, True)])
def test_exllamav3_draft_read_with_the_api_key(tabby, capsys, tmp_path, loaded_draft, changed):
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text("admin_key: %s\napi_key: %s\n" % (ADMIN, API))
    tabby.models["Other"] = 2
    tabby.model = ("Big", loaded_draft, {})
    args = dict(url=tabby.url, api_tokens_file=str(tokens), model_name="Big", draft_model_name="Draft")
    code, out = run_module(capsys, **args)
    assert code == 0, out
    assert out["changed"] is changed
    assert out["differences"] == (["draft_model"] if changed else [])
    assert tabby.model[1] == "Draft"
    assert API not in json.dumps(out)
    code, out = run_module(capsys, **args)
    assert out["changed"] is False


def test_exllamav3_draft_is_not_checkable(tabby, capsys):
    tabby.model = ("Big", "Draft", {})
    code, out = run_module(capsys, url=tabby.url, admin_key=ADMIN, model_name="Big", draft_model_name="Other")
    assert code == 0
    assert out["changed"] is False
    assert warned(out, "does not report the draft model")


def test_draft_params_need_a_draft(tabby, capsys):
    code, out = run_module(
        capsys, url=tabby.url, admin_key=ADMIN, model_name="Big", draft_params={"draft_rope_alpha": 1}
    )
    assert code == 1
    assert "draft_params needs draft_model_name" in out["msg"]
