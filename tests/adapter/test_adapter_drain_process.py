"""The real server process (openai_adapter.main over the fake client, real sockets):
SIGTERM drains without cutting anyone off, a second signal exits at once, the pre-drain
delay, no redirects on trailing slashes, and a body that stalls gets 408."""
from __future__ import annotations

import http.client
import importlib.util
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from openai_adapter.accounts.schema import ledger, reservations
from openai_adapter.accounts.store import make_engine

_spec = importlib.util.spec_from_file_location("fake_adapter_main", Path(__file__).with_name("fake_adapter_main.py"))
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)
FakeModelAdapterProcess = _main.FakeModelAdapterProcess

GRACE_S = 6.0  # margin 1.5 s: streams still running 4.5 s after the signal are ended
COMP = {"model": "fake", "prompt": "[[delay=100]]", "stream": True}


def _start(tmp_path, name: str, **env) -> FakeModelAdapterProcess:
    adapter = FakeModelAdapterProcess(tmp_path / f"{name}.log", **env).start()
    adapter.wait_ready()
    return adapter


class Stream(threading.Thread):
    """A streaming completion read in the background: its data lines, and when it ended."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[str] = []
        self.first = threading.Event()
        self.ended_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line[6:])
                        self.first.set()
        except BaseException as err:  # noqa: BLE001 (reported by the test)
            self.error = err
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


def _post(conn: http.client.HTTPConnection) -> tuple[int, dict, dict]:
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "fake", "prompt": "x", "max_tokens": 1}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())


def test_sigterm_drains_streams_refuses_new_requests_and_exits_0(tmp_path):
    adapter = _start(tmp_path, "drain", ADAPTER_SHUTDOWN_GRACE_S=GRACE_S, ADAPTER_RETRY_AFTER_S=2)
    try:
        kept = http.client.HTTPConnection("127.0.0.1", adapter.port, timeout=10)
        kept.request("GET", "/v1/models")
        assert kept.getresponse().read() and kept.sock is not None  # a kept-alive connection
        short = Stream(adapter.url, {**COMP, "max_tokens": 20})  # about 2 s: fits in the grace period
        long = Stream(adapter.url, {**COMP, "max_tokens": 300})  # about 30 s: does not
        for s in (short, long):
            s.start()
            assert s.first.wait(10) and s.error is None, s.error
        adapter.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert httpx.get(adapter.url + "/health/ready").status_code == 503  # readiness fails at once
        assert httpx.get(adapter.url + "/health/live").status_code == 200
        r = httpx.post(adapter.url + "/v1/completions", json={"model": "fake", "prompt": "x"})  # a new connection
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "shutting_down" and r.json()["error"]["type"] == "server_error"
        sock = kept.sock
        status, headers, body = _post(kept)  # on the kept-alive connection
        assert kept.sock is sock or kept.sock is None  # the same socket carried it (then closed)
        assert status == 503 and headers["retry-after"] == "2" and headers["connection"] == "close"
        assert body["error"]["code"] == "shutting_down"

        short.join(10)
        assert short.error is None and short.lines[-1] == "[DONE]"
        assert all('"error"' not in line for line in short.lines)
        assert json.loads(short.lines[-2])["choices"][0]["finish_reason"] == "length"

        long.join(GRACE_S + 5)
        assert long.error is None and long.lines[-1] == "[DONE]", (long.error, long.lines[-3:])
        err = json.loads(long.lines[-2])["error"]
        assert err["code"] == "shutting_down" and err["type"] == "server_error"
        assert long.ended_at - signalled < GRACE_S
        rc = adapter.proc.wait(GRACE_S + 5)
        assert rc == 0, adapter.log_tail()
        assert time.monotonic() - signalled < GRACE_S + 4
    finally:
        adapter.stop()
    e = make_engine(adapter.env["ADAPTER_DATABASE_URL"])
    with e.connect() as conn:
        outcomes = sorted(r.outcome for r in conn.execute(sa.select(ledger)))
        assert conn.execute(sa.select(sa.func.count()).select_from(reservations)).scalar() == 0
    e.dispose()
    assert outcomes == ["failed", "length"]  # both settled: the drained one with what it generated


def test_a_second_signal_exits_at_once(tmp_path):
    adapter = _start(tmp_path, "twice", ADAPTER_SHUTDOWN_GRACE_S=60)
    try:
        s = Stream(adapter.url, {**COMP, "max_tokens": 300})
        s.start()
        assert s.first.wait(10)
        adapter.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert adapter.proc.poll() is None  # draining
        adapter.proc.send_signal(signal.SIGINT)
        t = time.monotonic()
        assert adapter.proc.wait(10) == 128 + signal.SIGINT
        assert time.monotonic() - t < 5
    finally:
        adapter.stop()


def test_pre_drain_delay_keeps_serving_while_not_ready_then_exits_when_idle(tmp_path):
    adapter = _start(tmp_path, "delay", ADAPTER_SHUTDOWN_GRACE_S=30, ADAPTER_SHUTDOWN_DELAY_S=2)
    try:
        adapter.proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        assert httpx.get(adapter.url + "/health/ready").status_code == 503
        r = httpx.post(adapter.url + "/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1})
        if time.monotonic() - t < 1.5:  # (a slow machine may have passed the delay already)
            assert r.status_code == 200, r.text
        assert adapter.proc.wait(15) == 0  # after the delay, nothing in flight: no need to wait 30 s
        assert time.monotonic() - t < 10
    finally:
        adapter.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    adapter = _start(tmp_path_factory.mktemp("gate"), "gate", ADAPTER_BODY_TIMEOUT_S=1)
    yield adapter
    adapter.stop()


@pytest.mark.parametrize("path", ["/v1/models/", "/health/ready/", "/v1/models//", "/nope/"])
def test_no_redirect_on_a_trailing_slash(running, path):
    r = httpx.get(running.url + path, follow_redirects=False)
    assert not 300 <= r.status_code < 400, (r.status_code, r.headers)
    assert "location" not in r.headers
    without = httpx.get(running.url + path.rstrip("/"))
    assert r.status_code == without.status_code  # the same answer as without the slash
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_trailing_slash_post_is_served(running):
    r = httpx.post(running.url + "/v1/completions/", json={"model": "fake", "prompt": "x", "max_tokens": 1},
                   follow_redirects=False)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


def _raw(port: int, data: bytes, wait_s: float) -> tuple[bytes, float]:
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
    return out, time.monotonic() - t


def test_a_body_that_stalls_gets_408_with_the_openai_body(running):
    body = json.dumps({"model": "fake", "prompt": "hello there", "max_tokens": 1}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    out, took = _raw(running.port, head + body[: len(body) // 2], wait_s=8)
    status_line, _, rest = out.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), out
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert json.loads(payload)["error"] == {"message": "the request body did not arrive within 1 s",
                                            "type": "invalid_request_error", "param": None,
                                            "code": "request_timeout"}
    assert took < 6  # answered and closed, not held open


def test_a_chunked_body_that_stalls_gets_408(running):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
    out, _ = _raw(running.port, head, wait_s=8)
    assert out.startswith(b"HTTP/1.1 408"), out
