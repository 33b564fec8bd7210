"""Shared pieces of the adapter tests: a scriptable fake Triton client, the app in
process, and launchers for a real tritonserver + adapter subprocess."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from openai_adapter.app import create_app
from openai_adapter.errors import OpenAIError, from_model_message
from openai_adapter.settings import Settings
from openai_adapter.triton_client import Chunk, GenerationRequest, ModelInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool role not supported') }}"
            "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class FakeClient:
    """LLMClient whose model streams words; prompt magic (like the fakellm backend):
    [[delay=MS]] [[words=a b]] [[fail_at=K]] [[error=MESSAGE]]."""

    def __init__(self, models: tuple[str, ...] = ("fake",), ready: bool = True) -> None:
        self.infos = {m: ModelInfo(m, TEMPLATE, "<s>", "</s>", 64) for m in models}
        self.ready = ready
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    def models(self) -> list[ModelInfo]:
        return list(self.infos.values()) if self.ready else []

    def versions(self, name: str) -> set[int]:
        return {1} if self.ready and name in self.infos else set()

    def model(self, name: str) -> ModelInfo:
        if name not in self.infos:
            raise OpenAIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        if not self.ready:
            raise OpenAIError(503, "not ready", code="model_not_ready", retry_after=1)
        return self.infos[name]

    async def generate(self, req: GenerationRequest):
        self.requests.append(req)
        prompt = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        magic = dict(re.findall(r"\[\[(\w+)(?:=([^\]]*))?\]\]", prompt))
        if "error" in magic:
            raise from_model_message(magic["error"], 1)
        words = (magic.get("words") or "hello world from the fake model").split()
        delay = float(magic.get("delay", 0)) / 1000
        fail_at = int(magic.get("fail_at", -1))
        n_in = len(prompt.split())
        max_tokens = req.max_tokens if req.max_tokens is not None else 64 - n_in
        done = False
        try:
            for i in range(max_tokens):
                if i == fail_at:
                    raise from_model_message(f"internal: fake failure at token {i}", 1)
                if delay:
                    await asyncio.sleep(delay)
                last = i == max_tokens - 1
                # Every piece carries the counts so far, as the llm backend's do.
                yield Chunk(words[i % len(words)] + " ", "length" if last else None, n_in, i + 1, "1")
            done = True
            self.finished.append(req.request_id)
        finally:
            if not done:
                self.cancelled.append(req.request_id)


@asynccontextmanager
async def app_client(client: FakeClient | None = None, **settings: Any):
    """(httpx client over the app in process, fake client); runs the lifespan."""
    fake = client or FakeClient()
    if "database_url" not in settings:  # a ledger of its own, as the adapter has by default
        settings["database_url"] = f"sqlite:///{tempfile.mkdtemp(prefix='adapter-test-')}/accounts.db"
    app = create_app(Settings(**settings), client=fake)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://adapter") as http:
            http.app = app  # type: ignore[attr-defined]
            yield http, fake


async def wait_until(cond, what: str, timeout_s: float = 5.0) -> None:
    """Poll `cond` on the event loop; fail naming `what` after `timeout_s`. Wait for the
    state the next step depends on itself (admitted at the adapter is not yet received by
    the model), with room for a loaded CI machine."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.01)


def load_fakellm():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fakellm_fixture", REPO_ROOT / "tests" / "fixtures" / "fakellm" / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class AdapterProcess:
    """`python -m openai_adapter.main` on a free port, against given Triton URLs."""

    def __init__(self, grpc_url: str, http_url: str, log_path: Path, **env: Any) -> None:
        from stack.ports import free_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env.setdefault("ADAPTER_DATABASE_URL", f"sqlite:///{log_path.parent}/accounts-{self.port}.db")
        self.env = dict(os.environ, ADAPTER_HOST="127.0.0.1", ADAPTER_PORT=str(self.port),
                        TRITON_GRPC_URLS=grpc_url, TRITON_HTTP_URLS=http_url, HF_HUB_OFFLINE="1",
                        **{k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AdapterProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "openai_adapter.main"], env=self.env, cwd=REPO_ROOT,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"adapter exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"adapter not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the process has no chance to settle anything (crash tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_triton(repo: Path, log_path: Path, extra_backends: dict[str, Path] | None = None):
    """A started, ready TritonServer on free ports (shows its log if it dies)."""
    from stack.triton import TritonServer
    return TritonServer.on_free_ports(repo, log_path=log_path,
                                      extra_backends=extra_backends or {}).start_ready(timeout=120)

