"""Error answers in the OpenAI shape, shared by the handlers and the middleware."""

from __future__ import annotations

import json

from aiohttp import web


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def openai_error(status: int, message: str, err_type: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def sse_error(message: str, err_type: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"
