"""The HTTP side: OpenAI-compatible routes, admin routes, auth, pass-through proxying."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from .config import ModelSpec, RouterConfig
from .control import kill_all_spawned
from .engines import upstream_headers
from .group import Lane, LoadFailed, build_lanes
from .metrics import Gauge, Metrics
from .middleware import MODEL_ID, REQUEST_ID, STATUS, Keys, Need, access_log, auth, errors, request_ids
from .reload import KEYS
from .responses import BadRequest, openai_error, sse_error
from .scheduler import QueueFull
from .upstream import Upstream, UpstreamError
from .vram import VramProbe, make_probe

# The stream a request's answer is on, once prepared: where a drain-deadline cut writes its error event.
PREPARED = web.RequestKey("prepared_response", web.StreamResponse)
log = logging.getLogger("llmstack_router.app")

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
ROUTER_KEY: web.AppKey[Router] = web.AppKey("router")


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

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, _app: web.Application | None = None) -> None:
        # One pooled session for every upstream: keep-alive connections skip a TCP handshake
        # per request, which is most of what a proxy hop costs on loopback.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=75, force_close=False)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.lanes = build_lanes(self.config, self.session, self.probe, self.metrics, self._held_elsewhere)
        self.lane_of = {model_id: lane for lane in self.lanes for model_id in lane.models}
        await asyncio.gather(*(lane.adopt_running() for lane in self.lanes))
        self.metrics.add_gauge(Gauge("llmrouter_queue_depth", "Requests waiting for a model, by lane.", ("lane",),
                                     lambda: {(lane.name,): lane.snapshot().queue_depth for lane in self.lanes}))
        self.metrics.add_gauge(Gauge("llmrouter_in_flight", "Requests being served, by lane.", ("lane",),
                                     lambda: {(lane.name,): lane.snapshot().in_flight for lane in self.lanes}))
        self.metrics.add_gauge(Gauge("llmrouter_model_loaded", "1 if the model is up.", ("model",),
                                     lambda: {(m,): float(self.is_loaded(m)) for m in self.config.models}))
        self.metrics.add_gauge(Gauge(
            "llmrouter_state_file_ok", "0 if the backend's last state-file read or write failed (TabbyAPI).",
            ("backend",), lambda: {(name,): float(status["state_error"] is None)
                                   for lane in self.lanes for name, runtime in lane.backends.items()
                                   if "state_error" in (status := runtime.engine.status())}))

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
            active = other.snapshot().active
            if other is not lane and other.group.name == lane.group.name and active:
                held += other.models[active].vram_mib or 0
        return held

    def is_loaded(self, model_id: str) -> bool:
        return self.lane_of[model_id].snapshot().loaded == model_id

    # ---- OpenAI routes -------------------------------------------------------------------

    def unknown_model(self, name: str) -> web.Response:
        valid = ", ".join(sorted(self.config.names))
        return openai_error(404, f"The model '{name}' does not exist. Valid ids: {valid}", "invalid_request_error",
                            "model_not_found", "model")

    async def list_models(self, request: web.Request) -> web.Response:
        created = int(self.started)
        data = [{
            "id": model.id, "object": "model", "created": created, "owned_by": "llmstack-router",
            "loaded": self.is_loaded(model.id), "aliases": list(model.aliases), "backend": model.backend,
            "group": self.config.backends[model.backend].group,
        } for model in self.config.models.values()]
        return web.json_response({"object": "list", "data": data})

    async def inference(self, request: web.Request) -> web.StreamResponse:
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
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if ticket.cut is None or task is None or task.uncancel():
                raise  # the client left (or shutdown): not a drain-deadline cut
            return await self._fail(request, request.get(PREPARED, response), 503, ticket.cut, "server_error",
                                    "drain_timeout", {"Retry-After": "1"})
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
                request[PREPARED] = response
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
        return web.json_response(self.status_body())

    async def metrics_text(self, request: web.Request) -> web.Response:
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
            # The lane's measure: its last swap's duration (scheduler.retry_after_s), as on /v1/*.
            return openai_error(503, str(exc), "server_error", "queue_full",
                                headers={"Retry-After": str(exc.retry_after_s)})
        except LoadFailed as exc:
            return openai_error(503, str(exc), "server_error", "model_load_failed", headers={"Retry-After": "1"})
        finally:
            ticket.close()
        return web.json_response({"loaded": model.id, "lane": lane.name})

    async def admin_unload(self, request: web.Request) -> web.Response:
        try:
            payload = await self._admin_json(request)
        except BadRequest as exc:
            return openai_error(400, str(exc), "invalid_request_error", "invalid_request")
        if isinstance(payload.get("model"), str):
            model = self.config.resolve(payload["model"])
            if model is None:
                return self.unknown_model(payload["model"])
            lanes = [self.lane_of[model.id]] if self.lane_of[model.id].snapshot().active == model.id else []
        elif isinstance(payload.get("group"), str) and payload["group"] in self.config.groups:
            lanes = [lane for lane in self.lanes if lane.group.name == payload["group"]]
        else:
            return openai_error(400, f"give 'model' or 'group' (one of {', '.join(self.config.groups)})",
                                "invalid_request_error", "invalid_request")
        for lane in lanes:
            lane.request_unload()
        return web.json_response({"unloading": [lane.name for lane in lanes]}, status=202)

    async def admin_status(self, request: web.Request) -> web.Response:
        body = self.status_body()
        logs = {}
        for lane in self.lanes:
            for name, runtime in lane.backends.items():
                logs[name] = (await runtime.controller.last_logs(20)).splitlines()
        body["backend_logs"] = logs
        return web.json_response(body)


def route_table(router: Router) -> list[tuple[str, str, Any, Need]]:
    """Every route: method, path, handler, and the key it takes (the auth middleware reads it)."""
    ops = Need.ANY if router.config.auth.metrics_require_key else Need.NONE
    return [
        ("GET", "/health", router.health, Need.NONE),
        ("GET", "/status", router.status, ops),
        ("GET", "/metrics", router.metrics_text, ops),
        ("GET", "/v1/models", router.list_models, Need.API),
        *(("POST", path, router.inference, Need.API) for path in INFERENCE_PATHS),
        ("POST", "/admin/load", router.admin_load, Need.ADMIN),
        ("POST", "/admin/unload", router.admin_unload, Need.ADMIN),
        ("GET", "/admin/status", router.admin_status, Need.ADMIN),
    ]


def create_app(config: RouterConfig, probe: VramProbe | None = None) -> web.Application:
    router = Router(config, probe)
    routes = route_table(router)
    needs = {path: need for _method, path, _handler, need in routes}
    keys = Keys(config.auth)
    middlewares = [request_ids, access_log(router.metrics), errors, auth(keys, needs)]
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[ROUTER_KEY] = router
    app[KEYS] = keys  # SIGHUP replaces the keys in place (reload.py)
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    for method, path, handler, _need in routes:
        # add_get also answers HEAD, as before the route table.
        (app.router.add_get if method == "GET" else app.router.add_post)(path, handler)
    return app
