#!/usr/bin/env bash
# Puts the model router's dependencies (router/pyproject.toml) and its build backend into the local
# wheelhouse that role `common` copies to hosts, so role `router` can `pip install` the collection's
# router/ with --no-index, like an air-gapped node. Skipped when the wheelhouse already has this set.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLMSTACK_CACHE:-$repo_root/.cache}"
python="${LLMSTACK_PYTHON:-$repo_root/.venv/bin/python}"
wheelhouse="$cache/wheelhouse"
# requirements/router.lock (make locks): router/pyproject.toml's pins and the build backend, with hashes.
lock="$repo_root/requirements/router.lock"
stamp="$wheelhouse/.router-$(sha1sum <"$lock" | cut -c1-12).complete"

if [[ -e "$stamp" ]]; then
  echo "router wheels: present in $wheelhouse"
  exit 0
fi
mkdir -p "$wheelhouse"
"$python" -m pip download -q --only-binary=:all: --require-hashes --find-links "$wheelhouse" --dest "$wheelhouse" -r "$lock"
cp "$lock" "$stamp"
echo "router wheels: downloaded into $wheelhouse"
