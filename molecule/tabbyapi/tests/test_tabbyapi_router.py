"""A GB200-shaped node (blackwell-multi-model-router.md): the router in front of TabbyAPI and a llama.cpp unit.

Each host holds three TabbyAPI models, two of them nested folders whose last component is the same
("4.0bpw": TabbyAPI's model card cannot tell them apart), and one llama.cpp unit in the same GPU group.
Through the router: switch TabbyAPI between its models in place (same PID, each model with its own load
settings), restart TabbyAPI and get the last switched model back, cross to llama.cpp and back. tabby-git
runs the exl3 generation (main), tabby-tarball the exl2 generation (exl2-checkpoint), whose repeated-load
check compares only the folder's last component (common/model.py at 79126f9).
"""

from __future__ import annotations

import json
import os
import shlex
import time

import pytest
import testinfra.utils.ansible_runner
import yaml

INVENTORY = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
testinfra_hosts = [f"ansible://{name}" for name in sorted(INVENTORY.get_hosts("router"))]

API_KEY = "molecule-router-api-key-0123456789"
ROUTER = "http://127.0.0.1:8002"
TOKENS = "/etc/llmstack/tabbyapi/api_tokens.yml"
ACTIVE = "/var/lib/llmstack/router-active/tabbyapi.json"
EFFECTIVE = "/var/lib/llmstack/tabbyapi/config.yml"
LLAMA = "llamacpp@smollm2.service"
GEN = {
    "tabby-git": {"startup": "tiny-exl3-a", "a": "llama-a-exl3", "b": "llama-b-exl3", "dir": "exl3"},
    "tabby-tarball": {"startup": "tiny-exl2", "a": "llama-a-exl2", "b": "llama-b-exl2", "dir": "exl2"},
}


def gen(host) -> dict:
    return GEN[host.backend.get_hostname()]


def call(host, url: str, *, key: str | None = API_KEY, body: dict | None = None) -> tuple[int, dict]:
    args = ["curl", "-s", "-m", "300", "-w", "\\n%{http_code}"]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    text, _newline, code = host.run(shlex.join([*args, url])).stdout.rpartition("\n")
    return int(code or 0), json.loads(text) if text.strip().startswith("{") else {"raw": text}


