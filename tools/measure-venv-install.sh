#!/usr/bin/env bash
# Times pip against uv building the SAME venv on a node that role `common` configured:
# same requirement, same /etc/llmstack/pip.conf settings (wheelhouse, index, CA), cold
# caches on both sides, so the difference is the installer alone.
#
# Run it on a lab host from the controller:
#   .venv/bin/ansible lab-node1 -i inventory/lab -m ansible.builtin.script -a tools/measure-venv-install.sh
# or directly on a node: tools/measure-venv-install.sh 'llama-cpp-python[server]==0.3.36'
# Prints one JSON line: {"requirement", "packages", "pip_s", "uv_s", "speedup"}.
set -euo pipefail

requirement="${1:-llama-cpp-python[server]==0.3.36}"
uv="${UV:-/opt/llmstack/tools/venv/bin/uv}"
env_file="${PIP_ENV_FILE:-/etc/llmstack/pip.env}"
[[ -r "$env_file" ]] || { echo "$env_file missing: apply role llmstack.inference.common first" >&2; exit 1; }
[[ -x "$uv" ]] || { echo "$uv missing: apply role llmstack.inference.common with common_use_uv: true" >&2; exit 1; }
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a

work="$(mktemp -d /var/tmp/measure-venv.XXXXXX)"
trap 'rm -rf "$work"' EXIT

seconds() { python3 -c 'import sys, time; print(f"{time.monotonic() - float(sys.argv[1]):.2f}")' "$1"; }
now() { python3 -c 'import time; print(time.monotonic())'; }

t0=$(now)
python3 -m venv "$work/pip-venv"
"$work/pip-venv/bin/pip" install --quiet --no-cache-dir "$requirement"
pip_s=$(seconds "$t0")

t0=$(now)
"$uv" venv --quiet --python /usr/bin/python3 "$work/uv-venv"
UV_CACHE_DIR="$work/uv-cache" "$uv" pip install --quiet --python "$work/uv-venv/bin/python" "$requirement"
uv_s=$(seconds "$t0")

# pip and uv spell project names differently (llama_cpp_python vs llama-cpp-python): compare PEP 503 names.
normalize() { python3 -c 'import re, sys
for line in sys.stdin:
    name, _, version = line.strip().partition("==")
    if name: print(re.sub(r"[-_.]+", "-", name).lower() + "==" + version)' | sort; }
pip_set=$("$work/pip-venv/bin/pip" freeze --all --exclude pip --exclude setuptools | normalize)
uv_set=$("$uv" pip freeze --quiet --python "$work/uv-venv/bin/python" | normalize)
if [[ "$pip_set" != "$uv_set" ]]; then
  echo "pip and uv built different venvs:" >&2
  diff <(echo "$pip_set") <(echo "$uv_set") >&2 || true
  exit 1
fi
python3 -c 'import json, sys
req, n, pip_s, uv_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(json.dumps({"requirement": req, "packages": n, "pip_s": pip_s, "uv_s": uv_s, "speedup": round(pip_s / uv_s, 1)}))' \
  "$requirement" "$(echo "$pip_set" | wc -l)" "$pip_s" "$uv_s"
