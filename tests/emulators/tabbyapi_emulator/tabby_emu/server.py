"""HTTP routes (part of the TabbyAPI emulator, see package doc).

Status codes and bodies follow TabbyAPI (endpoints/core/router.py, endpoints/OAI): FastAPI-style
{"detail": ...} errors, 503 when no model is loaded, SSE framed by sse-starlette (CRLF line ends,
": ping" comments every network.sse_ping_interval s on main's load stream, none on exl2's).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import pathlib
import time
import uuid
from typing import Any

from aiohttp import web

from .auth import AuthStore
from .config import EmuConfig
from .container import LoadError, ModelManager
from .generate import count_tokens, generate, prompt_text
from .schema import DRAFT_LOAD_REQUEST, DRAFT_REQUEST_DEFAULTS, LOAD_REQUEST, LOAD_REQUEST_DEFAULTS, validate

log = logging.getLogger("tabby_emu.server")

CFG = web.AppKey("cfg", EmuConfig)
MODELS = web.AppKey("models", ModelManager)
AUTH = web.AppKey("auth", AuthStore)
LOAD_TASKS = web.AppKey("load_tasks", set)
ISSUES = web.AppKey("issues", list)


def _detail(status: int, detail: Any) -> web.Response:
    return web.json_response({"detail": detail}, status=status)


def _auth_error(request: web.Request, admin: bool) -> web.Response | None:
    problem = request.app[AUTH].check(request.headers, admin=admin)
    return _detail(401, problem) if problem else None


def _no_model(request: web.Request) -> web.Response | None:
    if request.app[MODELS].current is None:
        return _detail(503, "No models are currently loaded.")
    return None


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _detail(422, [{"type": "json_invalid", "msg": "JSON decode error"}])
    if not isinstance(body, dict):
        return _detail(422, [{"type": "model_attributes_type", "msg": "Input should be an object"}])
    return body


class SSEWriter:
    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def start(self) -> None:
        await self.response.prepare(self.request)

    async def data(self, payload: str) -> None:
        await self.response.write(f"data: {payload}\r\n\r\n".encode())

    async def ping(self) -> None:
        stamp = datetime.datetime.now(datetime.UTC).isoformat()
        await self.response.write(f": ping - {stamp}\r\n\r\n".encode())


async def health(request: web.Request) -> web.Response:
    # common/health.py: unhealthy (503) from the first fatal generation error on, for good.
    issues = request.app[ISSUES]
    if issues:
        return web.json_response({"status": "unhealthy", "issues": list(issues)}, status=503)
    return web.json_response({"status": "healthy", "issues": []})


async def list_models(request: web.Request) -> web.Response:
    if denied := _auth_error(request, admin=False):
        return denied
    cfg = request.app[CFG]
    created = int(time.time())
    cards = []
    if request.app[AUTH].permission(request.headers) == "admin":
        root = pathlib.Path(cfg.model_dir).resolve()
        draft_root = pathlib.Path(cfg.draft_model_dir).resolve()
        if root.is_dir():
            for child in sorted(root.iterdir()):
                if child.is_dir() and child != draft_root:
                    cards.append({"id": child.name, "object": "model", "created": created, "owned_by": "tabbyAPI"})
    elif (current := request.app[MODELS].current) is not None:
        cards.append({"id": current.path.name, "object": "model", "created": created, "owned_by": "tabbyAPI"})
    return web.json_response({"object": "list", "data": cards})


async def current_model(request: web.Request) -> web.Response:
    if denied := _auth_error(request, admin=False) or _no_model(request):
        return denied
    card = request.app[MODELS].current.card()  # type: ignore[union-attr]
    card["created"] = int(time.time())
    return web.json_response(card)


async def permission(request: web.Request) -> web.Response:
    if denied := _auth_error(request, admin=False):
        return denied
    return web.json_response({"permission": request.app[AUTH].permission(request.headers)})


def _load_request(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """ModelLoadRequest validation: unknown fields dropped, wrong types a 422 detail list."""
    data, errors = validate(LOAD_REQUEST, body, ("body",))
    if "model_name" not in body:
        errors.insert(0, {"type": "missing", "loc": ["body", "model_name"], "msg": "Field required", "input": body})
    elif body["model_name"] is None:
        errors.insert(
            0,
            {
                "type": "string_type",
                "loc": ["body", "model_name"],
                "msg": "Input should be a valid string",
                "input": None,
            },
        )
    load = {**LOAD_REQUEST_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    draft_body = body.get("draft_model")
    draft: dict[str, Any] = {}
    if isinstance(draft_body, dict):
        fields, draft_errors = validate(DRAFT_LOAD_REQUEST, draft_body, ("body", "draft_model"))
        if draft_body.get("draft_model_name") is None:
            kind, msg = (
                ("missing", "Field required")
                if "draft_model_name" not in draft_body
                else ("string_type", "Input should be a valid string")
            )
            draft_errors.insert(
                0, {"type": kind, "loc": ["body", "draft_model", "draft_model_name"], "msg": msg, "input": draft_body}
            )
        errors += draft_errors
        draft = {**DRAFT_REQUEST_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
    elif draft_body is not None:
        errors.append(
            {
                "type": "model_type",
                "loc": ["body", "draft_model"],
                "msg": "Input should be a valid dictionary or object",
                "input": draft_body,
            }
        )
    load["draft_model"] = draft
    load.pop("skip_queue", None)
    return load, errors


async def load_model(request: web.Request) -> web.StreamResponse:
    if denied := _auth_error(request, admin=True):
        return denied
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    load, errors = _load_request(body)
    if errors:
        return _detail(422, errors)
    if not load.get("model_name"):
        return _detail(400, "A model name was not provided for load.")
    cfg = request.app[CFG]
    model_path = pathlib.Path(cfg.model_dir) / str(load["model_name"])
    if not model_path.exists():
        return _detail(400, "Could not find the model path for load. Check model name or config.yml?")
    # stream_model_load: the draft folder always comes from the config.
    load["draft_model"]["draft_model_dir"] = cfg.draft_model_dir
    models = request.app[MODELS]
    sse = SSEWriter(request)
    await sse.start()
    if not cfg.generation.detached_load:
        await _load_in_request(sse, models.load_gen(model_path, load))
        return sse.response

    queue: asyncio.Queue[tuple[int, int, str] | Exception | None] = asyncio.Queue()

    async def run_load() -> None:
        try:
            async for progress in models.load_gen(model_path, load):
                queue.put_nowait(progress)
            queue.put_nowait(None)
        except (LoadError, OSError, ValueError) as exc:
            queue.put_nowait(exc)

    # main: detached, so a client that disconnects does not cancel the load.
    task = asyncio.create_task(run_load())
    request.app[LOAD_TASKS].add(task)
    task.add_done_callback(request.app[LOAD_TASKS].discard)
    ping = cfg.sse_ping_interval or None
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=ping)
            except TimeoutError:
                await sse.ping()
                continue
            if item is None:
                break
            if isinstance(item, Exception):
                await sse.data(_error_event(item))
                break
            await _progress_events(sse, item)
    except ConnectionResetError:
        log.error("Model load request disconnected. The load will continue.")
    return sse.response


async def _load_in_request(sse: SSEWriter, progress: Any) -> None:
    """exl2-checkpoint: the response drives the load; a disconnect cancels it half-way."""
    try:
        async for item in progress:
            await _progress_events(sse, item)
    except ConnectionResetError:
        log.error("Model load cancelled by user. Please make sure to run unload to free up resources.")
    except (LoadError, OSError, ValueError) as exc:
        await sse.data(_error_event(exc))
    finally:
        await progress.aclose()


def _error_event(exc: Exception) -> str:
    return json.dumps({"error": {"message": str(exc), "trace": None}})


async def _progress_events(sse: SSEWriter, item: tuple[int, int, str]) -> None:
    module, modules, model_type = item
    if module != 0:
        await sse.data(
            json.dumps({"model_type": model_type, "module": module, "modules": modules, "status": "processing"})
        )
    if module == modules:
        await sse.data(
            json.dumps({"model_type": model_type, "module": module, "modules": modules, "status": "finished"})
        )


async def unload_model(request: web.Request) -> web.Response:
    if denied := _auth_error(request, admin=True) or _no_model(request):
        return denied
    await request.app[MODELS].unload()
    return web.json_response(None)


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    if denied := _auth_error(request, admin=False) or _no_model(request):
        return denied
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    model = request.app[MODELS].current
    assert model is not None
    text = prompt_text(body.get("messages") if chat else None, None if chat else body.get("prompt"))
    prompt_tokens = count_tokens(text)
    budget = model.max_seq_len - prompt_tokens
    if budget <= 0:
        return _detail(400, f"Prompt length {prompt_tokens} is greater than max_seq_len {model.max_seq_len}")
    max_tokens = min(int(body.get("max_tokens") or body.get("max_completion_tokens") or 64), budget)
    fail_on = os.environ.get("TABBY_EMU_FAIL_PROMPT")
    if fail_on and fail_on in text:
        # A fatal generator error (the backends' generate_gen): recorded in HealthManager for good.
        stamp = datetime.datetime.now(datetime.UTC).isoformat()
        request.app[ISSUES].append({"time": stamp, "description": "RuntimeError: emulated fatal generation error"})
        request_id = uuid.uuid4().hex
        return _detail(
            503, f"Completion {request_id} aborted. Maybe the model was unloaded? Please check the server console."
        )
    tokens = generate(model.path.name, text, max_tokens)
    finish = "length"
    token_s = float(os.environ.get("TABBY_EMU_TOKEN_S", "0.005"))
    prompt_s = prompt_tokens * float(os.environ.get("TABBY_EMU_PROMPT_TOKEN_S", "0.0005"))
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model.path.name,
    }
    started = time.monotonic()
    await asyncio.sleep(prompt_s)

    def usage() -> dict[str, Any]:
        total = time.monotonic() - started
        gen_time = max(total - prompt_s, 1e-6)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
            "prompt_time": round(prompt_s, 6),
            "completion_time": round(gen_time, 6),
            "completion_tokens_per_sec": round(len(tokens) / gen_time, 2),
            "total_time": round(total, 6),
        }

    if not body.get("stream"):
        await asyncio.sleep(token_s * len(tokens))
        content = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        obj = "chat.completion" if chat else "text_completion"
        return web.json_response({**base, "object": obj, "choices": [choice], "usage": usage()})

    sse = SSEWriter(request)
    await sse.start()
    obj = "chat.completion.chunk" if chat else "text_completion"
    for index, token in enumerate(tokens):
        await asyncio.sleep(token_s)
        last = index == len(tokens) - 1
        piece: dict[str, Any] = {"index": 0, "finish_reason": finish if last else None}
        if chat:
            piece["delta"] = {"role": "assistant", "content": token}
        else:
            piece["text"] = token
        await sse.data(json.dumps({**base, "object": obj, "choices": [piece]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        chunk = {**base, "object": obj, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        await sse.data(json.dumps({**chunk, "usage": usage()}))
    await sse.data("[DONE]")
    return sse.response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


def build_app(cfg: EmuConfig, models: ModelManager, auth: AuthStore) -> web.Application:
    app = web.Application()
    app[CFG] = cfg
    app[MODELS] = models
    app[AUTH] = auth
    app[LOAD_TASKS] = set()
    app[ISSUES] = []
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/model/list", list_models)
    app.router.add_get("/v1/model", current_model)
    app.router.add_get("/v1/auth/permission", permission)
    app.router.add_post("/v1/model/load", load_model)
    app.router.add_post("/v1/model/unload", unload_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app
