#!/usr/bin/env bash
# Runs `ansible-test sanity` and `ansible-test units` for this collection.
#
# ansible-test only works inside an `ansible_collections/<namespace>/<name>` tree, and the
# checkout is not one, so the collection's files (tracked plus untracked-but-not-ignored,
# exactly what git would commit) are copied into a throw-away tree and tested there.
#
# Usage: tools/ansible-test.sh [sanity|units|all] [extra ansible-test arguments...]
#
# Environment:
#   ANSIBLE_TEST_PYTHON  python version to test with (default 3.11, the controller's)
#   ANSIBLE_TEST_ENV     --venv (default) or --local.
#                        --venv: ansible-test builds one virtualenv per test from its own pinned
#                        requirements (pylint, voluptuous, pytest, ...) and caches it under
#                        ~/.ansible/test/venv; it needs no Docker (absent here and in CI) and keeps
#                        those pins out of the controller venv, whose linters are pinned differently.
#                        --local: uses the python running ansible-test as is; only for machines
#                        that already carry the sanity requirements.
#   ANSIBLE_TEST_KEEP    1 keeps the temporary tree (its path is printed) for debugging.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
what=${1:-all}
if [[ $# -gt 0 ]]; then shift; fi
python_version=${ANSIBLE_TEST_PYTHON:-3.11}
env_mode=${ANSIBLE_TEST_ENV:---venv}

case "$what" in
  sanity | units | all) ;;
  *) echo "usage: $0 [sanity|units|all] [ansible-test args...]" >&2; exit 2 ;;
esac
case "$env_mode" in
  --venv | --local) ;;
  *) echo "ANSIBLE_TEST_ENV must be --venv or --local, not '$env_mode'" >&2; exit 2 ;;
esac

# ansible-test must come from the controller venv: it has to match the ansible-core the
# collection is developed against.
ansible_test="$repo_root/.venv/bin/ansible-test"
if [[ ! -x "$ansible_test" ]]; then
  echo "$ansible_test not found: create the controller venv first (make venv)" >&2
  exit 2
fi

# ansible-test fetches get-pip.py from ci-files.testing.ansible.com, which air-gapped and proxied
# machines cannot reach; tools/ansible_test_get_pip.py does the same job from the configured
# package index. A real get-pip.py already cached there is left alone.
pip_version=$(sed -n "s/^ *pip='\([0-9.]*\)',$/\1/p" \
  "$("$repo_root/.venv/bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py")
if [[ "$env_mode" == --venv && -n "$pip_version" ]]; then
  get_pip_cache="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
  if [[ ! -s "$get_pip_cache" ]]; then
    mkdir -p "$(dirname "$get_pip_cache")"
    cp "$repo_root/tools/ansible_test_get_pip.py" "$get_pip_cache"
  fi
fi

namespace=$(sed -n 's/^namespace: *//p' "$repo_root/galaxy.yml")
name=$(sed -n 's/^name: *//p' "$repo_root/galaxy.yml")

work=$(mktemp -d "${TMPDIR:-/tmp}/llmstack-ansible-test.XXXXXX")
# shellcheck disable=SC2317  # only ever called through the EXIT trap
cleanup() {
  if [[ "${ANSIBLE_TEST_KEEP:-0}" == 1 ]]; then
    echo "kept $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

collection="$work/ansible_collections/$namespace/$name"
mkdir -p "$collection"
# -c -o --exclude-standard = what `git add -A` would take; files deleted in the work tree are
# still listed by -c, so keep only those that exist.
(
  cd "$repo_root"
  git ls-files -z -c -o --exclude-standard |
    while IFS= read -r -d '' path; do
      if [[ -e "$path" || -L "$path" ]]; then printf '%s\0' "$path"; fi
    done |
    tar --null --files-from=- -cf - |
    tar -xf - -C "$collection"
)
# ansible-test lists a collection's files through git when there is a repository; give it one
# so that it tests exactly the copied files (and not, say, a stray tests/output).
git -C "$collection" init -q
git -C "$collection" add -A

export PATH="$repo_root/.venv/bin:$PATH"
# A controller's ANSIBLE_CONFIG or collections path must not leak into the tests.
unset ANSIBLE_CONFIG ANSIBLE_COLLECTIONS_PATH ANSIBLE_COLLECTIONS_PATHS

status=0
run_phase() {
  local phase=$1; shift
  local started=$SECONDS rc=0
  echo "== ansible-test $phase --python $python_version $env_mode $*"
  (cd "$collection" && "$ansible_test" "$phase" --python "$python_version" "$env_mode" --color no "$@") || rc=$?
  echo "== ansible-test $phase: rc=$rc in $((SECONDS - started))s"
  # Results are kept in the checkout's git-ignored tests/output for a look after the tree is gone.
  if [[ -d "$collection/tests/output" ]]; then
    mkdir -p "$repo_root/tests/output"
    cp -r "$collection/tests/output/." "$repo_root/tests/output/"
  fi
  if [[ $rc -ne 0 ]]; then status=$rc; fi
}

if [[ "$what" == sanity || "$what" == all ]]; then
  run_phase sanity "$@"
fi
if [[ "$what" == units || "$what" == all ]]; then
  if [[ -d "$collection/tests/unit" ]]; then
    # Unit tests keep expensive fixtures (a real torch venv) in the checkout's cache, and
    # ansible-test passes no custom environment variables to pytest: link the cache into the
    # tree, only now, since the sanity "symlinks" test would reject it.
    cache_dir=${LLMSTACK_CACHE:-$repo_root/.cache}
    mkdir -p "$cache_dir"
    ln -sfn "$cache_dir" "$collection/.cache"
    run_phase units "$@"
  else
    echo "== ansible-test units: no tests/unit in the collection" >&2
    status=1
  fi
fi
exit "$status"
