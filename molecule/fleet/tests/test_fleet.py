"""The CPU fleet: requests through the LiteLLM gateway reach the node whose router serves the model."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import testinfra
import testinfra.utils.ansible_runner

INVENTORY = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
# No test takes testinfra's `host` fixture: molecule passes --hosts=all, which would run each test once per
# host (a module's testinfra_hosts does not override --hosts). Each test picks its hosts with node().

MASTER_KEY = "sk-molecule-fleet-master-key-0123456789"
ROUTER_KEY = "molecule-fleet-router-key-0123456789"
# model id -> (node, the llama.cpp unit that serves it there)
MODELS = {
    "smollm2-node1": ("node1", "llamacpp@smollm2-node1.service"),
    "smollm2-node2-py": ("node2", "llamacpp@smollm2-node2-py.service"),
    "smollm2-node2-bin": ("node2", "llamacpp@smollm2-node2-bin.service"),
}


def address(name: str) -> str:
    return INVENTORY.get_variables(name)["ansible_host"]


def node(name: str):
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={os.environ['MOLECULE_INVENTORY_FILE']}")


def curl(host, url: str, key: str, body: dict | None = None) -> tuple[int, dict | str]:
    args = ["curl", "-s", "-m", "300", "-w", "\\n%{http_code}", "-H", f"Authorization: Bearer {key}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    text, _newline, code = host.run(shlex.join([*args, url])).stdout.rpartition("\n")
    return int(code or 0), json.loads(text) if text.strip().startswith("{") else text


def gateway(path: str, body: dict | None = None) -> tuple[int, dict | str]:
    return curl(node("gw"), f"http://{address('gw')}:4000{path}", MASTER_KEY, body)


def router_requests(name: str, model: str) -> float:
    """Completions the node's own router answered with 200 for this model (its Prometheus counter)."""
    _code, text = curl(node(name), f"http://{address(name)}:8002/metrics", ROUTER_KEY)
    for line in str(text).splitlines():
        if line.startswith("llmrouter_requests_total{") and f'model="{model}"' in line and 'code="200"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def active_llamacpp_units(name: str) -> list[str]:
    out = node(name).run("systemctl list-units --state=active --plain --no-legend 'llamacpp@*'").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def test_gateway_lists_every_model_of_every_node() -> None:
    code, body = gateway("/v1/models")
    assert code == 200, body
    assert sorted(m["id"] for m in body["data"]) == sorted(MODELS)


def test_routers_listen_on_their_lab_address_only() -> None:
    for name in ("node1", "node2"):
        assert node(name).socket(f"tcp://{address(name)}:8002").is_listening
        assert not node(name).socket("tcp://0.0.0.0:8002").is_listening


# node2-bin after node2-py, then node2-py again: two swaps on node2, both caused by requests through the gateway.
@pytest.mark.parametrize(
    ("step", "model"),
    [(1, "smollm2-node1"), (2, "smollm2-node2-py"), (3, "smollm2-node2-bin"), (4, "smollm2-node2-py")],
)
def test_request_through_the_gateway_reaches_the_right_node(step: int, model: str) -> None:
    name, unit = MODELS[model]
    others = [n for n in ("node1", "node2") if n != name]
    before = {n: router_requests(n, model) for n in ("node1", "node2")}
    code, body = gateway("/v1/chat/completions", {
        "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]})
    assert code == 200, body
    assert body["choices"][0]["message"]["content"].strip()
    assert router_requests(name, model) == before[name] + 1
    assert all(router_requests(o, model) == before[o] for o in others)
    # On node2 the request swapped models when the other one was loaded: only the served unit is up.
    assert active_llamacpp_units(name) == [unit]


def test_node2_swapped_models() -> None:
    _code, status = curl(node("node2"), f"http://{address('node2')}:8002/status", ROUTER_KEY)
    group = status["groups"][0]
    # py -> bin -> py at least (the parametrized test above), each a real stop and start.
    assert group["swaps"] >= 3
    assert group["last_error"] is None


def test_gateway_refuses_a_wrong_key() -> None:
    code, _body = curl(node("gw"), f"http://{address('gw')}:4000/v1/models", "sk-wrong-key-0123456789")
    assert code in (400, 401)