def chat(host, model: str) -> dict:
    code, body = call(host, ROUTER + "/v1/chat/completions", body={
        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Say hello."}]})
    assert code == 200, body
    assert body["choices"][0]["message"]["content"], body
    return body


def card(host) -> dict:
    key = yaml.safe_load(host.file(TOKENS).content_string)["api_key"]
    code, body = call(host, "http://127.0.0.1:5000/v1/model", key=key)
    assert code == 200, body
    return body


def tabby_pid(host) -> int:
    return int(host.check_output("systemctl show -p MainPID --value tabbyapi.service"))


def wait_card(host, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if call(host, "http://127.0.0.1:5000/health", key=None)[0] == 200:
            return card(host)
        time.sleep(1)
    raise AssertionError("TabbyAPI did not come back healthy")


def test_router_lists_every_model_with_aliases(host) -> None:
    g = gen(host)
    code, body = call(host, ROUTER + "/v1/models")
    assert code == 200, body
    models = {m["id"]: m for m in body["data"]}
    assert {g["startup"], g["a"], g["b"], "smollm2-135m-instruct"} <= set(models), models
    assert models[g["b"]]["aliases"] == ["llama-b"]


def test_router_config_carries_each_models_load_request(host) -> None:
    g = gen(host)
    config = yaml.safe_load(host.file("/etc/llmstack/router/config.yml").content_string)
    tabby = config["backends"]["tabbyapi"]
    assert tabby["state_file"] == ACTIVE
    loads = {m["id"]: m["load"] for m in tabby["models"]}
    assert loads[g["a"]]["model_name"] == f"{g['dir']}/Llama-A/4.0bpw"
    assert loads[g["a"]]["max_seq_len"] == 2048
    assert loads[g["b"]]["draft_model"]["draft_model_name"]
    assert {m["served_name"] for m in tabby["models"] if m["id"] in (g["a"], g["b"])} == {"4.0bpw"}


def test_switches_in_place_between_same_named_folders(host) -> None:
    g = gen(host)
    chat(host, g["a"])
    pid = tabby_pid(host)
    first = card(host)
    assert first["id"] == "4.0bpw"
    assert first["parameters"]["max_seq_len"] == 2048
    chat(host, g["b"])
    second = card(host)
    # The same card id: only B's own settings (its max_seq_len) show that B, not A, is loaded.
    assert second["id"] == "4.0bpw"
    assert second["parameters"]["max_seq_len"] == 1024, second
    if g["dir"] == "exl2":
        # exllamav2's model_info() reports the draft; exllamav3's never does (backends/*/model.py).
        assert second["parameters"].get("draft"), second
    assert tabby_pid(host) == pid, "an in-place switch keeps the TabbyAPI process"
    record = host.file(ACTIVE)
    assert (record.user, record.mode) == ("llmrouter", 0o644)
    assert json.loads(record.content_string) == {"id": g["b"], "model_name": f"{g['dir']}/Llama-B/4.0bpw"}


def test_restart_brings_the_last_switched_model_back(host) -> None:
    g = gen(host)
    chat(host, g["b"])
    assert host.run("systemctl restart tabbyapi.service").rc == 0
    back = wait_card(host)
    assert back["id"] == "4.0bpw"
    assert back["parameters"]["max_seq_len"] == 1024, back
    effective = yaml.safe_load(host.file(EFFECTIVE).content_string)
    assert effective["model"]["model_name"] == f"{g['dir']}/Llama-B/4.0bpw"
    assert (host.file(EFFECTIVE).user, host.file(EFFECTIVE).mode) == ("tabbyapi", 0o600)
    log = host.check_output("journalctl -u tabbyapi.service -n 50 --no-pager")
    assert f"({g['b']}, the router's last switch)" in log


def test_crosses_to_llamacpp_and_back(host) -> None:
    g = gen(host)
    chat(host, "smollm2-135m-instruct")
    assert host.run(f"systemctl is-active --quiet {LLAMA}").rc == 0
    assert host.run("systemctl is-active --quiet tabbyapi.service").rc != 0, "one engine at a time in the group"
    chat(host, g["a"])
    assert host.run("systemctl is-active --quiet tabbyapi.service").rc == 0
    assert host.run(f"systemctl is-active --quiet {LLAMA}").rc != 0
    assert card(host)["parameters"]["max_seq_len"] == 2048
    # Leave the node on its start-up model.
    chat(host, g["startup"])
    assert card(host)["id"] == g["startup"]


def vram(host, models: list, gpus: list) -> dict:
    # JSON module args: key=value would split the list option at its commas.
    args = {"model_dir": "/mnt/models", "generation": "exl3", "models": models, "gpus": gpus}
    return host.ansible("llmstack.inference.tabbyapi_vram", json.dumps(args), check=False, become=False)


def test_vram_estimate_refuses_a_70b_on_a_24gb_card_and_feeds_the_router(host) -> None:
    if gen(host)["dir"] != "exl3":
        pytest.skip("the GB200-shaped VRAM check runs on tabby-git (tabbyapi_vram_gpus)")
    big = [{"name": "exl3/Llama-3.1-70B/4.0bpw", "id": "llama-70b", "max_seq_len": 24576}]
    fits = vram(host, big, [189471])
    assert fits.get("failed") is not True, fits
    need = fits["models"]["llama-70b"]["estimate_mib"]
    assert 35000 < need < 60000, fits["models"]["llama-70b"]
    refused = vram(host, big, [24564])
    # testinfra returns the failed module's result; its message is the refusal.
    assert "llama-70b does not fit" in refused.get("msg", ""), refused
    assert f"= {need} MiB" in refused["msg"], "the refusal gives the numbers"
    # The router's pre-flight got the estimate of each TabbyAPI model that declares no vram_mib.
    config = yaml.safe_load(host.file("/etc/llmstack/router/config.yml").content_string)
    models = {m["id"]: m for m in config["backends"]["tabbyapi"]["models"]}
    assert models["llama-a-exl3"]["vram_mib"] > 0
