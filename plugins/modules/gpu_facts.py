#!/usr/bin/python
# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_facts
short_description: Gather NVIDIA GPU facts from nvidia-smi
version_added: 0.1.0
description:
  - Runs C(nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits), FIELDS being
    C(index,name,uuid,memory.total,memory.used,memory.free,compute_cap,driver_version,pci.bus_id),
    and C(nvidia-smi -q -d COMPUTE), and returns one entry per GPU plus totals,
    the driver version, the highest CUDA version the driver supports and the architecture families.
  - Drivers too old to know C(compute_cap) are queried without it; the compute capability is then
    inferred from the product name (RV(ansible_facts.llmstack_gpus[].compute_capability_source) says which).
  - A host without C(nvidia-smi), without a working driver or without GPUs is not an error (unless
    O(require_gpu=true)); it gets RV(ansible_facts.llmstack_gpu_count=0) and RV(ansible_facts.llmstack_gpu_reason).
  - Only reads; never changes the host.
author:
  - llmstack maintainers (@llmstack)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.facts
attributes:
  check_mode:
    support: full
    details: The module only reads, so it gathers the same facts in check mode.
  diff_mode:
    support: none
  facts:
    support: full
  platform:
    platforms: posix
options:
  nvidia_smi_path:
    description:
      - Path of the C(nvidia-smi) binary.
      - By default it is looked up in E(PATH) and the usual system directories.
    type: path
  timeout:
    description:
      - Seconds each C(nvidia-smi) run may take before it counts as hung (a wedged driver can block it for minutes).
      - Needs C(timeout) from coreutils on the host; without it nvidia-smi runs unbounded.
    type: int
    default: 60
  require_gpu:
    description:
      - Fail, with the reason, when no GPU can be reported.
    type: bool
    default: false
notes:
  - The CUDA version is the highest one the driver supports (the C(nvidia-smi) header), not a CUDA toolkit on the host.
seealso:
  - module: llmstack.inference.flash_attn_check
"""

EXAMPLES = r"""
- name: Gather GPU facts
  llmstack.inference.gpu_facts:

- name: Refuse to go on without a Blackwell-capable driver
  ansible.builtin.assert:
    that:
      - not ansible_facts.llmstack_gpu_has_blackwell
        or (ansible_facts.llmstack_gpu_driver_version is version('570', '>=')
            and ansible_facts.llmstack_gpu_cuda_version is version('12.8', '>='))
    fail_msg: Blackwell GPUs need driver >= 570 and CUDA >= 12.8

- name: Fail clearly on a node that must have GPUs
  llmstack.inference.gpu_facts:
    nvidia_smi_path: /usr/bin/nvidia-smi
    require_gpu: true
"""

RETURN = r"""
ansible_facts:
  description: GPU facts.
  returned: always
  type: dict
  contains:
    llmstack_gpus:
      description: One entry per GPU, in nvidia-smi index order.
      type: list
      elements: dict
      returned: always
      sample:
        - index: 0
          name: NVIDIA GeForce RTX 5090
          uuid: GPU-6d3c0b8e-2a9f-7c41-5e1d-93b0a4f7c2e8
          memory_total_mib: 32607
          memory_used_mib: 2
          memory_free_mib: 32111
          compute_capability: "12.0"
          compute_capability_source: nvidia-smi
          sm: "120"
          architecture: Blackwell
          driver_version: 570.153.02
          pci_bus_id: "00000000:01:00.0"
      contains:
        index:
          description: nvidia-smi index.
          type: int
        name:
          description: Product name.
          type: str
        uuid:
          description: GPU UUID (C(GPU-...)), stable across reboots unlike the index.
          type: str
        memory_total_mib:
          description: Total memory in MiB; null where nvidia-smi reports none (unified-memory parts).
          type: int
        memory_used_mib:
          description: Used memory in MiB, or null.
          type: int
        memory_free_mib:
          description: Free memory in MiB, or null.
          type: int
        compute_capability:
          description: Compute capability such as C(8.9) or C(12.0), or null when neither the driver nor the name tells.
          type: str
        compute_capability_source:
          description: C(nvidia-smi), C(name) (inferred from the product name on old drivers) or null.
          type: str
        sm:
          description: The capability as a CUDA arch number (C(120) for sm_120).
          type: str
        architecture:
          description: Family (Volta, Turing, Ampere, Ada, Hopper, Blackwell, ...) or C(unknown).
          type: str
        driver_version:
          description: Driver version reported for this GPU.
          type: str
        pci_bus_id:
          description: PCI bus id.
          type: str
    llmstack_gpu_count:
      description: Number of GPUs; 0 when none could be reported.
      type: int
      returned: always
      sample: 2
    llmstack_gpu_memory_total_mib:
      description: Sum of the GPUs' total memory in MiB (null when no GPU reports it).
      type: int
      returned: always
      sample: 57171
    llmstack_gpu_memory_used_mib:
      description: Sum of used memory in MiB, or null.
      type: int
      returned: always
      sample: 3
    llmstack_gpu_memory_free_mib:
      description: Sum of free memory in MiB, or null.
      type: int
      returned: always
      sample: 56191
    llmstack_gpu_driver_version:
      description: NVIDIA driver version, or null.
      type: str
      returned: always
      sample: 570.153.02
    llmstack_gpu_cuda_version:
      description: Highest CUDA version the driver supports, or null.
      type: str
      returned: always
      sample: "12.8"
    llmstack_gpu_architectures:
      description: Sorted distinct architecture families.
      type: list
      elements: str
      returned: always
      sample: [Ada, Blackwell]
    llmstack_gpu_compute_capabilities:
      description: Sorted distinct compute capabilities.
      type: list
      elements: str
      returned: always
      sample: ["8.9", "12.0"]
    llmstack_gpu_cuda_arch_list:
      description: The capabilities joined with C(;), the form C(TORCH_CUDA_ARCH_LIST) takes.
      type: str
      returned: always
      sample: 8.9;12.0
    llmstack_gpu_has_blackwell:
      description: Whether any GPU is a Blackwell (compute capability 10.x, 11.x or 12.x).
      type: bool
      returned: always
      sample: true
    llmstack_gpu_reason:
      description: Why no GPU was reported; null when GPUs were found.
      type: str
      returned: always
      sample: nvidia-smi was not found on this host (no NVIDIA driver installed)
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llmstack.inference.plugins.module_utils import _nvidia_smi as smi


