"""The service guard's prestart script, run for real against real processes, ports and mounts.

Each test writes a guard config, starts real listeners as throwaway system users on loopback,
runs roles/service_guard/files/prestart.sh as root exactly as systemd's `ExecStartPre=+` would,
and checks both its exit status and what happened to the processes.

Needs root (it creates users, mounts tmpfs and signals other users' processes). The one piece of
hardware we lack, the GPU, is emulated by a fake `nvidia-smi` written per test (see `fake_gpu`).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "roles/service_guard/files/prestart.sh"
# The listeners run as unprivileged users, who cannot execute the controller venv under /root.
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the guard runs as root: run this suite as root"),
    pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason=f"{SYSTEM_PYTHON} is needed for listeners"),
]

LISTENER = textwrap.dedent(
    """
    import signal, socket, sys, time
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((sys.argv[1], int(sys.argv[2])))
    sock.listen()
    if sys.argv[3] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.2)
    """
)

# The GPU is emulated by the shared corpus of recorded nvidia-smi outputs (tests/fixtures/nvidia_smi).
_SPEC = importlib.util.spec_from_file_location(
    "nvidia_smi_corpus", Path(__file__).resolve().parents[2] / "tests/fixtures/nvidia_smi/nvidia_smi.py"
)
corpus = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(corpus)


@dataclass
class GuardRun:
    returncode: int
    output: str

    def lines(self, level: str) -> list[str]:
        return [line for line in self.output.splitlines() if f": {level}: " in line]


@dataclass
class Guard:
    """One guarded service: its config file and the throwaway user it runs as."""

    workdir: Path
    user: str
    unit: str = "sgtest.service"
    ports: list[int] = field(default_factory=list)
    model_dirs: list[Path] = field(default_factory=list)
    gpus: list[int | str] = field(default_factory=list)
    min_free_vram_mib: int = 0
    require_mountpoint: bool = True
    model_mount: str = ""
    kill_grace_s: int = 2
    nvidia_smi: str = "nvidia-smi-absent-on-purpose"
    extra_lines: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.workdir / f"{self.unit.removesuffix('.service')}.conf"

    def write_config(self) -> Path:
        lines = [f"unit={self.unit}", f"user={self.user}"]
        lines += [f"port={port}" for port in self.ports]
        lines += [f"model_dir={path}" for path in self.model_dirs]
        lines += [f"gpu={gpu}" for gpu in self.gpus]
        lines += [
            f"min_free_vram_mib={self.min_free_vram_mib}",
            f"require_mountpoint={str(self.require_mountpoint).lower()}",
            f"model_mount={self.model_mount}",
            f"kill_grace_s={self.kill_grace_s}",
            f"nvidia_smi={self.nvidia_smi}",
            *self.extra_lines,
        ]
        self.config.write_text("# written by test_prestart.py\n" + "\n".join(lines) + "\n")
        self.config.chmod(0o644)
        return self.config

    def run(self, env: dict[str, str] | None = None) -> GuardRun:
        self.write_config()
        proc = subprocess.run(
            ["/bin/bash", str(SCRIPT), str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
            check=False,
        )
        return GuardRun(proc.returncode, proc.stdout + proc.stderr)


def _make_user(prefix: str) -> str:
    name = f"{prefix}{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    return name


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, str]]:
    made = {"service": _make_user("sgsvc"), "other": _make_user("sgoth")}
    yield made
    for name in made.values():
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """World-traversable scratch dir: the service user must be able to reach model dirs in it."""
    path = Path("/tmp") / f"sgtest-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    yield path
    mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounted if m.startswith(f"{path}/")), key=len, reverse=True):
        subprocess.run(["umount", mount], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _mount_tmpfs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "sgtest", str(path)], check=True)
    return path


@pytest.fixture
def model_store(workdir: Path) -> Path:
    """A mounted model store holding one model folder, like /mnt/models on a node."""
    store = _mount_tmpfs(workdir / "models")
    model = store / "tiny-exl3"
    model.mkdir(mode=0o755)
    (model / "config.json").write_text('{"num_hidden_layers": 2}')
    (model / "config.json").chmod(0o644)
    return store


@pytest.fixture
def guard(workdir: Path, users: dict[str, str], model_store: Path) -> Guard:
    return Guard(workdir=workdir, user=users["service"], ports=[_free_port()], model_dirs=[model_store])


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _spawn(
    processes: list[subprocess.Popen[str]], user: str, port: int, host: str = "127.0.0.1", mode: str = "normal"
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", LISTENER, host, str(port), mode],
        user=user if user != "root" else None,
        group=pwd.getpwnam(user).pw_gid if user != "root" else None,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    processes.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", "listener did not start"
    return proc


def _running(proc: subprocess.Popen[str]) -> bool:
    """True while the process exists and is not a zombie (the guard cannot reap our children)."""
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_held(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def test_clean_start_logs_every_check(guard: Guard) -> None:
    result = guard.run()
    assert result.returncode == 0, result.output
    out = result.output
    assert f"port {guard.ports[0]} is free" in out
    assert "GPU process and VRAM checks skipped" in out
    assert f"model directory {guard.model_dirs[0]} is on the mount {guard.model_dirs[0]}" in out
    assert "may start" in out
    assert all(line.startswith("service-guard[sgtest.service]: ") for line in out.splitlines())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_orphan_of_service_user_is_stopped(guard: Guard, users, processes, host: str) -> None:
    guard.ports = [_free_port(host)]
    orphan = _spawn(processes, users["service"], guard.ports[0], host=host)
    result = guard.run()
    assert result.returncode == 0, result.output
    assert not _running(orphan)
    assert orphan.wait(timeout=5) == -signal.SIGTERM
    assert not _port_held(guard.ports[0], host)
    assert f"stopping leftover PID {orphan.pid} of user {users['service']} (port {guard.ports[0]})" in result.output
    assert f"PID {orphan.pid} exited after SIGTERM" in result.output


def test_orphan_ignoring_sigterm_is_killed_after_grace(guard: Guard, users, processes) -> None:
    guard.kill_grace_s = 1
    orphan = _spawn(processes, users["service"], guard.ports[0], mode="ignore-term")
    started = time.monotonic()
    result = guard.run()
    assert result.returncode == 0, result.output
    assert time.monotonic() - started >= 1
    assert orphan.wait(timeout=5) == -signal.SIGKILL
    assert "still running 1s after SIGTERM: sending SIGKILL" in result.output


# A stand-in for ps (bind-mounted over the real one in a private pid and mount namespace): it answers with
# the real ps and, once, when the guard asks "-o $SWAP_ON -p $SWAP_PID", SIGKILLs that process and starts
# another one of the same user under the same PID (ns_last_pid; nothing else forks in the namespace).
PID_SWAP_PS = """#!/bin/bash
"$REAL_PS" "$@"
rc=$?
if [[ "$*" == "-o $SWAP_ON -p $SWAP_PID" ]] && mkdir "$SWAP_DIR/swapped" 2>/dev/null; then
    kill -KILL "$SWAP_PID"
    # Reaped by the namespace's init (the driver below); a zombie would keep the number.
    for _ in $(seq 50); do [[ -e /proc/$SWAP_PID ]] || break; sleep 0.1; done
    echo $((SWAP_PID - 1)) >/proc/sys/kernel/ns_last_pid
    /usr/bin/setpriv --reuid="$SWAP_UID" --regid="$SWAP_GID" --clear-groups /bin/sleep 300 </dev/null >/dev/null 2>&1 &
    echo "$! $(cut -d' ' -f22 "/proc/$!/stat")" >"$SWAP_DIR/impostor"
