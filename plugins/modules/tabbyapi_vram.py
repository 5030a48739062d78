#!/usr/bin/python
# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tabbyapi_vram
short_description: Estimate the VRAM of TabbyAPI's EXL2/EXL3 models per GPU and refuse what does not fit
version_added: 0.1.0
description:
  - Reads each model folder's C(config.json) (layers, hidden size, heads, KV heads, head_dim, vocab,
    MLP/MoE sizes and C(quantization_config.bits)/C(head_bits)) and estimates, per GPU, what TabbyAPI
    needs to load it with its settings (max_seq_len, cache_mode, cache_size, gpu_split or autosplit
    with autosplit_reserve, tensor_parallel, chunk_size) and its draft model (own weights, own cache).
  - The estimate is weights + cache + draft + overhead (CUDA context and chunk_size scratch per GPU);
    the autosplit reserve is added per GPU as the loader keeps it free. The terms and their sources
    are in the collection's C(plugins/module_utils/_exl_vram.py).
  - A model with O(models[].vram_mib) is reported with that figure, not estimated.
  - Fails before any load, with the numbers, when a model does not fit (unless O(fail_on_misfit=false)).
  - Only reads; never changes the host.
author:
  - llmstack maintainers (@llmstack)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: The module only reads files and nvidia-smi, so it estimates the same in check mode.
  diff_mode:
    support: none
  platform:
    platforms: posix
