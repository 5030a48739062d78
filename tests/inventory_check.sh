#!/usr/bin/env bash
# `--syntax-check` and `--check` runs of playbooks/site.yml for the example inventories (inventory/hydra,
# inventory/gb200) against lab hosts standing in for their hosts.
#
# Each inventory host gets a fresh lab host `invchk-<host>`. An overlay inventory (a second -i, so it
# wins over the example's placeholder ansible_host) points each host at its stand-in and adds:
#   group_vars/all/overrides.yml   tests/inventory_check/<inventory>.yml: no-GPU overrides and test
#                                  values for the Vault variables, each explained there;
#   group_vars/all/airgap.yml      written here: the lab cannot reach GitHub, so the sources a real
#                                  node downloads from there are replaced the way an air-gapped site
#                                  replaces them (a local git mirror, a local Ollama archive).
# Before anything connects, every host must resolve to a lab address (198.18.0.0/24): no run ever
# reaches the example's placeholder addresses. The lab hosts are torn down at exit, also on failure.
#
# Usage: tests/inventory_check.sh [hydra] [gb200]     (default: both). Needs root (the lab).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH=$repo/.venv/bin:$PATH
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0
cache=${LLMSTACK_CACHE:-$repo/.cache}
labctl=(python tools/lab/labctl.py)
inventories=("$@")
((${#inventories[@]} > 0)) || inventories=(hydra gb200)

work=$(mktemp -d "${TMPDIR:-/tmp}/invchk.XXXXXX")
booted=()
cleanup() {
    local rc=$? name
    for name in "${booted[@]}"; do
        "${labctl[@]}" down "$name" >/dev/null || echo "inventory_check: labctl down $name failed" >&2
    done
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf 'inventory_check: %s\n' "$*"; }

# Hosts of the inventory, or of one of its groups.
inventory_hosts() {
    ansible-inventory -i "inventory/$1" --list |
        python -c '
import json, sys
inventory, group = json.load(sys.stdin), sys.argv[1]
names = inventory["_meta"]["hostvars"] if group == "all" else inventory.get(group, {}).get("hosts", [])
print("\n".join(sorted(names)))' "${2:-all}"
}

resolved_host() {
    ansible-inventory -i "inventory/$1" -i "$2" --host "$3" |
        python -c 'import json, sys; print(json.load(sys.stdin).get("ansible_host", ""))'
}

# The air-gapped sources. A check run only asks them whether they exist and what they hold.
write_airgap_vars() {
    local inv=$1 overlay=$2 archive sha
    : >"$overlay/group_vars/all/airgap.yml"
    if [[ -n $(inventory_hosts "$inv" tabbyapi) ]]; then
        # An empty mirror: the tabbyapi role's check run lists its refs (git ls-remote), never fetches.
        echo "tabbyapi_git_repo: /srv/git/tabbyAPI.git" >>"$overlay/group_vars/all/airgap.yml"
        ansible -i "inventory/$inv" -i "$overlay" tabbyapi -m ansible.builtin.command \
            -a "git init --quiet --bare /srv/git/tabbyAPI.git creates=/srv/git/tabbyAPI.git/HEAD" >/dev/null
    fi
    if [[ -n $(inventory_hosts "$inv" ollama) ]]; then
        # The ollama scenario's labelled test stand-in (not Ollama) as the local archive: the check run
        # reads its checksum on the controller; nothing is copied or unpacked.
        mkdir -p "$work/ollama-archive/bin"
        cp molecule/ollama/files/ollama-standin.sh "$work/ollama-archive/bin/ollama"
        archive=$work/ollama-standin-linux-amd64.tgz
        tar -C "$work/ollama-archive" -czf "$archive" bin
        sha=$(sha256sum "$archive" | cut -d' ' -f1)
        printf 'ollama_archive_src: %s\nollama_archive_sha256: "%s"\n' "$archive" "$sha" \
            >>"$overlay/group_vars/all/airgap.yml"
    fi
}

check_inventory() {
    local inv=$1 overlay=$work/$1 host name address started
    [[ -f tests/inventory_check/$inv.yml ]] || { say "no overrides file tests/inventory_check/$inv.yml"; return 1; }
    mkdir -p "$overlay/group_vars/all"
    cp "tests/inventory_check/$inv.yml" "$overlay/group_vars/all/overrides.yml"
    {
        echo "all:"
        echo "  vars:"
        echo "    ansible_user: root"
        echo "    ansible_ssh_private_key_file: $cache/lab/id_ed25519"
        echo "    ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        echo "    ansible_python_interpreter: /usr/bin/python3"
        echo "  hosts:"
    } >"$overlay/hosts.yml"

    say "$inv: syntax check"
    ansible-playbook -i "inventory/$inv" -i "$overlay" playbooks/site.yml --syntax-check

    for host in $(inventory_hosts "$inv"); do
        name=invchk-$host
        started=$SECONDS
        # A leftover of an aborted earlier run would hold the name.
        "${labctl[@]}" down "$name" >/dev/null 2>&1 || true
        booted+=("$name")
        address=$("${labctl[@]}" up "$name" | python -c 'import json, sys; print(json.load(sys.stdin)["address"])')
        say "$inv: $host stands in as lab host $name at $address ($((SECONDS - started)) s)"
        printf '    %s:\n      ansible_host: %s\n' "$host" "$address" >>"$overlay/hosts.yml"
    done

    for host in $(inventory_hosts "$inv"); do
        address=$(resolved_host "$inv" "$overlay" "$host")
        if [[ $address != 198.18.0.* ]]; then
            say "$inv: $host would connect to '$address', not to a lab host: refusing to run"
            return 1
        fi
    done

    write_airgap_vars "$inv" "$overlay"

    say "$inv: --check run of playbooks/site.yml"
    started=$SECONDS
    ansible-playbook -i "inventory/$inv" -i "$overlay" playbooks/site.yml --check
    say "$inv: --check passed in $((SECONDS - started)) s"
}

for inv in "${inventories[@]}"; do
    check_inventory "$inv"
done
say "all passed: ${inventories[*]}"