fi
exit $rc
"""

# PID 1 of the namespace: starts the listener as the service user, runs the guard, then reports the
# listener's and the impostor's "pid starttime" and what the impostor's PID holds after the guard.
PID_SWAP_DRIVER = """
mount --bind "$SWAP_DIR/ps" "$PS_PATH" || exit 99
/usr/bin/setpriv --reuid="$SWAP_UID" --regid="$SWAP_GID" --clear-groups \\
    /usr/bin/python3 -c "$LISTENER" 127.0.0.1 "$PORT" "$MODE" >"$SWAP_DIR/listener.out" 2>&1 &
export SWAP_PID=$!
for _ in $(seq 100); do grep -q ready "$SWAP_DIR/listener.out" && break; sleep 0.1; done
echo "listener=$SWAP_PID $(cut -d' ' -f22 "/proc/$SWAP_PID/stat")"
/bin/bash "$SCRIPT" "$CONFIG"
echo "guard-rc=$?"
echo "impostor=$(cat "$SWAP_DIR/impostor" 2>/dev/null)"
read -r pid _ <"$SWAP_DIR/impostor" && echo "now=$(cut -d' ' -f3,22 "/proc/$pid/stat" 2>/dev/null || echo gone)"
"""


@pytest.mark.parametrize(
    ("signal_name", "swap_on", "mode"), [("TERM", "user:64=", "normal"), ("KILL", "stat=", "ignore-term")]
)
def test_a_reused_pid_is_not_signalled(
    guard: Guard, users, workdir: Path, signal_name: str, swap_on: str, mode: str
) -> None:
    """The listed leftover exits and its PID goes to a new process of the same user before the guard's signal.

    TERM: swapped while the guard reads the owner (after judging it, before SIGTERM). KILL: the leftover
    ignores SIGTERM and is swapped at the guard's first liveness check, so the new process still looks like
    the leftover when the grace period ends. Only the start time (stat field 22) tells the two apart.
    """
    guard.kill_grace_s = 1
    guard.write_config()
    account = pwd.getpwnam(users["service"])
    real_ps = workdir / "ps.real"
    shutil.copy2("/usr/bin/ps", real_ps)
    (workdir / "ps").write_text(PID_SWAP_PS)
    (workdir / "ps").chmod(0o755)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "REAL_PS": str(real_ps),
        "PS_PATH": os.path.realpath("/usr/bin/ps"),
        "SWAP_DIR": str(workdir),
        "SWAP_ON": swap_on,
        "SWAP_UID": str(account.pw_uid),
        "SWAP_GID": str(account.pw_gid),
        "LISTENER": LISTENER,
        "PORT": str(guard.ports[0]),
        "MODE": mode,
        "SCRIPT": str(SCRIPT),
        "CONFIG": str(guard.config),
    }
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "/bin/bash", "-c", PID_SWAP_DRIVER],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    out = proc.stdout + proc.stderr
    report = {key: value for key, _sep, value in (line.partition("=") for line in proc.stdout.splitlines())}
    assert {"listener", "guard-rc", "impostor", "now"} <= report.keys(), out
    listener_pid, listener_start = report["listener"].split()
    impostor_pid, impostor_start = report["impostor"].split()
    assert impostor_pid == listener_pid, f"the PID was not reused (the test's premise): {out}"
    assert impostor_start != listener_start, out
    assert report["now"] == f"S {impostor_start}", f"the process that took PID {listener_pid} was signalled: {out}"
    assert f"stopping leftover PID {listener_pid} of user {users['service']}" in out
    assert f"PID {listener_pid} exited (or its number was reused) before SIG{signal_name}: not signalled" in out
    assert report["guard-rc"] == "0", out
    assert f"port {guard.ports[0]} is free after stopping leftovers" in out


@pytest.mark.parametrize("holder", ["other", "root"])
def test_foreign_holder_fails_the_start_and_is_untouched(guard: Guard, users, processes, holder: str) -> None:
    user = users.get(holder, holder)
    foreign = _spawn(processes, user, guard.ports[0])
    result = guard.run()
    assert result.returncode == 1, result.output
    assert _running(foreign), "the guard must not touch another user's process"
    assert _port_held(guard.ports[0])
    [refusal] = [line for line in result.lines("error") if f"PID {foreign.pid}" in line]
    assert f"port {guard.ports[0]} is held by PID {foreign.pid} of user {user}" in refusal
    assert "/usr/bin/python3 -c" in refusal, "the refusal names the command"
    assert "Not touching it" in refusal
    assert "start of sgtest.service refused: 1 problem(s)" in result.output


def test_mixed_holders_only_own_leftover_is_stopped(guard: Guard, users, processes) -> None:
    guard.ports = [_free_port(), _free_port()]
    own = _spawn(processes, users["service"], guard.ports[0])
    foreign = _spawn(processes, users["other"], guard.ports[1])
    result = guard.run()
    assert result.returncode == 1, result.output
    assert not _running(own)
    assert _running(foreign)


def test_every_problem_is_reported_in_one_run(guard: Guard, users, processes, workdir: Path) -> None:
    _spawn(processes, users["other"], guard.ports[0])
    guard.model_dirs = [workdir / "no-such-models"]
    result = guard.run()
    assert result.returncode == 1
    assert len(result.lines("error")) == 3, result.output
    assert "refused: 2 problem(s)" in result.output


def test_missing_model_dir_fails_clearly(guard: Guard, workdir: Path) -> None:
    missing = workdir / "models" / "not-downloaded"
    guard.model_dirs = [missing]
    result = guard.run()
    assert result.returncode == 1
    assert f"model directory {missing} does not exist" in result.output


def test_model_dir_on_root_filesystem_needs_a_mount(guard: Guard, workdir: Path) -> None:
    unmounted = workdir / "plain"
    (unmounted / "m").mkdir(parents=True)
    unmounted.chmod(0o755)
    guard.model_dirs = [unmounted]
    refused = guard.run()
    assert refused.returncode == 1
    assert "not on a mounted model store" in refused.output

    guard.require_mountpoint = False
    assert guard.run().returncode == 0


def test_empty_mounted_store_is_refused(guard: Guard, workdir: Path) -> None:
    guard.model_dirs = [_mount_tmpfs(workdir / "empty-store")]
    result = guard.run()
    assert result.returncode == 1
    assert "is empty" in result.output


def test_declared_mount_must_be_mounted(guard: Guard, workdir: Path, model_store: Path) -> None:
    guard.model_mount = str(model_store)
    guard.model_dirs = [model_store / "tiny-exl3"]
    ok = guard.run()
    assert ok.returncode == 0, ok.output
    assert f"is on the mounted store {model_store}" in ok.output

    subprocess.run(["umount", str(model_store)], check=True)
    (model_store / "tiny-exl3").mkdir()
    (model_store / "tiny-exl3" / "stale").write_text("left on the root fs")
    result = guard.run()
    assert result.returncode == 1
    assert f"declared model mount {model_store} is not mounted" in result.output


def test_model_dir_unreadable_by_service_user(guard: Guard, model_store: Path) -> None:
    model_store.chmod(0o700)
    result = guard.run()
    assert result.returncode == 1
    assert f"not readable by {guard.user}" in result.output


def test_vram_minimum_without_nvidia_smi_fails(guard: Guard) -> None:
    guard.min_free_vram_mib = 1024
    result = guard.run()
    assert result.returncode == 1
    assert "needs 1024 MiB free VRAM but 'nvidia-smi-absent-on-purpose' is not installed" in result.output


@pytest.fixture
def fake_gpu(guard: Guard, workdir: Path):
    """Installs the corpus emulator as nvidia-smi; returns a function that picks its box and live apps."""

    def set_state(box: str, apps: list[dict] | None = None) -> None:
        guard.nvidia_smi = str(corpus.install(workdir / "gpu", box, apps, python=SYSTEM_PYTHON))

    return set_state


GPU0 = "GPU-a41f0c7e-6b2d-93e5-0d8c-5f1b7e3a2c94"  # rtx5090_4090: the 5090, 30603 MiB free
GPU1 = "GPU-0c5d9e3b-8a17-f24c-6e0d-b3a9c1f7e528"  # rtx5090_4090: the 4090, 24060 MiB free


def _app(proc: subprocess.Popen[str], gpu_uuid: str, used: int | str) -> dict:
    return {"pid": str(proc.pid), "gpu_uuid": gpu_uuid, "used_memory": str(used)}


def test_gpu_leftover_of_service_user_is_stopped_and_vram_rechecked(guard: Guard, users, processes, fake_gpu) -> None:
    leftover = _spawn(processes, users["service"], _free_port())
    foreign = _spawn(processes, users["other"], _free_port())
    fake_gpu("rtx5090_4090", [_app(leftover, GPU0, 20000), _app(foreign, GPU1, 3000)])
    guard.min_free_vram_mib = 40000
    guard.gpus = [0]
    result = guard.run()
    assert result.returncode == 0, result.output
    assert not _running(leftover)
    assert _running(foreign), "GPU processes of other users are not the guard's business"
    assert f"stopping leftover PID {leftover.pid} of user {users['service']} (GPU memory (20000 MiB))" in result.output
    assert "GPU 0: 50603 MiB free" in result.output
    assert "free VRAM >= required 40000 MiB on each GPU (0)" in result.output


def test_insufficient_vram_fails_on_the_gpu_that_lacks_it(guard: Guard, users, processes, fake_gpu) -> None:
    foreign = _spawn(processes, users["other"], _free_port())
    fake_gpu("rtx5090_4090", [_app(foreign, GPU1, 1)])
    guard.min_free_vram_mib = 25000
    guard.kill_grace_s = 1
    result = guard.run()
    assert result.returncode == 1
    assert "free VRAM check failed on GPU(s) all: GPU 1: 24060 MiB free < required 25000 MiB" in result.output
    assert _running(foreign)


def test_free_vram_is_never_summed_across_gpus(guard: Guard, fake_gpu) -> None:
    """1000 + 80000 MiB free is not 40000 MiB free on a GPU."""
    fake_gpu("h100x2_uneven")
    guard.min_free_vram_mib = 40000
    guard.kill_grace_s = 0
    guard.gpus = [0, 1]
    result = guard.run()
    assert result.returncode == 1, result.output
    assert "GPU 0: 1000 MiB free < required 40000 MiB" in result.output
    assert "GPU 1: 80000 MiB free" in result.output


def test_gpus_are_selected_by_uuid_as_by_index(guard: Guard, users, processes, fake_gpu) -> None:
    leftover = _spawn(processes, users["service"], _free_port())
    fake_gpu("rtx5090_4090", [_app(leftover, GPU0, 5000)])
    guard.min_free_vram_mib = 24000
    guard.kill_grace_s = 1
    guard.gpus = [GPU1]
    result = guard.run()
    assert result.returncode == 0, result.output
    # Only GPU 1 was asked about: the leftover on GPU 0 is outside this service's devices.
    assert _running(leftover)
    assert "GPU 1: 24060 MiB free" in result.output
    assert "GPU 0:" not in result.output
    guard.min_free_vram_mib = 24061
    refused = guard.run()
    assert refused.returncode == 1
    assert f"on GPU(s) {GPU1}: GPU 1: 24060 MiB free < required 24061 MiB" in refused.output


def test_unknown_gpu_is_refused(guard: Guard, fake_gpu) -> None:
    fake_gpu("h100")
    guard.gpus = ["GPU-00000000-dead-beef-0000-000000000000"]
    result = guard.run()
    assert result.returncode == 1
    assert "GPU GPU-00000000-dead-beef-0000-000000000000 is not among the GPUs" in result.output


def test_mig_uuid_selects_its_gpu_and_its_free_memory_is_unknown(guard: Guard, users, processes, fake_gpu) -> None:
    leftover = _spawn(processes, users["service"], _free_port())
    # MIG mode: the driver shows no per-process memory ([N/A]).
    fake_gpu("a100_mig", [{"pid": str(leftover.pid), "gpu_uuid": "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77",
                           "used_memory": "[N/A]"}])
    guard.gpus = ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"]
    result = guard.run()
    assert result.returncode == 0, result.output
    assert not _running(leftover), "a leftover on the MIG device's GPU must be stopped"
    assert "(GPU memory (unknown MiB))" in result.output
    guard.min_free_vram_mib = 1000
    guard.kill_grace_s = 0
    refused = guard.run()
    assert refused.returncode == 1
    mig = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"
    assert f"MIG device {mig}: free memory not reported per MIG instance" in refused.output


def test_na_free_vram_is_unknown_and_a_zero_minimum_reads_none(guard: Guard, fake_gpu) -> None:
    fake_gpu("gb10_na_memory")
    ok = guard.run()
    assert ok.returncode == 0, ok.output
    assert "no free VRAM minimum: VRAM not read" in ok.output
    guard.min_free_vram_mib = 1000
    guard.kill_grace_s = 0
    refused = guard.run()
    assert refused.returncode == 1
    assert "GPU 0: free VRAM unknown (nvidia-smi shows '[N/A]')" in refused.output


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ("fallen_off_bus", "failed with exit code 15: Unable to determine the device handle for GPU 0000:0B:00.0"),
        ("gpu_is_lost", "exit code 15: Unable to determine the device handle for GPU 0000:02:00.0: GPU is lost"),
        ("driver_library_mismatch", "exit code 18: Failed to initialize NVML: Driver/library version mismatch"),
        ("driver_unreachable", "failed with exit code 9: NVIDIA-SMI has failed because it couldn't communicate"),
    ],
)
def test_failing_nvidia_smi_fails_closed_even_without_a_minimum(guard: Guard, fake_gpu, box: str, message: str) -> None:
    fake_gpu(box)
    result = guard.run()
    assert result.returncode == 1, result.output
    [refusal] = result.lines("error")[:1]
    assert "could not check the GPUs of sgtest.service" in refusal
    assert message in refusal


def test_hung_nvidia_smi_is_cut_after_its_timeout(guard: Guard, workdir: Path) -> None:
    hung = workdir / "hung-nvidia-smi"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    guard.nvidia_smi = str(hung)
    guard.extra_lines = ["nvidia_smi_timeout_s=1"]
    started = time.monotonic()
    result = guard.run()
    assert time.monotonic() - started < 15
    assert result.returncode == 1
    assert "did not answer within 1s" in result.output


def _run_with_tool_replaced(guard: Guard, tool: str, replacement: Path) -> GuardRun:
    """Runs the guard in a private mount namespace in which `tool` is `replacement`."""
    path = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert path, f"{tool} is needed on this machine"
    guard.write_config()
    proc = subprocess.run(
        ["unshare", "-m", "/bin/bash", "-c", 'mount --bind "$1" "$2" && exec /bin/bash "$3" "$4"', "-",
         str(replacement), os.path.realpath(path), str(SCRIPT), str(guard.config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return GuardRun(proc.returncode, proc.stdout + proc.stderr)


def _script(workdir: Path, name: str, body: str) -> Path:
    path = workdir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_failing_ss_refuses_instead_of_calling_the_port_free(guard: Guard, workdir: Path) -> None:
    broken = _script(workdir, "ss-broken", "echo 'Cannot open netlink socket: Protocol not supported' >&2; exit 1")
    result = _run_with_tool_replaced(guard, "ss", broken)
    assert result.returncode == 1, result.output
    assert f"could not check port {guard.ports[0]}: ss failed: Cannot open netlink socket" in result.output
    assert "is free" not in result.output


def test_listener_without_pid_refuses(guard: Guard, workdir: Path) -> None:
    port = guard.ports[0]
    # What ss prints for a socket whose process it cannot see: no users:(...) column.
    blind = _script(workdir, "ss-blind", f"echo 'LISTEN 0      4096      127.0.0.1:{port}      0.0.0.0:*'")
    result = _run_with_tool_replaced(guard, "ss", blind)
    assert result.returncode == 1, result.output
    assert f"could not check port {port}: ss shows a listener without a process" in result.output


def test_failing_findmnt_refuses(guard: Guard, workdir: Path) -> None:
    broken = _script(workdir, "findmnt-broken", "echo 'findmnt: can not read /proc/self/mountinfo' >&2; exit 1")
    result = _run_with_tool_replaced(guard, "findmnt", broken)
    assert result.returncode == 1, result.output
    assert "could not check that model directory" in result.output
    assert "findmnt failed (findmnt: can not read /proc/self/mountinfo)" in result.output


def test_root_as_service_user_is_a_configuration_error(guard: Guard) -> None:
    guard.user = "root"
    result = guard.run()
    assert result.returncode == 2
    assert "service user 'root' is root: run sgtest.service as an unprivileged system user" in result.output


def test_journal_priority_prefix_under_systemd(guard: Guard) -> None:
    result = guard.run(env={"JOURNAL_STREAM": "8:12345"})
    assert result.returncode == 0
    assert all(line.startswith("<6>service-guard[") for line in result.output.splitlines())
    guard.model_dirs = [Path("/nonexistent-models")]
    refused = guard.run(env={"JOURNAL_STREAM": "8:12345"})
    assert any(line.startswith("<3>service-guard[") for line in refused.output.splitlines())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("colour=blue", "unknown key 'colour'"),
        ("port=70000", "port '70000' is not a TCP port number"),
        ("kill_grace_s=soon", "kill_grace_s 'soon' is not a whole number"),
        ("require_mountpoint=yes", "require_mountpoint must be true or false"),
        ("gpu=first", "gpu 'first' is neither a GPU index nor a GPU-/MIG- UUID"),
        ("gibberish", "'gibberish' is not key=value"),
        ("nvidia_smi_timeout_s=0", "nvidia_smi_timeout_s '0' is not a whole number of seconds above 0"),
    ],
)
def test_bad_config_is_a_configuration_error(guard: Guard, line: str, message: str) -> None:
    guard.extra_lines = [line]
    result = guard.run()
    assert result.returncode == 2
    assert message in result.output


def test_unknown_user_is_a_configuration_error(guard: Guard) -> None:
    guard.user = "no-such-user-sgtest"
    result = guard.run()
    assert result.returncode == 2
    assert "service user 'no-such-user-sgtest' does not exist" in result.output


def test_config_writable_by_others_is_rejected(guard: Guard) -> None:
    guard.write_config()
    guard.config.chmod(0o666)
    proc = subprocess.run(["/bin/bash", str(SCRIPT), str(guard.config)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "must be owned by root and not group/other-writable" in proc.stdout


def test_refuses_to_run_unprivileged(guard: Guard, workdir: Path) -> None:
    guard.write_config()
    script_copy = workdir / "prestart"
    shutil.copy(SCRIPT, script_copy)
    script_copy.chmod(0o755)
    proc = subprocess.run(
        ["/bin/bash", str(script_copy), str(guard.config)],
        user=guard.user,
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert proc.returncode == 2
    assert "must run as root" in proc.stdout


ROLE_VALIDATION = """
- name: Validate the guard variables
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Run the role's argument checks only
      ansible.builtin.include_role:
        name: llmstack.inference.service_guard
        tasks_from: validate
"""


def test_role_refuses_root_as_the_service_user(tmp_path: Path, localhost_playbook) -> None:
    """Argument validation, on the controller: the guard would stop any root process as a "leftover"."""
    playbook = tmp_path / "validate.yml"
    playbook.write_text(ROLE_VALIDATION)
    extra = {"service_guard_user": "root", "service_guard_instances": [{"unit": "sgtest.service", "ports": [8080]}]}
    proc = localhost_playbook(playbook, extra_vars=extra)
    assert proc.returncode == 2, proc.stdout
    assert "service_guard_user is 'root': the guarded unit must run as an unprivileged system user" in proc.stdout
