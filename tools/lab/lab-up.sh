#!/usr/bin/env bash
# `make lab`: boots every host of the lab fleet (inventory/lab, group `lab`; host N at 198.18.0.(10+N)),
# deploys playbooks/site.yml to it and prints a real reply from a model on every inference node,
# asked through the LiteLLM gateway (tools/lab/lab-reply.yml; LAB_PROMPT overrides the question).
# Re-running reuses running hosts (the site playbook is idempotent).
# `tools/lab/lab-up.sh destroy` (make lab-destroy) tears the fleet down, leaving other lab hosts alone.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"
export LLMSTACK_CACHE="${LLMSTACK_CACHE:-$repo_root/.cache}"
export PATH="$repo_root/.venv/bin:$PATH"
export ANSIBLE_CONFIG="$repo_root/ansible.cfg"
python="$repo_root/.venv/bin/python"
labctl=("$python" tools/lab/labctl.py)
inventory=inventory/lab
site="${LAB_SITE_PLAYBOOK:-playbooks/site.yml}"

# "name index" for every host of group lab, from the inventory's literal ansible_host.
fleet() {
  ansible-inventory -i "$inventory" --list | "$python" -c 'import ipaddress, json, sys
inv = json.load(sys.stdin)
hostvars = inv["_meta"]["hostvars"]
for name in inv.get("lab", {}).get("hosts", []):
    address = ipaddress.ip_address(hostvars[name]["ansible_host"])
    if address not in ipaddress.ip_network("198.18.0.0/24"):
        sys.exit(f"{name}: ansible_host {address} is outside the lab network 198.18.0.0/24")
    print(name, int(str(address).rsplit(".", 1)[1]) - 10)'
}

host_state() {
  "${labctl[@]}" status | "$python" -c 'import json, sys
hosts = {h["name"]: h for h in json.load(sys.stdin)}
h = hosts.get(sys.argv[1])
print("absent" if h is None else ("running" if h["running"] else "stale"))' "$1"
}

# Read up front: labctl would otherwise swallow a loop's stdin and end it after the first host.
mapfile -t fleet_hosts < <(fleet)
[[ ${#fleet_hosts[@]} -gt 0 ]] || { echo "no hosts in group lab of $inventory" >&2; exit 1; }

if [[ "${1:-up}" == "destroy" ]]; then
  for entry in "${fleet_hosts[@]}"; do
    read -r name _ <<<"$entry"
    [[ "$(host_state "$name")" == "absent" ]] || "${labctl[@]}" down "$name"
  done
  exit 0
fi

stamp() { date +%s; }
t_start=$(stamp)

echo "== artifacts (cached under $LLMSTACK_CACHE)"
tools/fetch-lab-model.sh
tools/build-llamacpp-wheel.sh
tools/build-llama-server.sh
tools/fetch-router-wheels.sh
"${labctl[@]}" rootfs >/dev/null
t_artifacts=$(stamp)

echo "== lab hosts"
for entry in "${fleet_hosts[@]}"; do
  read -r name index <<<"$entry"
  state="$(host_state "$name")"
  [[ "$state" != "stale" ]] || "${labctl[@]}" down "$name"
  if [[ "$state" != "running" ]]; then
    "${labctl[@]}" up "$name" --index "$index" --bind-ro "$LLMSTACK_CACHE/models:/mnt/models" \
      | "$python" -c 'import json, sys; h = json.load(sys.stdin); print(h["name"], "up at", h["address"], "in", h["boot_seconds"], "s")'
  else
    echo "$name already running"
  fi
done
t_boot=$(stamp)

echo "== $site"
ansible-playbook -i "$inventory" "$site"
t_site=$(stamp)

echo "== replies through the LiteLLM gateway"
ANSIBLE_CALLBACK_RESULT_FORMAT=yaml ansible-playbook -i "$inventory" tools/lab/lab-reply.yml
t_end=$(stamp)
echo "== times: artifacts $((t_artifacts - t_start)) s, boot $((t_boot - t_artifacts)) s, site $((t_site - t_boot)) s, reply $((t_end - t_site)) s"
