"""Two real llama.cpp servers (llama-cpp-python) swapped by the router, driven with the official openai client.

The models: SmolLM2-135M-Instruct (the lab model) and a generated tiny random llama (see
make_tiny_gguf.py). prepare_llamacpp.sh builds the venv and the second model once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio
from router_helpers import API_KEY, RunningRouter, free_port, router_config, start_router

pytestmark = pytest.mark.asyncio
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("LLMSTACK_CACHE", HERE.parents[1] / ".cache"))
VENV_PYTHON = CACHE / "venvs" / "llamacpp" / "bin" / "python"
SMOL = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = CACHE / "models" / "tiny-random-llama.gguf"


@pytest.fixture(scope="session")
def llama_ready() -> None:
    result = subprocess.run(["bash", str(HERE / "prepare_llamacpp.sh")], capture_output=True, text=True,
                            timeout=1800, check=False)
    if result.returncode != 0:
        pytest.fail(f"prepare_llamacpp.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def llama_backend(port: int, model_path: Path, model_id: str, **options) -> dict:
    return {
        "engine": "llamacpp", "group": "gpu0", "url": f"http://127.0.0.1:{port}",
        "command": [str(VENV_PYTHON), "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
                    "--port", str(port), "--model_alias", model_id, "--n_ctx", "512", "--n_threads", "1"],
        "ready_timeout_s": 120, "stop_timeout_s": 10, "models": [{"id": model_id, "aliases": [f"{model_id}-alias"]}],
        **options,
    }


@pytest_asyncio.fixture
async def llama_router(llama_ready) -> AsyncIterator[RunningRouter]:
    router = await start_router(router_config({
        "smollm": llama_backend(free_port(), SMOL, "smollm2-135m"),
        "tiny": llama_backend(free_port(), TINY, "tiny-random"),
    }, group={"min_residency_s": 1.0, "queue_size": 256}))
    yield router
    await router.close()


def live_backends(router: RunningRouter) -> list[str]:
    lane = router.router.lane_of["smollm2-135m"]
    return [name for name, rt in lane.backends.items()
            if rt.controller.proc is not None and rt.controller.proc.returncode is None]


async def test_openai_client_models_chat_stream_and_errors_across_swaps(llama_router: RunningRouter) -> None:
    client = openai.AsyncOpenAI(base_url=llama_router.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    models = await client.models.list()
    assert {m.id for m in models.data} == {"smollm2-135m", "tiny-random"}
    assert not any(m.model_extra["loaded"] for m in models.data)

    reply = await client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert live_backends(llama_router) == ["smollm"]

    pieces = []
    stream = await client.chat.completions.create(
        model="tiny-random-alias", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True,
        temperature=0)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) >= 2, pieces  # arrived as separate chunks
    assert live_backends(llama_router) == ["tiny"]
    loaded = {m.id: m.model_extra["loaded"] for m in (await client.models.list()).data}
    assert loaded == {"smollm2-135m": False, "tiny-random": True}

    completion = await client.completions.create(model="smollm2-135m", prompt="1, 2, 3,", max_tokens=4,
                                                 temperature=0)
    assert completion.choices[0].text
    assert live_backends(llama_router) == ["smollm"]

    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "smollm2-135m" in str(missing.value)
    bad_key = openai.AsyncOpenAI(base_url=llama_router.url + "/v1", api_key="not-a-valid-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad_key.models.list()
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="smollm2-135m", messages=[])
    lane = llama_router.router.lane_of["smollm2-135m"]
    assert lane.core.swaps == 3
    assert all(record.error is None for record in lane.history)
    swaps = [(r.to_model, round(r.duration_s, 2), round(r.start_to_ready_s, 2)) for r in lane.history]
    print("\nllama.cpp swaps:", swaps)


async def test_kill_9_of_llamacpp_mid_stream_then_recovery(llama_router: RunningRouter) -> None:
    client = openai.AsyncOpenAI(base_url=llama_router.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    lane = llama_router.router.lane_of["smollm2-135m"]
    stream = await client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Count from one to one hundred."}],
        max_tokens=300, stream=True, temperature=0)

    async def read_and_kill_after_three_chunks() -> None:
        received = 0
        async for _chunk in stream:
            received += 1
            if received == 3:
                os.kill(lane.backends["smollm"].controller.proc.pid, signal.SIGKILL)

    with pytest.raises(openai.APIError) as broken:
        await read_and_kill_after_three_chunks()
    assert "failed while serving smollm2-135m" in str(broken.value)
    for _poll in range(100):
        if lane.core.phase == "idle":
            break
        await asyncio.sleep(0.05)
    reply = await client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4)
    assert reply.choices[0].message.content is not None
    assert lane.core.swaps == 2


# The scheduler's bound over 200 alternating requests is proven against fake backends in test_router_faults
# (test_two_hundred_alternating_requests_no_failure_bounded_swaps, ~17 s). Here the same invariants hold on
# real llama.cpp processes started and stopped under concurrent load; what costs is each swap (a process
# start and model load, 4-6 s), not a request. Four times the concurrency forces swaps both ways while
# requests wait on each side; 200 requests took 123 s and proved nothing more.
ALTERNATING_REQUESTS = 64
CONCURRENCY = 16


async def test_alternating_requests_on_llamacpp_all_answered_with_bounded_swaps(llama_router: RunningRouter) -> None:
    client = openai.AsyncOpenAI(base_url=llama_router.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    lane = llama_router.router.lane_of["smollm2-135m"]
    semaphore = asyncio.Semaphore(CONCURRENCY)
    loop = asyncio.get_running_loop()
    began = loop.time()

    async def one(index: int) -> str:
        async with semaphore:
            reply = await client.chat.completions.create(
                model=("smollm2-135m", "tiny-random")[index % 2], messages=[{"role": "user", "content": "hi"}],
                max_tokens=1, temperature=0)
            return reply.model

    answered = await asyncio.gather(*(one(i) for i in range(ALTERNATING_REQUESTS)))
    elapsed = loop.time() - began
    assert len(answered) == ALTERNATING_REQUESTS  # any failure would have raised
    print(f"\n{ALTERNATING_REQUESTS} alternating llama.cpp requests, {CONCURRENCY} concurrent: "
          f"{lane.core.swaps} swaps, {elapsed:.1f}s")
    assert lane.core.swaps <= 1 + elapsed / 1.0  # at most one swap per residency window
    assert lane.core.swaps <= 30
    assert all(record.error is None for record in lane.history)
