"""Model folders for the TabbyAPI emulator (which is an emulator for hosts without a GPU).

Stdlib only, so Molecule prepare steps and pytest fixtures can both create model folders. The
config.json carries the fields TabbyAPI and a VRAM estimate read (layers, hidden size, heads,
KV heads, vocab, intermediate size, max_position_embeddings, quantization_config); presets give
real architectures' numbers (no weights, so every folder is a few hundred bytes).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

# Published config.json numbers of the seeds' models (Llama 3.x).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
    },
    "llama-3.1-70b": {
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    },
    "llama-3.1-8b": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    },
    "llama-3.2-1b": {
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
    },
}


def make_model(
    model_dir: str | pathlib.Path,
    name: str,
    layers: int | None = 4,
    quant: str | None = "exl3",
    max_position_embeddings: int | None = 8192,
    bits: float = 4.0,
    preset: str = "tiny",
    **fields: Any,
) -> pathlib.Path:
    """Creates model_dir/name/config.json; name may be nested (e.g. 'exl3/Llama/4.0bpw').

    `layers` and `max_position_embeddings` override the preset unless None (None with the tiny
    preset: the field is left out of config.json, as some models do); `fields` are written as given.
    """
    path = pathlib.Path(model_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    config.update(PRESETS[preset])
    if layers is not None:
        config["num_hidden_layers"] = layers
    if max_position_embeddings is not None:
        config["max_position_embeddings"] = max_position_embeddings
    config.update(fields)
    if quant:
        config["quantization_config"] = {"quant_method": quant, "bits": bits}
    (path / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="create an emulator model folder")
    parser.add_argument("model_dir")
    parser.add_argument("name", help="folder under model_dir; may be nested (exl3/Llama/4.0bpw)")
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: preset's, tiny: 4)")
    parser.add_argument("--quant", default="exl3", help="exl2, exl3, or '' for none")
    parser.add_argument("--bits", type=float, default=4.0, help="quantization_config.bits (bits per weight)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--max-position-embeddings", type=int, default=None)
    cli = parser.parse_args()
    layers = cli.layers if cli.layers is not None else (4 if cli.preset == "tiny" else None)
    max_pos = cli.max_position_embeddings or (8192 if cli.preset == "tiny" else None)
    print(make_model(cli.model_dir, cli.name, layers, cli.quant or None, max_pos, cli.bits, cli.preset))
