"""The router's VRAM probe against the shared corpus of recorded nvidia-smi outputs (tests/fixtures/nvidia_smi)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from llmstack_router.config import parse_config
from llmstack_router.metrics import Metrics
from llmstack_router.swap import SwapError, Swapper
from llmstack_router.vram import NvidiaSmiProbe, VramProbeError, parse_nvidia_smi
from router_helpers import router_config

FIXTURES = Path(__file__).resolve().parents[2] / "tests/fixtures/nvidia_smi"
sys.path.insert(0, str(FIXTURES))
import nvidia_smi as corpus  # noqa: E402  (the fixture directory is not a package)

QUERY = ["--query-gpu=index,memory.free", "--format=csv,noheader,nounits"]
FAILING = sorted(name for name in corpus.names() if "fail" in corpus.load(name))


def _stdout(box: str) -> str:
    rc, out, _err = corpus.render(corpus.load(box), QUERY)
    assert rc == 0
    return out


@pytest.mark.parametrize(
    ("box", "gpus", "free"),
    [
        ("h100", (), 81008),
        ("rtx5090_4090", (), 24060),  # the tightest GPU, never the sum (issue 13)
        ("rtx5090_4090", (1,), 24060),
        ("h100x2_uneven", (0,), 1000),
        ("h100x2_uneven", (), 1000),
        ("h100x2_uneven", (1,), 80000),
        ("a100_mig", (0,), 26006),
    ],
)
def test_recorded_free_memory(box: str, gpus: tuple[int, ...], free: int) -> None:
    assert parse_nvidia_smi(_stdout(box), gpus) == free


def test_na_memory_is_unknown_not_a_crash() -> None:
    # GB10 (unified memory) prints [N/A]: unknown, so pre-flight falls back to the declared capacity.
    assert parse_nvidia_smi(_stdout("gb10_na_memory"), ()) is None
    assert parse_nvidia_smi(_stdout("gb10_na_memory"), (0,)) is None


def test_a_line_that_is_no_gpu_row_is_a_probe_error() -> None:
    with pytest.raises(VramProbeError, match="unexpected nvidia-smi output"):
        parse_nvidia_smi("Unable to determine the device handle for GPU 0000:0B:00.0: Unknown Error\n", ())


@pytest.fixture
def probe_for(tmp_path: Path):
    def make(box: str) -> NvidiaSmiProbe:
        return NvidiaSmiProbe(binary=str(corpus.install(tmp_path, box)), timeout_s=10.0)

    return make


def test_probe_reads_a_recorded_box(probe_for) -> None:
    assert asyncio.run(probe_for("rtx5090_4090").free_mib((0,))) == 30603


@pytest.mark.parametrize("box", FAILING)
def test_probe_error_names_what_nvidia_smi_printed(probe_for, box: str) -> None:
    """nvidia-smi prints its failures on stdout: the error must carry that line, not an empty stderr."""
    fail = corpus.load(box)["fail"]
    with pytest.raises(VramProbeError) as caught:
        asyncio.run(probe_for(box).free_mib(()))
    assert f"failed ({fail['rc']}): {fail['stdout'].splitlines()[0]}" in str(caught.value)


@pytest.mark.parametrize(("need", "refused"), [(40000, True), (1000, False)])
def test_preflight_needs_the_minimum_on_each_gpu_of_the_group(probe_for, need: int, refused: bool) -> None:
    """1000 + 80000 MiB free is 81000 summed, and still no room for a 40000-MiB model (main: it swapped)."""
    config = parse_config(router_config({"b": {"engine": "llamacpp", "group": "gpu0", "url": "http://127.0.0.1:9",
                                               "models": [{"id": "m", "vram_mib": need}]}}, group={"gpus": [0, 1]}))
    swapper = Swapper("gpu0", config.groups["gpu0"], config, probe_for("h100x2_uneven"), Metrics(), {},
                      dict(config.models), lambda: 0, time.monotonic)
    preflight = swapper._preflight(config.models["m"], None)
    if not refused:
        asyncio.run(preflight)
        return
    with pytest.raises(SwapError, match="needs 40000 MiB but GPU group gpu0 can free at most 1000 MiB on its tightest"):
        asyncio.run(preflight)
