"""The router role on tabby-tarball: two llama.cpp units (llama-cpp-python and llama-server) behind llmrouter,
swapped both ways with real completions, beside TabbyAPI in the same GPU group; the router's files, keys,
polkit rule and sandbox. (Was the router scenario; it shares this scenario's boot to save CI time.)
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

testinfra_hosts = ["ansible://tabby-tarball"]

API_KEY = "molecule-router-api-key-0123456789"
ADMIN_KEY = "molecule-router-admin-key-0123456789"
ROUTER = "http://127.0.0.1:8002"
# model id -> the unit that must be the only active llama.cpp unit once the router served it
MODELS = {
    "smollm2-135m-instruct": "llamacpp@smollm2.service",
    "smollm2-135m-instruct-bin": "llamacpp@smollm2-bin.service",
}
UNITS = sorted(MODELS.values())
# Every engine unit of the router's one GPU group: after a swap exactly one of them is active.
ENGINES = sorted([*UNITS, "tabbyapi.service"])
TABBY_MODELS = ["tiny-exl2", "llama-a-exl2", "llama-b-exl2"]
MAX_EXPOSURE = 2.0


def call(host, path: str, *, key: str | None = API_KEY, body: dict | None = None) -> tuple[int, dict]:
    # The status code goes on a line of its own after the body.
    args = ["curl", "-s", "-m", "300", "-w", "\\n%{http_code}"]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    text, _newline, code = host.run(shlex.join([*args, ROUTER + path])).stdout.rpartition("\n")
    return int(code or 0), json.loads(text) if text.strip().startswith("{") else {"raw": text}


def chat(host, model: str) -> tuple[int, dict]:
    return call(host, "/v1/chat/completions", body={
        "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})


def active_units(host) -> list[str]:
    return [unit for unit in ENGINES if host.run(f"systemctl is-active --quiet {unit}").rc == 0]


@pytest.fixture(scope="module", autouse=True)
def back_on_the_startup_model(host):
    # The verifier's --hosts overrides testinfra_hosts: this part is tabby-tarball's alone.
    if host.backend.get_hostname() != "tabby-tarball":
        pytest.skip("the router part of the scenario runs on tabby-tarball")
    # The swaps below stop TabbyAPI; the other test modules expect the host as the converge left it.
    yield
    code, body = chat(host, "tiny-exl2")
    assert code == 200, body
    assert active_units(host) == ["tabbyapi.service"]


def test_router_runs_as_its_own_user_on_loopback(host) -> None:
    service = host.service("llmrouter.service")
    assert service.is_running
    assert service.is_enabled
    pid = host.run("systemctl show -p MainPID --value llmrouter.service").stdout.strip()
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == "llmrouter"
    assert host.socket("tcp://127.0.0.1:8002").is_listening
    assert not host.socket("tcp://0.0.0.0:8002").is_listening


def test_router_installed_from_the_collection_source(host) -> None:
    assert host.file("/opt/llmstack/router/venv/bin/llmstack-router").exists
    assert host.file("/opt/llmstack/router/src/src/llmstack_router/app.py").exists
    check = host.run("/opt/llmstack/router/venv/bin/llmstack-router --config /etc/llmstack/router/config.yml --check")
    assert check.rc == 0, check.stderr
    assert "5 models in 1 groups" in check.stdout + check.stderr


@pytest.mark.parametrize(
    ("path", "owner", "group", "mode"),
    [
        ("/etc/llmstack/router", "root", "llmrouter", 0o750),
        ("/etc/llmstack/router/config.yml", "root", "llmrouter", 0o640),
        ("/etc/llmstack/router/api_keys", "llmrouter", "llmrouter", 0o600),
        ("/etc/llmstack/router/admin_keys", "llmrouter", "llmrouter", 0o600),
        ("/etc/llmstack/router/llamacpp-smollm2.api_key", "llmrouter", "llmrouter", 0o600),
        ("/var/lib/llmstack/router", "llmrouter", "llmrouter", 0o750),
    ],
)
def test_files_and_secrets(host, path: str, owner: str, group: str, mode: int) -> None:
    item = host.file(path)
    assert item.exists
    assert (item.user, item.group, item.mode) == (owner, group, mode)


def test_config_is_derived_from_the_llamacpp_instances(host) -> None:
    config = host.file("/etc/llmstack/router/config.yml").content_string
    assert "unit: llamacpp@smollm2.service" in config
    assert "unit: llamacpp@smollm2-bin.service" in config
    assert "url: http://127.0.0.1:8081" in config
    assert "molecule-" not in config  # keys only by file


def test_sandbox_exposure(host) -> None:
    out = host.run("systemd-analyze security llmrouter.service").stdout
    score = float(re.search(r"Overall exposure level for llmrouter.service: ([0-9.]+)", out).group(1))
    print(f"systemd-analyze security llmrouter.service: {score}")
    assert score <= MAX_EXPOSURE


def test_backends_are_left_to_the_router(host) -> None:
    for unit in UNITS:
        assert host.run(f"systemctl is-enabled {unit}").stdout.strip() != "enabled"


@pytest.mark.parametrize(
    "command",
    [
        "systemctl start ssh.service",
        "systemctl restart llamacpp@smollm2.service",
        "systemctl enable llamacpp@smollm2.service",
        "systemctl start llamacpp@other.service",
    ],
)
def test_polkit_rule_allows_nothing_but_start_and_stop_of_the_backends(host, command: str) -> None:
    result = host.run(f"runuser -u llmrouter -- {command}")
    assert result.rc != 0
    assert "Interactive authentication required" in result.stderr or "Access denied" in result.stderr


def test_models_lists_both_with_aliases(host) -> None:
    code, body = call(host, "/v1/models")
    assert code == 200
    assert sorted(m["id"] for m in body["data"]) == sorted([*MODELS, *TABBY_MODELS])
    smollm = next(m for m in body["data"] if m["id"] == "smollm2-135m-instruct")
    assert smollm["aliases"] == ["smollm"]


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("wrong-key-0123456789abc", 401), (ADMIN_KEY, 401)])
def test_api_needs_an_api_key(host, key, status) -> None:
    assert call(host, "/v1/models", key=key)[0] == status


def test_unknown_model_is_a_404_naming_the_valid_ids(host) -> None:
    code, body = chat(host, "no-such-model")
    assert code == 404
    assert body["error"]["code"] == "model_not_found"
    assert all(model in body["error"]["message"] for model in [*MODELS, *TABBY_MODELS])


def test_swaps_both_ways_with_real_completions(host) -> None:
    # bin -> python -> bin -> python (alias): every request is served by the unit of its model, alone.
    for model in ["smollm2-135m-instruct-bin", "smollm2-135m-instruct", "smollm2-135m-instruct-bin", "smollm"]:
        code, body = chat(host, model)
        assert code == 200, body
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["completion_tokens"] >= 1
        wanted = MODELS.get(model, "llamacpp@smollm2.service")
        assert active_units(host) == [wanted]
    code, status = call(host, "/admin/status", key=ADMIN_KEY)
    assert code == 200
    group = status["groups"][0]
    assert group["swaps"] >= 4
    assert group["last_error"] is None
    # The router reads its backends' journal (SupplementaryGroups=systemd-journal) for error messages.
    assert any("Started" in line for lines in status["backend_logs"].values() for line in lines)


def test_streaming_through_the_router(host) -> None:
    body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 8, "stream": True,
                       "messages": [{"role": "user", "content": "Say hello."}]})
    out = host.run(shlex.join(["curl", "-sN", "-m", "300", "-H", f"Authorization: Bearer {API_KEY}",
                               "-H", "Content-Type: application/json", "-d", body, ROUTER + "/v1/chat/completions"]))
    events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert len(events) >= 2
    assert events[-1] == "data: [DONE]"


def test_polkit_rule_allows_reset_failed_of_the_backends_only(host) -> None:
    denied = host.run("runuser -u llmrouter -- systemctl reset-failed ssh.service")
    assert denied.rc != 0
    assert "Interactive authentication required" in denied.stderr or "Access denied" in denied.stderr
    # systemd looks the unit up before it asks polkit: an unloaded (inactive, collected) unit answers
    # "not loaded" whatever the rule says, so the unit is loaded first (the next test swaps it anyway).
    assert host.run("systemctl start llamacpp@smollm2-bin.service").rc == 0
    allowed = host.run("runuser -u llmrouter -- systemctl reset-failed llamacpp@smollm2-bin.service")
    assert allowed.rc == 0, allowed.stderr


def test_start_limit_hit_unit_is_reported_and_cleared_by_the_router(host) -> None:
    # Real systemd: restart the unit past StartLimitBurst (5 per 600 s) so it is refused with
    # Result=start-limit-hit; the router's next load clears it (reset-failed via polkit) and serves.
    unit = "llamacpp@smollm2-bin.service"
    for _attempt in range(12):
        if host.run(f"systemctl show -p Result --value {unit}").stdout.strip() == "start-limit-hit":
            break
        host.run(f"systemctl restart {unit}")
    assert host.run(f"systemctl show -p Result --value {unit}").stdout.strip() == "start-limit-hit"
    assert host.run(f"systemctl is-failed {unit}").stdout.strip() == "failed"
    since = host.run("date +%s").stdout.strip()
    code, body = chat(host, "smollm2-135m-instruct-bin")
    assert code == 200, body
    assert active_units(host) == [unit]
    journal = host.run(f"journalctl -u llmrouter.service --since @{since} --no-pager -o cat").stdout
    assert f"cleared the start limit of {unit}" in journal


def test_systemctl_reload_keeps_a_request_in_flight(host) -> None:
    # The request needs a swap (the other model is up), so it is in flight (queued, then streamed)
    # while systemd runs ExecReload (--check, then SIGHUP).
    pid = host.run("systemctl show -p MainPID --value llmrouter.service").stdout.strip()
    since = host.run("date +%s").stdout.strip()
    body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": "Count to twenty."}]})
    curl = shlex.join(["curl", "-sN", "-m", "300", "-H", f"Authorization: Bearer {API_KEY}",
                       "-H", "Content-Type: application/json", "-d", body, ROUTER + "/v1/chat/completions"])
    out = host.run(f"{curl} > /tmp/reload-stream.out & sleep 0.3; systemctl reload llmrouter.service; "
                   f"echo reload=$?; wait; cat /tmp/reload-stream.out")
    assert "reload=0" in out.stdout, out.stderr
    events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", out.stdout[-500:]
    assert not any('"error"' in event for event in events)
    assert host.run("systemctl show -p MainPID --value llmrouter.service").stdout.strip() == pid
    journal = host.run(f"journalctl -u llmrouter.service --since @{since} --no-pager -o cat").stdout
    assert "config reloaded from" in journal
