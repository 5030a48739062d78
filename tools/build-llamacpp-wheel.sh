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
# The stamp names the locks too: a refreshed lock (make locks) fetches its wheels again.
locks=("$repo_root/requirements/llamacpp.lock" "$repo_root/requirements/uv.lock")
stamp="$wheelhouse/.llama_cpp_python-${LLAMACPP_PYTHON_VERSION}-uv-${UV_VERSION}-$(cat "${locks[@]}" | sha1sum | cut -c1-12).complete"
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
# The build is not reproducible, so its hash is recorded now, once, and role llamacpp installs against
# it (--require-hashes). A wheel from before this record gets its hash on the first run after.
for wheel in "$wheelhouse"/llama_cpp_python-"${LLAMACPP_PYTHON_VERSION}"-*.whl; do
  [[ -f "$wheel.sha256" ]] || (cd "$wheelhouse" && sha256sum "$(basename "$wheel")" >"$(basename "$wheel").sha256")
done

# Dependencies are the locks' wheels, checked against their hashes; with them the wheelhouse works with
# --no-index, and the node's install checks the same hashes again.
"$python" -m pip download --dest "$wheelhouse" --only-binary=:all: --find-links "$wheelhouse" --require-hashes \
  -r "$repo_root/requirements/llamacpp.lock" -r "$repo_root/requirements/uv.lock" >>"$log" 2>&1 \
  || { tail -n 40 "$log" >&2; echo "dependency download failed, see $log" >&2; exit 1; }

touch "$stamp"
end=$(date +%s)
echo "llama-cpp-python ${LLAMACPP_PYTHON_VERSION}: compile $((built - start))s, dependencies $((end - built))s, wheelhouse $wheelhouse"
