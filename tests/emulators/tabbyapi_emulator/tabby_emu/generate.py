"""Deterministic text generation (part of the TabbyAPI emulator, see package doc).

The same model, prompt and max_tokens always give the same words, so tests can compare the
streamed and non-streamed answers and assert exact token counts.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

WORDS = [
    "the",
    "node",
    "serves",
    "tokens",
    "from",
    "a",
    "quantized",
    "model",
    "while",
    "the",
    "cache",
    "holds",
    "context",
    "and",
    "the",
    "router",
    "keeps",
    "every",
    "backend",
    "warm",
    "so",
    "requests",
    "land",
    "on",
    "a",
    "loaded",
    "model",
    "with",
    "low",
    "latency",
    "today",
]


def prompt_text(messages: list[dict[str, Any]] | None, prompt: str | list[str] | None) -> str:
    if messages is not None:
        parts = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', 'user')}: {content or ''}")
        return "\n".join(parts)
    if isinstance(prompt, list):
        return "\n".join(str(p) for p in prompt)
    return str(prompt or "")


def count_tokens(text: str) -> int:
    # Close enough to a BPE count for usage numbers; exactness only matters within the emulator.
    return max(1, len(text.split()))


def generate(model_id: str, text: str, max_tokens: int) -> list[str]:
    seed = hashlib.sha256(f"{model_id}\0{text}".encode()).digest()
    rng = random.Random(seed)
    return [(" " if i else "") + rng.choice(WORDS) for i in range(max_tokens)]
