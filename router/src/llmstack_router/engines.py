"""One class per inference engine, found by the config's ``engine`` string.

The protocol and the generic OpenAI engine are in ``engine_base.py``, TabbyAPI (in-place
switches, the router's state file of its active model) in ``engine_tabbyapi.py``. Adding an engine
is one class here (or in a module of its own) and one entry in ``ENGINES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .engine_base import Engine, EngineError, OpenAIEngine, WaitFor, lists_model, upstream_headers
from .engine_tabbyapi import TabbyApiEngine

if TYPE_CHECKING:
    import aiohttp

    from .config import BackendSpec, ModelSpec

__all__ = ["ENGINES", "Engine", "EngineError", "TabbyApiEngine", "WaitFor", "make_engine", "upstream_headers"]


class LlamaCppEngine(OpenAIEngine):
    """llama.cpp's llama-server (``/health``) or llama-cpp-python's server (no ``/health``)."""

    kind: ClassVar[str] = "llamacpp"
    serves_many_models: ClassVar[bool] = False

    async def _healthy(self) -> bool:
        return await self._status("/health", fallback="/v1/models") == 200


class VllmEngine(OpenAIEngine):
    """vLLM answers ``/v1/models`` before the weights are in: loaded once it lists the model."""

    kind: ClassVar[str] = "vllm"
    serves_many_models: ClassVar[bool] = False

    async def _loaded(self, model: ModelSpec) -> bool:
        status, payload = await self.get("/v1/models")
        return status == 200 and lists_model(payload, model.served_name)


class SglangEngine(VllmEngine):
    kind: ClassVar[str] = "sglang"


class OllamaEngine(OpenAIEngine):
    """Ollama loads each model on its first request; up when ``/api/tags`` answers."""

    kind: ClassVar[str] = "ollama"

    async def _healthy(self) -> bool:
        return await self._status("/api/tags", fallback="/v1/models") == 200


ENGINES: dict[str, type[OpenAIEngine]] = {cls.kind: cls for cls in (
    TabbyApiEngine, VllmEngine, SglangEngine, LlamaCppEngine, OllamaEngine, OpenAIEngine)}


def make_engine(spec: BackendSpec, session: aiohttp.ClientSession) -> Engine:
    return ENGINES[spec.engine](spec, session)
