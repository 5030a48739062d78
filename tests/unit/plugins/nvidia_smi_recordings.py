"""Recorded nvidia-smi answers and an nvidia-smi emulator for the unit tests.

This is an EMULATOR of NVIDIA's nvidia-smi for hardware we lack in CI: `install_fake_nvidia_smi`
writes an executable that answers the invocations the gpu_facts module makes with text recorded
from real machines (values, UUID shapes, memory totals and reserved memory as those GPUs and
drivers print them; UUIDs and bus ids are randomised per box). Each invocation is logged so
tests can assert the exact command lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

QUERY_ARGS = [
    "--query-gpu=index,name,uuid,memory.total,memory.used,memory.free,compute_cap,driver_version,pci.bus_id",
    "--format=csv,noheader,nounits",
]


def q_compute(driver: str, cuda: str, bus_ids: list[str], when: str = "Tue Jun 17 10:42:07 2025") -> str:
    """`nvidia-smi -q -d COMPUTE` as drivers up to the 580 series print it."""
    gpus = "".join("GPU %s\n    Compute Mode                          : Default\n\n" % bus for bus in bus_ids)
    return (
        "\n==============NVSMI LOG==============\n\n"
        "Timestamp                                 : %s\n"
        "Driver Version                            : %s\n"
        "CUDA Version                              : %s\n\n"
        "Attached GPUs                             : %d\n%s" % (when, driver, cuda, len(bus_ids), gpus)
    )


def ok(stdout: str) -> dict:
    return {"rc": 0, "stdout": stdout, "stderr": ""}


# The values of every box live in the shared corpus (tests/fixtures/nvidia_smi), which the guard's
# tests and the router's VRAM probe read too; this module adds the -q texts and gpu_facts' expectations.
_CORPUS_DIR = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "nvidia_smi"
_SPEC = importlib.util.spec_from_file_location("nvidia_smi_corpus", _CORPUS_DIR / "nvidia_smi.py")
corpus = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(corpus)
LEGACY_QUERY_ARGS = [QUERY_ARGS[0].replace(",compute_cap", ""), QUERY_ARGS[1]]


def recorded(box: str, args: list[str] | None = None) -> dict:
    """What nvidia-smi ARGS (default: gpu_facts' query) prints on a corpus box, as an answer of the emulator below."""
    rc, stdout, stderr = corpus.render(corpus.load(box), list(args or QUERY_ARGS))
    return {"rc": rc, "stdout": stdout, "stderr": stderr}


DRIVER_UNREACHABLE = recorded("driver_unreachable")
NO_DEVICES = recorded("no_devices")

RTX5090_BUS = "00000000:01:00.0"
B200_BUSES = [
    "00000000:1B:00.0",
    "00000000:43:00.0",
    "00000000:52:00.0",
    "00000000:61:00.0",
    "00000000:9D:00.0",
    "00000000:C3:00.0",
    "00000000:D1:00.0",
    "00000000:DF:00.0",
]
# Each box: answers per invocation kind, and what the module must report.
BOXES: dict[str, dict] = {
    "rtx5090": {
        "answers": {
            "query": recorded("rtx5090"),
            "q": ok(q_compute("570.153.02", "12.8", [RTX5090_BUS])),
        },
        "expect": {
            "count": 1,
            "names": ["NVIDIA GeForce RTX 5090"],
            "capabilities": ["12.0"],
            "architectures": ["Blackwell"],
            "total": 32607,
            "used": 2,
            "free": 32111,
            "driver": "570.153.02",
            "cuda": "12.8",
            "blackwell": True,
            "arch_list": "12.0",
        },
    },
    "rtx4090": {
        "answers": {
            "query": recorded("rtx4090"),
            "q": ok(q_compute("550.144.03", "12.4", ["00000000:01:00.0"])),
        },
        "expect": {
            "count": 1,
            "names": ["NVIDIA GeForce RTX 4090"],
            "capabilities": ["8.9"],
            "architectures": ["Ada"],
            "total": 24564,
            "used": 1,
            "free": 24077,
            "driver": "550.144.03",
            "cuda": "12.4",
            "blackwell": False,
            "arch_list": "8.9",
        },
    },
    "rtx_pro_6000": {
        "answers": {
            "query": recorded("rtx_pro_6000"),
            "q": ok(q_compute("575.57.08", "12.9", ["00000000:C1:00.0"])),
        },
        "expect": {
            "count": 1,
            "names": ["NVIDIA RTX PRO 6000 Blackwell Workstation Edition"],
            "capabilities": ["12.0"],
            "architectures": ["Blackwell"],
            "total": 97887,
            "used": 0,
            "free": 97251,
            "driver": "575.57.08",
            "cuda": "12.9",
            "blackwell": True,
            "arch_list": "12.0",
        },
    },
    "b200x8": {
        "answers": {"query": recorded("b200x8"), "q": ok(q_compute("570.133.20", "12.8", B200_BUSES))},
        "expect": {
            "count": 8,
            "names": ["NVIDIA B200"] * 8,
            "capabilities": ["10.0"],
            "architectures": ["Blackwell"],
            "total": 8 * 183359,
            "used": 164210,
            "free": 18322 + 7 * 182532,
            "driver": "570.133.20",
            "cuda": "12.8",
            "blackwell": True,
            "arch_list": "10.0",
        },
    },
    "h100": {
        "answers": {
            "query": recorded("h100"),
            "q": ok(q_compute("550.90.07", "12.4", ["00000000:18:00.0"])),
        },
        "expect": {
            "count": 1,
            "names": ["NVIDIA H100 80GB HBM3"],
            "capabilities": ["9.0"],
            "architectures": ["Hopper"],
            "total": 81559,
            "used": 0,
            "free": 81008,
            "driver": "550.90.07",
            "cuda": "12.4",
            "blackwell": False,
            "arch_list": "9.0",
        },
    },
    "mixed_5090_4090": {
        "answers": {
            "query": recorded("rtx5090_4090"),
            "q": ok(q_compute("575.64.03", "12.9", ["00000000:01:00.0", "00000000:02:00.0"])),
        },
        "expect": {
            "count": 2,
            "names": ["NVIDIA GeForce RTX 5090", "NVIDIA GeForce RTX 4090"],
            "capabilities": ["8.9", "12.0"],
            "architectures": ["Ada", "Blackwell"],
            "total": 32607 + 24564,
            "used": 1510 + 18,
            "free": 30603 + 24060,
            "driver": "575.64.03",
            "cuda": "12.9",
            "blackwell": True,
            "arch_list": "8.9;12.0",
        },
    },
    # Unified memory: the DGX Spark's GB10 has no dedicated VRAM, nvidia-smi prints [N/A].
    "gb10_na_memory": {
        "answers": {
            "query": recorded("gb10_na_memory"),
            "q": ok(q_compute("580.95.05", "13.0", ["0000000F:01:00.0"])),
        },
        "expect": {
            "count": 1,
            "names": ["NVIDIA GB10"],
            "capabilities": ["12.1"],
            "architectures": ["Blackwell"],
            "total": None,
            "used": None,
            "free": None,
            "driver": "580.95.05",
            "cuda": "13.0",
            "blackwell": True,
            "arch_list": "12.1",
        },
    },
    # R470 does not know compute_cap: the module retries without it and infers 7.0 from the name.
    "v100_legacy_driver": {
        "answers": {
            "query": recorded("v100_legacy_driver"),
            "legacy_query": recorded("v100_legacy_driver", LEGACY_QUERY_ARGS),
            "q": ok(q_compute("470.256.02", "11.4", ["00000000:00:1E.0"])),
        },
        "expect": {
            "count": 1,
            "names": ["Tesla V100-SXM2-32GB"],
            "capabilities": ["7.0"],
            "architectures": ["Volta"],
            "total": 32510,
            "used": 3,
            "free": 32507,
            "driver": "470.256.02",
            "cuda": "11.4",
            "blackwell": False,
            "arch_list": "7.0",
            "capability_source": "name",
        },
    },
    # `-q` without a CUDA line (seen in some containers): the plain table header is the fallback.
    "rtx4090_header_fallback": {
        "answers": {
            "query": recorded("rtx4090_565"),
            "q": {"rc": 0, "stdout": "\n==============NVSMI LOG==============\n\n", "stderr": ""},
            "plain": ok(
                "Tue Jun 17 10:42:07 2025       \n"
                "+-----------------------------------------------------------------------------------------+\n"
                "| NVIDIA-SMI 565.57.01              Driver Version: 565.57.01      CUDA Version: 12.7     |\n"
                "|-----------------------------------------+------------------------+----------------------+\n"
            ),
        },
        "expect": {
            "count": 1,
            "names": ["NVIDIA GeForce RTX 4090"],
            "capabilities": ["8.9"],
            "architectures": ["Ada"],
            "total": 24564,
            "used": 1,
            "free": 24077,
            "driver": "565.57.01",
            "cuda": "12.7",
            "blackwell": False,
            "arch_list": "8.9",
        },
    },
}

FAILURES: dict[str, dict] = {
    "driver_unreachable": {
        "answers": {"query": DRIVER_UNREACHABLE, "q": DRIVER_UNREACHABLE, "plain": DRIVER_UNREACHABLE},
        "reason_contains": "could not communicate with the NVIDIA driver",
    },
    "no_devices": {
        "answers": {"query": NO_DEVICES, "q": NO_DEVICES, "plain": NO_DEVICES},
        "reason_contains": "found no NVIDIA devices",
    },
    "garbled_output": {
        "answers": {"query": ok("0, NVIDIA GeForce RTX 5090, 32607\n")},
        "reason_contains": "unexpected nvidia-smi output",
    },
    "unknown_failure": {
        "answers": {
            "query": {
                "rc": 15,
                "stdout": "",
                "stderr": "Unable to determine the device handle for GPU0000:01:00.0: Unknown Error\n",
            }
        },
        "reason_contains": "exit code 15: Unable to determine the device handle",
    },
    "hung": {
        "answers": {"query": {"rc": 0, "stdout": "", "stderr": "", "sleep": 30}},
        "reason_contains": "did not answer in time",
    },
}

FAKE_SCRIPT = '''#!{python}
"""Emulated nvidia-smi (tests only): answers from answers.json next to this file."""
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "calls.log"), "a") as log:
    log.write(json.dumps(args) + "\\n")
with open(os.path.join(here, "answers.json")) as handle:
    answers = json.load(handle)
if args and args[0].startswith("--query-gpu="):
    kind = "query" if "compute_cap" in args[0] else "legacy_query"
elif args[:1] == ["-q"]:
    kind = "q"
elif not args:
    kind = "plain"
else:
    kind = "unknown"
answer = answers.get(kind, {{"rc": 2, "stdout": "", "stderr": "emulator: no recording for %s\\n" % kind}})
time.sleep(answer.get("sleep", 0))
sys.stdout.write(answer["stdout"])
sys.stderr.write(answer["stderr"])
sys.exit(answer["rc"])
'''


def install_fake_nvidia_smi(directory: Path, answers: dict) -> Path:
    """Write an emulated nvidia-smi answering with `answers` into `directory`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "answers.json").write_text(json.dumps(answers))
    script = directory / "nvidia-smi"
    script.write_text(FAKE_SCRIPT.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def recorded_calls(script: Path) -> list[list[str]]:
    log = script.parent / "calls.log"
    if not os.path.exists(log):
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]
