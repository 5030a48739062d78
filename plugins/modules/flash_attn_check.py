#!/usr/bin/python
# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: flash_attn_check
short_description: Diagnose flash-attn in a Python environment and name the wheel that fits it
version_added: 0.1.0
description:
  - Runs a probe with the given interpreter (typically a venv's C(bin/python)) that imports torch and
    flash_attn and reports the Python tag, torch version, torch's CUDA version, the C++11 ABI flag
    (C(torch._C._GLIBCXX_USE_CXX11_ABI)), whether CUDA is available, the devices' compute capability
    and the flash-attn version.
  - Classifies the result as one RV(problem) with a RV(message) that names the fix, and returns the exact
    flash-attn release wheel (file name and URL) matching that environment in RV(recommended_wheel).
  - With O(run_kernel=true) and a GPU present it also runs a tiny attention kernel, which is the only way
    to catch a build without kernels for the GPU ("no kernel image is available for execution on the device").
  - Refuses, in RV(wheel_refusal), any wheel the release did not publish (its table of published wheels is
    built from each flash-attn tag's C(.github/workflows/publish.yml)), naming the ways out.
  - Describes a source build limited to this node's GPU architectures in RV(source_build)
    (C(FLASH_ATTN_CUDA_ARCHS), C(MAX_JOBS) from the node's available memory, C(NVCC_THREADS)).
  - Never changes anything.
author:
  - llmstack maintainers (@llmstack)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: The probe only reads, so it also runs in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  python:
    description: Interpreter of the environment to check, e.g. C(/opt/llmstack/tabbyapi/venv/bin/python).
    type: path
    required: true
  min_version:
    description: Oldest flash-attn version accepted; older ones give RV(problem=too_old).
    type: str
    default: 2.5.7
  wheel_version:
    description:
      - flash-attn release to recommend a wheel from.
      - Release wheels have Blackwell (sm_100/sm_120) kernels only from 2.8.0 on, being built with CUDA >= 12.8;
        2.7.4.post1 wheels have none.
    type: str
    default: 2.8.3
  run_kernel:
    description:
      - Run a small causal attention (fp16, 1x128x4x64) on the first GPU when one is available.
      - Allocates a few MiB of GPU memory for a moment.
    type: bool
    default: false
  environment:
    description: Extra environment variables for the probe, such as C(CUDA_VISIBLE_DEVICES) or C(LD_LIBRARY_PATH).
    type: dict
    default: {}
  timeout:
    description:
      - Seconds the probe may take (importing torch can take tens of seconds on a cold disk).
      - Needs C(timeout) from coreutils on the host; without it the probe runs unbounded.
    type: int
    default: 300
  fail_on_problem:
    description: Fail, with the message, unless RV(problem) is V(ok).
    type: bool
    default: false
  capabilities:
    description:
      - Compute capabilities of the node's GPUs (C(gpu_facts)' C(compute_capability)) for RV(source_build); empty
        uses the devices torch sees.
    type: list
    elements: str
    default: []
  cuda_archs:
    description:
      - C(FLASH_ATTN_CUDA_ARCHS) values for RV(source_build), overriding O(capabilities). flash-attn's setup.py
        compiles V(80), V(90), V(100) and V(120) only; compute capabilities such as V(12.0) are mapped to those.
    type: list
    elements: str
    default: []
  arch_list:
    description:
      - Deprecated; a C(TORCH_CUDA_ARCH_LIST)-style list such as V(12.0;9.0), mapped to O(cuda_archs).
        C(TORCH_CUDA_ARCH_LIST) is ignored by flash-attn's setup.py, which reads C(FLASH_ATTN_CUDA_ARCHS).
    type: str
  max_jobs:
    description:
      - Cap on the C(MAX_JOBS) of RV(source_build), which is otherwise one job per 9 GiB of available memory
        and at most half the CPUs (setup.py's own rule); V(0) means no cap.
    type: int
    default: 0
notes:
  - The table of published wheels (torch, Python, CUDA, ABI and machine per flash-attn version) is built into the
    module for 2.6.3 and 2.7.4 to 2.8.3; for another O(wheel_version) the file name follows the current naming
    scheme, RV(recommended_wheel.published) is null and RV(wheel_refusal) says so.
seealso:
  - module: llmstack.inference.gpu_facts
"""

EXAMPLES = r"""
- name: Diagnose flash-attn in TabbyAPI's venv, running a kernel on the GPU
  llmstack.inference.flash_attn_check:
    python: /opt/llmstack/tabbyapi/venv/bin/python
    run_kernel: true
  register: flash_attn

- name: Install the wheel that matches the venv when flash-attn is missing or mismatched
  ansible.builtin.pip:
    name: "{{ flash_attn.recommended_wheel.url }}"
    executable: /opt/llmstack/tabbyapi/venv/bin/pip
    extra_args: --no-deps --force-reinstall
  when:
    - flash_attn.problem in ['missing', 'abi_or_torch_mismatch', 'too_old']
    - flash_attn.recommended_wheel.published | default(false)

- name: Require a working flash-attn
  llmstack.inference.flash_attn_check:
    python: /opt/llmstack/tabbyapi/venv/bin/python
    min_version: 2.8.0
    fail_on_problem: true
"""

RETURN = r"""
problem:
  description:
    - V(ok).
    - V(no_torch) - torch is missing or cannot be imported.
    - V(no_cuda) - torch is a CPU-only build, or CUDA is not available at run time.
    - V(missing) - flash-attn, or a module it needs, is not installed.
    - "V(abi_or_torch_mismatch) - flash-attn fails to import, typically with C(undefined symbol: _ZN3c10...)."
    - V(too_old) - flash-attn is older than O(min_version).
    - V(no_kernel_for_gpu) - the kernel run found no kernel image for the GPU.
    - V(kernel_failed) - the kernel run failed otherwise.
  returned: always
  type: str
  sample: missing
message:
  description: What was found and the fix.
  returned: always
  type: str
  sample: >-
    flash-attn is not installed in /opt/llmstack/tabbyapi/venv/bin/python:
    /opt/llmstack/tabbyapi/venv/bin/python -m pip install
    https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/flash_attn-2.8.3+cu12torch2.8cxx11abiFALSE-cp311-cp311-linux_x86_64.whl
python_tag:
  description: CPython tag of the interpreter.
  returned: always
  type: str
  sample: cp311
python_version:
  description: Interpreter version.
  returned: always
  type: str
  sample: 3.11.13
machine:
  description: Machine name as wheels spell it.
  returned: always
  type: str
  sample: x86_64
torch_version:
  description: torch version, or null when torch cannot be imported.
  returned: always
  type: str
  sample: 2.8.0+cu128
torch_cuda_version:
  description: CUDA version torch was built with (C(torch.version.cuda)); null for CPU builds.
  returned: always
  type: str
  sample: "12.8"
cxx11abi:
  description: Whether torch was built with the C++11 ABI (C(torch._C._GLIBCXX_USE_CXX11_ABI)); null without torch.
  returned: always
  type: bool
  sample: true
cuda_available:
  description: C(torch.cuda.is_available()).
  returned: always
  type: bool
  sample: true
devices:
  description: CUDA devices torch sees.
  returned: always
  type: list
  elements: dict
  sample: [{"index": 0, "name": "NVIDIA GeForce RTX 5090", "capability": "12.0"}]
device_capability:
  description: Compute capability of the first device, or null.
  returned: always
  type: str
  sample: "12.0"
flash_attn_version:
  description: Installed flash-attn version (from the import, else from the package metadata), or null.
  returned: always
  type: str
  sample: 2.8.3
flash_attn_error:
  description: First line of the error importing flash_attn, or null.
  returned: always
  type: str
  sample: >-
    ImportError: .../flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so:
    undefined symbol: _ZN3c105ErrorC2ENS_14SourceLocationESs
kernel_ok:
  description: Result of the kernel run; null when it did not run.
  returned: always
  type: bool
  sample: true
recommended_wheel:
  description: The flash-attn release wheel for this environment; null when torch is missing or has no CUDA.
  returned: always
  type: dict
  contains:
    version:
      description: flash-attn version (O(wheel_version)).
      type: str
    filename:
      description: Wheel file name.
      type: str
      sample: flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl
    url:
      description: Release download URL.
      type: str
      sample: >-
        https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl
    published:
      description: Whether that release publishes this wheel; null when the release is not in the module's table.
      type: bool
    why_not_published:
      description: Why there is no such wheel (torch, Python, CUDA or machine not covered), or null.
      type: str
    python_tag:
      description: CPython tag used.
      type: str
    torch:
      description: torch major.minor used.
      type: str
    cuda_major:
      description: torch's CUDA major used.
      type: str
    cxx11abi:
      description: C(TRUE) or C(FALSE).
      type: str
    platform:
      description: Platform tag, C(linux_x86_64) or C(linux_aarch64).
      type: str
    built_with_cuda:
      description: CUDA toolkit the release wheels were built with, or null.
      type: str
    has_blackwell_kernels:
      description: Whether the release wheels carry sm_100/sm_120 kernels, or null when unknown.
      type: bool
    lacks_kernels_for:
      description: Compute capabilities of this host's GPUs that the release wheels have no kernel for.
      type: list
      elements: str
    published_per:
      description: The release workflow file the table of published wheels was read from, or null.
      type: str
      sample: Dao-AILab/flash-attention@v2.8.3:.github/workflows/publish.yml
wheel_refusal:
  description:
    - Why RV(recommended_wheel) must not be installed (the release did not publish it, its release is not in the
      table, or it has no kernels for a GPU here), naming the ways out; null when it may be installed.
  returned: always
  type: str
  sample: >-
    flash-attn 2.8.3 publishes wheels for torch 2.4, 2.5, 2.6, 2.7, 2.8 only, not 2.9: ... was never published.
    Nothing was installed. Ways out: (1) a known-good venv tarball ...
source_build:
  description: How to build flash-attn for this node instead (environment and command).
  returned: always
  type: dict
  contains:
    env:
      description:
        - Environment of the build - C(FLASH_ATTN_CUDA_ARCHS) (absent when no architecture is left),
          C(MAX_JOBS), C(NVCC_THREADS), C(FLASH_ATTENTION_FORCE_BUILD=TRUE) (no download of a guessed release wheel).
      type: dict
      sample:
        FLASH_ATTENTION_FORCE_BUILD: "TRUE"
        MAX_JOBS: "8"
        NVCC_THREADS: "4"
        FLASH_ATTN_CUDA_ARCHS: "100;120"
    cuda_archs:
      description: The C(FLASH_ATTN_CUDA_ARCHS) values, one per GPU major.
      type: list
      elements: str
      sample: ["100", "120"]
    arch_origin:
      description: Where they came from - V(cuda_archs), V(the GPUs' compute capability) or V(the devices torch sees).
      type: str
    skipped_capabilities:
      description: Capabilities or values setup.py has no kernels for (below sm_80, or sm_110).
      type: list
      elements: str
    max_jobs_rule:
      description: How C(MAX_JOBS) was reached.
      type: str
      sample: min(cpus // 2 = 36, MemAvailable 81920 MiB // 9216 MiB per job at 4 nvcc threads) = 8
    memory_available_mib:
      description: C(MemAvailable) of the node, or null when unreadable.
      type: int
    cpus:
      description: CPUs of the node (C(os.cpu_count())).
      type: int
    error:
      description: Why there is nothing to build for, naming the fix; null otherwise.
      type: str
    command:
      description: The pip command.
      type: list
      elements: str
      sample: [/opt/llmstack/tabbyapi/venv/bin/python, -m, pip, install, flash-attn==2.8.3, --no-build-isolation]
    needs:
      description: What the build needs on the node.
      type: str
"""

import json
import os
import re

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llmstack.inference.plugins.module_utils import _flash_attn as fa


def run_probe(module: AnsibleModule) -> dict:
    python = module.params["python"]
    if not os.path.exists(python):
        module.fail_json(
            msg="%s does not exist: create the environment first (python3 -m venv DIR) or fix the python option"
            % python
        )
    if not os.access(python, os.X_OK):
        module.fail_json(
            msg="%s is not executable: chmod +x it (a venv unpacked from a tarball may have lost the bit)" % python
        )
    command = [python, "-c", fa.PROBE_SOURCE, json.dumps({"run_kernel": module.params["run_kernel"]})]
    timeout_bin = module.get_bin_path("timeout")
    if timeout_bin and module.params["timeout"] > 0:
        command = [timeout_bin, "--kill-after=10", str(module.params["timeout"]), *command]
    environ = {str(key): str(value) for key, value in module.params["environment"].items()}
    # Packages in the remote user's ~/.local would otherwise answer for the environment under test.
    environ.setdefault("PYTHONNOUSERSITE", "1")
    rc, out, err = module.run_command(command, environ_update=environ)
    report = fa.parse_probe_output(out)
    if report is None:
        tail = " | ".join((err or out or "no output").strip().splitlines()[-3:])
        hint = "the probe timed out" if rc == 124 else "the interpreter could not run the probe"
        module.fail_json(msg="%s (%s, exit code %d): %s" % (hint, python, rc, tail), rc=rc, stdout=out, stderr=err)
    return report


def memory_available_mib() -> int | None:
    """MemAvailable, what setup.py's psutil.virtual_memory().available reads."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) // 1024 if match else None


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            python=dict(type="path", required=True),
            min_version=dict(type="str", default=fa.DEFAULT_MIN_VERSION),
            wheel_version=dict(type="str", default=fa.DEFAULT_WHEEL_VERSION),
            run_kernel=dict(type="bool", default=False),
            environment=dict(type="dict", default={}),
            timeout=dict(type="int", default=300),
            fail_on_problem=dict(type="bool", default=False),
            capabilities=dict(type="list", elements="str", default=[]),
            cuda_archs=dict(type="list", elements="str", default=[]),
            arch_list=dict(type="str"),
            max_jobs=dict(type="int", default=0),
        ),
        supports_check_mode=True,
    )
    python = module.params["python"]
    wheel_version = module.params["wheel_version"].lstrip("v")
    cuda_archs = module.params["cuda_archs"]
    if module.params["arch_list"]:
        module.deprecate(
            "arch_list (the role's tabbyapi_flash_attn_arch_list) names TORCH_CUDA_ARCH_LIST, which flash-attn's "
            "setup.py ignores; use cuda_archs (tabbyapi_flash_attn_cuda_archs) with FLASH_ATTN_CUDA_ARCHS values "
            "such as 120 or 90",
            version="0.3.0",
            collection_name="llmstack.inference",
        )
        cuda_archs = cuda_archs or [item for item in re.split(r"[;, ]+", module.params["arch_list"]) if item]
    report = run_probe(module)
    wheel = fa.recommend_wheel(report, wheel_version)
    problem, message = fa.diagnose(report, module.params["min_version"], wheel, python)
    devices = report.get("devices") or []
    installed = report.get("flash_attn_version") or report.get("flash_attn_dist_version")

    if (
        problem == "ok"
        and not module.params["run_kernel"]
        and any(d["capability"].split(".")[0] in ("10", "12") for d in devices)
        and not fa.version_at_least(installed, "2.8.0")
    ):
        module.warn(
            "flash-attn %s predates the first release wheels with Blackwell kernels (2.8.0); run with run_kernel=true "
            "to find out whether this build has them" % installed
        )

    result = dict(
        changed=False,
        problem=problem,
        message=message,
        python_tag=report.get("python_tag"),
        python_version=report.get("python_version"),
        machine=report.get("machine"),
        torch_version=report.get("torch_version"),
        torch_cuda_version=report.get("torch_cuda"),
        cxx11abi=report.get("cxx11abi"),
        cuda_available=bool(report.get("cuda_available")),
        devices=devices,
        device_capability=devices[0]["capability"] if devices else None,
        flash_attn_version=installed,
        flash_attn_error=report.get("flash_attn_error"),
        kernel_ok=report.get("kernel_ok"),
        recommended_wheel=wheel,
        wheel_refusal=fa.wheel_refusal(wheel, python),
        source_build=fa.source_build(
            report,
            wheel_version,
            python,
            capabilities=module.params["capabilities"],
            cuda_archs=cuda_archs,
            memory_available_mib=memory_available_mib(),
            cpus=os.cpu_count(),
            max_jobs=module.params["max_jobs"],
        ),
    )
    if module.params["fail_on_problem"] and problem != "ok":
        module.fail_json(msg=message, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
