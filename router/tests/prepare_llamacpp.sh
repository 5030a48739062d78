#!/usr/bin/env bash
# Prepares what the router's llama.cpp integration tests run: a venv with llama-cpp-python[server]
# installed from the local wheelhouse (built once by tools/build-llamacpp-wheel.sh), the lab model
# (tools/fetch-lab-model.sh) and a second, generated tiny model (make_tiny_gguf.py). Idempotent.
set -euo pipefail

LLAMACPP_PYTHON_VERSION="${LLAMACPP_PYTHON_VERSION:-0.3.36}"
GGUF_VERSION="0.19.0"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
cache="${LLMSTACK_CACHE:-$repo_root/.cache}"
venv="$cache/venvs/llamacpp"
models="$cache/models"
lab_model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
tiny_model="$models/tiny-random-llama.gguf"
stamp="$venv/.router-tests-llama-cpp-python-${LLAMACPP_PYTHON_VERSION}-gguf-${GGUF_VERSION}"

[[ -s "$lab_model" ]] || "$repo_root/tools/fetch-lab-model.sh"
if [[ ! -f "$stamp" ]]; then
  compgen -G "$cache/wheelhouse/llama_cpp_python-${LLAMACPP_PYTHON_VERSION}-*.whl" >/dev/null \
    || "$repo_root/tools/build-llamacpp-wheel.sh"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --find-links "$cache/wheelhouse" \
    "llama-cpp-python[server]==${LLAMACPP_PYTHON_VERSION}" "gguf==${GGUF_VERSION}"
  touch "$stamp"
fi
[[ -s "$tiny_model" ]] || "$venv/bin/python" "$here/make_tiny_gguf.py" "$lab_model" "$tiny_model"
echo "llama.cpp test venv: $venv; models: $lab_model $tiny_model"
