"""Unit tests for plugins/module_utils/_http.py over real sockets.

Every server here is a real listening socket (TCP, TLS or unix), so the tests exercise Ansible's
urls.Request the way the modules use it: proxies from the environment, CA bundles, client
certificates, unix sockets, HTTP errors and incremental Server-Sent-Events reading.
"""

from __future__ import annotations

import os
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from ansible_collections.llmstack.inference.plugins.module_utils import _http
from ansible_collections.llmstack.inference.tests.unit.plugins.json_http import JsonHandler

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
PROXY_VARS += tuple(var.upper() for var in PROXY_VARS)


class Recorder:
    def __init__(self):
        self.requests = []  # (method, request target, headers)
        self.reply = (200, {"ok": True})
        self.sse = []  # SSE chunks for POST /sse
        self.gate = threading.Event()
        self.gate_released = None


def make_handler(recorder, name):
    class Handler(JsonHandler):
        def do_GET(self):
            recorder.requests.append(("GET", self.path, dict(self.headers)))
            status, body = recorder.reply
            self.reply(status, dict(body, served_by=name) if isinstance(body, dict) else body)

        def do_POST(self):
            recorder.requests.append(("POST", self.path, dict(self.headers)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for chunk in recorder.sse:
                if chunk is None:
                    # Wait until the client has seen what was sent so far.
                    recorder.gate_released = recorder.gate.wait(5)
                    continue
                self.wfile.write(chunk.encode())
                self.wfile.flush()

    return Handler


def start(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def clean_env(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def servers():
    started = []

    def make(name="server", context=None):
        recorder = Recorder()
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(recorder, name))
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        started.append(start(server))
        recorder.url = "%s://127.0.0.1:%d" % ("https" if context else "http", server.server_address[1])
        return recorder

    yield make
    for server in started:
        server.shutdown()
        server.server_close()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("base", "path", "expected"),
    [
        ("http://h:5000", "/v1/models", "http://h:5000/v1/models"),
        ("http://h:5000/", "/v1/models", "http://h:5000/v1/models"),
        ("http://h:5000/v1", "/v1/models", "http://h:5000/v1/models"),
        ("http://h:5000/v1/", "/v1/models", "http://h:5000/v1/models"),
        ("http://h/gateway", "/v1/models", "http://h/gateway/v1/models"),
    ],
)
def test_join_url(base, path, expected):
    assert _http.join_url(base, path) == expected


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:5000", True),
        ("http://127.8.9.10", True),
        ("http://localhost:8000/v1", True),
        ("http://LOCALHOST", True),
        ("http://node.localhost", True),
        ("http://[::1]:5000", True),
        ("http://10.0.0.5:5000", False),
        ("http://gateway.example.org", False),
        ("http://[2001:db8::1]:5000", False),
        ("http://localhost.example.org", False),
    ],
)
def test_is_loopback(url, loopback):
    assert _http.is_loopback(url) is loopback


def test_argument_spec_adds_key_and_timeout_without_touching_the_shared_dict():
    spec = _http.http_argument_spec("admin_key", timeout=600)
    assert spec["admin_key"] == {"type": "str", "no_log": True}
    assert spec["timeout"] == {"type": "int", "default": 600}
    assert set(_http.HTTP_COMMON_ARGS) <= set(spec)
    spec["url"]["default"] = "changed"
    assert "admin_key" not in _http.HTTP_COMMON_ARGS
    assert "timeout" not in _http.HTTP_COMMON_ARGS
    assert _http.HTTP_COMMON_ARGS["url"]["default"] == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("status", "body", "detail"),
    [
        (503, {"detail": "No models are currently loaded."}, "No models are currently loaded."),
        (401, {"error": {"message": "Invalid key", "type": "auth"}}, "Invalid key"),
        (400, {"detail": [{"loc": ["body"], "msg": "bad"}]}, '[{"loc": ["body"], "msg": "bad"}]'),
        (404, {"error": "no route"}, "no route"),
        (500, "plain text", '"plain text"'),
    ],
)
def test_http_error_status_is_a_result(clean_env, servers, status, body, detail):
    server = servers()
    server.reply = (status, body)
    result = _http.HttpClient(server.url).call("GET", "/v1/model")
    assert isinstance(result, _http.HttpResult)
    assert result.status == status
    assert result.error_detail() == detail
    # open_stream gives the same result instead of a live response.
    streamed = _http.HttpClient(server.url).open_stream("GET", "/v1/model")
    assert isinstance(streamed, _http.HttpResult)
    assert streamed.status == status


