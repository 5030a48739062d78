#!/usr/bin/env bash
# `make lab`: boots every host of the lab fleet (inventory/lab, group `lab`; host N at 198.18.0.(10+N)),
# deploys playbooks/site.yml to it and prints one real reply from SmolLM2 through the deployed
# llama.cpp endpoint. Re-running reuses running hosts (the site playbook is idempotent).
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
prompt="${LAB_PROMPT:-In one sentence, what is a llama?}"

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

if [[ "${1:-up}" == "destroy" ]]; then
  fleet | while read -r name _; do
    [[ "$(host_state "$name")" == "absent" ]] || "${labctl[@]}" down "$name"
  done
  exit 0
fi

stamp() { date +%s; }
t_start=$(stamp)

echo "== artifacts (cached under $LLMSTACK_CACHE)"
tools/fetch-lab-model.sh
tools/build-llamacpp-wheel.sh
# llama-server only when some instance of the fleet runs it.
if ansible-inventory -i "$inventory" --list | "$python" -c 'import json, sys
hostvars = json.load(sys.stdin)["_meta"]["hostvars"].values()
sys.exit(0 if any(i.get("server_impl", v.get("llamacpp_server_impl", "python")) == "binary"
                  for v in hostvars for i in v.get("llamacpp_instances", [])) else 1)'; then
  tools/build-llama-server.sh
fi
"${labctl[@]}" rootfs >/dev/null
t_artifacts=$(stamp)

echo "== lab hosts"
fleet | while read -r name index; do
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

echo "== reply through the deployed endpoint"
# The probe runs on the node (llama.cpp binds 127.0.0.1 there) against its first started instance;
# the key comes from the inventory, so it may live in Vault.
node="$(ansible-inventory -i "$inventory" --graph llamacpp | sed -n 's/^ *|--\([A-Za-z0-9_.-]*\)$/\1/p' | head -n 1)"
port="$(ansible-inventory -i "$inventory" --host "$node" | "$python" -c 'import json, sys
started = [i for i in json.load(sys.stdin).get("llamacpp_instances", []) if i.get("state", "started") == "started"]
if not started:
    sys.exit("no llamacpp instance with state started in the inventory")
print(started[0]["port"])')"
probe_args="$("$python" -c 'import json, sys
print(json.dumps({"url": "http://127.0.0.1:" + sys.argv[1], "api_key": "{{ llamacpp_api_key }}",
                  "stream": False, "max_tokens": 64, "prompt": sys.argv[2]}))' "$port" "$prompt")"
# The default callback prints "<host> | SUCCESS => {json}"; result_format json keeps that parseable.
reply="$(ANSIBLE_CALLBACK_RESULT_FORMAT=json ANSIBLE_NOCOLOR=1 ANSIBLE_DEPRECATION_WARNINGS=0 \
  ansible "$node" -i "$inventory" -m llmstack.inference.model_probe -a "$probe_args")" || true
"$python" - "$reply" "$node" "$prompt" <<'PY'
import json, sys
raw, node, prompt = sys.argv[1:4]
head, sep, body = raw.partition(" => ")
try:
    result = json.loads(body) if sep else {}
except ValueError:
    result = {}
if "SUCCESS" not in head or "text" not in result:
    sys.exit(f"probe on {node} failed:\n{raw}")
print(f"prompt: {prompt}")
print(f"{result['model']} on {node} ({result['completion_tokens']} tokens, {result['latency_ms']:.0f} ms):")
print(result["text"].strip())
PY
t_end=$(stamp)
echo "== times: artifacts $((t_artifacts - t_start)) s, boot $((t_boot - t_artifacts)) s, site $((t_site - t_boot)) s, reply $((t_end - t_site)) s"
