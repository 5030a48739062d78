"""The TabbyAPI emulator (tests/emulators/tabbyapi_emulator, an emulator for hosts without a GPU),
run as a real process exactly as the tabbyapi role runs it, plus model_load/model_probe against it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
EMULATOR = REPO / "tests" / "emulators" / "tabbyapi_emulator"
sys.path.insert(0, str(EMULATOR))
from tabby_emu.fixtures import make_model  # noqa: E402

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    # Two consecutive free ports, so the port+1 fallback never lands on a busy one by accident.
    for _attempt in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65535 and not port_open(port) and not port_open(port + 1):
            return port
    raise RuntimeError("no free port pair")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Emulator:
    def __init__(self, workdir: pathlib.Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.workdir = workdir
        (workdir / "config.yml").write_text(yaml.safe_dump(config))
        self.port = config["network"]["port"]
        full_env = dict(os.environ, TABBY_EMU_MODULE_LOAD_S="0.01", TABBY_EMU_TOKEN_S="0.002")
        full_env.update(env or {})
        self.log = open(workdir / "emulator.log", "w+")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, str(EMULATOR / "main.py")],
            cwd=workdir,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_port(self, port: int | None = None, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("emulator exited %s: %s" % (self.proc.returncode, self.output()))
            if port_open(port or self.port):
                return
            time.sleep(0.05)
        raise AssertionError("emulator port not open: " + self.output())

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "emulator.log").read_text()

    @property
    def keys(self) -> dict[str, str]:
        return yaml.safe_load((self.workdir / "api_tokens.yml").read_text())

    def url(self, path: str, port: int | None = None) -> str:
        return "http://127.0.0.1:%d%s" % (port or self.port, path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def http(method: str, url: str, headers: dict[str, str] | None = None, body: Any = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers=dict(headers or {}, **{"Content-Type": "application/json"})
    )
    try:
        with NO_PROXY.open(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ok(result: tuple[int, bytes]) -> bytes:
    status, body = result
    assert status == 200, body
    return body


def sse_data(raw: bytes) -> list[str]:
    return [line[len("data: ") :] for line in raw.decode().split("\r\n") if line.startswith("data: ")]


@pytest.fixture
def lab(tmp_path):
    """A TabbyAPI-like working directory with three model folders."""
    models = tmp_path / "models"
    make_model(models, "Small-exl3", layers=4, quant="exl3")
    make_model(models, "Other-exl3", layers=6, quant="exl3")
    make_model(models, "Old-exl2", layers=3, quant="exl2")
    make_model(models, "Tiny-draft", layers=2, quant="exl3")
    started: list[Emulator] = []

    def start(
        model_name: str | None = "Small-exl3", env: dict[str, str] | None = None, port: int | None = None, **model
    ):
        config = {
            "network": {"host": "127.0.0.1", "port": port or free_port(), "disable_auth": False},
            "model": dict({"model_dir": str(models), "model_name": model_name}, **model),
            "draft_model": {"draft_model_dir": str(models)},
        }
        emulator = Emulator(tmp_path, config, env)
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


def test_startup_order_tokens_and_port(lab, tmp_path):
    emulator = lab(env={"TABBY_EMU_MODULE_LOAD_S": "0.25"})  # 6 modules -> 1.5 s "load"
    time.sleep(0.6)
    assert emulator.proc.poll() is None
    assert not port_open(emulator.port), "port must stay closed while the startup model loads"
    assert not (tmp_path / "api_tokens.yml").exists()
    emulator.wait_port()
    tokens = tmp_path / "api_tokens.yml"
    keys = yaml.safe_load(tokens.read_text())
    assert re.fullmatch(r"[0-9a-f]{32}", keys["api_key"])
    assert re.fullmatch(r"[0-9a-f]{32}", keys["admin_key"])
    assert keys["api_key"] != keys["admin_key"]
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"
    assert "Your admin key is: " + keys["admin_key"] in emulator.output()


def test_existing_api_tokens_are_kept(lab, tmp_path):
    (tmp_path / "api_tokens.yml").write_text("api_key: provisioned-api\nadmin_key: provisioned-admin\n")
    emulator = lab()
    emulator.wait_port()
    assert emulator.keys == {"api_key": "provisioned-api", "admin_key": "provisioned-admin"}
    status = http("GET", emulator.url("/v1/model"), {"x-api-key": "provisioned-api"})[0]
    assert status == 200


def test_port_taken_falls_back_to_next_port(lab):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        emulator = lab(port=port)
        emulator.wait_port(port + 1)
        assert "Port %d is currently in use. Switching to %d." % (port, port + 1) in emulator.output()
        status, _body = http("GET", emulator.url("/health", port + 1))
        assert status == 200


def test_both_ports_taken_exits(lab):
    port = free_port()
    with socket.socket() as first, socket.socket() as second:
        for sock, number in ((first, port), (second, port + 1)):
            sock.bind(("127.0.0.1", number))
            sock.listen()
        emulator = lab(port=port)
        assert emulator.proc.wait(timeout=15) == 1
        assert "are in use by different services" in emulator.output()


@pytest.mark.parametrize(
    ("model_name", "env", "extra", "needle"),
    [
        ("Missing", None, {}, "does not exist"),
        ("Old-exl2", {"TABBY_EMU_BACKENDS": "exllamav3"}, {}, "exllamav2 backend is no longer supported"),
        ("Small-exl3", None, {"backend": "exllamav2"}, "require the exllamav3 backend"),
        ("Small-exl3", None, {"cache_mode": "9,9"}, "Unsupported cache_mode"),
    ],
)
def test_startup_load_failure_exits(lab, model_name, env, extra, needle):
    emulator = lab(model_name, env=env, **extra)
    assert emulator.proc.wait(timeout=15) == 1
    assert needle in emulator.output()
    assert not port_open(emulator.port)


def test_auth_rules(lab):
    emulator = lab()
    emulator.wait_port()
    keys = emulator.keys
    api, admin = keys["api_key"], keys["admin_key"]
    cases = [
        ("GET", "/health", {}, 200),
        ("GET", "/v1/model", {}, 401),
        ("GET", "/v1/model", {"x-api-key": "nope"}, 401),
        ("GET", "/v1/model", {"x-api-key": api}, 200),
        ("GET", "/v1/model", {"Authorization": "Bearer " + api}, 200),
        ("GET", "/v1/model", {"Authorization": "Bearer " + admin}, 200),
        ("GET", "/v1/model", {"Authorization": api}, 401),
        ("GET", "/v1/model", {"x-admin-key": admin}, 401),
        ("POST", "/v1/model/unload", {"x-api-key": api}, 401),
        ("POST", "/v1/model/unload", {"x-admin-key": api}, 401),
        ("POST", "/v1/model/unload", {"Authorization": "Bearer " + api}, 401),
    ]
    for method, path, headers, expected in cases:
        status, body = http(method, emulator.url(path), headers)
        assert status == expected, (method, path, headers, body)
    status, body = http("GET", emulator.url("/v1/model"), {})
    assert json.loads(body) == {"detail": "Please provide an API key"}


def test_models_list_depends_on_key(lab):
    emulator = lab()
    emulator.wait_port()
    keys = emulator.keys
    body = ok(http("GET", emulator.url("/v1/models"), {"x-api-key": keys["admin_key"]}))
    assert [m["id"] for m in json.loads(body)["data"]] == ["Old-exl2", "Other-exl3", "Small-exl3", "Tiny-draft"]
    body = ok(http("GET", emulator.url("/v1/models"), {"x-api-key": keys["api_key"]}))
    assert [m["id"] for m in json.loads(body)["data"]] == ["Small-exl3"]


def test_load_progress_stream_and_unload(lab):
    emulator = lab()
    emulator.wait_port()
    # Bearer works on admin and API routes alike; x-admin-key alone is refused on API routes (as in TabbyAPI).
    admin = {"Authorization": "Bearer " + emulator.keys["admin_key"]}
    status, body = http("POST", emulator.url("/v1/model/load"), admin, {"model_name": "Nope"})
    assert status == 400
    assert "Could not find the model path" in json.loads(body)["detail"]
    status, body = http("POST", emulator.url("/v1/model/load"), admin, {})
    assert status == 422
    status, raw = http(
        "POST",
        emulator.url("/v1/model/load"),
        admin,
        {"model_name": "Other-exl3", "cache_mode": "6,6", "draft_model": {"draft_model_name": "Tiny-draft"}},
    )
    assert status == 200
    events = [json.loads(d) for d in sse_data(raw)]
    assert [(e["model_type"], e["module"], e["status"]) for e in events] == (
        [("draft", i, "processing") for i in range(1, 5)]
        + [("draft", 4, "finished")]
        + [("model", i, "processing") for i in range(1, 9)]
        + [("model", 8, "finished")]
    )
    card = ok(http("GET", emulator.url("/v1/model"), admin))
    card = json.loads(card)
    assert card["id"] == "Other-exl3"
    assert card["parameters"]["cache_mode"] == "6,6"
    assert card["parameters"]["draft"]["id"] == "Tiny-draft"
    # Loading the loaded model again answers with one 1/1 step (processing + finished), as TabbyAPI does.
    raw = ok(http("POST", emulator.url("/v1/model/load"), admin, {"model_name": "Other-exl3"}))
    assert [(e["module"], e["modules"], e["status"]) for e in map(json.loads, sse_data(raw))] == [
        (1, 1, "processing"),
        (1, 1, "finished"),
    ]
    status = http("POST", emulator.url("/v1/model/unload"), admin)[0]
    assert status == 200
    status, body = http("GET", emulator.url("/v1/model"), admin)
    assert status == 503
    assert json.loads(body)["detail"] == "No models are currently loaded."
    status = http("POST", emulator.url("/v1/chat/completions"), admin, {"messages": []})[0]
    assert status == 503


def test_load_error_is_an_sse_error_event(lab):
    emulator = lab(env={"TABBY_EMU_BACKENDS": "exllamav3"})
    emulator.wait_port()
    status, raw = http(
        "POST", emulator.url("/v1/model/load"), {"x-admin-key": emulator.keys["admin_key"]}, {"model_name": "Old-exl2"}
    )
    assert status == 200
    assert json.loads(sse_data(raw)[-1])["error"]["message"].startswith("The exllamav2 backend is no longer supported")


def test_completions_are_deterministic_streamed_or_not(lab):
    emulator = lab()
    emulator.wait_port()
    headers = {"Authorization": "Bearer " + emulator.keys["api_key"]}
    request = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12}
    whole = ok(http("POST", emulator.url("/v1/chat/completions"), headers, request))
    whole = json.loads(whole)
    assert whole["usage"]["completion_tokens"] == 12
    assert whole["model"] == "Small-exl3"
    text = whole["choices"][0]["message"]["content"]
    streamed = dict(request, stream=True, stream_options={"include_usage": True})
    raw = ok(http("POST", emulator.url("/v1/chat/completions"), headers, streamed))
    data = sse_data(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    again = ok(http("POST", emulator.url("/v1/chat/completions"), headers, request))
    assert json.loads(again)["choices"][0]["message"]["content"] == text
    legacy = ok(http("POST", emulator.url("/v1/completions"), headers, {"prompt": "Once", "max_tokens": 3}))
    assert len(json.loads(legacy)["choices"][0]["text"].split()) == 3


def test_api_tokens_file_is_reread(lab, tmp_path):
    emulator = lab()
    emulator.wait_port()
    old = emulator.keys["api_key"]
    (tmp_path / "api_tokens.yml").write_text("api_key: rotated-key\nadmin_key: rotated-admin\n")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        if http("GET", emulator.url("/v1/model"), {"x-api-key": "rotated-key"})[0] == 200:
            break
        time.sleep(0.2)
    assert http("GET", emulator.url("/v1/model"), {"x-api-key": "rotated-key"})[0] == 200
    assert http("GET", emulator.url("/v1/model"), {"x-api-key": old})[0] == 401


def ansible_module(module: str, args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    """Runs a collection module through ansible itself (AnsiballZ), as a playbook would."""
    command = [
        str(pathlib.Path(sys.executable).parent / "ansible"),
        "localhost",
        # Our own inventory: the repo's lab inventory carries lab-host settings localhost must not get.
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        "ansible_python_interpreter=" + sys.executable,
        "-m",
        "llmstack.inference." + module,
        "-a",
        json.dumps(args),
    ]
    if check:
        command.append("--check")
    env = dict(
        os.environ,
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
        ANSIBLE_NOCOLOR="1",
    )
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    # The ad-hoc line is "localhost | STATUS => {json}".
    _head, arrow, result = done.stdout.partition(" => ")
    assert arrow, done.stdout + done.stderr
    return json.loads(result)


def test_modules_against_emulator(lab, tmp_path):
    emulator = lab(env={"TABBY_EMU_MODULE_LOAD_S": "0.05"})
    url = "http://127.0.0.1:%d" % emulator.port
    # model_probe started before the port opens: it must wait through the startup load.
    probe = ansible_module(
        "model_probe",
        {
            "url": url,
            "api_tokens_file": str(tmp_path / "api_tokens.yml"),
            "expect_model": "Small-exl3",
            "timeout": 60,
            "interval": 0.2,
            "auth_header": "x-api-key",
            "min_tokens_per_second": 1,
        },
    )
    assert not probe.get("failed"), probe
    assert probe["changed"] is False
    assert probe["completion_tokens"] == 32
    assert probe["ttft_ms"] > 0
    load_args = {
        "url": url,
        "api_tokens_file": str(tmp_path / "api_tokens.yml"),
        "model_name": "Other-exl3",
        "draft_model_name": "Tiny-draft",
    }
    checked = ansible_module("model_load", load_args, check=True)
    assert checked["changed"] is True
    assert checked["current_model"] == "Other-exl3"
    loaded = ansible_module("model_load", load_args)
    assert loaded["changed"] is True, loaded
    assert (loaded["previous_model"], loaded["current_model"], loaded["current_draft_model"]) == (
        "Small-exl3",
        "Other-exl3",
        "Tiny-draft",
    )
    assert loaded["progress"] == dict(loaded["progress"], model_modules=8, draft_modules=4, finished=True)
    again = ansible_module("model_load", load_args)
    assert again["changed"] is False
    assert ansible_module("model_load", load_args, check=True)["changed"] is False
    unloaded = ansible_module(
        "model_load", {"url": url, "api_tokens_file": str(tmp_path / "api_tokens.yml"), "state": "unloaded"}
    )
    assert unloaded["changed"] is True
    assert unloaded["current_model"] is None
