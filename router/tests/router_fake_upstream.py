"""Emulator of an OpenAI-compatible inference engine, for tests only (we have no GPU engines here).

It speaks the parts of llama.cpp / vLLM / TabbyAPI that the router relies on (readiness
endpoints, completions with and without SSE streaming, TabbyAPI's admin model load with SSE
progress) and can misbehave on purpose: exit at start, never become ready, stream slowly.
It runs in-process (``FakeUpstream``) or as a process the router spawns (``python fake_upstream.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import PurePosixPath
from typing import Any

from aiohttp import web


class FakeUpstream:
    def __init__(self, model: str = "fake", engine: str = "llamacpp", chunks: int = 5, chunk_delay_s: float = 0.0,
                 never_ready: bool = False, api_key: str | None = None) -> None:
        self.model = model
        self.engine = engine
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.never_ready = never_ready
        self.api_key = api_key
        self.requests = 0
        self.probes = 0  # readiness probes (/health, /v1/models): the load a starting engine sees
        self.disconnects = 0
        self.completed_streams = 0
        self.request_ids: list[str] = []
        self.auth_headers: list[str | None] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/model", self.current_model)
        app.router.add_post("/v1/model/load", self.load)
        app.router.add_post("/v1/model/unload", self.unload)
        app.router.add_get("/_stats", self.stats)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            app.router.add_post(path, self.complete)
        return app

    async def health(self, request: web.Request) -> web.Response:
        self.probes += 1
        if self.never_ready:
            return web.json_response({"status": "loading model"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        self.probes += 1
        if self.never_ready:
            return web.json_response({"error": "loading"}, status=503)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def current_model(self, request: web.Request) -> web.Response:
        return web.json_response({"detail": "Not Found"}, status=404)

    async def load(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": "Not Found"}, status=404)

    async def unload(self, request: web.Request) -> web.Response:
        return web.json_response({"detail": "Not Found"}, status=404)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "disconnects": self.disconnects,
                                  "completed_streams": self.completed_streams, "model": self.model})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.request_ids.append(request.headers.get("X-Request-Id", ""))
        self.auth_headers.append(request.headers.get("Authorization"))
        payload: dict[str, Any] = await request.json()
        if payload.get("model") not in (self.model, None):
            return web.json_response({"error": {"message": f"model {payload.get('model')} not served here"}},
                                     status=404)
        fault = payload.get("fake_fault")
        if fault is not None:
            return await self.fault(request, fault)
        if request.path.endswith("embeddings"):
            return web.json_response({"object": "list", "model": self.model,
                                      "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]})
        if not payload.get("stream"):
            return web.json_response({
                "id": "cmpl-1", "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"hello from {self.model}"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index in range(self.chunks):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                chunk = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": self.model,
                         "choices": [{"index": 0, "delta": {"content": f"t{index} "}, "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed_streams += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        return response

    async def fault(self, request: web.Request, fault: str) -> web.StreamResponse:
        """Misbehaviour a request asks for with ``"fake_fault"`` (the router forwards the body as is)."""
        if fault == "html_error":  # a proxy or a crashed engine in front: HTML, not JSON
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if fault == "big":  # an unstreamed answer of 16 MiB: more than any socket buffers hold (a slow reader's)
            return web.Response(body=b'{"object": "chat.completion", "pad": "' + b"x" * (16 << 20) + b'"}',
                                content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            if fault == "hang":  # headers, then nothing
                await asyncio.sleep(3600)
            elif fault == "trickle":  # one byte at a time, each well inside any per-chunk timeout
                while True:
                    await response.write(b":")
                    await asyncio.sleep(0.05)
            elif fault == "flood":  # 64 MiB as fast as the router takes it (a slow reader's stream)
                piece = b"data: " + b"x" * 65530 + b"\n\n"
                for _index in range(1024):
                    await response.write(piece)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        await response.write_eof()
        return response


class FakeTabbyApi(FakeUpstream):
    """TabbyAPI's model API, as strict as the real one at the pinned commits (exl2: 79126f9, exl3: e632af4).

    ``folders``: the model folders under model_dir (nested paths); ``loaded``: the folder loaded at start.
    Each behaviour names the real file it follows.
    """

    def __init__(self, folders: list[str], loaded: str | None, admin_key: str, generation: str = "exl3",
                 fail_load: tuple[str, ...] = ()) -> None:
        super().__init__(PurePosixPath(loaded).name if loaded else "none", engine="tabbyapi", api_key=admin_key)
        assert generation in ("exl2", "exl3")
        self.folders, self.loaded, self.generation, self.fail_load = folders, loaded, generation, fail_load
        self.load_bodies: list[dict[str, Any]] = []
        self.unloads = 0
        self.real_loads = 0
        self.module_delay_s = 0.005  # per loaded module: a load takes time

    def _admin_refusal(self, request: web.Request) -> web.Response | None:
        # common/auth.py check_admin_key: x-admin-key first, else "Authorization: Bearer <key>"; 401 otherwise.
        key = request.headers.get("x-admin-key")
        bearer = request.headers.get("Authorization", "")
        if key is None and bearer.lower().startswith("bearer "):
            key = bearer.split(" ", 1)[1]
        if key is None:
            return web.json_response({"detail": "Please provide an admin key"}, status=401)
        if key != self.api_key:
            return web.json_response({"detail": "Invalid admin key"}, status=401)
        return None

    def _no_model(self) -> web.Response:
        # common/model.py check_model_container: 503 while no model is loaded.
        return web.json_response({"detail": "No models are currently loaded."}, status=503)

    async def current_model(self, request: web.Request) -> web.Response:
        if self.loaded is None:
            return self._no_model()
        # backends/*/model.py model_info: the card id is the folder's basename (model_dir.name).
        return web.json_response({"id": PurePosixPath(self.loaded).name, "object": "model",
                                  "owned_by": "tabbyAPI", "parameters": {}})

    async def unload(self, request: web.Request) -> web.Response:
        refusal = self._admin_refusal(request) or (self._no_model() if self.loaded is None else None)
        if refusal is not None:
            return refusal
        self.loaded, self.model, self.unloads = None, "none", self.unloads + 1
        return web.Response(status=200)

    async def load(self, request: web.Request) -> web.StreamResponse:
        refusal = self._admin_refusal(request)
        if refusal is not None:
            return refusal
        body = await request.json()
        self.load_bodies.append(body)
        name = body.get("model_name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            # endpoints/core/types/model.py ModelLoadRequest: model_name is required (FastAPI answers 422).
            return web.json_response({"detail": [{"loc": ["body", "model_name"], "msg": "Field required"}]},
                                     status=422)
        if name not in self.folders:
            # endpoints/core/router.py load_model: model_dir / model_name must exist, else 400 before any stream.
            return web.json_response({"detail": "Could not find the model path for load. Check model name or "
                                                "config.yml?"}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.generation == "exl3":
            await response.write(b": ping - 2026-01-01 00:00:00\r\n\r\n")  # sse_starlette pings (main only)
        # common/model.py load_model_gen: exl2 compares basenames only and returns without an event;
        # main compares resolved full paths and yields (1, 1, "model") -> processing + finished.
        if self.loaded is not None and self.generation == "exl2" and PurePosixPath(self.loaded).name == \
                PurePosixPath(name).name:
            await response.write_eof()
            return response
        if self.loaded == name:
            for status in ("processing", "finished"):
                await self._event(response, {"model_type": "model", "module": 1, "modules": 1, "status": status})
            await response.write_eof()
            return response
        # common/model.py load_model_gen: the loaded model is unloaded before the new one loads.
        self.loaded, self.model = None, "none"
        if name in self.fail_load:
            # endpoints/core/utils/model.py stream_model_load: an exception becomes one SSE event
            # with the error body (common/networking.py get_generator_error), then the stream ends.
            await self._event(response, {"error": {"message": f"CUDA out of memory loading {name}", "trace": None}})
            await response.write_eof()
            return response
        types = ["draft", "model"] if isinstance(body.get("draft_model"), dict) else ["model"]
        for model_type in types:
            for module in range(1, 4):
                await asyncio.sleep(self.module_delay_s)
                await self._event(response, {"model_type": model_type, "module": module, "modules": 3,
                                             "status": "processing"})
            await self._event(response, {"model_type": model_type, "module": 3, "modules": 3, "status": "finished"})
        self.loaded, self.model, self.real_loads = name, PurePosixPath(name).name, self.real_loads + 1
        await response.write_eof()
        return response

    async def _event(self, response: web.StreamResponse, event: dict[str, Any]) -> None:
        # sse_starlette frames each event as "data: <json>\r\n\r\n".
        await response.write(f"data: {json.dumps(event)}\r\n\r\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--engine", default="llamacpp")
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--exit-at-start", type=int, default=None)
    parser.add_argument("--exit-if-file", default=None, help="exit 3 at start while this file exists")
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--ready-file", default=None)
    parser.add_argument("--exit-file", default=None)
    args = parser.parse_args()
    print(f"fake engine pid {os.getpid()} starting model {args.model}", flush=True)
    if args.exit_if_file and os.path.exists(args.exit_if_file):
        args.exit_at_start = 3
    if args.exit_at_start is not None:
        print("error: CUDA out of memory while loading weights (emulated)", flush=True)
        sys.exit(args.exit_at_start)
    time.sleep(args.start_delay)
    upstream = FakeUpstream(args.model, args.engine, args.chunks, args.chunk_delay, args.never_ready)

    asyncio.run(_serve(upstream, args.port, args.ready_file, args.exit_file))


async def _serve(upstream: FakeUpstream, port: int, ready_file: str | None, exit_file: str | None) -> None:
    runner = web.AppRunner(upstream.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # Written after the socket listens: the benchmark subtracts this instant from swap times.
    if ready_file:
        with open(ready_file, "w") as handle:
            handle.write(repr(time.time()))
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    if exit_file:
        with open(exit_file, "w") as handle:
            handle.write(repr(time.time()))
    await runner.cleanup()


if __name__ == "__main__":
    main()