def test_success_sends_headers_and_json(clean_env, servers):
    server = servers()
    client = _http.HttpClient(server.url + "/v1", headers={"Authorization": "Bearer k"})
    result = client.call("GET", "/v1/models")
    assert result.status == 200
    assert result.json() == {"ok": True, "served_by": "server"}
    method, path, headers = server.requests[-1]
    assert (method, path) == ("GET", "/v1/models")
    assert headers["Authorization"] == "Bearer k"
    assert headers["Accept"] == _http.ACCEPT


def test_netrc_does_not_replace_the_key(clean_env, servers, tmp_path):
    # urls.Request would send ~/.netrc credentials as Authorization, over the Bearer key.
    server = servers()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password secret\n")
    netrc.chmod(0o600)
    clean_env.setenv("NETRC", str(netrc))
    _http.HttpClient(server.url, headers={"Authorization": "Bearer k"}).call("GET", "/v1/models")
    assert server.requests[-1][2]["Authorization"] == "Bearer k"


def _silent_server():
    """Accepts connections and never answers: a server that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    return listener, "http://127.0.0.1:%d" % listener.getsockname()[1]


@pytest.mark.parametrize("case", ["refused", "hangs", "missing_socket"])
def test_transport_failures_raise_transport_error(clean_env, tmp_path, case):
    listener = None
    kwargs = {}
    if case == "refused":
        url = "http://127.0.0.1:%d" % free_port()
    elif case == "hangs":
        listener, url = _silent_server()
    else:
        url = "http://tabby"
        kwargs["unix_socket"] = str(tmp_path / "absent.sock")
    client = _http.HttpClient(url, **kwargs)
    started = time.monotonic()
    try:
        with pytest.raises(_http.TransportError) as failure:
            client.call("GET", "/v1/models", timeout=0.5)
    finally:
        if listener:
            listener.close()
    assert "GET http" in str(failure.value)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://host/x", "127.0.0.1:5000"])
def test_only_http_urls(url):
    with pytest.raises(_http.HttpConfigError, match="only http:// and https://"):
        _http.HttpClient(url)


# --- proxies ---------------------------------------------------------------------------------


@pytest.fixture
def proxy(servers, clean_env):
    proxy = servers("proxy")
    clean_env.setenv("http_proxy", proxy.url)
    clean_env.setenv("HTTP_PROXY", proxy.url)
    return proxy


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("use_proxy", [True, False])
def test_loopback_never_goes_through_the_environment_proxy(servers, proxy, host, use_proxy):
    target = servers("target")
    url = target.url.replace("127.0.0.1", host)
    client = _http.HttpClient(url, use_proxy=use_proxy)
    result = client.call("GET", "/v1/models")
    assert result.json()["served_by"] == "target"
    assert proxy.requests == []
    assert client.use_proxy is False


def test_other_hosts_use_the_environment_proxy_when_asked(proxy):
    client = _http.HttpClient("http://inference.example.invalid:8000", use_proxy=True)
    assert client.use_proxy is True
    result = client.call("GET", "/v1/models")
    assert result.json()["served_by"] == "proxy"
    # A proxy gets the absolute URL as the request target.
    assert proxy.requests[-1][1] == "http://inference.example.invalid:8000/v1/models"


@pytest.mark.parametrize("how", ["default", "use_proxy=false", "no_proxy"])
def test_other_hosts_bypass_the_proxy_by_default_or_no_proxy(proxy, clean_env, how):
    if how == "no_proxy":
        clean_env.setenv("no_proxy", "inference.example.invalid")
        client = _http.HttpClient("http://inference.example.invalid:8000", use_proxy=True)
    elif how == "default":
        client = _http.HttpClient("http://inference.example.invalid:8000")
    else:
        client = _http.HttpClient("http://inference.example.invalid:8000", use_proxy=False)
    # Direct, the .invalid name does not resolve: a transport failure, and the proxy saw nothing.
    with pytest.raises(_http.TransportError):
        client.call("GET", "/v1/models", timeout=5)
    assert proxy.requests == []


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    garbage = folder / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return {"cert": str(cert), "key": str(key), "garbage": str(garbage), "missing": str(folder / "absent.pem")}


def _server_context(tls_files, require_client_cert=False):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    if require_client_cert:
        # The self-signed certificate doubles as the client's and as the CA that signs it.
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls_files["cert"])
    return context


@pytest.mark.parametrize(
    ("kwargs", "works"),
    [
        ({}, False),
        ({"ca_path": "cert"}, True),
        ({"validate_certs": False}, True),
    ],
)
def test_ca_path_is_passed_through(clean_env, servers, tls_files, kwargs, works):
    server = servers(context=_server_context(tls_files))
    kwargs = {k: tls_files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    client = _http.HttpClient(server.url, **kwargs)
    if works:
        assert client.call("GET", "/v1/models").status == 200
    else:
        with pytest.raises(_http.TransportError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            client.call("GET", "/v1/models")


@pytest.mark.parametrize("with_client_cert", [True, False])
def test_client_cert_is_passed_through(clean_env, servers, tls_files, with_client_cert):
    server = servers(context=_server_context(tls_files, require_client_cert=True))
    kwargs = {"ca_path": tls_files["cert"]}
    if with_client_cert:
        kwargs.update(client_cert=tls_files["cert"], client_key=tls_files["key"])
    client = _http.HttpClient(server.url, **kwargs)
    if with_client_cert:
        assert client.call("GET", "/v1/models").status == 200
    else:
        with pytest.raises(_http.TransportError):
            client.call("GET", "/v1/models")


@pytest.mark.parametrize(
    ("option", "file", "needle"),
    [
        ("ca_path", "missing", "ca_path %(missing)s is not a file"),
        ("client_cert", "missing", "client_cert %(missing)s is not a file"),
        ("client_key", "missing", "client_key %(missing)s is not a file"),
        ("ca_path", "garbage", "the TLS files were rejected"),
        ("client_cert", "garbage", "the TLS files were rejected"),
    ],
)
def test_unusable_tls_files_fail_at_once(tls_files, option, file, needle):
    with pytest.raises(_http.HttpConfigError) as failure:
        _http.HttpClient("https://127.0.0.1:1", **{option: tls_files[file]})
    assert needle % tls_files in str(failure.value)


# --- unix sockets --------------------------------------------------------------------------------


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def test_unix_socket(clean_env, tmp_path):
    recorder = Recorder()
    path = str(tmp_path / "tabby.sock")

    class Handler(make_handler(recorder, "unix")):
        def address_string(self):
            return "unix"

    server = start(UnixHTTPServer(path, Handler))
    try:
        # A proxy in the environment must not matter for a socket either.
        clean_env.setenv("http_proxy", "http://127.0.0.1:%d" % free_port())
        client = _http.HttpClient("http://tabby", unix_socket=path)
        assert client.use_proxy is False
        result = client.call("GET", "/v1/models")
    finally:
        server.shutdown()
        server.server_close()
        os.unlink(path)
    assert result.json()["served_by"] == "unix"
    assert recorder.requests[-1][:2] == ("GET", "/v1/models")


# --- Server-Sent Events ----------------------------------------------------------------------------


def test_sse_is_read_incrementally(clean_env, servers):
    # The server sends one event, then waits until the test has seen it before sending more:
    # a reader that waited for the whole body would see nothing until the 5 s gate timed out.
    server = servers()
    server.sse = ['data: {"n": 1}\r\n\r\n', None, 'data: {"n": 2}\r\n\r\n']
    response = _http.HttpClient(server.url).open_stream("POST", "/sse", {"x": 1}, timeout=10)
    with response:
        events = _http.iter_sse(response)
        first = next(events)
        assert first.json() == {"n": 1}
        assert server.gate_released is None  # the server is still holding the second event
        server.gate.set()
        rest = list(events)
    assert server.gate_released is True
    assert [event.json() for event in rest] == [{"n": 2}]
    assert server.requests[-1][2]["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        (["data: a\n\n", "data: b\n\n"], [("message", "a"), ("message", "b")]),
        (["data: a\r\n\r\n", ": ping\r\n\r\n", "data:b\r\n\r\n"], [("message", "a"), ("message", "b")]),
        (["event: progress\ndata: one\ndata: two\n\n"], [("progress", "one\ntwo")]),
        (["data: last-without-blank-line\n"], [("message", "last-without-blank-line")]),
        (["retry: 10\nid: 3\n\n", "data: [DONE]\n\n"], [("message", "[DONE]")]),
    ],
)
def test_sse_framing(clean_env, servers, chunks, expected):
    server = servers()
    server.sse = chunks
    response = _http.HttpClient(server.url).open_stream("POST", "/sse")
    with response:
        assert [(event.event, event.data) for event in _http.iter_sse(response)] == expected


def test_sse_interrupted_stream_is_a_transport_error():
    class Broken:
        def readline(self):
            raise ConnectionResetError("peer reset")

    with pytest.raises(_http.TransportError, match="event stream interrupted"):
        list(_http.iter_sse(Broken()))
