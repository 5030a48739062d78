"""TabbyAPI: one process, many models, switched through its admin API; the model kept across restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import aiohttp

from .engine_base import PROBE_ERRORS, EngineError, OpenAIEngine, WaitFor

if TYPE_CHECKING:
    from .config import ModelSpec

log = logging.getLogger("llmstack_router.engines")


class TabbyApiEngine(OpenAIEngine):
    """Up when ``/health`` answers; loaded when ``/v1/model`` names the model."""

    kind: ClassVar[str] = "tabbyapi"
    serves_many_models: ClassVar[bool] = True
    config_keys: ClassVar[tuple[str, ...]] = ("tabby_config",)

    async def _healthy(self) -> bool:
        return await self._status("/health") == 200

    async def _loaded(self, model: ModelSpec) -> bool:
        if not await self._healthy():
            return False
        status, payload = await self.get("/v1/model")
        return status == 200 and isinstance(payload, dict) and payload.get("id") == model.served_name

    async def current_model(self) -> str | None:
        try:
            status, payload = await self.get("/v1/model")
        except PROBE_ERRORS:
            return None
        return payload.get("id") if status == 200 and isinstance(payload, dict) else None

    def prepare_start(self, model: ModelSpec) -> None:
        # Written before the start, so the process comes up with the model already.
        if self.spec.tabby_config:
            try:
                persist_tabby_model(self.spec.tabby_config, model.served_name)
            except OSError as exc:
                raise EngineError(f"cannot write {self.spec.tabby_config}: {exc}") from exc

    async def load(self, model: ModelSpec, wait: WaitFor) -> None:
        await wait(self.healthy, "healthy")
        if await self.current_model() != model.served_name:
            await self._admin_load(model)
        await wait(lambda: self.is_loaded(model), "ready")

    async def switch(self, model: ModelSpec, wait: WaitFor) -> None:
        await self._admin_load(model)
        await wait(lambda: self.is_loaded(model), "ready")

    async def _admin_load(self, model: ModelSpec) -> None:
        try:
            await self.admin_load(model, self.spec.ready_timeout_s)
        except (EngineError, aiohttp.ClientError, TimeoutError) as exc:
            raise EngineError(f"TabbyAPI {self.spec.name} could not switch to {model.id}: {exc}") from exc
        if self.spec.tabby_config:
            try:
                persist_tabby_model(self.spec.tabby_config, model.served_name)
            except OSError as exc:
                log.error("loaded %s but could not persist it in %s: %s", model.id, self.spec.tabby_config, exc)

    async def admin_load(self, model: ModelSpec, timeout_s: float) -> int:
        """``POST /v1/model/load`` with the admin key, reading the SSE progress to the end.

        Returns how many progress events arrived. TabbyAPI unloads the old model itself.
        """
        backend = self.spec
        if backend.admin_key is None:
            raise EngineError(f"backend {backend.name}: an in-place TabbyAPI load needs admin_key_file")
        headers = {"x-admin-key": backend.admin_key, "Authorization": f"Bearer {backend.admin_key}"}
        events = 0
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s)
        async with self.session.post(backend.url + "/v1/model/load", json={"model_name": model.served_name},
                                     headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                text = (await resp.text())[:2000]
                raise EngineError(f"TabbyAPI refused to load {model.served_name} ({resp.status}): {text}")
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                events += 1
                if isinstance(event, dict) and (event.get("error") or event.get("status") == "error"):
                    raise EngineError(f"TabbyAPI failed to load {model.served_name}: {event.get('error') or event}")
        return events


_MODEL_NAME_LINE = re.compile(r"^(\s+)model_name:.*$")


def persist_tabby_model(config_path: str, served_name: str) -> bool:
    """Set ``model.model_name`` in TabbyAPI's config.yml so a restart keeps the model.

    Edits the one line so the operator's comments survive; writes a tempfile in the same
    directory and os.replace()s it (atomic), keeping the previous file as ``.bak``.
    Returns whether the file changed.
    """
    path = Path(config_path)
    original = path.read_text(encoding="utf-8") if path.exists() else ""
    value = json.dumps(served_name)  # a JSON string is a valid YAML scalar, quoting included
    lines = original.splitlines()
    in_model = False
    model_line = None
    replaced = False
    for index, line in enumerate(lines):
        if re.match(r"^model:\s*(#.*)?$", line):
            in_model, model_line = True, index
            continue
        if in_model and line and not line[0].isspace() and not line.lstrip().startswith("#"):
            in_model = False
        match = _MODEL_NAME_LINE.match(line) if in_model else None
        if match:
            lines[index] = f"{match.group(1)}model_name: {value}"
            replaced = True
            break
    if not replaced:
        if model_line is None:
            lines += ["model:", f"  model_name: {value}"]
        else:
            lines.insert(model_line + 1, f"  model_name: {value}")
    updated = "\n".join(lines) + "\n"
    if updated == original:
        return False
    if path.exists():
        shutil.copy2(path, path.with_name(path.name + ".bak"))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(updated)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True
