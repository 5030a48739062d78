# Copyright: llmstack maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The HTTP layer of the modules that talk to an inference server (model_load, model_probe).

Transport comes from Ansible's own ``ansible.module_utils.urls`` (``Request``): proxies and
``no_proxy``, CA bundles, client certificates, timeouts and unix sockets behave as in every
other Ansible HTTP module. This file keeps only what Ansible lacks:

- HTTP error statuses come back as results (``HttpResult``), not exceptions: callers decide
  whether a 503 means "still loading" or a failure, and ``error_detail`` finds the server's words.
- Network-level failures (refused, reset, DNS, timeout, TLS) raise ``TransportError``, which
  readiness loops treat as "not up yet"; bad local TLS files raise ``HttpConfigError`` at once.
- Server-Sent-Events read incrementally (``iter_sse``) and base-URL joining (``join_url``).

Private to the collection: it can change at any time.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
from http.client import HTTPException
from typing import Any, Dict, Iterator, Optional

from ansible.module_utils.urls import ConnectionError as AnsibleConnectionError
from ansible.module_utils.urls import Request, make_context

# The options every HTTP module shares (documented in doc fragment llmstack.inference._http).
# The key option (api_key or admin_key) and the timeout, whose meaning and default differ per
# module, are added by http_argument_spec().
HTTP_COMMON_ARGS = dict(
    url=dict(type="str", default="http://127.0.0.1:5000"),
    api_tokens_file=dict(type="path"),
    validate_certs=dict(type="bool", default=True),
    ca_path=dict(type="path"),
    client_cert=dict(type="path"),
    client_key=dict(type="path"),
    unix_socket=dict(type="path"),
    # Off by default, as before this module used urls: the servers are on the node or its LAN, and
    # a proxy exported for pip or apt (a play's `environment`) would receive their requests, since
    # urllib's no_proxy knows no CIDR ranges. On, a gateway behind a proxy can be reached.
    use_proxy=dict(type="bool", default=False),
)

ACCEPT = "application/json, text/event-stream"


def http_argument_spec(key_option: str, timeout: int) -> Dict[str, Any]:
    """HTTP_COMMON_ARGS plus the module's key option (no_log) and its timeout default."""
    spec = copy.deepcopy(HTTP_COMMON_ARGS)
    spec[key_option] = dict(type="str", no_log=True)
    spec["timeout"] = dict(type="int", default=timeout)
    return spec


class TransportError(Exception):
    """The request never got an HTTP answer (connection refused/reset, DNS, timeout, TLS)."""


class HttpConfigError(ValueError):
    """A local setting (CA bundle, client certificate) cannot be used; retrying will not help."""


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


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_file(option: str, path: Optional[str]) -> None:
    if path and not os.path.isfile(path):
        raise HttpConfigError(
            "%s %s is not a file: give the path of a PEM file on the host the module runs on" % (option, path)
        )


class HttpClient:
    """Requests against one server, on one ansible.module_utils.urls.Request.

    The TLS context is built once (not per readiness poll) so that a missing or broken CA bundle
    or client certificate fails at once with HttpConfigError instead of looking like a server
    that is not up yet.
    """

    def __init__(
        self,
        base_url: str,
        headers: Optional[Dict[str, str]] = None,
        validate_certs: bool = True,
        ca_path: Optional[str] = None,
        client_cert: Optional[str] = None,
        client_key: Optional[str] = None,
        unix_socket: Optional[str] = None,
        use_proxy: bool = False,
    ) -> None:
        if not base_url.lower().startswith(("http://", "https://")):
            # urls.Request would also open file:// and ftp:// URLs; an inference server is only HTTP(S).
            raise HttpConfigError("url %s: only http:// and https:// URLs are supported" % base_url)
        for option, path in (("ca_path", ca_path), ("client_cert", client_cert), ("client_key", client_key)):
            _check_file(option, path)
        try:
            context = make_context(
                cafile=ca_path, validate_certs=validate_certs, client_cert=client_cert, client_key=client_key
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise HttpConfigError(
                "the TLS files were rejected (%s): check that ca_path, client_cert and client_key are PEM files "
                "and that the key matches the certificate" % exc
            ) from exc
        self.base_url = base_url
        # Loopback servers (and unix sockets) are reached directly even with use_proxy: a proxy
        # cannot reach this host's own 127.0.0.1, and no_proxy rarely lists loopback. Other hosts
        # follow use_proxy, with urllib's http(s)_proxy / no_proxy handling as in ansible.builtin.uri.
        self.use_proxy = bool(use_proxy) and not unix_socket and not is_loopback(base_url)
        all_headers = {"Accept": ACCEPT}
        all_headers.update(headers or {})
        self.request = Request(
            headers=all_headers,
            use_proxy=self.use_proxy,
            unix_socket=unix_socket,
            context=context,
            # ~/.netrc would replace the Authorization header the key travels in.
            use_netrc=False,
            follow_redirects="urllib2",
        )

    def open_stream(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        """Sends a request; returns the live response (2xx, read it incrementally) or an
        HttpResult for an HTTP error status."""
        url = join_url(self.base_url, path)
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            return self.request.open(method, url, data=data, headers=headers, timeout=timeout)
        except urllib.error.HTTPError as exc:
            try:
                body = exc.read()
            except (OSError, HTTPException):
                body = b""
            return HttpResult(exc.code, dict(exc.headers or {}), body)
        except (urllib.error.URLError, AnsibleConnectionError, OSError, HTTPException, socket.timeout) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransportError("%s %s: %s" % (method, url, reason)) from exc

    def call(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> HttpResult:
        """A whole request: status, headers and body, HTTP errors included."""
        response = self.open_stream(method, path, payload, timeout)
        if isinstance(response, HttpResult):
            return response
        with response:
            try:
                body = response.read()
            except (OSError, HTTPException, socket.timeout) as exc:
                raise TransportError("%s %s: reading the answer failed: %s" % (method, path, exc)) from exc
            return HttpResult(response.status, dict(response.headers), body)


def client_from_params(params: Dict[str, Any], headers: Optional[Dict[str, str]] = None) -> HttpClient:
    """An HttpClient from the HTTP_COMMON_ARGS options of a module."""
    return HttpClient(
        params["url"],
        headers=headers,
        validate_certs=params["validate_certs"],
        ca_path=params["ca_path"],
        client_cert=params["client_cert"],
        client_key=params["client_key"],
        unix_socket=params["unix_socket"],
        use_proxy=params["use_proxy"],
    )


def iter_sse(response: Any) -> Iterator[SSEEvent]:
    """Yields the events of a text/event-stream response as they arrive.

    Reads line by line (never the whole body), so progress and first-token times are seen live.
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