class GpuFacts:
    """Runs nvidia-smi through the module and turns its answers into facts."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.timeout_prefix: list[str] = []
        timeout_bin = module.get_bin_path("timeout")
        if timeout_bin and module.params["timeout"] > 0:
            # KILL after a grace, because a process stuck in the driver may ignore TERM.
            self.timeout_prefix = [timeout_bin, "--kill-after=5", str(module.params["timeout"])]

    def run(self, binary: str, *args: str) -> tuple[int, str, str]:
        rc, out, err = self.module.run_command([*self.timeout_prefix, binary, *args], environ_update={"LC_ALL": "C"})
        return rc, out or "", err or ""

    def find_binary(self) -> tuple[str | None, str | None]:
        configured = self.module.params["nvidia_smi_path"]
        if configured:
            if not os.path.exists(configured):
                return (
                    None,
                    "nvidia-smi was not found at %s (set nvidia_smi_path to the driver's nvidia-smi)" % configured,
                )
            if not os.access(configured, os.X_OK):
                return None, "%s is not executable" % configured
            return configured, None
        found = self.module.get_bin_path(
            "nvidia-smi", opt_dirs=["/usr/bin", "/usr/local/nvidia/bin", "/opt/nvidia/bin"]
        )
        if not found:
            return None, "nvidia-smi was not found on this host (no NVIDIA driver installed, or set nvidia_smi_path)"
        return found, None

    def query_gpus(self, binary: str) -> tuple[list[dict], str | None]:
        return smi.query_gpus(lambda *args: self.run(binary, *args))

    def versions(self, binary: str, gpus: list[dict]) -> tuple[str | None, str | None]:
        # `-q -d COMPUTE` keeps the output short; its header carries both versions.
        rc, out, _err = self.run(binary, "-q", "-d", "COMPUTE")
        cuda = smi.parse_cuda_version(out) if rc == 0 else None
        driver = next((gpu["driver_version"] for gpu in gpus if gpu["driver_version"]), None)
        if driver is None and rc == 0:
            driver = smi.parse_driver_version(out)
        if cuda is None:
            rc, out, _err = self.run(binary)
            cuda = smi.parse_cuda_version(out) if rc == 0 else None
        return driver, cuda

    def gather(self) -> dict:
        binary, reason = self.find_binary()
        gpus: list[dict] = []
        driver = cuda = None
        if binary:
            gpus, reason = self.query_gpus(binary)
            if gpus:
                driver, cuda = self.versions(binary, gpus)
        return smi.summarize(gpus, driver, cuda, reason)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            nvidia_smi_path=dict(type="path"),
            timeout=dict(type="int", default=60),
            require_gpu=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    facts = GpuFacts(module).gather()
    if module.params["require_gpu"] and facts["llmstack_gpu_count"] == 0:
        module.fail_json(msg="No GPU found: %s" % facts["llmstack_gpu_reason"], ansible_facts=facts)
    module.exit_json(changed=False, ansible_facts=facts)


if __name__ == "__main__":
    main()
