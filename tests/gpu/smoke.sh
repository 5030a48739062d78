#!/usr/bin/env bash
# GPU smoke test for a lent CUDA machine (never run in CI): runs the gpu_facts, tabbyapi_vram (tests/gpu/vram.yml) and
# flash_attn_check modules through ansible (localhost, local connection) against the machine's
# real nvidia-smi and torch, with a real flash-attn kernel run, and prints the recommended wheel.
# For the machine's torch it then checks flash-attn `auto`: the recommendation and the refusal
# agree (a wheel the release never published is refused with the ways out), and the tabbyapi
# role's own flash-attn tasks, run in check mode, stop at the refusal with the environment's
# `pip freeze` unchanged. Last, the source build plan: FLASH_ATTN_CUDA_ARCHS for these GPUs,
# MAX_JOBS from this machine's available memory.
#
# Usage: tests/gpu/smoke.sh [--python PY] [--wheel-version V] [--install-torch SPEC]
#                           [--install-flash-attn] [--out DIR]
#   --python PY            interpreter whose torch/flash-attn is checked (default: the first of
#                          $SMOKE_PYTHON, python3, python that imports torch)
#   --wheel-version V      flash-attn release to recommend from (default 2.8.3)
#   --install-torch SPEC   create $CACHE/gpu-smoke/torch-venv with `pip install SPEC` (e.g.
#                          torch==2.8.0: PyPI's Linux torch wheels are CUDA builds) and check that
#   --install-flash-attn   after the first check, pip-install the recommended wheel into the
#                          checked environment (only when it is a venv under $CACHE) and check again
#   --out DIR              also write DIR/smoke-result.json
#
# What it installs, only with pip and only under $CACHE (${LLMSTACK_CACHE:-<repo>/.cache}):
#   - ansible-core (the version pinned in requirements/controller.txt) into $CACHE/gpu-smoke/ansible-venv,
#     unless <repo>/.venv already has ansible-playbook;
#   - torch / the flash-attn wheel, only when asked with the options above.
# Nothing outside the repository and its cache is changed; no root needed.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${LLMSTACK_CACHE:-$repo_root/.cache}
smoke_cache="$cache/gpu-smoke"
python=${SMOKE_PYTHON:-}
wheel_version=2.8.3
install_torch=""
install_flash_attn=0
out_dir=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) python=$2; shift 2 ;;
    --wheel-version) wheel_version=$2; shift 2 ;;
    --install-torch) install_torch=$2; shift 2 ;;
    --install-flash-attn) install_flash_attn=1; shift ;;
    --out) out_dir=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
    -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '== %s\n' "$*"; }

base_python() {
  local candidate
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return 0; fi
  done
  echo "no python3 on PATH" >&2
  return 1
}

# ansible-playbook: the controller venv if there is one, else a pip-installed ansible-core.
if [[ -x "$repo_root/.venv/bin/ansible-playbook" ]]; then
  ansible_bin="$repo_root/.venv/bin"
else
  ansible_core_pin=$(grep -E '^ansible-core==' "$repo_root/requirements/controller.txt")
  ansible_bin="$smoke_cache/ansible-venv/bin"
  if [[ ! -x "$ansible_bin/ansible-playbook" ]]; then
    log "installing $ansible_core_pin into $smoke_cache/ansible-venv"
    "$(base_python)" -m venv "$smoke_cache/ansible-venv"
    "$ansible_bin/python" -m pip install --disable-pip-version-check -q "$ansible_core_pin"
  fi
fi

if [[ -n "$install_torch" ]]; then
  torch_venv="$smoke_cache/torch-venv"
  log "installing $install_torch into $torch_venv"
  "$(base_python)" -m venv "$torch_venv"
  "$torch_venv/bin/python" -m pip install --disable-pip-version-check -q "$install_torch"
  python="$torch_venv/bin/python"
fi

if [[ -z "$python" ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      python=$(command -v "$candidate")
      break
    fi
  done
fi
if [[ -z "$python" ]]; then
  echo "no interpreter with torch found: pass --python PY, or --install-torch torch==X (needs PyPI)" >&2
  exit 2
fi

# The checkout is the collection: expose it as llmstack.inference without touching ~/.ansible.
collections=$(mktemp -d "${TMPDIR:-/tmp}/llmstack-gpu-smoke.XXXXXX")
trap 'rm -rf "$collections"' EXIT
mkdir -p "$collections/ansible_collections/llmstack"
ln -s "$repo_root" "$collections/ansible_collections/llmstack/inference"

run_smoke() {
  # -i localhost, keeps the lab inventory (and its ssh settings) out of a local run.
  ANSIBLE_COLLECTIONS_PATH="$collections" ANSIBLE_CONFIG="$repo_root/ansible.cfg" ANSIBLE_STDOUT_CALLBACK=default \
    "$ansible_bin/ansible-playbook" -i localhost, -c local \
    -e "ansible_python_interpreter=$ansible_bin/python" \
    -e "smoke_python=$python" -e "smoke_wheel_version=$wheel_version" -e "smoke_out_dir=$out_dir" \
    "$repo_root/tests/gpu/smoke.yml"
}

log "nvidia-smi: $(command -v nvidia-smi || echo 'not found')"
log "checking $python"
run_smoke

# The EXL2/EXL3 VRAM estimate against the device's real nvidia-smi (tests/gpu/vram.yml).
log "VRAM estimate against the real GPUs"
ANSIBLE_COLLECTIONS_PATH="$collections" ANSIBLE_CONFIG="$repo_root/ansible.cfg" ANSIBLE_STDOUT_CALLBACK=default \
  "$ansible_bin/ansible-playbook" -i localhost, -c local \
  -e "ansible_python_interpreter=$ansible_bin/python" -e "vram_out_dir=$out_dir" \
  "$repo_root/tests/gpu/vram.yml"

if [[ "$install_flash_attn" == 1 ]]; then
  case "$python" in
    "$cache"/*) ;;
    *) echo "--install-flash-attn only installs into venvs under $cache, not $python" >&2; exit 2 ;;
  esac
  url=$(
    ANSIBLE_COLLECTIONS_PATH="$collections" ANSIBLE_CONFIG="$repo_root/ansible.cfg" ANSIBLE_LOAD_CALLBACK_PLUGINS=1 \
      ANSIBLE_STDOUT_CALLBACK=ansible.builtin.json "$ansible_bin/ansible" all -i localhost, -c local \
      -e "ansible_python_interpreter=$ansible_bin/python" -m llmstack.inference.flash_attn_check \
      -a "python=$python wheel_version=$wheel_version" |
      "$ansible_bin/python" -c 'import json,sys; r=json.load(sys.stdin)["plays"][0]["tasks"][0]["hosts"]["localhost"]; print((r.get("recommended_wheel") or {}).get("url") or "")'
  )
  if [[ -z "$url" ]]; then
    echo "no recommended wheel to install" >&2
    exit 1
  fi
  log "installing $url"
  # --no-deps: the wheel was chosen for the torch already there, which must stay as it is.
  "$python" -m pip install --disable-pip-version-check --no-deps --force-reinstall "$url"
  "$python" -m pip install --disable-pip-version-check einops
  log "checking again after the install"
  run_smoke
fi
