"""What each inference engine needs: how to tell it is ready, and TabbyAPI's in-place model switch."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from .config import BackendSpec, ModelSpec

_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


class EngineError(RuntimeError):
    pass


def upstream_headers(backend: BackendSpec) -> dict[str, str]:
    if backend.api_key is None:
        return {}
    return {"Authorization": f"Bearer {backend.api_key}"}


async def _get(session: aiohttp.ClientSession, backend: BackendSpec, path: str) -> tuple[int, Any]:
    async with session.get(backend.url + path, headers=upstream_headers(backend), timeout=_PROBE_TIMEOUT) as resp:
        body = await resp.read()
        if resp.status != 200:
            return resp.status, None
        try:
            return resp.status, json.loads(body) if body else None
        except ValueError:
            return resp.status, None


def _lists_model(payload: Any, served_name: str) -> bool:
    if not isinstance(payload, dict):
        return False
    entries = payload.get("data") or payload.get("models") or []
    return any(isinstance(e, dict) and served_name in (e.get("id"), e.get("name"), e.get("model")) for e in entries)


async def is_ready(session: aiohttp.ClientSession, backend: BackendSpec, model: ModelSpec) -> bool:
    """One readiness probe; connection errors mean 'not yet'."""
    try:
        if backend.engine == "tabbyapi":
            status, _body = await _get(session, backend, "/health")
            if status != 200:
                return False
            status, payload = await _get(session, backend, "/v1/model")
            return status == 200 and isinstance(payload, dict) and payload.get("id") == model.served_name
        if backend.engine in ("vllm", "sglang"):
            status, payload = await _get(session, backend, "/v1/models")
            return status == 200 and _lists_model(payload, model.served_name)
        if backend.engine == "llamacpp":
            status, _body = await _get(session, backend, "/health")
            if status == 404:  # llama-cpp-python's server has no /health
                status, _body = await _get(session, backend, "/v1/models")
            return status == 200
        if backend.engine == "ollama":
            status, _body = await _get(session, backend, "/api/tags")
            if status == 404:
                status, _body = await _get(session, backend, "/v1/models")
            return status == 200
        status, _body = await _get(session, backend, "/v1/models")
        return status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def tabby_current_model(session: aiohttp.ClientSession, backend: BackendSpec) -> str | None:
    try:
        status, payload = await _get(session, backend, "/v1/model")
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    return payload.get("id") if status == 200 and isinstance(payload, dict) else None


async def tabby_load(session: aiohttp.ClientSession, backend: BackendSpec, model: ModelSpec, timeout_s: float) -> int:
    """Switch TabbyAPI's model through its admin API, reading the SSE progress to the end.

    Returns how many progress events arrived. TabbyAPI unloads the old model itself.
    """
    if backend.admin_key is None:
        raise EngineError(f"backend {backend.name}: an in-place TabbyAPI load needs admin_key_file")
    headers = {"x-admin-key": backend.admin_key, "Authorization": f"Bearer {backend.admin_key}"}
    events = 0
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s)
    async with session.post(backend.url + "/v1/model/load", json={"model_name": model.served_name},
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
