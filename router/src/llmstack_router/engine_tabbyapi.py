"""TabbyAPI: one process, many models, switched in place through its admin API.

What the real server does, at the two commits the tabbyapi role pins (exl2: 79126f9, the tip of
exl2-checkpoint; exl3: e632af4, main), and what this class makes of it:

- ``GET /v1/model``'s card ``id`` is the loaded folder's basename (``endpoints/core/utils/model.py``
  ``get_current_model`` -> the backend's ``model_info``: ``self.model_dir.name``), so
  ``exl3/A/4.0bpw`` and ``exl3/B/4.0bpw`` both report ``4.0bpw``. "Loaded" therefore also needs the
  router's own knowledge (``known_active``) when several models of the backend share a served_name.
- ``POST /v1/model/load`` answers an SSE stream of ``ModelLoadResponse`` events (``status``
  processing/finished per ``model_type``), or one event ``{"error": {"message": ...}}`` when the load
  raised (``get_generator_error``); a missing folder is a 400 before any stream
  (``endpoints/core/router.py``). The old model is unloaded before the new one loads
  (``common/model.py load_model_gen``), so a load failing midway leaves no model.
- A repeated load of the loaded model: main compares resolved full paths and answers one finished
  event; exl2 compares basenames only and answers an empty stream, also for a *different* folder with
  the same basename. An empty answer for a model that shares its served_name is therefore followed by
  ``POST /v1/model/unload`` and the load again.

The router never writes TabbyAPI's files: it records the model it loads in its own state file
(``state_file``), which the tabbyapi role's ExecStartPre applies to TabbyAPI's config at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from .engine_base import EngineError, OpenAIEngine, WaitFor

if TYPE_CHECKING:
    from .config import BackendSpec, ModelSpec

log = logging.getLogger("llmstack_router.engines")


class TabbyApiEngine(OpenAIEngine):
    """Up when ``/health`` answers; loaded when ``/v1/model`` names the model and the router knows it is this one."""

    kind: ClassVar[str] = "tabbyapi"
    serves_many_models: ClassVar[bool] = True
    config_keys: ClassVar[tuple[str, ...]] = ("state_file",)
    model_keys: ClassVar[tuple[str, ...]] = ("load",)

    def __init__(self, spec: BackendSpec, session: aiohttp.ClientSession) -> None:
        super().__init__(spec, session)
        self.models = {m.id: m for m in spec.models}
        # The id of the model the router last loaded successfully (or the state file named at router
        # start); None while unknown. Writers: __init__, prepare_start, load, switch, _admin_load, _commit.
        self.known_active: str | None = None
        # The last state-file error (None: the last write or read worked). Writer: _write_state, __init__.
        self.state_error: str | None = None
        # What known_active was before the last prepare_start: the state file's fallback if that start fails.
        self._before_start: ModelSpec | None = None
        self.known_active = self._read_state()

    # ---- readiness -----------------------------------------------------------------------

    async def _healthy(self) -> bool:
        return await self._status("/health") == 200

    async def _card_id(self) -> str | None:
        status, payload = await self.get("/v1/model")  # 503 while no model is loaded
        return payload.get("id") if status == 200 and isinstance(payload, dict) else None

    def _shares_served_name(self, model: ModelSpec) -> bool:
        return any(m.served_name == model.served_name and m.id != model.id for m in self.spec.models)

    async def _loaded(self, model: ModelSpec) -> bool:
        if not await self._healthy() or await self._card_id() != model.served_name:
            return False
        return self.known_active == model.id or not self._shares_served_name(model)

    # ---- start, load, switch -------------------------------------------------------------

    def prepare_start(self, model: ModelSpec) -> None:
        # Before a (re)start: the ExecStartPre reads the state file, so TabbyAPI comes up with ``model``
        # already. Not fatal when it fails: load() below switches after the start.
        self._before_start = self.models.get(self.known_active or "")
        # A new process: what it holds is known from its card only (without the ExecStartPre it comes up
        # with config.yml's model, perhaps a sibling with the same basename), until our own load.
        self.known_active = None
        self._write_state(model)

    async def load(self, model: ModelSpec, wait: WaitFor) -> None:
        try:
            await wait(self.healthy, "healthy")
            if not await self.is_loaded(model):
                await self._admin_load(model)
            await wait(lambda: self.is_loaded(model), "ready")
        except BaseException:
            self.known_active = None
            self._rollback(self._before_start)
            raise
        self._commit(model)

    async def switch(self, model: ModelSpec, previous: ModelSpec, wait: WaitFor) -> None:
        self._write_state(model)  # a TabbyAPI restart during the load comes back with the model asked for
        try:
            await self._admin_load(model)
        except EngineError as exc:
            # Nothing unloaded when TabbyAPI refused before its stream began (400, 401, 422).
            kept = await self.is_loaded(previous)
            self.known_active = previous.id if kept else None
            self._rollback(previous)
            raise EngineError(str(exc), previous_kept=kept) from exc
        except BaseException:
            self._rollback(previous)
            raise
        self._commit(model)
        await wait(lambda: self.is_loaded(model), "ready")

    async def _admin_load(self, model: ModelSpec) -> None:
        try:
            events = await self.admin_load(model, self.spec.ready_timeout_s)
            if events == 0 and self._shares_served_name(model):
                # exl2 took a sibling folder with the same basename for this one and did nothing.
                log.info("TabbyAPI %s answered the load of %s with no event; unloading and loading again",
                         self.spec.name, model.id)
                await self.admin_unload()
                await self.admin_load(model, self.spec.ready_timeout_s)
        except (EngineError, aiohttp.ClientError, TimeoutError) as exc:
            raise EngineError(f"TabbyAPI {self.spec.name} could not load {model.id}: {exc}") from exc
        # TabbyAPI said finished for this folder: from now on the card's basename means this model.
        self.known_active = model.id

    def _admin_headers(self) -> dict[str, str]:
        if self.spec.admin_key is None:
            raise EngineError(f"backend {self.spec.name}: an in-place TabbyAPI load needs admin_key_file")
        # common/auth.py check_admin_key: x-admin-key, else Authorization: Bearer.
        return {"x-admin-key": self.spec.admin_key}

    async def admin_unload(self) -> None:
        headers = self._admin_headers()
        async with self.session.post(self.spec.url + "/v1/model/unload", headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=self.spec.stop_timeout_s)) as resp:
            # 503: no model loaded (common/model.py check_model_container), which is what we want.
            if resp.status not in (200, 503):
                raise EngineError(f"TabbyAPI refused to unload ({resp.status}): {(await resp.text())[:2000]}")

    async def admin_load(self, model: ModelSpec, timeout_s: float) -> int:
        """``POST /v1/model/load`` with the model's ``load`` body, reading the SSE progress to the end.

        Returns how many progress events arrived (0: exl2's answer for a model it thinks is loaded).
        """
        body = model.load or {"model_name": model.served_name}
        headers = self._admin_headers()
        events = 0
        finished = False
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s)
        async with self.session.post(self.spec.url + "/v1/model/load", json=body, headers=headers,
                                     timeout=timeout) as resp:
            if resp.status != 200:
                text = (await resp.text())[:2000]
                raise EngineError(f"TabbyAPI refused to load {body['model_name']} ({resp.status}): {text}")
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and ": ping" comments (main sends pings)
                try:
                    event = json.loads(line[5:].strip())
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    raise EngineError(f"TabbyAPI failed to load {body['model_name']}: {message}")
                events += 1
                finished = event.get("status") == "finished" and event.get("model_type", "model") == "model"
        if events and not finished:
            raise EngineError(f"TabbyAPI's load stream for {body['model_name']} ended before the model finished "
                              f"({events} events)")
        return events

    # ---- the state file ------------------------------------------------------------------

    def _record(self, model: ModelSpec) -> dict[str, str]:
        return {"id": model.id, "model_name": str((model.load or {}).get("model_name", model.served_name))}

    def _commit(self, model: ModelSpec) -> None:
        self.known_active = model.id
        self._write_state(model)

    def _rollback(self, model: ModelSpec | None) -> None:
        """A load failed: the state file names the model that worked before, not the one that failed."""
        if model is not None:
            self._write_state(model)

    def _write_state(self, model: ModelSpec) -> None:
        path = self.spec.state_file
        if path is None:
            return
        record = self._record(model)
        try:
            if read_state_file(path) == record:
                self.state_error = None
                return
            write_state_file(path, record)
        except OSError as exc:
            # Not fatal: the model serves; only a TabbyAPI restart would come back with another one.
            self.state_error = f"cannot write {path}: {exc}"
            log.error("TabbyAPI %s: %s (a restart of TabbyAPI will not keep %s)", self.spec.name,
                      self.state_error, model.id)
            return
        self.state_error = None

    def _read_state(self) -> str | None:
        path = self.spec.state_file
        if path is None:
            return None
        try:
            record = read_state_file(path)
        except OSError as exc:
            self.state_error = f"cannot read {path}: {exc}"
            log.warning("TabbyAPI %s: %s", self.spec.name, self.state_error)
            return None
        if record is None:
            return None
        model = self.models.get(record.get("id", ""))
        if model is None or self._record(model) != record:
            log.warning("TabbyAPI %s: state file %s names %s, which this config does not declare; ignored",
                        self.spec.name, path, record)
            return None
        return model.id

    def status(self) -> dict[str, Any]:
        return {"known_active": self.known_active, "state_file": self.spec.state_file,
                "state_error": self.state_error}


def read_state_file(path: str) -> dict[str, str] | None:
    """The state file's record, None when it is missing or not a record (a torn or foreign file)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    if not (isinstance(data, dict) and isinstance(data.get("id"), str) and isinstance(data.get("model_name"), str)):
        return None
    return {"id": data["id"], "model_name": data["model_name"]}


def write_state_file(path: str, record: dict[str, str]) -> None:
    """Write ``record`` atomically: a tempfile in the same directory, fsync, os.replace, fsync the directory.

    Mode 0644 whatever the process umask (the router's unit has UMask=0077; the tabbyapi user must read
    it), and missing directories are made 0755 for the same reason.
    """
    target = Path(path)
    missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
            os.chmod(directory, 0o755)  # noqa: S103 - the tabbyapi user must reach the file (no secret in it)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
