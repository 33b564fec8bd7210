"""`make serve`: export the default model if needed, start tritonserver and the OpenAI
adapter, wait until the adapter is ready, print how to call it; start either again
if it dies (with back-off); stop both on Ctrl-C / SIGTERM leaving no process behind
(the adapter drains first, within its grace period).

Ports and host: ADAPTER_HOST, ADAPTER_PORT (9000), TRITON_HTTP_PORT (8000),
TRITON_GRPC_PORT (8001), TRITON_METRICS_PORT (8002). Logs go to build/logs/.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stack.triton import REPO_ROOT, TritonServer

MODEL_ID = "smollm2-135m-instruct"
LOG_DIR = REPO_ROOT / "build" / "logs"


class _Stop(Exception):
    pass


def _on_signal(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        sys.exit(f"serve: {name}={raw!r} is not a port number")


def ensure_model(repository: Path) -> Path:
    try:
        from stack.default_model import ensure_default_model
    except ImportError as err:
        sys.exit(f"serve: the default-model exporter is not available ({err}); "
                 "stack/default_model.py must provide ensure_default_model")
    try:
        return ensure_default_model(repository, name=MODEL_ID)
    except (_Stop, KeyboardInterrupt):
        raise
    except Exception as err:  # say what failed, not a traceback
        raise RuntimeError(f"could not prepare the default model: {type(err).__name__}: {err}") from err


def _adapter_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen | None, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Supervised:
    """A child process that is started again when it dies, with a growing pause
    (1 s, 2 s, 4 s … 30 s; back to 1 s after a minute of good health)."""

    def __init__(self, name: str, start, alive, stop) -> None:
        self.name, self._start, self._alive, self._stop = name, start, alive, stop
        self.backoff, self.next_try, self.started_at, self.restarts = 1.0, 0.0, 0.0, 0

    def start(self) -> None:
        self._start()
        self.started_at = time.monotonic()

    def tend(self) -> None:
        """Restart the process if it died (not before its back-off has passed)."""
        now = time.monotonic()
        if self._alive():
            if now - self.started_at > 60:
                self.backoff = 1.0
            return
        if self.next_try == 0.0:
            print(f"serve: {self.name} died; starting it again in {self.backoff:g} s "
                  f"(log {LOG_DIR})", file=sys.stderr, flush=True)
            self.next_try = now + self.backoff
        if now >= self.next_try:
            self.next_try = 0.0
            self.backoff = min(self.backoff * 2, 30.0)
            self.restarts += 1
            self._stop()  # whatever is left of it (a process group, shared memory)
            self.start()

    def stop(self) -> None:
        self._stop()


def main() -> int:
    host = os.environ.get("ADAPTER_HOST", "0.0.0.0")
    port = _env_int("ADAPTER_PORT", 9000)
    http_port = _env_int("TRITON_HTTP_PORT", 8000)
    grpc_port = _env_int("TRITON_GRPC_PORT", 8001)
    metrics_port = _env_int("TRITON_METRICS_PORT", 8002)
    grace = float(os.environ.get("ADAPTER_SHUTDOWN_GRACE_S", "30")) + float(os.environ.get("ADAPTER_SHUTDOWN_DELAY_S",
                                                                                          "0"))
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    triton = TritonServer(REPO_ROOT / "model_repository", http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, log_path=LOG_DIR / "tritonserver.log")
    adapter: list[subprocess.Popen] = []
    env = dict(os.environ, ADAPTER_HOST=host, ADAPTER_PORT=str(port),
               TRITON_REPOSITORY_KEY=triton.repository_key, TRITON_GRPC_URLS=f"127.0.0.1:{grpc_port}",
               TRITON_HTTP_URLS=f"http://127.0.0.1:{http_port}")

    def start_adapter() -> None:
        log = open(LOG_DIR / "adapter.log", "ab")
        adapter[:] = [subprocess.Popen([sys.executable, "-m", "openai_adapter.main"], env=env, cwd=REPO_ROOT,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]

    # Supervision: a dead tritonserver or adapter is started again; the other one keeps
    # running (the adapter answers 503 while Triton is away, and reconnects).
    children = [
        Supervised("tritonserver", triton.start, lambda: triton.proc is not None and triton.proc.poll() is None,
                   lambda: triton.stop(grace=5)),
        Supervised("the adapter", start_adapter, lambda: bool(adapter) and adapter[0].poll() is None,
                   lambda: _stop_process(adapter[0] if adapter else None, grace=grace + 5)),
    ]
    try:
        print(f"serve: preparing the default model {MODEL_ID} in model_repository/ "
              "(first run: fetch + export, about a minute)", flush=True)
        ensure_model(REPO_ROOT / "model_repository")
        print(f"serve: starting tritonserver (HTTP {http_port}, gRPC {grpc_port}, metrics {metrics_port}); "
              f"log {LOG_DIR / 'tritonserver.log'}", flush=True)
        triton.start()
        children[0].started_at = time.monotonic()
        triton.wait_ready(timeout=300)
        print(f"serve: starting the OpenAI adapter on {host}:{port}; log {LOG_DIR / 'adapter.log'}", flush=True)
        children[1].start()
        local = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
        deadline = time.monotonic() + 120
        while not _adapter_ready(local):
            if adapter[0].poll() is not None:
                raise RuntimeError(f"the adapter exited with code {adapter[0].returncode}; "
                                   f"see {LOG_DIR / 'adapter.log'}")
            if triton.proc is not None and triton.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited; see {LOG_DIR / 'tritonserver.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the adapter is not ready after 120 s; see {LOG_DIR}")
            time.sleep(0.3)
        auth = ' -H "Authorization: Bearer $KEY"' if os.environ.get("ADAPTER_API_KEYS") else ""
        print(f"""
Ready: OpenAI-compatible API at {local}/v1  (model "{MODEL_ID}")

  curl {local}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{{"model": "{MODEL_ID}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  python: OpenAI(base_url="{local}/v1", api_key="unused").chat.completions.create(...)

A process that dies is started again. Ctrl-C stops tritonserver and the adapter.""", flush=True)
        while True:
            for child in children:
                child.tend()
            time.sleep(0.5)
    except _Stop as sig:
        print(f"\nserve: {sig}: stopping (in-flight requests get up to {grace:g} s)", flush=True)
        return_code = 0
    except (RuntimeError, TimeoutError) as err:
        print(f"serve: {err}", file=sys.stderr, flush=True)
        return_code = 1
    finally:
        # Ignore further Ctrl-C while we stop the children, so nothing is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The adapter first: it drains its streams while Triton still serves them.
        _stop_process(adapter[0] if adapter else None, grace=grace + 5)
        triton.stop(grace=5)
    print("serve: stopped", flush=True)
    return return_code


if __name__ == "__main__":
    sys.exit(main())
