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
from typing import Any

from aiohttp import web


class FakeUpstream:
    def __init__(self, model: str = "fake", engine: str = "llamacpp", chunks: int = 5, chunk_delay_s: float = 0.0,
                 never_ready: bool = False, api_key: str | None = None, models: list[str] | None = None) -> None:
        self.model = model
        self.engine = engine
        self.chunks = chunks
        self.chunk_delay_s = chunk_delay_s
        self.never_ready = never_ready
        self.api_key = api_key
        self.available = models or [model]
        self.requests = 0
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
        app.router.add_get("/_stats", self.stats)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            app.router.add_post(path, self.complete)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.never_ready:
            return web.json_response({"status": "loading model"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        if self.never_ready:
            return web.json_response({"error": "loading"}, status=503)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def current_model(self, request: web.Request) -> web.Response:
        if self.engine != "tabbyapi":
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.json_response({"id": self.model, "object": "model"})

    async def load(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = body.get("model_name")
        if request.headers.get("x-admin-key") != self.api_key:
            return web.json_response({"detail": "admin key"}, status=401)
        if name not in self.available:
            return web.json_response({"detail": f"no model {name}"}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for module in range(1, 4):
            await asyncio.sleep(0.01)
            event = {"model_type": "model", "module": module, "modules": 3, "status": "processing"}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        self.model = name
        await response.write(b'data: {"model_type": "model", "status": "finished"}\n\n')
        await response.write_eof()
        return response

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