options:
  model_dir:
    description: TabbyAPI's C(model_dir); O(models[].name) and O(models[].draft.name) are folders under it.
    type: path
    required: true
  models:
    description:
      - The node's TabbyAPI models (the role's normalised C(tabbyapi_models)). Settings keys are TabbyAPI's
        own C(config.yml) C(model:) keys; draft keys drop the C(draft_) prefix.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: Folder under O(model_dir), may be nested (C(exl3/Llama-3.1-70B/4.0bpw)).
        type: str
        required: true
      id:
        description: Client id, the key of RV(models). Default the folder's basename.
        type: str
      max_seq_len:
        description: C(max_seq_len); unset or V(-1) follows TabbyAPI's default for the backend.
        type: int
      cache_mode:
        description: C(FP16), C(Q8), C(Q6), C(Q4), or for exllamav3 a C(K,V) bit pair such as C(8,8).
        type: str
      cache_size:
        description: Cache tokens (default max_seq_len), rounded up to 256 as the loaders do.
        type: int
      gpu_split:
        description: GB per GPU (TabbyAPI's unit, 1024^3 bytes). For exllamav2 it budgets the weights only
          (the cache comes on top); for exllamav3 everything the model allocates.
        type: list
        elements: float
      gpu_split_auto:
        description: Autosplit (TabbyAPI's default when several GPUs are visible and no gpu_split is given).
        type: bool
      autosplit_reserve:
        description: MiB kept free per GPU by the autosplit loader (TabbyAPI default C([96])).
        type: list
        elements: float
      tensor_parallel:
        description: Tensor parallel; the estimate then shares weights and cache in proportion to gpu_split or GPU size.
        type: bool
      chunk_size:
        description: Prompt chunk (default 2048); scratch scales with it.
        type: int
      vram_mib:
        description: Measured need in MiB; the model is reported with it and not estimated.
        type: int
      draft:
        description: Draft model, keys without the C(draft_) prefix.
        type: dict
        suboptions:
          name:
            description: Folder under O(model_dir).
            type: str
            required: true
          cache_mode:
            description: Draft cache mode (default FP16); the draft cache has the main model's cache_size.
            type: str
          gpu_split:
            description: GB per GPU for the draft (default autosplit).
            type: list
            elements: float
  gpus:
    description:
      - Total MiB of each visible GPU, in CUDA order. When omitted, read from C(nvidia-smi) (which also gives
        the free memory reported in RV(gpus)).
    type: list
    elements: int
  devices:
    description:
      - With GPUs read from nvidia-smi, only these (CUDA_VISIBLE_DEVICES-style indexes or C(GPU-) UUIDs), in this order.
    type: list
    elements: str
  generation:
    description:
      - TabbyAPI generation (the role's C(tabbyapi_generation)). V(exl3) (main) refuses exl2 quants;
        unquantized models load with exllamav3 there and with exllamav2 at V(exl2).
      - Default the backend that each model's quant method selects.
    type: str
    choices: [exl2, exl3]
  context_mib:
    description: CUDA context and kernels per GPU used, in MiB (a measured-class constant; see notes).
    type: int
    default: 600
  fail_on_misfit:
    description:
      - Fail when a model does not fit.
      - With V(false) the misfits are only reported (C(fits) false in RV(models)) and warned about.
    type: bool
    default: true
  nvidia_smi_path:
    description: Path of C(nvidia-smi) when O(gpus) is omitted; default looked up in E(PATH).
    type: path
  timeout:
    description:
      - Seconds C(nvidia-smi) may take before it counts as hung (needs C(timeout) from coreutils).
    type: int
    default: 60
notes:
  - The estimate assumes flash-attn (TabbyAPI's paged mode); without it exllamav2 also needs
    chunk_size^2 attention scratch.
  - The CUDA context is not in any source; 600 MiB is the upper end of what a torch process with loaded kernels shows.
seealso:
  - module: llmstack.inference.gpu_facts
  - module: llmstack.inference.model_load
"""

EXAMPLES = r"""
- name: Refuse a TabbyAPI model set that does not fit this node's GPUs
  llmstack.inference.tabbyapi_vram:
    model_dir: /srv/models
    generation: exl2
    models:
      - name: Llama-3.1-70B-Instruct-exl2-3.5bpw
        id: llama70b
        max_seq_len: 32768
        cache_mode: FP16
        draft:
          name: Llama-3.2-1B-Instruct-exl2-4.0bpw
          cache_mode: Q4
  register: vram

- name: Estimate for other GPUs, without failing
  llmstack.inference.tabbyapi_vram:
    model_dir: /srv/models
    models: "{{ tabbyapi_models }}"
    gpus: [32607, 24564]
    fail_on_misfit: false
"""

RETURN = r"""
models:
  description: Per model id, the estimate (or the declared vram_mib) and whether it fits.
  returned: always
  type: dict
  sample:
    llama70b:
      source: estimate
      estimate_mib: 43429
      per_gpu_mib: [32405, 11024]
      weights_mib: 29387
      cache_mib: 10240
      draft_mib: 1718
      overhead_mib: 2084
      fits: true
      fits_free: null
      detail:
        backend: exllamav2
        split: autosplit
        max_seq_len: 32768
        cache_size: 32768
        cache_mode: FP16
        per_gpu:
          - {gpu: 0, need_mib: 32405, capacity_mib: 32607, reserve_mib: 96, layers: [0, 60]}
          - {gpu: 1, need_mib: 11024, capacity_mib: 24564, reserve_mib: 0, layers: [61, 79]}
        problem: null
gpus:
  description: The GPUs estimated against; free and used MiB only when read from nvidia-smi.
  returned: always
  type: list
  elements: dict
  sample: [{index: 0, name: NVIDIA GeForce RTX 5090, total_mib: 32607, free_mib: 32111, used_mib: 2}]
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llmstack.inference.plugins.module_utils import _devices as devmod
from ansible_collections.llmstack.inference.plugins.module_utils import _exl_vram as vram
from ansible_collections.llmstack.inference.plugins.module_utils import _nvidia_smi as smi

SETTINGS = (
    "max_seq_len",
    "cache_mode",
    "cache_size",
    "gpu_split",
    "gpu_split_auto",
    "autosplit_reserve",
    "tensor_parallel",
    "chunk_size",
)


def read_config(model_dir: str, name: str, role: str) -> dict:
    folder = os.path.join(model_dir, name)
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise vram.VramError(
            "%s folder %s: cannot read config.json (%s); check the model's name against model_dir, "
            "finish the download, or set vram_mib for this model to skip the estimate" % (role, folder, exc)
        ) from exc
    return vram.model_shape(config, path)


def query_gpus(module: AnsibleModule) -> list[dict]:
    binary = module.params["nvidia_smi_path"] or module.get_bin_path(
        "nvidia-smi", opt_dirs=["/usr/bin", "/usr/local/nvidia/bin"]
    )
    if not binary:
        module.fail_json(msg="nvidia-smi was not found: give gpus (total MiB per GPU) or install the NVIDIA driver")
    prefix = []
    timeout_bin = module.get_bin_path("timeout")
    if timeout_bin and module.params["timeout"] > 0:
        # KILL after a grace, because a process stuck in the driver may ignore TERM (as gpu_facts does).
        prefix = [timeout_bin, "--kill-after=5", str(module.params["timeout"])]

    def run(*args: str) -> tuple[int, str, str]:
        rc, out, err = module.run_command([*prefix, binary, *args], environ_update={"LC_ALL": "C"})
        return rc, out or "", err or ""

    gpus, reason = smi.query_gpus(run)
    if reason:
        module.fail_json(msg="%s; give gpus (total MiB per GPU) to estimate without nvidia-smi" % reason)
    return gpus


def select(found: list[dict], devices: list[str]) -> list[dict]:
    """The GPUs CUDA would show with CUDA_VISIBLE_DEVICES=devices, in that order."""
    if not devices:
        return found
    chosen = []
    for token in devices:
        match = [g for g in found if str(g["index"]) == token or (g["uuid"] or "") == token]
        if not match:
            raise vram.VramError(
                "device %s is not among the GPUs nvidia-smi lists (%s)"
                % (token, ", ".join(str(g["index"]) for g in found))
            )
        chosen.append(match[0])
    return chosen


def evaluate(params: dict, gpus: list[dict]) -> dict:
    totals = [g["total_mib"] for g in gpus]
    frees = [g.get("free_mib") for g in gpus]
    results = {}
    for entry in params["models"]:
        name = entry.get("name")
        if not name:
            raise vram.VramError("every models entry needs name, the folder under model_dir: %r" % (entry,))
        model_id = entry.get("id") or name.rstrip("/").rsplit("/", 1)[-1]
        if entry.get("vram_mib") is not None:
            need = int(entry["vram_mib"])
            results[model_id] = {
                "source": "vram_mib",
                "estimate_mib": need,
                "per_gpu_mib": [],
                "weights_mib": None,
                "cache_mib": None,
                "draft_mib": None,
                "overhead_mib": None,
                "fits": need <= sum(totals),
                "fits_free": None if None in frees else need <= sum(frees),
                "detail": {
                    "problem": None
                    if need <= sum(totals)
                    else "vram_mib %d exceeds the GPUs' %d MiB" % (need, sum(totals))
                },
            }
            continue
        shape = read_config(params["model_dir"], name, "model %s:" % model_id)
        settings = {key: entry.get(key) for key in SETTINGS if entry.get(key) is not None}
        draft_shape = None
        if entry.get("draft"):
            draft = entry["draft"]
            if not draft.get("name"):
                raise vram.VramError("model %s: draft needs name, the draft folder under model_dir" % model_id)
            draft_shape = read_config(params["model_dir"], draft["name"], "model %s: draft" % model_id)
            settings["draft"] = draft
        result = vram.estimate(shape, settings, totals, draft_shape, params["generation"], params["context_mib"])
        result = {"source": "estimate", **result}
        per_gpu = result["detail"]["per_gpu"]
        result["fits_free"] = (
            None
            if None in frees
            # A model that does not fit the GPUs' size cannot fit what is free of them either.
            else result["fits"]
            and all(g["need_mib"] + g["reserve_mib"] <= free for g, free in zip(per_gpu, frees, strict=True))
        )
        for g, free in zip(per_gpu, frees, strict=True):
            g["free_mib"] = free
        results[model_id] = result
    return results


def main() -> None:
    model_spec = dict(
        name=dict(type="str", required=True),
        id=dict(type="str"),
        max_seq_len=dict(type="int"),
        cache_mode=dict(type="str"),
        cache_size=dict(type="int"),
        gpu_split=dict(type="list", elements="float"),
        gpu_split_auto=dict(type="bool"),
        autosplit_reserve=dict(type="list", elements="float"),
        tensor_parallel=dict(type="bool"),
        chunk_size=dict(type="int"),
        vram_mib=dict(type="int"),
        draft=dict(
            type="dict",
            options=dict(
                name=dict(type="str", required=True),
                cache_mode=dict(type="str"),
                gpu_split=dict(type="list", elements="float"),
            ),
        ),
    )
    module = AnsibleModule(
        argument_spec=dict(
            model_dir=dict(type="path", required=True),
            models=dict(type="list", elements="dict", required=True, options=model_spec),
            gpus=dict(type="list", elements="int"),
            devices=dict(type="list", elements="str"),
            generation=dict(type="str", choices=["exl2", "exl3"]),
            context_mib=dict(type="int", default=vram.CONTEXT_MIB),
            fail_on_misfit=dict(type="bool", default=True),
            nvidia_smi_path=dict(type="path"),
            timeout=dict(type="int", default=60),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        if params["gpus"]:
            if params["devices"]:
                raise vram.VramError("devices selects GPUs read from nvidia-smi; with gpus given, list only those GPUs")
            gpus = [
                {"index": i, "name": None, "total_mib": total, "free_mib": None, "used_mib": None}
                for i, total in enumerate(params["gpus"])
            ]
        else:
            tokens = devmod.parse_devices(params["devices"])
            found = [
                {
                    "index": g["index"],
                    "name": g["name"],
                    "uuid": g["uuid"],
                    "total_mib": g["memory_total_mib"],
                    "free_mib": g["memory_free_mib"],
                    "used_mib": g["memory_used_mib"],
                }
                for g in query_gpus(module)
            ]
            gpus = select(found, tokens)
            if not gpus or any(g["total_mib"] is None for g in gpus):
                raise vram.VramError(
                    "nvidia-smi reports no memory size for these GPUs (unified memory?): give gpus in MiB"
                )
        results = evaluate(params, gpus)
    except (vram.VramError, devmod.DeviceError) as exc:
        module.fail_json(msg=str(exc))
    misfits = [
        vram.misfit_message(model_id, r) if r["source"] == "estimate" else "%s: %s" % (model_id, r["detail"]["problem"])
        for model_id, r in results.items()
        if not r["fits"]
    ]
    if misfits and params["fail_on_misfit"]:
        module.fail_json(msg="; ".join(misfits), models=results, gpus=gpus)
    for message in misfits:
        module.warn(message)
    module.exit_json(changed=False, models=results, gpus=gpus)


if __name__ == "__main__":
    main()
