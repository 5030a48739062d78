#!/usr/bin/env bash
# Puts the model router's dependencies (router/pyproject.toml) and its build backend into the local
# wheelhouse that role `common` copies to hosts, so role `router` can `pip install` the collection's
# router/ with --no-index, like an air-gapped node. Skipped when the wheelhouse already has this set.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLMSTACK_CACHE:-$repo_root/.cache}"
python="${LLMSTACK_PYTHON:-$repo_root/.venv/bin/python}"
wheelhouse="$cache/wheelhouse"
# aiohttp and pyyaml as router/pyproject.toml pins them; setuptools satisfies its build requirement (>=68).
requirements=(aiohttp==3.14.5 pyyaml==6.0.3 setuptools==80.9.0 wheel==0.45.1)
stamp="$wheelhouse/.router-$(printf '%s\n' "${requirements[@]}" | sha1sum | cut -c1-12).complete"

if [[ -e "$stamp" ]]; then
  echo "router wheels: present in $wheelhouse"
  exit 0
fi
mkdir -p "$wheelhouse"
"$python" -m pip download -q --only-binary=:all: --dest "$wheelhouse" "${requirements[@]}"
printf '%s\n' "${requirements[@]}" >"$stamp"
echo "router wheels: downloaded into $wheelhouse"
