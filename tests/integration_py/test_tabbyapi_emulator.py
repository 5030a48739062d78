"""The TabbyAPI emulator (tests/emulators/tabbyapi_emulator, an emulator for hosts without a GPU),
run as a real process exactly as the tabbyapi role runs it, plus model_load/model_probe against it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
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
from tabby_emu.generation import installed_backends, pick_generation  # noqa: E402

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
    def __init__(
        self,
        workdir: pathlib.Path,
        config: dict[str, Any] | None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        port: int | None = None,
        checkout: pathlib.Path = EMULATOR,
    ):
        self.workdir = workdir
        if config is not None:
            (workdir / "config.yml").write_text(yaml.safe_dump(config))
        self.port = port or config["network"]["port"]
        full_env = dict(os.environ, TABBY_EMU_MODULE_LOAD_S="0.01", TABBY_EMU_TOKEN_S="0.002")
        full_env.pop("TABBY_EMU_GENERATION", None)
        full_env.update(env or {})
        self.log = open(workdir / "emulator.log", "w+")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, str(checkout / "main.py"), *(args or [])],
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
        model_name: str | None = "Small-exl3",
        env: dict[str, str] | None = None,
        port: int | None = None,
        generation: str | None = None,
        draft: dict[str, Any] | None = None,
        **model,
    ):
        config = {
            "network": {"host": "127.0.0.1", "port": port or free_port(), "disable_auth": False},
            "model": dict({"model_dir": str(models), "model_name": model_name}, **model),
            "draft_model": dict({"draft_model_dir": str(models)}, **(draft or {})),
        }
        env = dict(env or {})
        if generation:
            env["TABBY_EMU_GENERATION"] = generation
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


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_both_ports_taken_exits_with_status_0(lab, generation):
    # main.py entrypoint_async logs and returns at both commits, so the process exits 0 (this
    # test asserted 1 before; the source says 0, which systemd's Restart=on-failure ignores).
    port = free_port()
    with socket.socket() as first, socket.socket() as second:
        for sock, number in ((first, port), (second, port + 1)):
            sock.bind(("127.0.0.1", number))
            sock.listen()
        emulator = lab(port=port, generation=generation)
        assert emulator.proc.wait(timeout=15) == 0
        assert "are in use by different services" in emulator.output()


@pytest.mark.parametrize(
    ("generation", "model_name", "env", "extra", "needle"),
    [
        # common/transformers_utils.py HFModel.from_directory (was "does not exist": not TabbyAPI's words)
        ("exl3", "Missing", None, {}, "Failed to load config.json from"),
        # main's validate_backend names the quantization (was "exllamav2 backend is no longer supported")
        ("exl3", "Old-exl2", {"TABBY_EMU_BACKENDS": "exllamav3"}, {}, "Models quantized with 'exl2' require"),
        ("exl3", "Small-exl3", None, {"backend": "exllamav2"}, "The exllamav2 backend is no longer supported"),
        ("exl2", "Small-exl3", None, {"backend": "exllamav2"}, "require the exllamav3 backend"),
        ("exl2", "Old-exl2", {"TABBY_EMU_BACKENDS": "exllamav3"}, {}, "Backend 'exllamav2' selected, but required"),
        ("exl3", "Small-exl3", None, {"cache_mode": "9,9"}, "Unsupported cache_mode"),
        ("exl2", "Small-exl3", None, {"cache_size": 1000}, "multiple of 256"),
    ],
)
def test_startup_load_failure_exits(lab, generation, model_name, env, extra, needle):
    emulator = lab(model_name, env=env, generation=generation, **extra)
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
    emulator = lab()  # no GENERATION file next to main.py: the exl3 generation (main)
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
    # exllamav3's model_info() reports no draft card (this asserted the draft id before; the
    # source, backends/exllamav3/model.py at both commits, proves that wrong).
    assert card["parameters"]["draft"] is None
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
    # common/model.py validate_backend at main (was "The exllamav2 backend is no longer supported":
    # that is main's answer to backend: exllamav2, not to an exl2-quantized folder).
    message = json.loads(sse_data(raw)[-1])["error"]["message"]
    assert message.startswith(
        "Models quantized with 'exl2' require the exllamav2 backend, which is no longer supported"
    )
    assert http("GET", emulator.url("/health"))[0] == 200, "a failed load leaves the service healthy"
    status, _body = http("GET", emulator.url("/v1/model"), {"x-api-key": emulator.keys["api_key"]})
    assert status == 503, "the old model was unloaded before the new one failed"


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


def test_api_tokens_file_is_reread_on_main(lab, tmp_path):
    emulator = lab(generation="exl3")
    emulator.wait_port()
    old = emulator.keys["api_key"]
    (tmp_path / "api_tokens.yml").write_text("api_key: [rotated-key, second-key]\nadmin_key: rotated-admin\n")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        if http("GET", emulator.url("/v1/model"), {"x-api-key": "rotated-key"})[0] == 200:
            break
        time.sleep(0.2)
    assert http("GET", emulator.url("/v1/model"), {"x-api-key": "rotated-key"})[0] == 200
    assert http("GET", emulator.url("/v1/model"), {"x-api-key": "second-key"})[0] == 200
    assert http("GET", emulator.url("/v1/model"), {"x-api-key": old})[0] == 401


def test_api_tokens_file_is_read_once_on_exl2(lab, tmp_path):
    # common/auth.py at 79126f9: read at start only, api_key a single string.
    emulator = lab(generation="exl2")
    emulator.wait_port()
    old = emulator.keys["api_key"]
    (tmp_path / "api_tokens.yml").write_text("api_key: rotated-key\nadmin_key: rotated-admin\n")
    time.sleep(3)
    assert http("GET", emulator.url("/v1/model"), {"x-api-key": "rotated-key"})[0] == 401
    assert http("GET", emulator.url("/v1/model"), {"x-api-key": old})[0] == 200


@pytest.mark.parametrize(
    ("generation", "tokens", "rc"),
    [
        ("exl2", "api_key: [a, b]", 1),
        ("exl2", "api_key: 0123", 1),
        ("exl3", "api_key: 0123", 1),
        ("exl3", "api_key: 12345e678", 1),
    ],
)
def test_api_tokens_that_pydantic_refuses_stop_the_start(lab, tmp_path, generation, tokens, rc):
    (tmp_path / "api_tokens.yml").write_text(tokens + "\nadmin_key: admin-key\n")
    emulator = lab(generation=generation)
    assert emulator.proc.wait(timeout=15) == rc
    assert "api_key" in emulator.output()


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
    # The exl2 generation with exllamav2 folders: the backend whose card reports the draft model
    # (exllamav3's card has no draft; model_load must not compare it there, see issue 9 item 4).
    make_model(tmp_path / "models", "Other-exl2", layers=6, quant="exl2")
    make_model(tmp_path / "models", "Tiny-draft-exl2", layers=2, quant="exl2")
    emulator = lab(env={"TABBY_EMU_MODULE_LOAD_S": "0.05"}, generation="exl2")
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
        "model_name": "Other-exl2",
        "draft_model_name": "Tiny-draft-exl2",
    }
    checked = ansible_module("model_load", load_args, check=True)
    assert checked["changed"] is True
    assert checked["current_model"] == "Other-exl2"
    loaded = ansible_module("model_load", load_args)
    assert loaded["changed"] is True, loaded
    assert (loaded["previous_model"], loaded["current_model"], loaded["current_draft_model"]) == (
        "Small-exl3",
        "Other-exl2",
        "Tiny-draft-exl2",
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


# --- generation by generation (issue 9 part 7; the README's table names the source files) ----


def admin_headers(emulator: Emulator) -> dict[str, str]:
    return {"x-admin-key": emulator.keys["admin_key"], "x-api-key": emulator.keys["admin_key"]}


def load(emulator: Emulator, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    status, raw = http("POST", emulator.url("/v1/model/load"), admin_headers(emulator), body)
    if status != 200:
        return status, json.loads(raw)["detail"]
    return status, [json.loads(d) for d in sse_data(raw)]


def card(emulator: Emulator) -> dict[str, Any]:
    return json.loads(ok(http("GET", emulator.url("/v1/model"), admin_headers(emulator))))


def test_generation_is_picked_from_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("TABBY_EMU_GENERATION", raising=False)
    monkeypatch.delenv("TABBY_EMU_BACKENDS", raising=False)
    assert pick_generation(tmp_path).name == "exl3", "no GENERATION file: main"
    (tmp_path / "GENERATION").write_text("exl2 generation: backends exllamav2 and exllamav3\n")
    exl2 = pick_generation(tmp_path)
    assert exl2.name == "exl2"
    assert installed_backends(exl2) == {"exllamav2", "exllamav3"}
    assert installed_backends(pick_generation(tmp_path / "nowhere")) == {"exllamav3"}
    monkeypatch.setenv("TABBY_EMU_GENERATION", "exl3")
    assert pick_generation(tmp_path).name == "exl3", "the env var wins over the file"
    monkeypatch.setenv("TABBY_EMU_BACKENDS", "exllamav2,exllamav3")
    assert installed_backends(pick_generation(tmp_path)) == {"exllamav3"}, "main has no exllamav2 code"
    monkeypatch.setenv("TABBY_EMU_GENERATION", "exl4")
    with pytest.raises(ValueError, match="exl2 or exl3"):
        pick_generation(tmp_path)


def test_generation_file_in_the_checkout_selects_exl2(tmp_path):
    # As the molecule scenario's exl2-checkpoint branch ships it: GENERATION next to main.py.
    checkout = tmp_path / "app"
    shutil.copytree(EMULATOR, checkout, ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "GENERATION").write_text("exl2 generation: backends exllamav2 and exllamav3\n")
    make_model(tmp_path / "models", "Old-exl2", layers=2, quant="exl2")
    port = free_port()
    config = {"network": {"port": port}, "model": {"model_dir": str(tmp_path / "models"), "model_name": "Old-exl2"}}
    emulator = Emulator(tmp_path, config, checkout=checkout)
    try:
        emulator.wait_port()
        assert "Emulating TabbyAPI generation exl2" in emulator.output()
        assert card(emulator)["parameters"]["max_batch_size"] == 16, "loaded by the exllamav2 backend"
        assert load(emulator, {"model_name": "Old-exl2"}) == (200, []), "exl2's silent repeated load"
    finally:
        emulator.stop()


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_repeated_load_rule(lab, tmp_path, generation):
    models = tmp_path / "models"
    make_model(models, "exl3/A/4.0bpw", layers=4, max_position_embeddings=4096)
    make_model(models, "exl3/B/4.0bpw", layers=6, max_position_embeddings=2048)
    emulator = lab("exl3/A/4.0bpw", generation=generation)
    emulator.wait_port()
    assert card(emulator)["id"] == "4.0bpw", "the card id is the folder basename"
    status, again = load(emulator, {"model_name": "exl3/A/4.0bpw", "draft_model": {"draft_model_name": "Tiny-draft"}})
    assert status == 200
    other_status, other = load(emulator, {"model_name": "exl3/B/4.0bpw"})
    assert other_status == 200
    if generation == "exl3":
        # main compares resolved paths and answers the loaded model with one finished step.
        assert [(e["module"], e["modules"], e["status"]) for e in again] == [(1, 1, "processing"), (1, 1, "finished")]
        assert other[-1] == {"model_type": "model", "module": 8, "modules": 8, "status": "finished"}
        assert card(emulator)["parameters"]["max_seq_len"] == 2048, "B is loaded"
    else:
        # exl2-checkpoint compares basenames and returns without an event: B is never loaded.
        assert again == []
        assert other == []
        assert card(emulator)["parameters"]["max_seq_len"] == 4096, "A is still loaded"


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_load_request_fields_and_types(lab, generation):
    emulator = lab(generation=generation)
    emulator.wait_port()
    bad = [
        ({"model_name": None}, ["body", "model_name"]),
        ({"model_name": 5}, ["body", "model_name"]),
        ({"model_name": "Other-exl3", "max_seq_len": "lots"}, ["body", "max_seq_len"]),
        ({"model_name": "Other-exl3", "max_seq_len": 4096.5}, ["body", "max_seq_len"]),
        ({"model_name": "Other-exl3", "gpu_split": "20,20"}, ["body", "gpu_split"]),
        ({"model_name": "Other-exl3", "cache_mode": 8}, ["body", "cache_mode"]),
        (
            {"model_name": "Other-exl3", "draft_model": {"draft_rope_scale": 1.0}},
            ["body", "draft_model", "draft_model_name"],
        ),
        ({"model_name": "Other-exl3", "draft_model": "Tiny-draft"}, ["body", "draft_model"]),
    ]
    for body, loc in bad:
        status, detail = load(emulator, body)
        assert status == 422, body
        assert detail[0]["loc"] == loc, (body, detail)
    assert load(emulator, {"model_name": ""})[0] == 400
    # Unknown fields are ignored like pydantic does; max_batch_size and draft_cache_mode are not
    # load-request fields at either commit, so they never reach the backend.
    status, events = load(
        emulator,
        {
            "model_name": "Other-exl3",
            "max_seq_len": "2048",
            "max_batch_size": 7,
            "no_such_field": True,
            "draft_model": {"draft_model_name": "Tiny-draft", "draft_cache_mode": "Q4", "bogus": 1},
        },
    )
    assert status == 200
    assert events[-1]["status"] == "finished", events
    params = card(emulator)["parameters"]
    assert params["max_seq_len"] == 2048
    assert params["max_batch_size"] == 128, "exllamav3's default, not the dropped 7"


def test_card_exllamav2_backend_with_draft(lab, tmp_path):
    models = tmp_path / "models"
    make_model(models, "exl2/Big", layers=3, quant="exl2", max_position_embeddings=8192)
    make_model(models, "exl2/Draft", layers=2, quant="exl2", max_position_embeddings=2048)
    emulator = lab("exl2/Big", generation="exl2")
    emulator.wait_port()
    full = card(emulator)
    assert set(full) >= {"id", "object", "created", "owned_by", "logging", "parameters"}
    params = full["parameters"]
    # backends/exllamav2/model.py create(): cache_size coalesce(cache_size, max_seq_len, 4096),
    # max_seq_len min(max_position_embeddings, cache_size) when unset.
    assert (params["max_seq_len"], params["cache_size"], params["cache_mode"]) == (4096, 4096, "FP16")
    assert params["draft"] is None
    status, events = load(
        emulator,
        {
            "model_name": "exl2/Big",
            "draft_model": {"draft_model_name": "exl2/Draft"},
        },
    )
    assert (status, events) == (200, []), "same basename: already loaded, even with a new draft"
    assert http("POST", emulator.url("/v1/model/unload"), admin_headers(emulator))[0] == 200
    status, events = load(
        emulator,
        {
            "model_name": "exl2/Big",
            "max_seq_len": 16384,
            "cache_mode": "8,8",
            "chunk_size": 300,
            "draft_model": {"draft_model_name": "exl2/Draft", "draft_rope_scale": 2.0},
        },
    )
    assert status == 200
    assert events[-1]["status"] == "finished", events
    params = card(emulator)["parameters"]
    assert params["max_seq_len"] == 16384
    assert params["cache_size"] == 16384
    assert params["cache_mode"] == "FP16", "exllamav2 falls back from an exl3 cache mode"
    assert params["rope_alpha"] == pytest.approx(-0.13436 + 0.80541 * 2 + 0.28833 * 4)
    assert params["chunk_size"] == 512
    draft = params["draft"]
    assert draft["id"] == "Draft"
    assert draft["parameters"]["max_seq_len"] == 16384
    assert draft["parameters"]["rope_scale"] == 2.0
    assert draft["parameters"]["cache_mode"] == "FP16"


def test_card_exllamav2_batch_default_is_an_assumption_not_faithful(lab):
    # TabbyAPI passes max_batch_size None to exllamav2's generator, which picks it; that value is
    # exllamav2's, not in TabbyAPI's source: the emulator reports 16.
    emulator = lab("Old-exl2", generation="exl2")
    emulator.wait_port()
    assert card(emulator)["parameters"]["max_batch_size"] == 16


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_card_exllamav3_backend(lab, tmp_path, generation):
    make_model(tmp_path / "models", "NoPos-exl3", layers=2, max_position_embeddings=None)
    emulator = lab("Other-exl3", generation=generation, cache_mode="Q8")
    emulator.wait_port()
    params = card(emulator)["parameters"]
    # backends/exllamav3/model.py: max_seq_len from config.json when unset, cache_size = it.
    assert (params["max_seq_len"], params["cache_size"], params["cache_mode"]) == (8192, 8192, "Q8")
    assert (params["rope_scale"], params["rope_alpha"], params["max_batch_size"]) == (1.0, 1.0, 128)
    status, events = load(emulator, {"model_name": "Small-exl3", "cache_size": 5000})
    assert status == 200
    assert "multiple of 256" in events[-1]["error"]["message"], "exllamav3 takes no unaligned cache"
    _status, events = load(
        emulator,
        {"model_name": "NoPos-exl3", "chunk_size": 300, "draft_model": {"draft_model_name": "Tiny-draft"}},
    )
    assert [e["model_type"] for e in events if e["status"] == "finished"] == ["draft", "model"]
    params = card(emulator)["parameters"]
    assert (params["max_seq_len"], params["cache_size"], params["chunk_size"]) == (8192, 8192, 512)
    assert params["draft"] is None, "exllamav3 reports no draft card"


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_use_as_default_limits_what_api_loads_take_from_config(lab, generation):
    emulator = lab(
        generation=generation,
        cache_mode="Q4",
        max_seq_len=2048,
        use_as_default=["cache_mode", "draft_cache_mode"],
        draft={"draft_cache_mode": "Q8"},
    )
    emulator.wait_port()
    assert card(emulator)["parameters"]["max_seq_len"] == 2048, "the startup load takes the whole config"
    make_model(emulator.workdir / "models", "exl2/Side", layers=2, quant="exl2")
    model = "Other-exl3" if generation == "exl3" else "exl2/Side"
    _status, events = load(emulator, {"model_name": model, "draft_model": {"draft_model_name": "Tiny-draft"}})
    assert events[-1]["status"] == "finished", events
    params = card(emulator)["parameters"]
    assert params["cache_mode"] == "Q4", "named in use_as_default"
    assert params["max_seq_len"] == (8192 if generation == "exl3" else 4096), "not named: the model's own default"
    if generation == "exl2":
        assert params["draft"]["parameters"]["cache_mode"] == "Q8", "draft_cache_mode only via use_as_default"


def _load_and_hang_up(emulator: Emulator, model_name: str) -> bytes:
    body = json.dumps({"model_name": model_name}).encode()
    request = (
        b"POST /v1/model/load HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"x-admin-key: "
        + emulator.keys["admin_key"].encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    with socket.create_connection(("127.0.0.1", emulator.port)) as sock:
        sock.sendall(request)
        first = sock.recv(4096)
    return first


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_client_disconnect_during_load(lab, tmp_path, generation):
    make_model(tmp_path / "models", "Slow-exl3", layers=40)
    emulator = lab(generation=generation, env={"TABBY_EMU_MODULE_LOAD_S": "0.05"})
    emulator.wait_port()
    first = _load_and_hang_up(emulator, "Slow-exl3")
    assert first.startswith(b"HTTP/1.1 200")
    time.sleep(3.5)  # 42 modules x 0.05 s
    status, body = http("GET", emulator.url("/v1/model"), admin_headers(emulator))
    if generation == "exl3":
        # main: the load runs in a detached task and finishes without its client.
        assert (status, json.loads(body)["id"]) == (200, "Slow-exl3")
    else:
        # exl2-checkpoint: the response drives the load; the disconnect cancels it, and the model
        # loaded before was already unloaded.
        assert status == 503, body
        assert "Model load cancelled by user" in emulator.output()


@pytest.mark.parametrize("generation", ["exl2", "exl3"])
def test_health_turns_unhealthy_after_a_fatal_generation_error(lab, generation):
    emulator = lab(generation=generation, env={"TABBY_EMU_FAIL_PROMPT": "explode"})
    emulator.wait_port()
    headers = {"Authorization": "Bearer " + emulator.keys["api_key"]}
    assert load(emulator, {"model_name": "Nope"})[0] == 400
    assert http("GET", emulator.url("/health"))[0] == 200, "load errors do not count"
    chat = {"messages": [{"role": "user", "content": "please explode"}], "max_tokens": 4}
    status, body = http("POST", emulator.url("/v1/chat/completions"), headers, chat)
    assert status == 503
    assert "aborted" in json.loads(body)["detail"]
    fine = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    assert http("POST", emulator.url("/v1/chat/completions"), headers, fine)[0] == 200
    status, body = http("GET", emulator.url("/health"))
    assert status == 503, "HealthManager never forgets an issue"
    health = json.loads(body)
    assert health["status"] == "unhealthy"
    assert health["issues"][0]["description"].startswith("RuntimeError")


def test_config_loading_order(lab, tmp_path):
    models = tmp_path / "models"
    ports = [free_port() for _attempt in range(3)]
    while len(set(ports)) < 3 or any(abs(a - b) < 2 for a in ports for b in ports if a != b):
        ports = [free_port() for _attempt in range(3)]
    file_port, env_port, cli_port = ports
    real = tmp_path / "etc-config.yml"
    real.write_text(
        yaml.safe_dump(
            {"network": {"port": file_port}, "model": {"model_dir": str(models), "model_name": "Small-exl3"}}
        )
    )
    (tmp_path / "config.yml").symlink_to(real)  # the role links config.yml; TabbyAPI follows it
    env = {"TABBY_NETWORK_PORT": str(env_port), "TABBY_MODEL_MAX_SEQ_LEN": "1024"}
    emulator = Emulator(tmp_path, None, env, port=env_port)
    try:
        emulator.wait_port()
        assert card(emulator)["parameters"]["max_seq_len"] == 1024, "env string coerced to int"
    finally:
        emulator.stop()
    emulator = Emulator(tmp_path, None, env, args=["--port", str(cli_port)], port=cli_port)
    try:
        emulator.wait_port()
        assert card(emulator)["id"] == "Small-exl3", "CLI port, file model"
    finally:
        emulator.stop()
    override = tmp_path / "override.yml"
    override.write_text(yaml.safe_dump({"network": {"port": file_port + 1}, "model": {"model_name": "Other-exl3"}}))
    # --config replaces the CLI layer: --port is ignored, the override file beats the env.
    emulator = Emulator(
        tmp_path, None, env, args=["--config", str(override), "--port", str(cli_port)], port=file_port + 1
    )
    try:
        emulator.wait_port()
        assert card(emulator)["id"] == "Other-exl3"
        assert not port_open(cli_port)
        assert not port_open(env_port)
    finally:
        emulator.stop()


def test_config_errors(lab, tmp_path):
    port = free_port()
    (tmp_path / "config.yml").write_text("network: [unclosed\n")
    # An unparsable file is logged and skipped: TabbyAPI starts with defaults (no model).
    emulator = Emulator(tmp_path, None, {"TABBY_NETWORK_PORT": str(port)}, port=port)
    try:
        emulator.wait_port()
        assert "couldn't load" in emulator.output()
        assert http("GET", emulator.url("/v1/model"), {"x-api-key": emulator.keys["api_key"]})[0] == 503
    finally:
        emulator.stop()
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"network": {"port": "five thousand"}}))
    emulator = Emulator(tmp_path, None, None, port=port)
    assert emulator.proc.wait(timeout=15) == 1, "a wrong type stops the start like pydantic"
    assert "network.port" in emulator.output()
    emulator.stop()


def test_not_faithful_no_vram_any_model_loads(lab, tmp_path):
    # No GPU: a 70B folder with a 128K FP16 cache "loads" in the emulator; the real server runs out
    # of VRAM. VRAM fit is the estimate's job (tabbyapi_vram), not the emulator's.
    make_model(
        tmp_path / "models",
        "exl3/Llama-3.1-70B/4.0bpw",
        preset="llama-3.1-70b",
        layers=None,
        max_position_embeddings=None,
    )
    emulator = lab("exl3/Llama-3.1-70B/4.0bpw", env={"TABBY_EMU_MODULE_LOAD_S": "0.001"})
    emulator.wait_port()
    params = card(emulator)["parameters"]
    assert (params["max_seq_len"], params["cache_size"]) == (131072, 131072)


def test_fixture_cli_writes_realistic_config(tmp_path):
    script = EMULATOR / "tabby_emu" / "fixtures.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "exl2/tiny-exl2", "--quant", "exl2"],
        capture_output=True,
        text=True,
        check=True,
    )
    folder = pathlib.Path(done.stdout.strip())
    config = json.loads((folder / "config.json").read_text())
    assert folder == tmp_path / "exl2" / "tiny-exl2"
    assert config["num_hidden_layers"] == 4
    assert config["quantization_config"] == {"quant_method": "exl2", "bits": 4.0}
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "intermediate_size",
        "max_position_embeddings",
    ):
        assert isinstance(config[key], int), key
    subprocess.run(
        [sys.executable, str(script), str(tmp_path), "exl3/L/3.5bpw", "--preset", "llama-3.1-70b", "--bits", "3.5"],
        capture_output=True,
        text=True,
        check=True,
    )
    big = json.loads((tmp_path / "exl3/L/3.5bpw/config.json").read_text())
    assert (big["num_hidden_layers"], big["hidden_size"], big["num_key_value_heads"]) == (80, 8192, 8)
    assert big["quantization_config"]["bits"] == 3.5
