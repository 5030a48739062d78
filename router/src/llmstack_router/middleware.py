"""The request pipeline around every handler, outermost first:

``request_ids`` (X-Request-Id in and out, the log context), ``access_log`` (one line and the
request counter per request), ``errors`` (exceptions to OpenAI-shaped answers), ``auth``
(which key each route takes, from the route table ``create_app`` builds).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum

from aiohttp import web

from .config import AuthSpec
from .logs import request_id
from .metrics import Metrics
from .responses import BadRequest, openai_error

log = logging.getLogger("llmstack_router.app")
access_logger = logging.getLogger("llmstack_router.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
MODEL_ID = web.RequestKey("model_id", str)
# The status the client saw when it differs from the response object's (a stream that
# answered 200 and then wrote an error event, a client that left: 499).
STATUS = web.RequestKey("status", int)
# Refusals the router answers itself; counted apart (llmrouter_rejected_total), as strings once.
REJECTED = {code: str(code) for code in (400, 401, 404, 408, 413, 429)}


# A generated request id: 16 random hex digits drawn once per process, then a counter (32 digits, as
# uuid4().hex was): unique without a getrandom(2) and a UUID object per request.
_RID_PREFIX = secrets.token_hex(8)
_rid_counter = itertools.count(1)


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")
    if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
        rid = f"{_RID_PREFIX}{next(_rid_counter):016x}"
    request[REQUEST_ID] = rid
    token = request_id.set(rid)
    try:
        response = await handler(request)
        if not response.prepared:
            response.headers["X-Request-Id"] = rid
        return response
    finally:
        request_id.reset(token)


def access_log(metrics: Metrics) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def logged(request: web.Request, handler: Handler) -> web.StreamResponse:
        began = time.monotonic()
        status = 500
        try:
            try:
                response = await handler(request)
            except (asyncio.CancelledError, ConnectionResetError):
                status = request.get(STATUS, 499)
                raise
            status = request.get(STATUS, response.status)
            return response
        finally:
            model = request.get(MODEL_ID)
            if model is not None:
                metrics.requests.inc(model, str(status))
            if status in REJECTED:
                metrics.rejected.inc(REJECTED[status])
            if access_logger.isEnabledFor(logging.INFO):
                # Formatted and written on the loop's next pass, after aiohttp has sent the response
                # (call_soon runs it in a copy of this context: the request id goes with it).
                asyncio.get_running_loop().call_soon(_access_line, request.method, request.path, status, model,
                                                     round((time.monotonic() - began) * 1000, 3))

    return logged


def _access_line(method: str, path: str, status: int, model: str | None, duration_ms: float) -> None:
    access_logger.info("%s %s %s", method, path, status,
                       extra={"status": status, "model": model, "duration_ms": duration_ms})


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413: keep the status, OpenAI shape
        return openai_error(exc.status, exc.reason, "invalid_request_error", exc.reason.lower().replace(" ", "_"))
    except BadRequest as exc:
        return openai_error(400, str(exc), "invalid_request_error", "invalid_request", exc.param)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error")
        return openai_error(500, "internal router error; see the router log with this request id",
                            "server_error", "internal_error")


class Need(StrEnum):
    """Which key a route takes."""

    NONE = "none"    # /health; /status and /metrics when auth.metrics_require_key is false
    API = "api"      # /v1/*: an API key (none needed with auth.allow_unauthenticated)
    ADMIN = "admin"  # /admin/*: an admin key, never an API key
    ANY = "any"      # /status, /metrics: either kind


class Keys:
    """Bearer tokens against the configured keys, compared without early exit."""

    def __init__(self, auth: AuthSpec) -> None:
        self.allow_unauthenticated = auth.allow_unauthenticated
        self.api = [k.encode() for k in auth.api_keys]
        self.admin = [k.encode() for k in auth.admin_keys]

    @staticmethod
    def bearer(request: web.Request) -> bytes | None:
        header = request.headers.get("Authorization", "")
        scheme, _space, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip().encode("utf-8", errors="replace")

    @staticmethod
    def matches(token: bytes | None, keys: list[bytes]) -> bool:
        if token is None:
            return False
        found = False
        for key in keys:  # no early exit: the time taken does not tell which key matched
            found |= hmac.compare_digest(token, key)
        return found

    def deny(self, need: Need, request: web.Request) -> web.Response | None:
        """None when the request may pass, else the 401 to answer."""
        if need == Need.NONE:
            return None
        token = self.bearer(request)
        if need == Need.ADMIN:
            if self.matches(token, self.admin):
                return None
            return openai_error(401, "admin key required (Authorization: Bearer <admin key>)",
                                "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if need == Need.ANY and self.matches(token, self.admin):
            return None
        if self.allow_unauthenticated or self.matches(token, self.api):
            return None
        return openai_error(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_request_error",
                            "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def auth(keys: Keys, needs: Mapping[str, Need]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """``needs`` maps a route's path to its key; a path not in it (a bug) takes an admin key."""

    @web.middleware
    async def authorized(request: web.Request, handler: Handler) -> web.StreamResponse:
        match = request.match_info
        # No route (404) or wrong method (405): aiohttp answers that, as it did before any key check.
        if match.http_exception is None:
            resource = match.route.resource
            path = resource.canonical if resource is not None else ""
            denied = keys.deny(needs.get(path, Need.ADMIN), request)
            if denied is not None:
                return denied
        return await handler(request)

    return authorized
