"""Recorded nvidia-smi answers and an nvidia-smi emulator for the unit tests.

This is an EMULATOR of NVIDIA's nvidia-smi for hardware we lack in CI: `install_fake_nvidia_smi`
writes an executable that answers the invocations the gpu_facts module makes with text recorded
from real machines (values, UUID shapes, memory totals and reserved memory as those GPUs and
drivers print them; UUIDs and bus ids are randomised per box). Each invocation is logged so
tests can assert the exact command lines.
"""

from __future__ import annotations

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


DRIVER_UNREACHABLE = {
    "rc": 9,
    "stdout": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n\n",
    "stderr": "",
}
NO_DEVICES = {"rc": 6, "stdout": "No devices were found\n", "stderr": ""}

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
B200_UUIDS = [
    "GPU-1a7e3c52-9d04-b6f8-2e31-c70a5d8b4f16",
    "GPU-84c2f0d9-3b6e-17a5-d9c0-2f4e8a61b3d7",
    "GPU-e5093b7a-c1d8-4f62-8a3e-97b0d2c5f141",
    "GPU-2d6f8e14-7a39-c0b5-e482-1f9c3d7a6e08",
    "GPU-b03c9a71-45e2-8d6f-1c7b-e9a2f4d0c853",
    "GPU-7f1d2e86-0b4c-a93e-56d1-8c2b7e0f4a39",
    "GPU-c9e48b30-d2a7-61f5-b0e3-4a8d1c6f92b7",
    "GPU-4b8a6d1f-e3c0-9725-f1a8-d6b4c2e07f5a",
]
# GPU 0 serves a model (vLLM holding 164210 MiB); the rest idle. total = used + free + reserved.
B200_QUERY = "".join(
    "%d, NVIDIA B200, %s, 183359, %d, %d, 10.0, 570.133.20, %s\n"
    % (i, uuid, 164210 if i == 0 else 0, 18322 if i == 0 else 182532, bus)
    for i, (uuid, bus) in enumerate(zip(B200_UUIDS, B200_BUSES, strict=True))
)

# Each box: answers per invocation kind, and what the module must report.
BOXES: dict[str, dict] = {
    "rtx5090": {
        "answers": {
            "query": ok(
                "0, NVIDIA GeForce RTX 5090, GPU-6d3c0b8e-2a9f-7c41-5e1d-93b0a4f7c2e8, 32607, 2, 32111, 12.0, "
                "570.153.02, 00000000:01:00.0\n"
            ),
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
            "query": ok(
                "0, NVIDIA GeForce RTX 4090, GPU-3f8a2c61-b7d4-e0a9-1c5b-8e2f6a9d4b70, 24564, 1, 24077, 8.9, "
                "550.144.03, 00000000:01:00.0\n"
            ),
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
            "query": ok(
                "0, NVIDIA RTX PRO 6000 Blackwell Workstation Edition, GPU-9b1e4d27-0c6a-f358-72d1-4a8e0b3c5f96, "
                "97887, 0, 97251, 12.0, 575.57.08, 00000000:C1:00.0\n"
            ),
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
        "answers": {"query": ok(B200_QUERY), "q": ok(q_compute("570.133.20", "12.8", B200_BUSES))},
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
            "query": ok(
                "0, NVIDIA H100 80GB HBM3, GPU-5e2a7c94-1f0b-d836-4c9e-a07b3f2d6e81, 81559, 0, 81008, 9.0, "
                "550.90.07, 00000000:18:00.0\n"
            ),
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
            "query": ok(
                "0, NVIDIA GeForce RTX 5090, GPU-a41f0c7e-6b2d-93e5-0d8c-5f1b7e3a2c94, 32607, 1510, 30603, 12.0, "
                "575.64.03, 00000000:01:00.0\n"
                "1, NVIDIA GeForce RTX 4090, GPU-0c5d9e3b-8a17-f24c-6e0d-b3a9c1f7e528, 24564, 18, 24060, 8.9, "
                "575.64.03, 00000000:02:00.0\n"
            ),
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
            "query": ok(
                "0, NVIDIA GB10, GPU-d8b3f6a2-4c1e-07d9-a5b2-e6f0c3d9184b, [N/A], [N/A], [N/A], 12.1, "
                "580.95.05, 0000000F:01:00.0\n"
            ),
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
            "query": {"rc": 2, "stdout": 'Field "compute_cap" is not a valid field to query.\n\n', "stderr": ""},
            "legacy_query": ok(
                "0, Tesla V100-SXM2-32GB, GPU-2c7e5a18-93f4-6b0d-e81c-4f9a0d3b7e62, 32510, 3, 32507, "
                "470.256.02, 00000000:00:1E.0\n"
            ),
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
            "query": ok(
                "0, NVIDIA GeForce RTX 4090, GPU-3f8a2c61-b7d4-e0a9-1c5b-8e2f6a9d4b70, 24564, 1, 24077, 8.9, "
                "565.57.01, 00000000:01:00.0\n"
            ),
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
