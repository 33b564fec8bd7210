"""Requests that are not valid HTTP never reach the app; uvicorn answers them itself. They
get a 400 with the OpenAI error body and the connection closed (they got uvicorn's plain
text "Invalid HTTP request received.", found by the reliability suite's hostile cases),
and the server goes on answering."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from adapter_testlib import FakeClient  # type: ignore[import-not-found]
from openai_adapter.app import create_app
from openai_adapter.main import uvicorn_config
from openai_adapter.settings import Settings
from stack.ports import free_port


@pytest.fixture(scope="module")
def port():
    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, log_level="warning", access_log=False, database_url="")
    server = uvicorn.Server(uvicorn_config(settings, create_app(settings, client=FakeClient())))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(10)


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may close before reading everything (a huge header)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    return out


BAD_HTTP = [
    b"GARBAGE\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n12345",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nzz\r\n",
]


@pytest.mark.parametrize("data", BAD_HTTP, ids=["request-line", "huge-header", "content-length", "two-lengths",
                                                "chunked"])
def test_invalid_http_gets_the_openai_error_body(port, data):
    raw = _raw(port, data)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert lines[0].startswith("HTTP/1.1 400"), raw[:200]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    err = json.loads(body[:int(headers["content-length"])])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_http_request"
    assert httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5).status_code == 200
