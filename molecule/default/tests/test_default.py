"""common + llamacpp on a lab host: users, files, units, sandbox, auth and real chat completions."""

from __future__ import annotations

import json
import shlex
import time

import pytest

KEY = "molecule-llamacpp-key-0123456789"
INSTANCES = {
    # unit instance: (port, alias, process that must be serving)
    "smollm2": (8080, "smollm2-135m-instruct", "/opt/llmstack/llamacpp/venv/bin/python -m llama_cpp.server"),
    "smollm2-bin": (8081, "smollm2-135m-instruct-bin", "/opt/llmstack/llamacpp/llama-server-b11434/bin/llama-server"),
}
# systemd-analyze security exposure (0 = fully sandboxed, 10 = unprotected) an instance may not exceed.
MAX_EXPOSURE = 2.0


def request(host, port: int, path: str, *, key: str | None = KEY, body: dict | None = None) -> tuple[int, str]:
    # The status code goes on a last line of its own after the body.
    args = ["curl", "-s", "-m", "120", "-w", "\\n%{http_code}"]
    if key:
        args += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    result = host.run(shlex.join([*args, f"http://127.0.0.1:{port}{path}"]))
    body, _newline, status = result.stdout.rpartition("\n")
    return int(status or 0), body


def main_pid(host, unit: str) -> int:
    return int(host.run(f"systemctl show -p MainPID --value {unit}").stdout.strip())


def test_service_user_is_a_locked_system_user(host) -> None:
    user = host.user("llamacpp")
    assert user.exists
    assert 0 < user.uid < 1000
    assert user.shell == "/usr/sbin/nologin"
    assert user.home == "/var/lib/llmstack/llamacpp"
    assert user.group == "llamacpp"
    assert host.run("passwd -S llamacpp").stdout.split()[1] == "L"


@pytest.mark.parametrize(
    ("path", "owner", "group", "mode"),
    [
        ("/opt/llmstack", "root", "root", 0o755),
        ("/etc/llmstack", "root", "root", 0o755),
        ("/var/lib/llmstack", "root", "root", 0o755),
        ("/opt/llmstack/wheelhouse", "root", "root", 0o755),
        ("/opt/llmstack/llamacpp", "root", "llamacpp", 0o755),
        ("/etc/llmstack/llamacpp", "root", "llamacpp", 0o750),
        ("/etc/llmstack/llamacpp/instances", "root", "llamacpp", 0o750),
        ("/var/lib/llmstack/llamacpp", "llamacpp", "llamacpp", 0o750),
        ("/etc/llmstack/pip.conf", "root", "root", 0o644),
        ("/etc/llmstack/llamacpp/instances/smollm2.env", "llamacpp", "llamacpp", 0o600),
        ("/etc/llmstack/llamacpp/instances/smollm2.args", "root", "llamacpp", 0o640),
        ("/etc/llmstack/llamacpp/instances/smollm2-bin.env", "llamacpp", "llamacpp", 0o600),
        ("/etc/llmstack/llamacpp/instances/smollm2-bin.args", "root", "llamacpp", 0o640),
        ("/etc/systemd/system/llamacpp@.service", "root", "root", 0o644),
    ],
)
def test_layout_owner_and_mode(host, path: str, owner: str, group: str, mode: int) -> None:
    f = host.file(path)
    assert f.exists, path
    assert (f.user, f.group, f.mode) == (owner, group, mode)


def test_api_key_reaches_both_servers_only_through_the_secret_file(host) -> None:
    for name in INSTANCES:
        # Each instance's own 0600 env file (the role-wide llamacpp_api_key is the default of every instance).
        secret = host.file(f"/etc/llmstack/llamacpp/instances/{name}.env").content_string
        assert f'API_KEY="{KEY}"' in secret
        assert f'LLAMA_API_KEY="{KEY}"' in secret
        assert KEY not in host.file(f"/etc/llmstack/llamacpp/instances/{name}.args").content_string
        cmdline = host.file(f"/proc/{main_pid(host, f'llamacpp@{name}.service')}/cmdline").content_string
        assert KEY not in cmdline


def test_pip_config_points_every_install_at_the_wheelhouse(host) -> None:
    conf = host.file("/etc/llmstack/pip.conf").content_string
    assert "find-links = /opt/llmstack/wheelhouse" in conf
    assert "no-index = true" in conf
    env = host.file("/etc/llmstack/pip.env").content_string
    assert 'UV_FIND_LINKS="/opt/llmstack/wheelhouse"' in env
    assert 'UV_NO_INDEX="1"' in env
    assert host.file("/opt/llmstack/wheelhouse").listdir(), "wheelhouse was not copied"


