"""The stack under test: `python -m stack.serve` (what `make serve` runs) as a subprocess on
free ports, so its supervision (restart with back-off) is what heals the faults.

Its accounts database lives in the suite's work directory, so the ledger and the open
reservations can be read after a crash; its logs go where `make serve` puts them
(build/logs/). The processes are found as the supervisor's children: the adapter,
tritonserver, and each model's Python stub (Triton's `triton_python_backend_stub`).
"""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import psutil

from stack.ports import free_port
from stack.serve import LOG_DIR, MODEL_ID

REPO_ROOT = Path(__file__).resolve().parents[1]
_STUB_MODEL = re.compile(r"/([^/]+)/(\d+)/model\.py$")


class ServeStack:
    def __init__(self, workdir: Path, env: Optional[dict[str, str]] = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model = MODEL_ID
        self.port, self.http_port, self.grpc_port, self.metrics_port = (free_port() for _ in range(4))
        self.url = f"http://127.0.0.1:{self.port}"
        self.triton_url = f"http://127.0.0.1:{self.http_port}"
        self.db_path = self.workdir / "accounts.db"
        self.out_path = self.workdir / "serve.out"
        self.env = dict(os.environ, ADAPTER_HOST="127.0.0.1", ADAPTER_PORT=str(self.port),
                        TRITON_HTTP_PORT=str(self.http_port), TRITON_GRPC_PORT=str(self.grpc_port),
                        TRITON_METRICS_PORT=str(self.metrics_port), HF_HUB_OFFLINE="1",
                        ADAPTER_DATABASE_URL=f"sqlite:///{self.db_path}", **(env or {}))
        self.proc: Optional[subprocess.Popen] = None
        self.logs = {"serve": str(self.out_path), "adapter": str(LOG_DIR / "adapter.log"),
                     "tritonserver": str(LOG_DIR / "tritonserver.log")}

    # -- life -------------------------------------------------------------------------
    def start(self, timeout: float = 400.0) -> float:
        """Start and wait for make serve's "Ready" line; the seconds it took."""
        t = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "stack.serve"], cwd=REPO_ROOT, env=self.env,
                                     stdout=open(self.out_path, "wb"), stderr=subprocess.STDOUT)
        while "Ready:" not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"make serve exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() - t > timeout:
                self.stop()
                raise TimeoutError(f"make serve not ready after {timeout:g} s:\n{self.output()[-3000:]}")
            time.sleep(0.3)
        return time.monotonic() - t

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        """SIGTERM to make serve (its Ctrl-C): how long it took, its exit code, what was left."""
        if self.proc is None:
            return {}
        kids = self._children()
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        seconds = time.monotonic() - t
        time.sleep(0.5)
        left = [p for p in kids if _alive(p)]
        for p in left:  # never leave anything behind, but say so
            p.kill()
        return {"seconds": round(seconds, 2), "exit_code": self.proc.returncode,
                "left_behind": [f"{p.pid}" for p in left]}

    # -- processes --------------------------------------------------------------------
    def _children(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return [p for p in psutil.Process(self.proc.pid).children(recursive=True) if _alive(p)]
        except psutil.NoSuchProcess:
            return []

    def processes(self) -> dict[str, psutil.Process]:
        """`serve`, `adapter`, `tritonserver`, `stub <model>` -> the live process."""
        out: dict[str, psutil.Process] = {}
        if self.proc is not None and self.proc.poll() is None:
            out["make serve (supervisor)"] = psutil.Process(self.proc.pid)
        for p in self._children():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            line = " ".join(cmd)
            if "openai_adapter.main" in line:
                out["adapter"] = p
            elif cmd and cmd[0].endswith("/tritonserver"):
                out["tritonserver"] = p
            elif "triton_python_backend_stub" in line and len(cmd) > 1:
                m = _STUB_MODEL.search(cmd[1])
                out[f"stub {m.group(1) if m else cmd[1]}"] = p
        return out

    def process(self, role: str, timeout: float = 30.0) -> psutil.Process:
        deadline = time.monotonic() + timeout
        while True:
            p = self.processes().get(role)
            if p is not None:
                return p
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {role} process under make serve")
            time.sleep(0.2)

    def memory(self) -> dict[str, dict[str, Any]]:
        """Resident memory of every process, MiB."""
        out = {}
        for role, p in self.processes().items():
            try:
                out[role] = {"pid": p.pid, "rss_mib": round(p.memory_info().rss / 2**20, 1)}
            except psutil.Error:
                pass
        return out

    # -- state ------------------------------------------------------------------------
    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def triton_model_ready(self) -> Optional[bool]:
        """Triton's own readiness of the model (what a probe on Triton sees); None: no answer."""
        try:
            return httpx.get(f"{self.triton_url}/v2/models/{self.model}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float) -> Optional[float]:
        t = time.monotonic()
        while not self.ready():
            if time.monotonic() - t > timeout:
                return None
            time.sleep(0.2)
        return time.monotonic() - t

    def gauges(self) -> dict[str, Optional[float]]:
        """The adapter's in-flight and waiting requests, the model's running and waiting ones."""
        out: dict[str, Optional[float]] = {}
        for name, url, metrics in (("adapter", self.url, ("adapter_requests_in_flight", "adapter_requests_waiting")),
                                   ("model", f"http://127.0.0.1:{self.metrics_port}",
                                    ("llm_num_requests_running", "llm_num_requests_waiting"))):
            try:
                text = httpx.get(url + "/metrics", timeout=3).text
            except httpx.HTTPError:
                text = ""
            for metric in metrics:
                values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith(metric) and (line[len(metric)] in " {")]
                out[metric] = sum(values) if values else None
        return out

    def wait_idle(self, timeout: float) -> tuple[Optional[float], dict[str, Optional[float]]]:
        """Seconds until every gauge reads 0 (None if not within `timeout`), and the last reading."""
        t = time.monotonic()
        while True:
            g = self.gauges()
            if all(v == 0 for v in g.values()):
                return time.monotonic() - t, g
            if time.monotonic() - t > timeout:
                return None, g
            time.sleep(0.25)

    def ledger(self) -> dict[str, Any]:
        """Requests by how they ended, and the reservations still open (read-only)."""
        if not self.db_path.exists():
            return {}
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM ledger GROUP BY outcome").fetchall())
            open_ = db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
        finally:
            db.close()
        return {"outcomes": outcomes, "open_reservations": open_}

    def restarts(self) -> int:
        return self.output().count("died; starting it again")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
