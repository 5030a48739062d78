"""The engine protocol, and the HTTP probing every engine class shares.

An engine class knows one inference server's API: how to tell its process answers, what
"loaded" means for a model, what happens after its process was started (load) and how it takes
another model without a restart (switch). Starting and stopping the process is the
controller's job (``control.py``), the order of steps the swap's (``swap.py``).

Unload is stopping the process, for every engine: none frees its VRAM reliably in place
(TabbyAPI #144), so no engine class has an unload of its own.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import aiohttp

if TYPE_CHECKING:
    from .config import BackendSpec, ModelSpec

_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
# A probe that cannot connect or times out means "not yet", never an error.
PROBE_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)

Check = Callable[[], Awaitable[bool]]
# Given by the swap: polls ``check`` until true, ends early when the process died, raises the
# swap's error (naming ``what``: "ready", "healthy") after the backend's ready_timeout_s.
WaitFor = Callable[[Check, str], Awaitable[None]]


class EngineError(RuntimeError):
    """The engine refused or failed an operation; the message is for the client.

    ``previous_kept``: after a failed switch, whether the process still serves the model it had
    (TabbyAPI unloads the old model before it loads the new one, so a load that fails midway leaves none).
    """

    def __init__(self, message: str, previous_kept: bool = True) -> None:
        super().__init__(message)
        self.previous_kept = previous_kept


class Engine(Protocol):
    kind: ClassVar[str]
    # False: one process serves one model (config.py refuses a second model on such a backend).
    serves_many_models: ClassVar[bool]
    # Backend keys only this engine accepts (config.py refuses them on other engines).
    config_keys: ClassVar[tuple[str, ...]]
    # Model keys only this engine's models accept.
    model_keys: ClassVar[tuple[str, ...]]
    spec: BackendSpec

    async def healthy(self) -> bool:
        """Readiness of the process: it answers HTTP (whatever model it has)."""

    async def is_loaded(self, model: ModelSpec) -> bool:
        """What "loaded" means: requests for ``model`` would be served now."""

    def prepare_start(self, model: ModelSpec) -> None:
        """Before the process starts to serve ``model``; raise EngineError to refuse."""

    async def load(self, model: ModelSpec, wait: WaitFor) -> None:
        """After the process was started: return once ``model`` is loaded."""

    async def switch(self, model: ModelSpec, previous: ModelSpec, wait: WaitFor) -> None:
        """The process serves ``previous``, another of its models; make it serve ``model`` without a restart."""

    def status(self) -> dict[str, Any]:
        """Engine-specific state for /status (empty: nothing to tell)."""


def upstream_headers(backend: BackendSpec) -> dict[str, str]:
    if backend.api_key is None:
        return {}
    return {"Authorization": f"Bearer {backend.api_key}"}


class OpenAIEngine:
    """Any OpenAI-compatible server: up when ``/v1/models`` answers, models load lazily."""

    kind: ClassVar[str] = "openai"
    serves_many_models: ClassVar[bool] = True
    config_keys: ClassVar[tuple[str, ...]] = ()
    model_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: BackendSpec, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.session = session

    async def get(self, path: str) -> tuple[int, Any]:
        """GET ``path``: the status and the JSON body (None unless a 200 with JSON)."""
        async with self.session.get(self.spec.url + path, headers=upstream_headers(self.spec),
                                    timeout=_PROBE_TIMEOUT) as resp:
            body = await resp.read()
            if resp.status != 200:
                return resp.status, None
            try:
                return resp.status, json.loads(body) if body else None
            except ValueError:
                return resp.status, None

    async def _status(self, path: str, fallback: str | None = None) -> int:
        status, _body = await self.get(path)
        if status == 404 and fallback is not None:
            status, _body = await self.get(fallback)
        return status

    async def _healthy(self) -> bool:
        return await self._status("/v1/models") == 200

    async def _loaded(self, model: ModelSpec) -> bool:
        return await self._healthy()

    async def healthy(self) -> bool:
        try:
            return await self._healthy()
        except PROBE_ERRORS:
            return False

    async def is_loaded(self, model: ModelSpec) -> bool:
        try:
            return await self._loaded(model)
        except PROBE_ERRORS:
            return False

    def prepare_start(self, model: ModelSpec) -> None:
        return None

    async def load(self, model: ModelSpec, wait: WaitFor) -> None:
        await wait(lambda: self.is_loaded(model), "ready")

    async def switch(self, model: ModelSpec, previous: ModelSpec, wait: WaitFor) -> None:
        # Lazy loaders (ollama, most OpenAI servers) load a model on its first request.
        await wait(lambda: self.is_loaded(model), "ready")

    def status(self) -> dict[str, Any]:
        return {}


def lists_model(payload: Any, served_name: str) -> bool:
    if not isinstance(payload, dict):
        return False
    entries = payload.get("data") or payload.get("models") or []
    return any(isinstance(e, dict) and served_name in (e.get("id"), e.get("name"), e.get("model")) for e in entries)
