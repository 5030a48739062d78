#!/usr/bin/env bash
# Builds llama-cpp-python[server] once on the controller and puts it, with every
# dependency wheel it needs and the uv wheel role `common` installs, into the local
# wheelhouse that role `common` copies to hosts (the same path an air-gapped site
# uses). Compiling takes minutes, so the build is skipped when the wheelhouse
# already holds a complete set for the pins.
#
# GGML_NATIVE=OFF: a -march=native wheel would only run on this controller's CPU
# kind; OFF keeps the AVX2/FMA baseline so any recent x86-64 host can load it.
set -euo pipefail

LLAMACPP_PYTHON_VERSION="${LLAMACPP_PYTHON_VERSION:-0.3.36}"
UV_VERSION="${UV_VERSION:-0.13.9}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLMSTACK_CACHE:-$repo_root/.cache}"
wheelhouse="$cache/wheelhouse"
stamp="$wheelhouse/.llama_cpp_python-${LLAMACPP_PYTHON_VERSION}-uv-${UV_VERSION}.complete"
python="${LLMSTACK_PYTHON:-$repo_root/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"

mkdir -p "$wheelhouse" "$cache/logs"
# Concurrent scenarios share the cache: the second caller waits, then finds the stamp.
exec 9>"$cache/.build-llamacpp-wheel.lock"
flock 9

if [[ -f "$stamp" ]]; then
  echo "llama-cpp-python ${LLAMACPP_PYTHON_VERSION}: wheelhouse complete ($wheelhouse), nothing to build"
  exit 0
fi

log="$cache/logs/build-llamacpp-wheel.log"
start=$(date +%s)

if ! compgen -G "$wheelhouse/llama_cpp_python-${LLAMACPP_PYTHON_VERSION}-*.whl" >/dev/null; then
  echo "building llama-cpp-python ${LLAMACPP_PYTHON_VERSION} (log: $log)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF ${LLAMACPP_EXTRA_CMAKE_ARGS:-}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    nice -n "${LLMSTACK_NICE:-10}" "$python" -m pip wheel --no-deps --no-cache-dir \
      --wheel-dir "$wheelhouse" "llama-cpp-python==${LLAMACPP_PYTHON_VERSION}" >"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; echo "wheel build failed, see $log" >&2; exit 1; }
fi
built=$(date +%s)

# Dependencies are plain downloads; with them the wheelhouse works with --no-index.
"$python" -m pip download --dest "$wheelhouse" --only-binary=:all: --find-links "$wheelhouse" \
  "llama-cpp-python[server]==${LLAMACPP_PYTHON_VERSION}" "uv==${UV_VERSION}" >>"$log" 2>&1 \
  || { tail -n 40 "$log" >&2; echo "dependency download failed, see $log" >&2; exit 1; }

touch "$stamp"
end=$(date +%s)
echo "llama-cpp-python ${LLAMACPP_PYTHON_VERSION}: compile $((built - start))s, dependencies $((end - built))s, wheelhouse $wheelhouse"
