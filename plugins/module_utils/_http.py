# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small HTTP + Server-Sent-Events client shared by model_load and model_probe.

Stdlib only (urllib), because it runs on the managed node. HTTP error statuses come back as
results, not exceptions: callers decide whether a 503 means "still loading" or a failure.
Network-level failures (refused, reset, timeout) raise TransportError, which readiness loops
treat as "not up yet".
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Any, Dict, Iterator, Optional

# Servers an operator points this at are on the node or its LAN; an environment proxy
# (http_proxy set for pip) would route 127.0.0.1 probes away, so proxies are never used.
_NO_PROXY = urllib.request.ProxyHandler({})


class TransportError(Exception):
    """The request never got an HTTP answer (connection refused/reset, DNS, timeout, TLS)."""


class HttpResult:
    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8") or "null")
        except ValueError:
            return None

    def error_detail(self) -> str:
        """The server's own words: FastAPI 'detail', OpenAI 'error.message', or the raw text."""
        data = self.json()
        if isinstance(data, dict):
            detail = data.get("detail")
            error = data.get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
            if detail:
                return detail if isinstance(detail, str) else json.dumps(detail)
            if isinstance(error, str):
                return error
        return self.body.decode("utf-8", "replace")[:500]


class SSEEvent:
    def __init__(self, event: str, data: str) -> None:
        self.event = event
        self.data = data

    def json(self) -> Any:
        return json.loads(self.data)


def join_url(base: str, path: str) -> str:
    """Joins a server base URL and an API path; a base already ending in /v1 is accepted."""
    base = base.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[:-3]
    return base + path


def _opener(validate_certs: bool, ca_path: Optional[str]) -> urllib.request.OpenerDirector:
    context = ssl.create_default_context(cafile=ca_path)
    if not validate_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return urllib.request.build_opener(_NO_PROXY, urllib.request.HTTPSHandler(context=context))


def _request(method: str, url: str, headers: Optional[Dict[str, str]], payload: Any) -> urllib.request.Request:
    data = None
    all_headers = {"Accept": "application/json, text/event-stream"}
    if payload is not None:
        data = json.dumps(payload).encode("utf-8")
        all_headers["Content-Type"] = "application/json"
    all_headers.update(headers or {})
    if not url.lower().startswith(("http://", "https://")):
        # urllib would also open file:// and ftp:// URLs; an inference server is only ever HTTP(S).
        raise TransportError("%s: only http:// and https:// URLs are supported" % url)
    return urllib.request.Request(url, data=data, headers=all_headers, method=method)  # noqa: S310


def open_url(
    method: str,
    url: str,
    headers: Optional[Dict[str, str]] = None,
    payload: Any = None,
    timeout: float = 30.0,
    validate_certs: bool = True,
    ca_path: Optional[str] = None,
) -> Any:
    """Opens a request; returns the live response (2xx) or an HttpResult for an HTTP error."""
    try:
        return _opener(validate_certs, ca_path).open(_request(method, url, headers, payload), timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read()
        except (OSError, HTTPException):
            body = b""
        return HttpResult(exc.code, dict(exc.headers or {}), body)
    except (urllib.error.URLError, OSError, HTTPException, socket.timeout) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransportError("%s %s: %s" % (method, url, reason)) from exc


def fetch(
    method: str,
    url: str,
    headers: Optional[Dict[str, str]] = None,
    payload: Any = None,
    timeout: float = 30.0,
    validate_certs: bool = True,
    ca_path: Optional[str] = None,
) -> HttpResult:
    """A whole request: status, headers and body, HTTP errors included."""
    response = open_url(method, url, headers, payload, timeout, validate_certs, ca_path)
    if isinstance(response, HttpResult):
        return response
    with response:
        try:
            body = response.read()
        except (OSError, HTTPException, socket.timeout) as exc:
            raise TransportError("%s %s: reading the answer failed: %s" % (method, url, exc)) from exc
        return HttpResult(response.status, dict(response.headers), body)


def iter_sse(response: Any) -> Iterator[SSEEvent]:
    """Yields the events of a text/event-stream response as they arrive.

    Follows the SSE framing rules servers differ on: CRLF or LF line ends, ':' comment lines
    (keep-alive pings), multi-line data joined by newlines, an optional space after the colon.
    """
    event_name = "message"
    data_lines = []  # type: list[str]
    while True:
        try:
            raw = response.readline()
        except (OSError, HTTPException, socket.timeout) as exc:
            raise TransportError("event stream interrupted: %s" % exc) from exc
        if not raw:
            break
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data_lines:
                yield SSEEvent(event_name, "\n".join(data_lines))
            event_name, data_lines = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _colon, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data_lines.append(value)
        elif field == "event":
            event_name = value
    if data_lines:
        yield SSEEvent(event_name, "\n".join(data_lines))
