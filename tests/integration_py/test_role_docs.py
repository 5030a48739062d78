"""`make docs-check` (tools/role-docs.sh check): a role README whose generated part no longer matches its
meta/argument_specs.yml fails the run, names the role, shows the diff and says to run `make docs`.

Runs the real aar-doc from the controller venv on a copy of the roles' meta/ and README.md files, so the
edits never touch the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "role-docs.sh"
BEGIN = "<!-- BEGIN_ANSIBLE_DOCS -->"
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if (p / "meta").is_dir())


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, ROLE_DOCS_ROOT=str(root))
    # aar-doc lives next to the interpreter running the tests (the controller venv).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(root: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), mode], env=_env(root), capture_output=True, text=True, timeout=300, check=False
    )


# The copy holds three roles only: every aar-doc run costs about half a second of CPU.
COPIED = ["common", "ollama", "service_guard"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The parts of the collection the generator reads, copied."""
    if shutil.which("aar-doc", path=_env(tmp_path)["PATH"]) is None:
        pytest.fail("aar-doc is not installed: run `make venv` (it is pinned in requirements/controller.txt)")
    (tmp_path / "tools").mkdir()
    shutil.copy2(REPO / "tools" / "role-docs.md.j2", tmp_path / "tools")
    shutil.copy2(REPO / "galaxy.yml", tmp_path)
    for role in COPIED:
        src = REPO / "roles" / role
        shutil.copytree(src / "meta", tmp_path / "roles" / role / "meta")
        shutil.copy2(src / "README.md", tmp_path / "roles" / role / "README.md")
    return tmp_path


def test_every_role_has_a_readme_with_an_intro_and_generated_tables() -> None:
    for role in ROLES:
        text = (REPO / "roles" / role / "README.md").read_text(encoding="utf-8")
        intro, _marker, generated = text.partition(BEGIN)
        assert generated, f"roles/{role}/README.md has no {BEGIN}"
        assert intro.startswith(f"# llmstack.inference.{role}\n"), role
        for section in ("## Example", "## Tags", "## What it does not do"):
            assert section in intro, f"roles/{role}/README.md intro lacks {section}"
        assert "| Variable | Type | Required | Default | Description |" in generated, role


def test_checked_in_readmes_are_current() -> None:
    result = _run(REPO, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "role READMEs match meta/argument_specs.yml" in result.stdout


def test_stale_readme_fails_until_regenerated(tree: Path) -> None:
    assert _run(tree, "check").returncode == 0

    spec = tree / "roles" / "common" / "meta" / "argument_specs.yml"
    text = spec.read_text(encoding="utf-8")
    edited, count = re.subn(
        r"(common_gpu_required:\n(?:\s+.*\n)*?\s+description: )(.*)", r"\1Changed by the test. \2", text, count=1
    )
    assert count == 1, "the test's anchor option common_gpu_required moved; adjust the test"
    spec.write_text(edited, encoding="utf-8")
    readme = tree / "roles" / "common" / "README.md"
    intro_before = readme.read_text(encoding="utf-8").partition(BEGIN)[0]

    stale = _run(tree, "check")
    assert stale.returncode == 1
    assert "roles/common/README.md is stale" in stale.stdout
    assert re.search(r"^\+\| `common_gpu_required` .*Changed by the test\.", stale.stdout, re.M), stale.stdout
    assert "stale role READMEs: common; run `make docs`" in stale.stderr
    for role in set(COPIED) - {"common"}:
        assert f"roles/{role}/README.md is stale" not in stale.stdout

    wrote = _run(tree, "write")
    assert wrote.returncode == 0, wrote.stderr
    assert wrote.stdout.splitlines() == ["wrote roles/common/README.md"]
    assert readme.read_text(encoding="utf-8").partition(BEGIN)[0] == intro_before, "the hand-written intro changed"
    assert _run(tree, "check").returncode == 0


def test_a_new_option_is_a_stale_readme(tree: Path) -> None:
    spec = tree / "roles" / "service_guard" / "meta" / "argument_specs.yml"
    # The spec's last lines are options of entry point main, so this adds a sibling option.
    knob = "".join(
        f"{line}\n"
        for line in (
            "      service_guard_new_knob:",
            "        type: int",
            "        default: 3",
            "        description: Added by the test.",
        )
    )
    spec.write_text(spec.read_text(encoding="utf-8") + knob, encoding="utf-8")
    stale = _run(tree, "check")
    assert stale.returncode == 1
    assert "+| `service_guard_new_knob` | int | no | `3` | Added by the test. |" in stale.stdout


def test_readme_without_markers_is_refused(tree: Path) -> None:
    readme = tree / "roles" / "ollama" / "README.md"
    readme.write_text("# llmstack.inference.ollama\n\nOnly an intro.\n", encoding="utf-8")
    for mode in ("check", "write"):
        result = _run(tree, mode)
        assert result.returncode == 1
        assert "roles/ollama/README.md: write the hand-written intro" in result.stderr
    assert readme.read_text(encoding="utf-8") == "# llmstack.inference.ollama\n\nOnly an intro.\n"
