# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""VRAM estimate for EXL2/EXL3 models as TabbyAPI loads them (private to this collection).

Pure functions: a model folder's config.json (as a dict), the TabbyAPI load settings and the GPUs'
sizes in, MiB per GPU out. Every term follows the loader that TabbyAPI calls; the facts come from
TabbyAPI at the two commits the tabbyapi role pins (exl2 generation 79126f90, main e632af41),
exllamav2 0.3.2 and exllamav3 (the mirrors' sources are named next to each term):

- weights: decoder linears at ``quantization_config.bits`` (the converter's average over the decoder
  layers, scales included); the output head at ``head_bits`` (EXL2: the effective rate of
  exllamav2 conversion/qparams.py qparams_headoptions; EXL3: exactly head_bits, 16 = FP16); norms at
  FP16. The token embedding stays in system RAM in both (exllamav2 model.py set_device_map
  embed_cpu=True and load_autosplit_gen's module 0 on CPU; exllamav3 modules/embedding.py
  prefer_cpu), so it costs no VRAM.
- cache: cache_size tokens x layers x kv_heads x head_dim x bytes per element of cache_mode
  (exllamav2 cache.py: FP16 2+2 B, Q4/Q6/Q8 packed bytes + an FP16 scale per 32 values, plus one
  full-length FP16 K/V layer per device as dequant temp; exllamav3 cache/quant.py: k_bits/8 +
  v_bits/8 + two FP16 scales per 32 values, cache/fp16.py 2+2 B).
- draft: its own weights plus its own cache of the MAIN model's cache_size in draft_cache_mode
  (exllamav2 backend create_cache(max_seq_len=self.cache_size); exllamav3 backend create_cache uses
  self.cache_size for both).
- overhead per GPU used: the CUDA context (a constant, see CONTEXT_MIB) plus scratch that scales with
  chunk_size (hidden state, q/k/v, MLP intermediates, the mask and rope tables of exllamav2
  set_device_map, the logits of the last device).
- reserve: what the autosplit loader leaves free on each GPU (TabbyAPI autosplit_reserve in MiB,
  default [96]; exllamav2 gets 0 on GPUs past the list, exllamav3 model.py load_gen pads with 0.5 GB).
"""

from __future__ import annotations

import math

MIB = 1024 * 1024

# CUDA context + torch/cuBLAS handles + the loaded extension kernels, per GPU that holds anything.
# Not in any source: the figure nvidia-smi shows for a torch process that has touched a GPU and
# loaded kernels (~300-600 MiB on Ampere..Blackwell with CUDA's lazy module loading); the upper end
# is taken so that the estimate errs towards refusing. The module's context_mib option overrides it.
CONTEXT_MIB = 600

# Effective bits of an EXL2 head: sum(bits * proportion) + scale_bits / group_size of
# exllamav2 conversion/qparams.py qparams_headoptions (e.g. 6: 0.15*8 + 0.85*6 + 4/128).
EXL2_HEAD_BITS = {2: 2.725, 3: 3.275, 4: 4.425, 5: 5.18125, 6: 6.33125, 8: 8.03125, 16: 16.0}
DEFAULT_HEAD_BITS = 6  # both converters' default (convert_exl2.py / convert_model.py -hb)

# Bytes per cached element (one K or one V value). exllamav2 cache.py ExLlamaV2Cache_Q4/Q6/Q8:
# uint8 tensors of head_dim // weights_per_byte (Q4 2/2, Q6 K 1 V 2, Q8 1/1) + FP16 scales per 32.
_EXL2_CACHE = {"FP16": (2.0, 2.0), "Q8": (1.0625, 1.0625), "Q6": (1.0625, 0.5625), "Q4": (0.5625, 0.5625)}
_LEGACY_PAIRS = {"Q4": (4, 4), "Q6": (6, 6), "Q8": (8, 8)}  # exllamav3 backend create_cache

# TabbyAPI defaults (common/config_models.py and the backends' unwrap() defaults).
DEFAULT_CHUNK_SIZE = 2048
DEFAULT_RESERVE_MIB = 96
EXL3_UNLISTED_RESERVE_MIB = 512  # exllamav3 load_gen: reserve_per_device padded with 0.5 (GB)
PAGE = 256  # cache sizes are rounded up to 256 tokens (exllamav2 adjust_cache_size, exllamav3 PAGE_SIZE)


class VramError(ValueError):
    """Input the estimate cannot use; the message names the fix."""


def _get(cfg: dict, text: dict, key: str, default=None):
    # Multimodal configs (Llama 4, Gemma 3, Qwen-VL) keep the language model's keys in text_config.
    if key in text and text[key] is not None:
        return text[key]
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    return default


def model_shape(config: dict, where: str = "config.json") -> dict:
    """The numbers the estimate needs from a model's config.json dict."""
    if not isinstance(config, dict):
        raise VramError("%s is not a JSON object" % where)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    missing = [
        k
        for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
        if _get(config, text, k) is None
    ]
    if missing:
        raise VramError(
            "%s lacks %s: it is not a transformers model config (set vram_mib for this model to skip the estimate)"
            % (where, ", ".join(missing))
        )
    layers = int(_get(config, text, "num_hidden_layers"))
    hidden = int(_get(config, text, "hidden_size"))
    heads = int(_get(config, text, "num_attention_heads"))
    kv_heads = int(_get(config, text, "num_key_value_heads", heads))
    head_dim = int(_get(config, text, "head_dim") or hidden // heads)
    experts = int(
        _get(config, text, "num_experts")
        or _get(config, text, "num_local_experts")
        or _get(config, text, "n_routed_experts")
        or 0
    )
    intermediate = int(_get(config, text, "intermediate_size", 4 * hidden))
    moe_intermediate = int(_get(config, text, "moe_intermediate_size") or intermediate) if experts else 0
    # Shared experts: Qwen2/3-MoE name their size, DeepSeek counts experts of moe_intermediate_size.
    shared = int(_get(config, text, "shared_expert_intermediate_size") or 0)
    if not shared and experts:
        shared = int(_get(config, text, "n_shared_experts") or 0) * moe_intermediate
    dense_layers = layers
    if experts:
        dense_layers = int(_get(config, text, "first_k_dense_replace") or 0) + len(
            _get(config, text, "mlp_only_layers") or []
        )
    qcfg = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else {}
    method = qcfg.get("quant_method")
    if method in ("exl2", "exl3"):
        if not isinstance(qcfg.get("bits"), (int, float)) or isinstance(qcfg.get("bits"), bool):
            raise VramError("%s: quantization_config.bits is missing or not a number" % where)
        bits = float(qcfg["bits"])
        head_bits = int(qcfg.get("head_bits") or DEFAULT_HEAD_BITS)
    elif method is None:
        bits, head_bits = 16.0, 16  # unquantized FP16/BF16 (exllamav3 loads these too)
    else:
        raise VramError(
            "%s: quant_method %r is neither exl2 nor exl3: TabbyAPI's exllama backends cannot load it "
            "(set vram_mib to skip the estimate)" % (where, method)
        )
    return {
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": int(_get(config, text, "vocab_size")),
        "intermediate": intermediate,
        "experts": experts,
        "experts_per_token": int(_get(config, text, "num_experts_per_tok") or 0),
        "moe_intermediate": moe_intermediate,
        "shared_intermediate": shared,
        "dense_layers": min(dense_layers, layers),
        "tie_word_embeddings": bool(_get(config, text, "tie_word_embeddings", False)),
        "max_position_embeddings": _get(config, text, "max_position_embeddings"),
        "quant_method": method,
        "bits": bits,
        "head_bits": head_bits,
    }


def backend_for(shape: dict, generation: str | None = None) -> str:
    """exllamav2 or exllamav3, as TabbyAPI picks it (common/model.py detect_backend / validate_backend)."""
    if shape["quant_method"] == "exl3":
        return "exllamav3"
    if shape["quant_method"] == "exl2":
        if generation == "exl3":
            raise VramError(
                "an exl2 model cannot load on TabbyAPI main (exl3 generation): its common/model.py refuses "
                "exl2 quants; use an exl3 quant or tabbyapi_generation exl2"
            )
        return "exllamav2"
    return "exllamav2" if generation == "exl2" else "exllamav3"


def _round_up(value: int, step: int) -> int:
    return (value + step - 1) // step * step


def context_lengths(shape: dict, backend: str, settings: dict) -> tuple[int, int]:
    """(max_seq_len, cache_size in tokens) as the backend resolves them."""
    mpe = shape["max_position_embeddings"]
    user_len = settings.get("max_seq_len")
    if user_len == -1:  # common/model.py: -1 means the model's own max_position_embeddings
        user_len = mpe or 4096
    user_cache = settings.get("cache_size")
    if backend == "exllamav2":
        # backends/exllamav2/model.py (paged mode): cache = cache_size or max_seq_len or 4096, then
        # max_seq_len = given or min(max_position_embeddings, cache_size), capped at the cache.
        cache = _round_up(int(user_cache or user_len or 4096), PAGE)
        seq = int(user_len or min(mpe or 4096, cache))
        return min(seq, cache), cache
    # backends/exllamav3/model.py: max_seq_len = given or max_position_embeddings or 8192;
    # cache_size = given or max_seq_len.
    seq = int(user_len or mpe or 8192)
    cache = _round_up(int(user_cache or seq), PAGE)
    return min(seq, cache), cache


def cache_element_bytes(backend: str, cache_mode) -> tuple[float, float, bool]:
    """(K bytes, V bytes, quantized) per cached element for a TabbyAPI cache_mode."""
    mode = str(cache_mode or "FP16").replace(" ", "").upper()
    if backend == "exllamav2":
        if mode not in _EXL2_CACHE:
            raise VramError("cache_mode %r is not an exllamav2 cache mode: use FP16, Q8, Q6 or Q4" % cache_mode)
        k, v = _EXL2_CACHE[mode]
        return k, v, mode != "FP16"
    if mode == "FP16":
        return 2.0, 2.0, False
    pair = _LEGACY_PAIRS.get(mode)
    if pair is None:
        parts = mode.split(",")
        if len(parts) != 2 or not all(p.isdigit() and 2 <= int(p) <= 8 for p in parts):
            raise VramError(
                "cache_mode %r is not an exllamav3 cache mode: use FP16, Q4/Q6/Q8 or 'K,V' bits 2..8 such as '8,8'"
                % cache_mode
            )
        pair = (int(parts[0]), int(parts[1]))
    # exllamav3 cache/quant.py: token_dim // 32 * bits int32 words + one FP16 scale per 32 values.
    return pair[0] / 8 + 1 / 16, pair[1] / 8 + 1 / 16, True


def layer_weight_bytes(shape: dict, layer: int) -> float:
    """Bytes of one decoder layer's weights on the GPU."""
    h, hd = shape["hidden"], shape["head_dim"]
    attn = h * hd * (shape["heads"] + 2 * shape["kv_heads"]) + shape["heads"] * hd * h
    if shape["experts"] and layer >= shape["dense_layers"]:
        mlp = 3 * h * (shape["experts"] * shape["moe_intermediate"] + shape["shared_intermediate"])
        router = h * shape["experts"] * 2  # the router gate stays FP16
    else:
        mlp = 3 * h * shape["intermediate"]
        router = 0
    return (attn + mlp) * shape["bits"] / 8 + router + 2 * h * 2  # + two FP16 norms


def head_bytes(shape: dict) -> float:
    bits = shape["head_bits"]
    if shape["quant_method"] == "exl2":
        bits = EXL2_HEAD_BITS.get(bits, bits + 0.33)
    return shape["vocab"] * shape["hidden"] * bits / 8 + shape["hidden"] * 2


def cache_layer_bytes(shape: dict, tokens: int, k_bytes: float, v_bytes: float) -> float:
    return tokens * shape["kv_heads"] * shape["head_dim"] * (k_bytes + v_bytes)


def scratch_bytes(shape: dict, backend: str, chunk: int, max_seq_len: int) -> float:
    """Activations for one chunk of chunk_size tokens on a GPU that holds layers of this model."""
    h, hd = shape["hidden"], shape["head_dim"]
    mlp_width = shape["intermediate"]
    if shape["experts"]:
        mlp_width = max(
            mlp_width if shape["dense_layers"] else 0,
            shape["moe_intermediate"] * max(shape["experts_per_token"], 1) + shape["shared_intermediate"],
        )
    states = 2 * chunk * h * 2  # residual + normed hidden state, FP16
    qkv = chunk * hd * (2 * shape["heads"] + 2 * shape["kv_heads"]) * 2  # q, k, v and attention output
    mlp = 2 * chunk * mlp_width * 2  # gate and up intermediates
    total = states + qkv + mlp
    if backend == "exllamav2":
        # model.py set_device_map: rope sin/cos (head_dim * max_seq_len * 2 * 2 B) and the mask (chunk^2 * 2 B).
        total += hd * max_seq_len * 4 + chunk * chunk * 2
    return total


def _chunk(settings: dict, max_seq_len: int, backend: str) -> int:
    chunk = int(settings.get("chunk_size") or DEFAULT_CHUNK_SIZE)
    if backend == "exllamav2":
        chunk = sorted((256, chunk, max_seq_len))[1]  # exllamav2 backend clamps to [256, max_seq_len]
    return _round_up(max(256, chunk), 256)


def model_blocks(shape: dict, backend: str, cache_tokens: int, cache_mode, chunk: int, max_seq_len: int) -> dict:
    """Weights and cache per layer in load order, plus the head, the scratch and the cache temp."""
    k_bytes, v_bytes, quantized = cache_element_bytes(backend, cache_mode)
    per_layer_cache = cache_layer_bytes(shape, cache_tokens, k_bytes, v_bytes)
    layers = [(layer_weight_bytes(shape, i), per_layer_cache) for i in range(shape["layers"])]
    # Logits of the last device: exllamav3 load_gen max_output_size=32 tokens, FP32, + one sampling copy.
    logits = 32 * shape["vocab"] * 4 * 2
    return {
        "layers": layers,
        "head": head_bytes(shape),
        "logits": logits,
        "scratch": scratch_bytes(shape, backend, chunk, max_seq_len),
        # One full-length FP16 K and V layer per device for a quantized cache (exllamav2 cache.py
        # ExLlamaV2Cache_Q.touch_device; exllamav3 cache/quant.py get_kv dequant temporaries).
        "cache_temp": cache_layer_bytes(shape, cache_tokens, 2.0, 2.0) if quantized else 0.0,
        "embedding_host": shape["vocab"] * shape["hidden"] * 2,
    }


def _reserve_list(backend: str, reserve_mib, count: int) -> list[int]:
    values = list(reserve_mib) if reserve_mib not in (None, []) else [DEFAULT_RESERVE_MIB]
    pad = 0 if backend == "exllamav2" else EXL3_UNLISTED_RESERVE_MIB
    values = [float(v) for v in values[:count]] + [pad] * max(0, count - len(values))
    return [math.ceil(v) for v in values]


class _Device:
    def __init__(self, index: int, capacity: int) -> None:
        self.index = index
        self.capacity = capacity * MIB
        self.weights = 0.0
        self.cache = 0.0
        self.draft = 0.0
        self.overhead = 0.0
        self.layers: list[int] = []

    def used(self) -> float:
        return self.weights + self.cache + self.draft + self.overhead


def _place(devices, blocks, budgets, cache_counts, is_draft, overhead_on, label):
    """Fill devices in order with (weights, cache) layers as the autosplit/manual loaders do.

    budgets[i]: bytes this model may still put on device i; a layer's cache counts against it when
    cache_counts (exllamav2 manual split leaves the cache outside the split). A device that is
    touched gets the model's scratch (and cache temp) first. Returns an error string or None.
    """
    i = 0
    touched: set[int] = set()
    items = [(w, c, n) for n, (w, c) in enumerate(blocks["layers"])] + [
        (blocks["head"] + blocks["logits"], 0.0, "head")
    ]
    for weight, cache, number in items:
        while True:
            if i >= len(devices):
                return (
                    "%s: no GPU left for %s after GPU %d (the loader fails for lack of VRAM; exllamav2 "
                    "says 'Insufficient VRAM for model and cache')"
                    % (label, "layer %d" % number if number != "head" else "the output head", len(devices) - 1)
                )
            fixed = 0.0 if i in touched else blocks["scratch"] + blocks["cache_temp"]
            need = weight + (cache if cache_counts else 0.0) + fixed
            if need <= budgets[i]:
                break
            i += 1
        dev = devices[i]
        if i not in touched:
            touched.add(i)
            overhead_on.add(i)
            budgets[i] -= fixed
            dev.overhead += fixed
        budgets[i] -= weight + (cache if cache_counts else 0.0)
        if is_draft:
            dev.draft += weight + cache
        else:
            dev.weights += weight
            dev.cache += cache
            if number != "head":
                dev.layers.append(number)
    return None


def estimate(
    shape: dict,
    settings: dict,
    gpus_mib: list[int],
    draft_shape: dict | None = None,
    generation: str | None = None,
    context_mib: int = CONTEXT_MIB,
) -> dict:
    """Estimate one TabbyAPI model (+ draft) on GPUs of gpus_mib total MiB each."""
    if not gpus_mib:
        raise VramError("no GPU sizes: give gpus (MiB per GPU) or run on a host where nvidia-smi lists GPUs")
    backend = backend_for(shape, generation)
    max_seq_len, cache_tokens = context_lengths(shape, backend, settings)
    chunk = _chunk(settings, max_seq_len, backend)
    count = len(gpus_mib)
    devices = [_Device(i, size) for i, size in enumerate(gpus_mib)]
    split = [float(v) for v in settings.get("gpu_split") or []]
    tp = bool(settings.get("tensor_parallel")) and count > 1
    # Backends: one visible GPU disables the split; a gpu_split list switches autosplit off.
    if count == 1:
        mode = "single"
    elif tp:
        mode = "tensor_parallel"
    elif split:
        mode = "manual"
    elif settings.get("gpu_split_auto", True) is False:
        mode = "single"  # no split and no autosplit: the loaders put everything on GPU 0
    else:
        mode = "autosplit"
    reserve = (
        _reserve_list(backend, settings.get("autosplit_reserve"), count)
        if mode in ("autosplit", "single")
        else [0] * count
    )
    if mode == "single" and backend == "exllamav2":
        reserve = [0] * count  # exllamav2 load_gen([99999]) on one GPU: no reserve
    ctx = context_mib * MIB
    free_for_models = [d.capacity - ctx - r * MIB for d, r in zip(devices, reserve, strict=True)]
    overhead_on: set[int] = set()
    error = None
    main = model_blocks(shape, backend, cache_tokens, settings.get("cache_mode"), chunk, max_seq_len)

    draft = None
    if draft_shape is not None:
        draft_settings = settings.get("draft") or {}
        draft_backend = backend_for(draft_shape, generation)
        draft = model_blocks(
            draft_shape, draft_backend, cache_tokens, draft_settings.get("cache_mode"), chunk, max_seq_len
        )
        draft_split = [float(v) for v in draft_settings.get("gpu_split") or []]
        if draft_split and count > 1:
            budgets = [v * 1024 * MIB for v in draft_split[:count]] + [0.0] * max(0, count - len(draft_split))
            cache_counts = draft_backend == "exllamav3"
        else:
            budgets = list(free_for_models)  # the draft autosplits first, from GPU 0
            cache_counts = True
        error = _place(devices, draft, budgets, cache_counts, True, overhead_on, "draft model")

    if error is None:
        if mode == "tensor_parallel":
            weights = sum(w for w, _c in main["layers"]) + main["head"] + main["logits"]
            cache = sum(c for _w, c in main["layers"])
            shares = split[:count] if split else [float(d.capacity) for d in devices]
            total_share = sum(shares) or 1.0
            for dev, share in zip(devices, shares + [0.0] * (count - len(shares)), strict=False):
                part = share / total_share
                if part <= 0:
                    continue
                dev.weights += weights * part
                dev.cache += cache * part
                dev.overhead += main["scratch"] + main["cache_temp"] * part
                dev.layers = list(range(shape["layers"]))
                overhead_on.add(dev.index)
        elif mode == "manual":
            budgets = [v * 1024 * MIB for v in split[:count]] + [0.0] * max(0, count - len(split))
            if backend == "exllamav3":
                # exllamav3 use_per_device caps every torch allocation of the model on that GPU.
                budgets = [b - d.draft for b, d in zip(budgets, devices, strict=True)]
            error = _place(devices, main, budgets, backend == "exllamav3", False, overhead_on, "model")
        else:
            budgets = [f - d.used() for f, d in zip(free_for_models, devices, strict=True)]
            if mode == "single":
                budgets = [budgets[0]] + [0.0] * (count - 1)
            error = _place(devices, main, budgets, True, False, overhead_on, "model")

    for i in overhead_on:
        devices[i].overhead += ctx
    per_gpu = []
    for dev, res in zip(devices, reserve, strict=True):
        need = dev.used()
        per_gpu.append(
            {
                "gpu": dev.index,
                "need_mib": _mib(need),
                "capacity_mib": dev.capacity // MIB,
                "reserve_mib": res if dev.index in overhead_on else 0,
                "weights_mib": _mib(dev.weights),
                "cache_mib": _mib(dev.cache),
                "draft_mib": _mib(dev.draft),
                "overhead_mib": _mib(dev.overhead),
                "layers": [dev.layers[0], dev.layers[-1]] if dev.layers else [],
            }
        )
    over = [g for g in per_gpu if g["need_mib"] + g["reserve_mib"] > g["capacity_mib"]]
    if error is None and over:
        error = "; ".join(
            "GPU %d needs %d MiB + %d MiB reserve of %d MiB"
            % (g["gpu"], g["need_mib"], g["reserve_mib"], g["capacity_mib"])
            for g in over
        )
    weights = sum(d.weights for d in devices)
    cache = sum(d.cache for d in devices)
    draft_total = sum(d.draft for d in devices)
    overhead = sum(d.overhead for d in devices)
    full_weights = sum(w for w, _c in main["layers"]) + main["head"] + main["logits"]
    full_cache = sum(c for _w, c in main["layers"])
    if error is not None:
        # A failed placement leaves layers out: report what the whole model needs.
        weights, cache = full_weights, full_cache
        if draft is not None:
            draft_total = sum(w + c for w, c in draft["layers"]) + draft["head"] + draft["logits"]
    return {
        "estimate_mib": _mib(weights + cache + draft_total + overhead),
        "per_gpu_mib": [g["need_mib"] for g in per_gpu],
        "weights_mib": _mib(weights),
        "cache_mib": _mib(cache),
        "draft_mib": _mib(draft_total),
        "overhead_mib": _mib(overhead),
        "fits": error is None,
        "detail": {
            "backend": backend,
            "split": mode,
            "quant_method": shape["quant_method"],
            "bits": shape["bits"],
            "head_bits": shape["head_bits"],
            "max_seq_len": max_seq_len,
            "cache_size": cache_tokens,
            "cache_mode": str(settings.get("cache_mode") or "FP16"),
            "chunk_size": chunk,
            "context_mib": context_mib,
            "embedding_host_mib": _mib(main["embedding_host"]),
            "per_gpu": per_gpu,
            "problem": error,
        },
    }


def _mib(value: float) -> int:
    return math.ceil(value / MIB)


def misfit_message(model_id: str, result: dict) -> str:
    """One line with the numbers: what the model needs, per GPU against capacity, and the way out."""
    detail = result["detail"]
    gpus = ", ".join(
        "GPU %d %d MiB (+%d reserve) of %d" % (g["gpu"], g["need_mib"], g["reserve_mib"], g["capacity_mib"])
        for g in detail["per_gpu"]
    )
    return (
        "%s does not fit: weights %d + cache %d (%d tokens %s) + draft %d + overhead %d = %d MiB; per GPU: %s; %s. "
        "Lower cache_size/max_seq_len, quantize the cache (Q4/Q8 or '4,4'), pick a lower bpw, drop the draft, "
        "or set vram_mib if you measured it"
        % (
            model_id,
            result["weights_mib"],
            result["cache_mib"],
            detail["cache_size"],
            detail["cache_mode"],
            result["draft_mib"],
            result["overhead_mib"],
            result["estimate_mib"],
            gpus,
            detail["problem"],
        )
    )
