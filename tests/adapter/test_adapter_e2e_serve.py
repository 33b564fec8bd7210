"""`make serve` (python -m stack.serve): ready, answers, starts a dead process again,
stops cleanly on SIGTERM and Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from stack.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _answers(port: int) -> bool:
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and bool(r.json()["choices"][0]["message"]["content"])


def test_serve_ready_answers_restarts_and_stops_cleanly(tmp_path):
    """SIGTERM here; Ctrl-C (SIGINT) goes through the same handler in stack/serve.py."""
    sig = signal.SIGTERM
    ports = [free_port() for _ in range(4)]
    env = dict(os.environ, ADAPTER_HOST="127.0.0.1", ADAPTER_PORT=str(ports[0]), TRITON_HTTP_PORT=str(ports[1]),
               TRITON_GRPC_PORT=str(ports[2]), TRITON_METRICS_PORT=str(ports[3]), HF_HUB_OFFLINE="1")
    out = tmp_path / "serve.out"
    proc = subprocess.Popen([sys.executable, "-m", "stack.serve"], cwd=REPO_ROOT, env=env,
                            stdout=open(out, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "Ready" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.5)
        text = out.read_text()
        assert f"http://127.0.0.1:{ports[0]}/v1" in text and "curl" in text
        assert _answers(ports[0])
        # A dead adapter, then a dead tritonserver, are started again; the other keeps running.
        for name in ("openai_adapter.main", "tritonserver"):
            (victim,) = [c for c in psutil.Process(proc.pid).children() if name in " ".join(c.cmdline())]
            victim.kill()
            deadline = time.monotonic() + 120
            while not _answers(ports[0]):
                assert proc.poll() is None, out.read_text()
                assert time.monotonic() < deadline, out.read_text()
                time.sleep(1)
        assert out.read_text().count("died; starting it again") == 2
        proc.send_signal(sig)
        assert proc.wait(60) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.5)
    left = [l for l in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
            if f"--http-port={ports[1]}" in l]
    assert left == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{ports[0]}/health/live", timeout=2)
