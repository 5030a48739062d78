"""TabbyAPI (the emulator) as the tabbyapi role leaves it, and the service guard's cases, live.

tabby-git runs the exl3 generation installed from git, tabby-tarball the exl2 generation from a
venv tarball. The guard tests stop and start the real unit on tabby-git and look at what systemd,
the journal and the processes show; each restores the running service before it returns.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
import yaml

INVENTORY = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
testinfra_hosts = [f"ansible://{name}" for name in sorted(INVENTORY.get_hosts("tabbyapi"))]

UNIT = "tabbyapi.service"
CONFIG = "/etc/llmstack/tabbyapi/config.yml"
TOKENS = "/etc/llmstack/tabbyapi/api_tokens.yml"
SCENARIO_DIR = Path(__file__).resolve().parents[1]
EXPECTED = {
    "tabby-git": {"backend": "exllamav3", "branch": "main", "model": "tiny-exl3-a"},
    "tabby-tarball": {"backend": "exllamav2", "branch": "exl2-checkpoint", "model": "tiny-exl2"},
}
LISTENER = (
    "import socket,sys,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
    "s.bind(('127.0.0.1',int(sys.argv[1])));s.listen();time.sleep(600)"
)


def name_of(host) -> str:
    return host.backend.get_hostname()


def tokens(host) -> dict:
    return yaml.safe_load(host.file(TOKENS).content_string)


def curl(host, path: str, key: str | None = None, header: str = "Authorization: Bearer") -> tuple[int, str]:
    auth = f"-H '{header} {key}'" if key else ""
    result = host.run(
        f"curl -s -o /tmp/body -w '%{{http_code}}' {auth} http://127.0.0.1:5000{path}; echo; cat /tmp/body"
    )
    code, _newline, body = result.stdout.partition("\n")
    return int(code or 0), body


def wait_healthy(host, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if curl(host, "/health")[0] == 200:
            return
        time.sleep(0.5)
    pytest.fail(f"tabbyapi not healthy after {timeout}s: {journal(host)[-2000:]}")


def journal(host, since: str = "") -> str:
    cursor = f"--after-cursor='{since}'" if since else ""
    return host.run(f"journalctl -u {UNIT} --no-pager -o cat {cursor}").stdout


def journal_cursor(host) -> str:
    out = host.run(f"journalctl -u {UNIT} -n 1 --show-cursor --no-pager -o cat").stdout
    return out.rsplit("-- cursor: ", 1)[-1].strip()


def start(host):
    # Every test restarts the unit; the rate limit (5 starts in 300 s) is for crash loops, not for tests.
    host.run(f"systemctl reset-failed {UNIT}")
    return host.run(f"systemctl start {UNIT}")


def pid_alive(host, pid: int) -> bool:
    return host.run(f"kill -0 {pid}").rc == 0


# --- what the role installed --------------------------------------------------------------


def test_service_runs_as_its_own_user_on_loopback(host) -> None:
    service = host.service("tabbyapi")
    assert service.is_running
    # tabby-git's TabbyAPI is on_demand (the router starts it), tabby-tarball's is started at boot.
    assert service.is_enabled == (name_of(host) != "tabby-git")
    pid = int(host.run(f"systemctl show -p MainPID --value {UNIT}").stdout)
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == "tabbyapi"
    assert host.socket("tcp://127.0.0.1:5000").is_listening
    assert not host.socket("tcp://0.0.0.0:5000").is_listening


def test_checkout_and_config_match_the_generation(host) -> None:
    expected = EXPECTED[name_of(host)]
    app = "/opt/llmstack/tabbyapi/app"
    assert host.run(f"git -C {app} rev-parse --abbrev-ref HEAD").stdout.strip() == expected["branch"]
    config = yaml.safe_load(host.file(CONFIG).content_string)
    assert config["model"]["backend"] == expected["backend"]
    assert config["model"]["model_dir"] == "/mnt/models"
    assert config["model"]["model_name"].endswith(expected["model"])
    assert config["network"]["host"] == "127.0.0.1"
    assert config["network"]["disable_auth"] is False
    # TabbyAPI reads the config.yml the unit's ExecStartPre writes from CONFIG and the router's last switch.
    assert host.file(f"{app}/config.yml").linked_to == "/var/lib/llmstack/tabbyapi/config.yml"
    assert host.file(f"{app}/api_tokens.yml").linked_to == TOKENS
    assert (host.file(CONFIG).user, host.file(CONFIG).group) == ("root", "tabbyapi")
    assert host.file(CONFIG).mode == 0o640


def test_api_tokens_are_private_and_used(host) -> None:
    token_file = host.file(TOKENS)
    assert (token_file.user, token_file.group, token_file.mode) == ("tabbyapi", "tabbyapi", 0o600)
    keys = tokens(host)
    assert re.fullmatch(r"[0-9a-f]{32}", keys["api_key"])
    assert re.fullmatch(r"[0-9a-f]{32}", keys["admin_key"])
    if name_of(host) == "tabby-tarball":
        assert keys["api_key"] == "0123456789abcdef0123456789abcdef", "provisioned keys are written as given"
    else:
        # Number-shaped keys stay strings (a YAML int or float would stop TabbyAPI at start).
        assert (keys["api_key"], keys["admin_key"]) == (
            "01234567890123456789012345678901", "12345678901234567890123456789e12")
    assert curl(host, "/health")[0] == 200
    assert curl(host, "/v1/models")[0] == 401
    assert curl(host, "/v1/models", keys["api_key"])[0] == 200


def test_unit_policy_and_environment(host) -> None:
    props = dict(
        line.split("=", 1)
        for line in host.run(
            f"systemctl show {UNIT} -p User -p Restart -p RestartUSec -p StartLimitBurst -p StartLimitIntervalUSec "
            "-p TimeoutStartUSec -p RequiresMountsFor -p Environment -p DropInPaths -p ExecStartPre"
        ).stdout.splitlines()
    )
    assert props["User"] == "tabbyapi"
    assert props["Restart"] == "on-failure"
    assert props["RestartUSec"] == "30s"
    assert props["StartLimitBurst"] == "5"
    # burst x (TimeoutStartSec + RestartSec): five crashes after full loads fall into one window (unit_start_limit).
    assert props["StartLimitIntervalUSec"] == "27min 30s"
    assert props["TimeoutStartUSec"] == "5min"
    assert "/mnt/models" in props["RequiresMountsFor"]
    for setting in ("CUDA_DEVICE_ORDER=PCI_BUS_ID", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"):
        assert setting in props["Environment"]
    assert "/etc/systemd/system/tabbyapi.service.d/10-service-guard.conf" in props["DropInPaths"]
    assert "/usr/local/libexec/llmstack/prestart" in props["ExecStartPre"]
    assert "/etc/llmstack/service_guard/tabbyapi.conf" in props["ExecStartPre"]


def test_sandboxing_exposure(host) -> None:
    out = host.run(f"systemd-analyze security --no-pager {UNIT}").stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    print(f"systemd-analyze security {UNIT} on {name_of(host)}: {score}")
    assert score <= 3.0, out


def test_tarball_venv_is_the_known_good_one(host) -> None:
    if name_of(host) != "tabby-tarball":
        pytest.skip("only tabby-tarball installs from a tarball")
    venv = "/opt/llmstack/tabbyapi/venv"
    stamp = host.file(f"{venv}/.llmstack-tarball").content_string.strip()
    cache = Path(os.environ.get("LLMSTACK_CACHE") or SCENARIO_DIR.parents[1] / ".cache")
    local = cache / "molecule-tabbyapi/tabbyapi-venv.tar.gz"
    assert stamp == hashlib.sha256(local.read_bytes()).hexdigest()
    assert host.file(f"{venv}/bin/python3").exists
    assert host.run(f"{venv}/bin/python -c 'import aiohttp, yaml'").rc == 0
    assert host.file(f"{venv}/bin/pip").content_string.startswith(f"#!{venv}/bin/python")
    assert not host.file(f"{venv}/.llmstack-deps").exists, "no dependency install over a tarball venv"


def test_relocated_tarball_fails_naming_the_fix(host) -> None:
    if name_of(host) != "tabby-tarball":
        pytest.skip("runs once, on tabby-tarball")
    result = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(SCENARIO_DIR / "relocated.yml")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"),
    )
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0, output
    assert "The venv was built at another path and moved" in output
    assert "/root/TabbyAPI/venv/bin/python" in output
    assert "python3 -m venv /tmp/relocated/venv" in output


# --- model_load and model_probe ------------------------------------------------------------


def run_module(host, module: str, **args) -> dict:
    return host.ansible(
        module,
        " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in args.items()),
        check=False,
        become=False,
    )


def test_model_load_switches_models_and_probe_passes(host) -> None:
    if name_of(host) != "tabby-git":
        pytest.skip("model switching runs on tabby-git")
    keys = tokens(host)
    switched = run_module(host, "llmstack.inference.model_load", model_name="tiny-exl3-b", api_tokens_file=TOKENS)
    assert switched["changed"] is True, switched
    assert switched["current_model"] == "tiny-exl3-b"
    code, body = curl(host, "/v1/model", keys["api_key"])
    assert code == 200
    assert json.loads(body)["id"] == "tiny-exl3-b"
    again = run_module(host, "llmstack.inference.model_load", model_name="tiny-exl3-b", api_tokens_file=TOKENS)
    assert again["changed"] is False

    probe = run_module(host, "llmstack.inference.model_probe", api_key=keys["api_key"], expect_model="tiny-exl3-b")
    assert probe["changed"] is False
    assert probe["model"] == "tiny-exl3-b"
    assert probe["completion_tokens"] >= 1
    assert probe["tokens_per_second"] > 0

    back = run_module(host, "llmstack.inference.model_load", model_name="tiny-exl3-a", api_tokens_file=TOKENS)
    assert back["current_model"] == "tiny-exl3-a"


# --- the service guard, live -----------------------------------------------------------------


@pytest.fixture
def git_host(host):
    if name_of(host) != "tabby-git":
        pytest.skip("guard cases run on tabby-git")
    yield host
    host.run("systemctl stop guard-foreign.service guard-sibling.service")
    store = "/srv/llmstack-models"
    host.run(f"test -d {store}/tiny-exl3-a.away && mv {store}/tiny-exl3-a.away {store}/tiny-exl3-a")
    start(host)
    wait_healthy(host)


def test_orphan_of_the_service_user_is_stopped(git_host) -> None:
    host = git_host
    assert host.run(f"systemctl stop {UNIT}").rc == 0
    # An instance started by hand outside systemd (a login session) and left behind.
    host.run(f'setsid -f runuser -u tabbyapi -- /usr/bin/python3 -c "{LISTENER}" 5000 </dev/null >/dev/null 2>&1')
    pid = 0
    for _attempt in range(50):
        out = host.run("ss -Hltnp 'sport = :5000'").stdout
        found = re.search(r"pid=(\d+)", out)
        if found:
            pid = int(found.group(1))
            break
        time.sleep(0.1)
    assert pid, "the orphan listener did not start"
    cursor = journal_cursor(host)
    started = start(host)
    assert started.rc == 0, journal(host, cursor)
    log = journal(host, cursor)
    assert f"stopping leftover PID {pid} of user tabbyapi (port 5000)" in log
    assert not pid_alive(host, pid)
    wait_healthy(host)
    assert host.socket("tcp://127.0.0.1:5000").is_listening, "TabbyAPI got its own port, not the port+1 fallback"


@pytest.mark.parametrize(
    ("unit", "user", "expect"),
    [
        ("guard-foreign", "nobody", "is held by PID {pid} of user nobody"),
        ("guard-sibling", "tabbyapi", "is held by PID {pid} of unit guard-sibling.service (user tabbyapi)"),
    ],
)
def test_foreign_holder_fails_the_start_and_is_untouched(git_host, unit: str, user: str, expect: str) -> None:
    host = git_host
    assert host.run(f"systemctl stop {UNIT}").rc == 0
    run = host.run(f'systemd-run --unit={unit} --uid={user} /usr/bin/python3 -c "{LISTENER}" 5001')
    assert run.rc == 0, run.stderr
    for _attempt in range(50):
        if host.socket("tcp://127.0.0.1:5001").is_listening:
            break
        time.sleep(0.1)
    pid = int(host.run(f"systemctl show -p MainPID --value {unit}").stdout)
    cursor = journal_cursor(host)
    failed = start(host)
    assert failed.rc != 0
    log = journal(host, cursor)
    assert "port 5001 " + expect.format(pid=pid) in log, log
    assert "Not touching" in log
    assert pid_alive(host, pid), "the guard must leave the foreign holder alone"
    assert host.service(unit).is_running
    assert not host.service("tabbyapi").is_running


def test_missing_model_dir_fails_clearly(git_host) -> None:
    host = git_host
    assert host.run(f"systemctl stop {UNIT}").rc == 0
    assert host.run("mv /srv/llmstack-models/tiny-exl3-a /srv/llmstack-models/tiny-exl3-a.away").rc == 0
    cursor = journal_cursor(host)
    failed = start(host)
    assert failed.rc != 0
    log = journal(host, cursor)
    assert "model directory /mnt/models/tiny-exl3-a does not exist" in log, log
    assert "start of tabbyapi.service refused" in log
