"""The HTTP side: OpenAI-compatible routes, admin routes, auth, pass-through proxying."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp
from aiohttp import web, web_protocol

from .config import LimitsSpec, ModelSpec, RouterConfig
from .control import kill_all_spawned
from .engines import upstream_headers
from .group import Lane, LoadFailed, build_lanes
from .metrics import Gauge, Metrics
from .middleware import MODEL_ID, REQUEST_ID, STATUS, Keys, Need, access_log, auth, errors, request_ids
from .reload import KEYS, reload_config
from .responses import BadRequest, openai_error, sse_error
from .scheduler import QueueFull
from .upstream import Response as UpstreamResponse
from .upstream import Upstream, UpstreamError
from .vram import VramProbe, make_probe

log = logging.getLogger("llmstack_router.app")

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
ROUTER_KEY: web.AppKey[Router] = web.AppKey("router")
STREAM = web.RequestKey("stream", web.StreamResponse)  # the SSE response once prepared
# The request encodings aiohttp's parser decodes itself (aiohttp/http_parser.py DeflateBuffer).
_ENCODINGS = frozenset(("identity", "gzip", "deflate", "br"))
# swap.py appends the backend's log to a load error after this marker: that part is for admins only.
_LOG_MARKER = "\n--- last log lines of "
_ECHO_MAX = 64  # an unknown model name is quoted up to this many characters


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: strict JSON, which refuses NaN/Infinity (Python's json accepts them by default).
_decode = json.JSONDecoder(parse_constant=_no_constant).decode


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
        self.limits = config.limits
        self.in_flight: dict[str, int] = dict.fromkeys(config.models, 0)
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

    async def refuse_queued(self, _app: web.Application | None = None) -> None:
        # on_shutdown: aiohttp runs it before it waits for the handlers (web_runner.py BaseRunner.cleanup).
        for lane in self.lanes:
            lane.refuse_queued("the router is restarting; retry")

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
        shown = name if len(name) <= _ECHO_MAX else f"{name[:_ECHO_MAX]}... ({len(name)} characters)"
        return openai_error(404, f"The model '{shown}' does not exist. Valid ids: {valid}", "invalid_request_error",
                            "model_not_found", "model")

    async def list_models(self, request: web.Request) -> web.Response:
        created = int(self.started)
        data = [{
            "id": model.id, "object": "model", "created": created, "owned_by": "llmstack-router",
            "loaded": self.is_loaded(model.id), "aliases": list(model.aliases), "backend": model.backend,
            "group": self.config.backends[model.backend].group,
        } for model in self.config.models.values()]
        return web.json_response({"object": "list", "data": data})

    async def read_body(self, request: web.Request) -> bytes:
        """The body, within limits.body_read_timeout_s; BadRequest/408 otherwise."""
        encoding = request.headers.get("Content-Encoding")
        if encoding is not None and encoding.strip().lower() not in _ENCODINGS:
            raise BadRequest(f"Content-Encoding {encoding[:32]!r} is not supported (use gzip, deflate, br or none)")
        try:
            if request.content.is_eof():
                # All of it arrived with the headers (the common case): nothing to wait for, no timer.
                return await request.read()
            # aiohttp reads until Content-Length bytes came (web_request.py BaseRequest.read): a client
            # that declares more than it sends would hold the connection until the peer gives up.
            async with asyncio.timeout(self.limits.body_read_timeout_s):
                return await request.read()
        except TimeoutError:
            # The rest of the body may still come: close after the 408 (web_protocol.py keep_alive), never
            # parse it as a request.
            request.protocol.keep_alive(False)
            raise web.HTTPRequestTimeout(reason="Request Timeout") from None
        except web.RequestPayloadError as exc:
            # web_protocol.py sets the parser's payload_exception to RequestPayloadError: a gzip/deflate/br
            # body that does not decode (http_parser.py DeflateBuffer) or a broken chunked body.
            request.protocol.keep_alive(False)
            raise BadRequest(f"the request body does not decode (Content-Encoding or chunking): {exc}") from None

    async def inference(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_body(request)
        try:
            payload = _decode(body.decode("utf-8"))
        except UnicodeDecodeError:
            return openai_error(400, "the request body is not valid UTF-8", "invalid_request_error", "invalid_json")
        except (ValueError, RecursionError):
            return openai_error(400, "the request body is not valid JSON (NaN and Infinity are not JSON either)",
                                "invalid_request_error", "invalid_json")
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
        cap = model.max_in_flight
        if cap is not None and self.in_flight[model.id] >= cap:
            request[STATUS] = 429
            return openai_error(429, f"model {model.id} has {cap} requests in flight (max_in_flight); retry later",
                                "rate_limit_error", "too_many_requests", headers={"Retry-After": "1"})
        self.in_flight[model.id] += 1
        lane = self.lane_of[model.id]
        ticket = lane.enqueue(model.id)
        response: web.StreamResponse | None = None
        try:
            if not ticket.future.done():
                response = await self._wait(request, ticket.future, model, stream)
            try:
                ticket.result()
            except QueueFull as exc:
                return await self._fail(request, response, 503, str(exc), "server_error", exc.code,
                                        {"Retry-After": str(exc.retry_after_s)})
            except LoadFailed as exc:
                # The backend's log lines go to the router log and /admin/status, never to a client.
                reason = str(exc).partition(_LOG_MARKER)[0]
                log.warning("model %s could not be loaded: %s", model.id, exc)
                return await self._fail(request, response, 503, f"model {model.id} could not be loaded: {reason} "
                                        f"(request id {request[REQUEST_ID]}; backend logs: /admin/status)",
                                        "server_error", "model_load_failed", {"Retry-After": "1"})
            return await self._forward(request, lane, model, body, stream, response)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if ticket.cut is None or task is None or task.uncancel():
                raise  # the client left (or shutdown): not a drain-deadline cut
            return await self._fail(request, request.get(STREAM, response), 503, ticket.cut, "server_error",
                                    "drain_timeout", {"Retry-After": "1"})
        finally:
            self.in_flight[model.id] -= 1
            ticket.close()

    async def _open_stream(self, request: web.Request, content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={
            "Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            "X-Request-Id": request[REQUEST_ID]})
        await response.prepare(request)
        # Recorded once prepared: a stalled client, a drain cut or an upstream failure writes its error here.
        request[STREAM] = response
        return response

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
                response = await self._open_stream(request, "text/event-stream")
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
        # One deadline for the whole exchange: request_timeout_s is per chunk, so a backend that
        # trickles a byte at a time would otherwise hold the slot for ever. One timer for both phases.
        deadline = asyncio.timeout(self.limits.upstream_total_timeout_s)
        upstream: UpstreamResponse | None = None
        try:
            async with deadline:
                upstream = await self.upstreams[backend.name].post(request.path, body, headers,
                                                                   backend.request_timeout_s)
                self.metrics.upstream_seconds.observe(time.monotonic() - began, model.id)
                return await self._relay(request, upstream, stream, response)
        except (UpstreamError, TimeoutError) as exc:
            # Before the answer (refused, reset, no headers in time) or while relaying it.
            return await self._upstream_failed(request, lane, model, request.get(STREAM, response), exc,
                                               deadline.expired())
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            if upstream is None and not isinstance(exc, asyncio.CancelledError):
                # Reset by the backend before it answered.
                return await self._upstream_failed(request, lane, model, response, exc, deadline.expired())
            if upstream is not None:
                # The client left: drop the upstream connection so the engine stops generating.
                upstream.close()
                request[STATUS] = 499
            raise
        except OSError as exc:
            if upstream is not None:
                raise  # the client side's, not the backend's
            # Refused, unreachable.
            return await self._upstream_failed(request, lane, model, response, exc, deadline.expired())

    async def _relay(self, request: web.Request, upstream: UpstreamResponse, stream: bool,
                     response: web.StreamResponse | None) -> web.StreamResponse:
        content_type = upstream.content_type
        is_sse = stream and upstream.status == 200 and content_type.startswith("text/event-stream")
        if response is None and not is_sse:
            data = await upstream.read()
            request[STATUS] = upstream.status
            if upstream.status >= 400 and not (content_type.startswith("application/json") and data[:1] == b"{"):
                # An engine (or a proxy before it) that answers an error in HTML or text: OpenAI's shape.
                detail = data[:2000].decode(errors="replace")
                return openai_error(upstream.status, f"backend answered {upstream.status}: {detail}",
                                    "server_error", "upstream_error")
            return web.Response(body=data, status=upstream.status, headers={"Content-Type": content_type})
        if response is None:
            response = await self._open_stream(request, content_type)
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

    async def _upstream_failed(self, request: web.Request, lane: Lane, model: ModelSpec,
                               response: web.StreamResponse | None, exc: BaseException,
                               total_expired: bool = False) -> web.StreamResponse:
        backend = self.config.backends[model.backend]
        if total_expired:
            status, code = 504, "upstream_timeout"
            message = (f"backend {backend.name} did not finish within {self.limits.upstream_total_timeout_s:.0f}s "
                       "(limits.upstream_total_timeout_s)")
        elif isinstance(exc, TimeoutError):
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
            return openai_error(503, str(exc), "server_error", exc.code,
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
    app.on_shutdown.append(router.refuse_queued)
    app.on_cleanup.append(router.stop)
    for method, path, handler, _need in routes:
        # add_get also answers HEAD, as before the route table.
        (app.router.add_get if method == "GET" else app.router.add_post)(path, handler)
    return app


# ---- the connection limit and the client deadlines ----------------------------------------------
# Idle time allowed between two requests of a keep-alive connection: aiohttp's keepalive_timeout, 75 s as
# web.run_app sets it (web.py); an AppRunner without it gets RequestHandler's 3630 s (web_protocol.py).
# Longer than the clients' own idle expiry (httpx 5 s, aiohttp's client 15 s), so they close first and
# never send on a connection we are closing.
KEEPALIVE_TIMEOUT_S = 75.0
# aiohttp counts the requests it parsed on a connection (web_protocol.py RequestHandler.data_received);
# nothing public says whether a connection's first headers have come. Checked once, here, by name.
if "_request_count" not in web_protocol.RequestHandler.__slots__:
    raise ImportError("aiohttp's RequestHandler has no _request_count, which limits.header_read_timeout_s reads: "
                      "install the aiohttp that router/pyproject.toml pins")
_BUSY = json.dumps({"error": {"message": "the router holds its maximum of connections (limits.max_connections); "
                                         "retry later", "type": "server_error", "param": None,
                              "code": "too_many_connections"}}).encode()
_BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY))


class _Busy(asyncio.Protocol):
    """Answers one connection over the limit with a 503, then closes it.

    Half-close first and drop what the client sends: closing a socket with unread input makes the
    kernel send a reset, which can discard the 503 before the client reads it. Held 1 s at most.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.metrics.rejected.inc("503")
        # No isinstance check: uvloop's transports are not asyncio.WriteTransport subclasses.
        transport = cast(asyncio.WriteTransport, transport)
        transport.write(_BUSY_REPLY)
        transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: the answer is the same for all

    def eof_received(self) -> bool:
        return False  # the client is done too: asyncio closes the transport


