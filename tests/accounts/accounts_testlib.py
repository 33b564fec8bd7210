"""Helpers of the accounts tests: a real adapter process over a fake inference side."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_ADAPTER = Path(__file__).with_name("fake_adapter.py")


class FakeAdapter:
    """`openai_adapter` served by uvicorn in its own process, with the test FakeClient as
    its model (a word per delay): the HTTP server, accounts and database are real."""

    def __init__(self, log_path: Path, **env) -> None:
        from stack.ports import free_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = dict(os.environ, ADAPTER_HOST="127.0.0.1", ADAPTER_PORT=str(self.port),
                        ADAPTER_LOG_LEVEL="warning", ADAPTER_ACCESS_LOG="false",
                        **{k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FakeAdapter":
        self.proc = subprocess.Popen([sys.executable, str(FAKE_ADAPTER)], env=self.env, cwd=REPO_ROOT,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"adapter exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health/live", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"adapter not live after 60 s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(condition, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until `condition()` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s (last value {value!r})")
        time.sleep(interval)
