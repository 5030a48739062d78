"""The HTTP side: OpenAI-compatible routes, admin routes, auth, pass-through proxying."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from .config import ModelSpec, RouterConfig
from .control import kill_all_spawned
from .engines import upstream_headers
from .group import Lane, LoadFailed
from .logs import request_id
from .metrics import Gauge, Metrics
from .scheduler import Phase, QueueFull
from .upstream import Upstream, UpstreamError
from .vram import VramProbe, make_probe

log = logging.getLogger("llmstack_router.app")
access_log = logging.getLogger("llmstack_router.access")

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
ROUTER_KEY: web.AppKey[Router] = web.AppKey("router")
REQUEST_ID = web.RequestKey("request_id", str)
MODEL_ID = web.RequestKey("model_id", str)
STATUS = web.RequestKey("status", int)


def openai_error(status: int, message: str, err_type: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def sse_error(message: str, err_type: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _validate(path: str, payload: Any) -> None:
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise BadRequest("'model' is required and must be a string", "model")
    if "stream" in payload and payload["stream"] is not None and not isinstance(payload["stream"], bool):
        raise BadRequest("'stream' must be true or false", "stream")
    if path == "/v1/chat/completions":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of message objects", "messages")
    elif path == "/v1/completions":
        if not isinstance(payload.get("prompt"), str | list):
            raise BadRequest("'prompt' must be a string or a list", "prompt")
    elif not isinstance(payload.get("input"), str | list):
        raise BadRequest("'input' must be a string or a list", "input")


class Router:
    def __init__(self, config: RouterConfig, probe: VramProbe | None = None) -> None:
        self.config = config
        self.probe = probe if probe is not None else make_probe(config.vram_probe)
        self.metrics = Metrics()
        self.lanes: list[Lane] = []
        self.lane_of: dict[str, Lane] = {}
        self.session: aiohttp.ClientSession | None = None
        self.started = time.time()
        self.upstreams = {name: Upstream(b.url) for name, b in config.backends.items()}
        self._upstream_headers = {name: {"Content-Type": "application/json", **upstream_headers(b)}
                                  for name, b in config.backends.items()}
        self._api_keys = [k.encode() for k in config.auth.api_keys]
        self._admin_keys = [k.encode() for k in config.auth.admin_keys]

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, _app: web.Application | None = None) -> None:
        # One pooled session for every upstream: keep-alive connections skip a TCP handshake
        # per request, which is most of what a proxy hop costs on loopback.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=75, force_close=False)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        for group in self.config.groups.values():
            members = [b for b in self.config.backends.values() if b.group == group.name]
            exclusive = [b for b in members if not b.co_reside]
            lanes = ([Lane(group.name, group, exclusive, self.config, self.session, self.probe, self.metrics,
                           self._held_elsewhere)] if exclusive else [])
            lanes += [Lane(f"{group.name}/{b.name}", group, [b], self.config, self.session, self.probe,
                           self.metrics, self._held_elsewhere) for b in members if b.co_reside]
            for lane in lanes:
                self.lanes.append(lane)
                for model_id in lane.models:
                    self.lane_of[model_id] = lane
        await asyncio.gather(*(lane.adopt_running() for lane in self.lanes))
        self.metrics.add_gauge(Gauge("llmrouter_queue_depth", "Requests waiting for a model, by lane.", ("lane",),
                                     lambda: {(lane.name,): lane.core.queue_depth() for lane in self.lanes}))
        self.metrics.add_gauge(Gauge("llmrouter_in_flight", "Requests being served, by lane.", ("lane",),
                                     lambda: {(lane.name,): lane.core.in_flight for lane in self.lanes}))
        self.metrics.add_gauge(Gauge("llmrouter_model_loaded", "1 if the model is up.", ("model",),
                                     lambda: {(m,): float(self.is_loaded(m)) for m in self.config.models}))

    async def stop(self, _app: web.Application | None = None) -> None:
        await asyncio.gather(*(lane.shutdown() for lane in self.lanes), return_exceptions=True)
        kill_all_spawned()
        for upstream in self.upstreams.values():
            upstream.close()
        if self.session is not None:
            await self.session.close()

    def _held_elsewhere(self, lane: Lane) -> int:
        held = 0
        for other in self.lanes:
            if other is not lane and other.group.name == lane.group.name and other.core.active:
                held += other.models[other.core.active].vram_mib or 0
        return held

    def is_loaded(self, model_id: str) -> bool:
        lane = self.lane_of[model_id]
        return lane.core.active == model_id and lane.core.phase in (Phase.READY, Phase.DRAINING)

    # ---- auth ----------------------------------------------------------------------------

    @staticmethod
    def _bearer(request: web.Request) -> bytes | None:
        header = request.headers.get("Authorization", "")
        scheme, _space, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip().encode("utf-8", errors="replace")

    @staticmethod
    def _matches(token: bytes | None, keys: list[bytes]) -> bool:
        if token is None:
            return False
        found = False
        for key in keys:  # no early exit: the time taken does not tell which key matched
            found |= hmac.compare_digest(token, key)
        return found

    def check_api_key(self, request: web.Request) -> web.Response | None:
        if self.config.auth.allow_unauthenticated:
            return None
        if self._matches(self._bearer(request), self._api_keys):
            return None
        return openai_error(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_request_error",
                            "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_admin_key(self, request: web.Request) -> web.Response | None:
        if self._matches(self._bearer(request), self._admin_keys):
            return None
        return openai_error(401, "admin key required (Authorization: Bearer <admin key>)", "invalid_request_error",
                            "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_any_key(self, request: web.Request) -> web.Response | None:
        token = self._bearer(request)
        if self._matches(token, self._admin_keys):
            return None
        return self.check_api_key(request)

    # ---- OpenAI routes -------------------------------------------------------------------

    def unknown_model(self, name: str) -> web.Response:
        valid = ", ".join(sorted(self.config.names))
        return openai_error(404, f"The model '{name}' does not exist. Valid ids: {valid}", "invalid_request_error",
                            "model_not_found", "model")

    async def list_models(self, request: web.Request) -> web.Response:
        denied = self.check_api_key(request)
        if denied is not None:
            return denied
        created = int(self.started)
        data = [{
            "id": model.id, "object": "model", "created": created, "owned_by": "llmstack-router",
            "loaded": self.is_loaded(model.id), "aliases": list(model.aliases), "backend": model.backend,
            "group": self.config.backends[model.backend].group,
        } for model in self.config.models.values()]
        return web.json_response({"object": "list", "data": data})

    async def inference(self, request: web.Request) -> web.StreamResponse:
        denied = self.check_api_key(request)
        if denied is not None:
            return denied
        body = await request.read()
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return openai_error(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json")
        try:
            _validate(request.path, payload)
        except BadRequest as exc:
            return openai_error(400, str(exc), "invalid_request_error", "invalid_request", exc.param)
        model = self.config.resolve(payload["model"])
        if model is None:
            return self.unknown_model(payload["model"])
        request[MODEL_ID] = model.id
        if payload["model"] != model.served_name:
            payload["model"] = model.served_name
            body = json.dumps(payload).encode()
        stream = payload.get("stream") is True
        lane = self.lane_of[model.id]
        ticket = lane.enqueue(model.id)
        response: web.StreamResponse | None = None
        try:
            if not ticket.future.done():
                response = await self._wait(request, ticket.future, model, stream)
            try:
                ticket.result()
            except QueueFull as exc:
                return await self._fail(request, response, 503, str(exc), "server_error", "queue_full",
                                        {"Retry-After": str(exc.retry_after_s)})
            except LoadFailed as exc:
                return await self._fail(request, response, 503, f"model {model.id} could not be loaded: {exc}",
                                        "server_error", "model_load_failed", {"Retry-After": "1"})
            return await self._forward(request, lane, model, body, stream, response)
        finally:
            ticket.close()

    async def _wait(self, request: web.Request, future: asyncio.Future[int], model: ModelSpec,
                    stream: bool) -> web.StreamResponse | None:
        """Wait for the grant; a streaming client gets SSE comments meanwhile so proxies keep it."""
        if not stream:
            await asyncio.wait({future})
            return None
        began = time.monotonic()
        response: web.StreamResponse | None = None
        interval = self.config.loading_progress_interval_s
        while not future.done():
            await asyncio.wait({future}, timeout=interval)
            if future.done():
                break
            if response is None:
                response = web.StreamResponse(status=200, headers={
                    "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                await response.prepare(request)
            await response.write(f": loading {model.id} {time.monotonic() - began:.0f}s\n\n".encode())
        return response

    async def _fail(self, request: web.Request, response: web.StreamResponse | None, status: int, message: str,
                    err_type: str, code: str, headers: dict[str, str]) -> web.StreamResponse:
        if response is None:
            request[STATUS] = status
            return openai_error(status, message, err_type, code, headers=headers)
        request[STATUS] = 200
        await response.write(sse_error(message, err_type, code))
        await response.write_eof()
        return response

    async def _forward(self, request: web.Request, lane: Lane, model: ModelSpec, body: bytes, stream: bool,
                       response: web.StreamResponse | None) -> web.StreamResponse:
        backend = self.config.backends[model.backend]
        headers = self._upstream_headers[backend.name] | {"X-Request-Id": request[REQUEST_ID]}
        began = time.monotonic()
        try:
            upstream = await self.upstreams[backend.name].post(request.path, body, headers, backend.request_timeout_s)
        except (OSError, TimeoutError) as exc:
            return await self._upstream_failed(request, lane, model, response, exc)
        self.metrics.upstream_seconds.observe(time.monotonic() - began, model.id)
        try:
            content_type = upstream.content_type
            is_sse = stream and upstream.status == 200 and content_type.startswith("text/event-stream")
            if response is None and not is_sse:
                data = await upstream.read()
                request[STATUS] = upstream.status
                return web.Response(body=data, status=upstream.status, headers={"Content-Type": content_type})
            if response is None:
                response = web.StreamResponse(status=200, headers={
                    "Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                await response.prepare(request)
            request[STATUS] = 200
            if upstream.status != 200:
                detail = (await upstream.read()).decode(errors="replace")[:2000]
                await response.write(sse_error(f"upstream answered {upstream.status}: {detail}",
                                               "server_error", "upstream_error"))
            else:
                async for chunk in upstream.iter_chunks():
                    await response.write(chunk)
            await response.write_eof()
            return response
        except (UpstreamError, TimeoutError) as exc:
            return await self._upstream_failed(request, lane, model, response, exc)
        except (asyncio.CancelledError, ConnectionResetError):
            # The client left: drop the upstream connection so the engine stops generating.
            upstream.close()
            request[STATUS] = 499
            raise

    async def _upstream_failed(self, request: web.Request, lane: Lane, model: ModelSpec,
                               response: web.StreamResponse | None, exc: BaseException) -> web.StreamResponse:
        backend = self.config.backends[model.backend]
        if isinstance(exc, TimeoutError):
            status, code = 504, "upstream_timeout"
            message = f"backend {backend.name} sent nothing for {backend.request_timeout_s:.0f}s (request_timeout_s)"
        else:
            status, code = 502, "upstream_error"
            message = f"backend {backend.name} failed while serving {model.id}: {exc}"
            lane.upstream_failed(model.id)
        log.warning(message)
        if response is None or not response.prepared:
            request[STATUS] = status
            return openai_error(status, message, "server_error", code)
        await response.write(sse_error(message, "server_error", code))
        await response.write_eof()
        return response

    # ---- operations routes ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def status_body(self) -> dict[str, Any]:
        return {"uptime_s": round(time.time() - self.started, 1), "groups": [lane.status() for lane in self.lanes]}

    async def status(self, request: web.Request) -> web.Response:
        if self.config.auth.metrics_require_key:
            denied = self.check_any_key(request)
            if denied is not None:
                return denied
        return web.json_response(self.status_body())

    async def metrics_text(self, request: web.Request) -> web.Response:
        if self.config.auth.metrics_require_key:
            denied = self.check_any_key(request)
            if denied is not None:
                return denied
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _admin_json(self, request: web.Request) -> dict[str, Any]:
        try:
            payload = json.loads(await request.read() or b"{}")
        except (ValueError, RecursionError) as exc:
            raise BadRequest("the request body is not valid JSON") from exc
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object")
        return payload

    async def admin_load(self, request: web.Request) -> web.Response:
        denied = self.check_admin_key(request)
        if denied is not None:
            return denied
        try:
            payload = await self._admin_json(request)
        except BadRequest as exc:
            return openai_error(400, str(exc), "invalid_request_error", "invalid_request")
        name = payload.get("model")
        model = self.config.resolve(name) if isinstance(name, str) else None
        if model is None:
            return self.unknown_model(str(name))
        lane = self.lane_of[model.id]
        ticket = lane.enqueue(model.id)
        try:
            await asyncio.wait({ticket.future})
            ticket.result()
        except QueueFull as exc:
            return openai_error(503, str(exc), "server_error", "queue_full", headers={"Retry-After": "5"})
        except LoadFailed as exc:
            return openai_error(503, str(exc), "server_error", "model_load_failed")
        finally:
            ticket.close()
        return web.json_response({"loaded": model.id, "lane": lane.name})

    async def admin_unload(self, request: web.Request) -> web.Response:
        denied = self.check_admin_key(request)
        if denied is not None:
            return denied
        try:
            payload = await self._admin_json(request)
        except BadRequest as exc:
            return openai_error(400, str(exc), "invalid_request_error", "invalid_request")
        if isinstance(payload.get("model"), str):
            model = self.config.resolve(payload["model"])
            if model is None:
                return self.unknown_model(payload["model"])
            lanes = [self.lane_of[model.id]] if self.lane_of[model.id].core.active == model.id else []
        elif isinstance(payload.get("group"), str) and payload["group"] in self.config.groups:
            lanes = [lane for lane in self.lanes if lane.group.name == payload["group"]]
        else:
            return openai_error(400, f"give 'model' or 'group' (one of {', '.join(self.config.groups)})",
                                "invalid_request_error", "invalid_request")
        for lane in lanes:
            lane.request_unload()
        return web.json_response({"unloading": [lane.name for lane in lanes]}, status=202)

    async def admin_status(self, request: web.Request) -> web.Response:
        denied = self.check_admin_key(request)
        if denied is not None:
            return denied
        body = self.status_body()
        logs = {}
        for lane in self.lanes:
            for name, runtime in lane.backends.items():
                logs[name] = (await runtime.controller.last_logs(20)).splitlines()
        body["backend_logs"] = logs
        return web.json_response(body)


@web.middleware
async def _observe(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
        rid = uuid.uuid4().hex
    request[REQUEST_ID] = rid
    token = request_id.set(rid)
    began = time.monotonic()
    router = request.app[ROUTER_KEY]
    status = 500
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405/413: keep the status, OpenAI shape
            response = openai_error(exc.status, exc.reason, "invalid_request_error", exc.reason.lower().replace(
                " ", "_"))
        except BadRequest as exc:
            response = openai_error(400, str(exc), "invalid_request_error", "invalid_request", exc.param)
        except (asyncio.CancelledError, ConnectionResetError):
            status = request.get(STATUS, 499)
            raise
        except Exception:
            log.exception("unhandled error")
            response = openai_error(500, "internal router error; see the router log with this request id",
                                    "server_error", "internal_error")
        status = request.get(STATUS, response.status)
        if not response.prepared:
            response.headers["X-Request-Id"] = rid
        return response
    finally:
        model = request.get(MODEL_ID)
        if model is not None:
            router.metrics.requests.inc(model, str(status))
        access_log.info("%s %s %s", request.method, request.path, status, extra={
            "status": status, "model": model, "duration_ms": round((time.monotonic() - began) * 1000, 3)})
        request_id.reset(token)


def create_app(config: RouterConfig, probe: VramProbe | None = None) -> web.Application:
    router = Router(config, probe)
    app = web.Application(middlewares=[_observe], client_max_size=config.max_body_bytes)
    app[ROUTER_KEY] = router
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    app.router.add_get("/health", router.health)
    app.router.add_get("/status", router.status)
    app.router.add_get("/metrics", router.metrics_text)
    app.router.add_get("/v1/models", router.list_models)
    for path in INFERENCE_PATHS:
        app.router.add_post(path, router.inference)
    app.router.add_post("/admin/load", router.admin_load)
    app.router.add_post("/admin/unload", router.admin_unload)
    app.router.add_get("/admin/status", router.admin_status)
    return app
