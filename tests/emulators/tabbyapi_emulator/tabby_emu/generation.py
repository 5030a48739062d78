"""Which TabbyAPI generation the emulator plays (part of the TabbyAPI emulator, see package doc).

The two pinned commits differ in behaviour deployment code sees, so every difference is one named
field here and the rest of the emulator asks this object instead of testing the generation name:
- exl2: 79126f904c2e (tip of exl2-checkpoint), backends exllamav2 + exllamav3
- exl3: e632af41eba6 (tip of main), backend exllamav3 only

Picked like a checkout tells them apart: the molecule scenario's emulator repository carries a
file GENERATION (content starting with "exl2") in the checkout root on branch exl2-checkpoint
only. TABBY_EMU_GENERATION (exl2|exl3) overrides the file, for tests.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Generation:
    name: str
    # common/model.py load_model_gen: how "the model already loaded" is recognised.
    # exl2: container.model_dir.name == model_path.name (basename); exl3: resolved paths equal.
    same_model_by_path: bool
    # exl2 returns without a progress event; exl3 yields one (1, 1, "model").
    repeat_load_event: bool
    # endpoints/core/utils/model.py stream_model_load: exl3 runs the load in a detached task;
    # exl2 drives it from the response, so a client disconnect cancels it.
    detached_load: bool
    # common/auth.py: exl3 polls api_tokens.yml every 2 s and takes a list of api keys.
    reload_tokens: bool
    api_key_list: bool
    # endpoints/core/router.py load_model: exl2 passes ping=sys.maxsize (never); exl3 takes
    # network.sse_ping_interval (common/networking.py get_sse_ping_interval).
    load_ping_configurable: bool
    # common/model.py apply_load_defaults: exl3 lets the model folder's tabby_config.yml win over
    # the request; exl2 lets the request win over it (and use_as_default over the folder file).
    inline_config_wins: bool
    default_backends: tuple[str, ...]

    @property
    def all_backends(self) -> tuple[str, ...]:
        return ("exllamav2", "exllamav3") if self.name == "exl2" else ("exllamav3",)


EXL2 = Generation(
    name="exl2",
    same_model_by_path=False,
    repeat_load_event=False,
    detached_load=False,
    reload_tokens=False,
    api_key_list=False,
    load_ping_configurable=False,
    inline_config_wins=False,
    default_backends=("exllamav2", "exllamav3"),
)
EXL3 = Generation(
    name="exl3",
    same_model_by_path=True,
    repeat_load_event=True,
    detached_load=True,
    reload_tokens=True,
    api_key_list=True,
    load_ping_configurable=True,
    inline_config_wins=True,
    default_backends=("exllamav3",),
)
GENERATIONS = {"exl2": EXL2, "exl3": EXL3}


def pick_generation(checkout: pathlib.Path = CHECKOUT) -> Generation:
    forced = os.environ.get("TABBY_EMU_GENERATION", "").strip()
    if forced:
        if forced not in GENERATIONS:
            raise ValueError(f"TABBY_EMU_GENERATION must be exl2 or exl3, got {forced!r}")
        return GENERATIONS[forced]
    marker = checkout / "GENERATION"
    if marker.is_file() and marker.read_text(encoding="utf-8").lstrip().startswith("exl2"):
        return EXL2
    return EXL3


def installed_backends(generation: Generation) -> set[str]:
    """TABBY_EMU_BACKENDS (comma list) stands in for the pip-installed exllama packages."""
    raw = os.environ.get("TABBY_EMU_BACKENDS")
    names = generation.default_backends if raw is None else [n.strip() for n in raw.split(",")]
    # main has no exllamav2 code left, whatever is installed.
    return {name for name in names if name in generation.all_backends}
