"""Model folders for the TabbyAPI emulator (which is an emulator for hosts without a GPU).

Stdlib only, so Molecule prepare steps and pytest fixtures can both create model folders.
"""

from __future__ import annotations

import json
import pathlib


def make_model(
    model_dir: str | pathlib.Path,
    name: str,
    layers: int = 4,
    quant: str | None = "exl3",
    max_position_embeddings: int = 8192,
) -> pathlib.Path:
    """Creates model_dir/name/config.json; name may contain '/' (e.g. 'exl2/Model')."""
    path = pathlib.Path(model_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "max_position_embeddings": max_position_embeddings,
    }
    if quant:
        config["quantization_config"] = {"quant_method": quant, "bits": 4.0}
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="create an emulator model folder")
    parser.add_argument("model_dir")
    parser.add_argument("name")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--quant", default="exl3", help="exl2, exl3, or '' for none")
    cli = parser.parse_args()
    print(make_model(cli.model_dir, cli.name, cli.layers, cli.quant or None))