def test_controller_ca_is_trusted(host) -> None:
    extra = host.run("ls /usr/local/share/ca-certificates/").stdout.split()
    assert [name for name in extra if name.startswith("llmstack-") and name.endswith(".crt")]
    # The bundle update-ca-certificates built holds the controller's (TLS-intercepting) CA too.
    with open("/etc/ssl/certs/ca-certificates.crt", encoding="ascii") as bundle:
        controller_last_cert = bundle.read().strip().split("-----BEGIN CERTIFICATE-----")[-1]
    assert controller_last_cert in host.file("/etc/ssl/certs/ca-certificates.crt").content_string


def test_uv_is_installed_in_the_tools_venv(host) -> None:
    result = host.run("/opt/llmstack/tools/venv/bin/uv --version")
    assert result.rc == 0
    assert result.stdout.split()[1] == "0.13.9"


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_instance_active_enabled_and_unprivileged(host, name: str) -> None:
    unit = f"llamacpp@{name}.service"
    service = host.service(unit)
    assert service.is_running
    assert service.is_enabled
    pid = main_pid(host, unit)
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == "llamacpp"
    cmdline = host.file(f"/proc/{pid}/cmdline").content_string.replace("\0", " ")
    assert cmdline.startswith(INSTANCES[name][2])


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_instance_listens_on_loopback_only(host, name: str) -> None:
    port = INSTANCES[name][0]
    # Columns: State Recv-Q Send-Q Local-Address:Port Peer-Address:Port
    local = [line.split()[3] for line in host.run(f"ss -Hltn 'sport = :{port}'").stdout.splitlines()]
    assert local == [f"127.0.0.1:{port}"]


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_requests_without_the_key_are_refused(host, name: str) -> None:
    port = INSTANCES[name][0]
    assert request(host, port, "/v1/models", key=None)[0] == 401
    assert request(host, port, "/v1/models", key="wrong-key-0123456789")[0] == 401
    status, body = request(host, port, "/v1/models")
    assert status == 200
    assert INSTANCES[name][1] in [m["id"] for m in json.loads(body)["data"]]


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_real_chat_completion(host, name: str) -> None:
    port, alias, _impl = INSTANCES[name]
    status, body = request(
        host,
        port,
        "/v1/chat/completions",
        body={
            "model": alias,
            "messages": [{"role": "user", "content": "Name one colour of the sky."}],
            "max_tokens": 24,
            "temperature": 0,
        },
    )
    assert status == 200, body
    reply = json.loads(body)["choices"][0]["message"]["content"]
    print(f"\nllamacpp@{name} (SmolLM2-135M-Instruct) replied: {reply!r}")
    assert reply.strip()


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_sandbox_exposure(host, name: str) -> None:
    result = host.run(f"systemd-analyze security --no-pager llamacpp@{name}.service")
    assert result.rc == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    print(f"\nllamacpp@{name}: {summary}")
    exposure = float(summary.split("exposure level for")[1].split(":")[1].split()[0])
    assert exposure <= MAX_EXPOSURE


def _serving(host, name: str, timeout_s: int = 120) -> bool:
    port = INSTANCES[name][0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if request(host, port, "/v1/models")[0] == 200:
            return True
        time.sleep(1)
    return False


def test_guard_never_touches_a_running_template_sibling(host) -> None:
    """Both instances run as llamacpp, in /system.slice/system-llamacpp.slice/llamacpp@<name>.service.

    smollm2's guard config is given its sibling's port for one restart: the guard must see that the
    holder belongs to another running unit (a *.service below the template's slice) and refuse, never
    kill it as a leftover of the same user. The real config comes back and smollm2 serves again.
    """
    conf = "/etc/llmstack/service_guard/llamacpp@smollm2.conf"
    sibling = "llamacpp@smollm2-bin.service"
    sibling_pid = main_pid(host, sibling)
    assert host.run(f"cp -p {conf} {conf}.verify").rc == 0
    try:
        assert host.run(f"echo port={INSTANCES['smollm2-bin'][0]} >> {conf}").rc == 0
        cursor = host.run("journalctl -n0 --show-cursor -o cat").stdout.strip().rpartition("cursor: ")[2]
        restart = host.run("systemctl restart llamacpp@smollm2.service")
        assert restart.rc != 0, "the guard let smollm2 start on its sibling's port"
        expected = f"port 8081 is held by PID {sibling_pid} of unit {sibling} (user llamacpp)"
        journal = ""
        for _attempt in range(20):  # journald stores the guard's lines asynchronously
            journal = host.run(
                f"journalctl -u llamacpp@smollm2.service --after-cursor={shlex.quote(cursor)} -o cat"
            ).stdout
            if expected in journal:
                break
            time.sleep(0.5)
        assert expected in journal, journal
        assert main_pid(host, sibling) == sibling_pid, "the sibling's main PID changed"
        assert _serving(host, "smollm2-bin", timeout_s=5)
    finally:
        host.run(f"mv {conf}.verify {conf}")
        host.run("systemctl reset-failed llamacpp@smollm2.service; systemctl restart llamacpp@smollm2.service")
    assert _serving(host, "smollm2")
    assert main_pid(host, sibling) == sibling_pid
