"""Helpers of the accounts tests: a real adapter process over a fake inference side."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "fake_adapter_main", Path(__file__).parents[1] / "adapter" / "fake_adapter_main.py")
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)


class FakeAdapter(_main.FakeModelAdapterProcess):
    """The adapter's real server (uvicorn, accounts, database) in its own process, with the
    tests' FakeClient as its model; start() returns once it is ready."""

    def __init__(self, log_path: Path, **env) -> None:
        super().__init__(log_path, ADAPTER_LOG_LEVEL="warning", **env)

    def start(self) -> "FakeAdapter":
        super().start()
        self.wait_ready(60)
        return self


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