class _Client(asyncio.Protocol):
    """One client connection: aiohttp's RequestHandler (``inner``) with the two deadlines aiohttp lacks.

    Headers: a connection whose first request has not been parsed within limits.header_read_timeout_s
    (nothing sent, or headers sent byte by byte) is closed; aiohttp alone would wait its keepalive_timeout.
    Between requests KEEPALIVE_TIMEOUT_S governs: aiohttp closes a connection idle (or in the middle of
    its next headers) that long (web_protocol.py _process_keepalive).

    Writes: when the transport pauses writing (over its high-water mark: the client stopped reading),
    the client has limits.client_write_timeout_s to take data again or is dropped. That bounds every
    write to a client, streamed or not, error bodies and aiohttp's own answers included, where
    aiohttp would wait in drain() for ever (http_writer.py); the abort cancels the handler, which
    frees the model's slot. A client that reads costs no timer at all.
    """

    __slots__ = ("header_timer", "inner", "limits", "metrics", "transport", "write_timer")

    def __init__(self, inner: web_protocol.RequestHandler, limits: LimitsSpec, metrics: Metrics) -> None:
        self.inner, self.limits, self.metrics = inner, limits, metrics
        self.transport: asyncio.Transport | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.inner.connection_made(transport)
        self.header_timer = asyncio.get_running_loop().call_later(self.limits.header_read_timeout_s,
                                                                  self._headers_due)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()
        self.write_timer = asyncio.get_running_loop().call_later(self.limits.client_write_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.header_timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.header_timer = self.write_timer = None
        self.inner.connection_lost(exc)

    def _headers_due(self) -> None:
        self.header_timer = None
        if self.inner._request_count == 0 and self.transport is not None:
            self.metrics.client_timeouts.inc("header_read")
            log.debug("client %s sent no complete headers in %.1fs (limits.header_read_timeout_s): closed",
                      self.transport.get_extra_info("peername"), self.limits.header_read_timeout_s)
            self.transport.abort()

    def _stalled(self) -> None:
        self.write_timer = None
        if self.transport is not None:
            self.metrics.client_timeouts.inc("write")
            log.warning("client %s took no write for %.1fs (limits.client_write_timeout_s): dropped",
                        self.transport.get_extra_info("peername"), self.limits.client_write_timeout_s)
            self.transport.abort()


def limited_factory(runner: web.AppRunner, config: RouterConfig) -> Any:
    """aiohttp's protocol factory (web_server.py Server.__call__) behind a count of its open connections,
    each with the client deadlines (_Client).

    aiohttp has no connection limit of its own: every accepted socket gets a RequestHandler, and
    Server.connection_made/connection_lost keep the set this reads (a connection a deadline closed
    leaves it once its handler task ended).
    """
    server = runner.server
    assert server is not None, "runner.setup() first"
    limits = config.limits
    metrics = runner.app[ROUTER_KEY].metrics

    def factory() -> asyncio.Protocol:
        if len(server.connections) >= limits.max_connections:
            return _Busy(metrics)
        return _Client(server(), limits, metrics)

    return factory


async def serve(config: RouterConfig, runner: web.AppRunner) -> asyncio.Server:
    """Listen on config.host:port with the connection limit and the client deadlines (instead of web.TCPSite)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(limited_factory(runner, config), config.host, config.port,
                                    reuse_address=True, backlog=1024)


def run(config: RouterConfig, config_path: str | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
    """What web.run_app did, with the connection limit: serve until SIGTERM/SIGINT, then clean up.
    SIGHUP reloads ``config_path`` in place (reload.py); without a handler its default action kills us.
    ``loop_factory``: the event loop (cli.py passes uvloop's when it is installed); None: asyncio's."""

    async def main() -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which is what
        # drops it from the queue or closes its upstream request.
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_TIMEOUT_S,
                               handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        listener = await serve(config, runner)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_config, app, config_path)
        try:
            await stop.wait()
        finally:
            listener.close()
            await runner.shutdown()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
