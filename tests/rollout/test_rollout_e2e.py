"""`llm-deploy` against the real tritonserver and two real adapter processes, on the
tiny checkpoint exported by the real `llm-export`: promote under 16 streams with no
failed or cut request, rollback at once, a damaged version refused with traffic
untouched, retire only after the old version's streams are done."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from adapter_testlib import AdapterProcess, start_triton  # type: ignore[import-not-found]
from openai_adapter.accounts.schema import ledger
from openai_adapter.accounts.store import make_engine, migrate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
MODEL = "tiny"


def _tiny_checkpoint(dest: Path) -> Path:
    spec = importlib.util.spec_from_file_location("export_conftest_tiny",
                                                  Path(__file__).parents[1] / "export" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_tiny_checkpoint(dest)


def llm_export(ckpt: Path, repo: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "export.cli", str(ckpt), "--name", MODEL, "--repository", str(repo),
                           "--max-num-seqs", "8", "--quiet", *extra], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.repo = tmp, tmp / "repo"
        self.ckpt = _tiny_checkpoint(tmp / "ckpt")
        llm_export(self.ckpt, self.repo)
        self.db_url = f"sqlite:///{tmp}/accounts.db"
        migrate(make_engine(self.db_url))
        self.triton = start_triton(self.repo, tmp / "triton.log")
        self.adapters = [AdapterProcess(self.triton.grpc_url, self.triton.http_url, tmp / f"adapter{i}.log",
                                        ADAPTER_DATABASE_URL=self.db_url, ADAPTER_HEALTH_INTERVAL_S=0.5).start()
                         for i in range(2)]
        for a in self.adapters:
            a.wait_ready()

    def deploy(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rollout.cli", "--triton", self.triton.http_url,
                               "--triton-grpc", self.triton.grpc_url,
                               "--repository", str(self.repo), "--database-url", self.db_url,
                               "--key", self.triton.repository_key, *args],
                              env=ENV, capture_output=True, text=True, timeout=600)

    def ledger_versions(self) -> dict[str, str]:
        with make_engine(self.db_url).connect() as conn:
            return {r.request_id: r.model_version for r in conn.execute(sa.select(ledger))}

    def stop(self) -> None:
        for a in self.adapters:
            a.stop()
        self.triton.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("rollout"))
    yield s
    s.stop()


BODY = {"model": MODEL, "messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 120,
        "ignore_eos": True, "temperature": 0, "stream": True}


async def one_stream(http: httpx.AsyncClient, url: str, model: str = MODEL, max_tokens: int = 120,
                     first: asyncio.Event | None = None) -> dict:
    """One streamed chat request; `first` is set when its first event arrives."""
    out = {"start": time.monotonic(), "status": None, "version": None, "id": None, "done": False, "error": None}
    async with http.stream("POST", url + "/v1/chat/completions",
                           json={**BODY, "model": model, "max_tokens": max_tokens}) as s:
        out["status"], out["version"] = s.status_code, s.headers.get("x-model-version")
        async for line in s.aiter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: {"):
                event = json.loads(line[6:])
                if first is not None:
                    first.set()
                out["id"] = event.get("id", out["id"])
                out["error"] = event.get("error", out["error"])
    return out


async def version_now(http: httpx.AsyncClient, url: str) -> str:
    r = await http.post(url + "/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.headers["x-model-version"]


async def test_promote_under_load_rollback_refuse_retire(stack):
    # Version 2: the same export again. (With another precision the new config.pbtxt
    # reloads the loaded versions; the old instance of one then sometimes never finished
    # unloading, and retire timed out: see the roll-out notes.)
    llm_export(stack.ckpt, stack.repo)
    urls = [a.url for a in stack.adapters]
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        assert {await version_now(http, u) for u in urls} == {"1"}

        # -- promote while 16 streams keep running ---------------------------------
        stop = asyncio.Event()
        results: list[dict] = []

        async def client(i: int) -> None:
            while not stop.is_set():
                results.append(await one_stream(http, urls[i % 2]))

        clients = [asyncio.ensure_future(client(i)) for i in range(16)]
        await asyncio.sleep(1.0)
        # The speed bound is wide: at these tiny shapes, on a shared machine, the rates swing 5x.
        promoted = await asyncio.to_thread(stack.deploy, "promote", MODEL, "--max-slowdown", "100")
        switched_at = time.monotonic()
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        await asyncio.sleep(3.0)
        stop.set()
        await asyncio.gather(*clients)
        assert all(r["status"] == 200 and r["done"] and r["error"] is None for r in results), \
            [r for r in results if not (r["status"] == 200 and r["done"] and r["error"] is None)][:3]
        billed = stack.ledger_versions()
        assert all(billed[r["id"]] == r["version"] for r in results)  # each finished where it started
        assert {r["version"] for r in results if r["start"] < switched_at - 5} == {"1"}
        assert {r["version"] for r in results if r["start"] > switched_at + 2} == {"2"}
        assert {await version_now(http, u) for u in urls} == {"2"}

        # -- rollback: every adapter back on version 1 within 2 s --------------------
        rolled = await asyncio.to_thread(stack.deploy, "rollback", MODEL)
        t0 = time.monotonic()
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        for u in urls:
            while await version_now(http, u) != "1":
                await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 2.0

        # -- a damaged version 3 is refused, traffic untouched -----------------------
        llm_export(stack.ckpt, stack.repo)
        data = stack.repo / MODEL / "3" / "model.onnx.data"
        raw = bytearray(data.read_bytes())
        for i in range(len(raw) // 4, len(raw) // 2, 7):
            raw[i] ^= 0x5A  # weights damaged after export: it loads, and answers otherwise
        data.write_bytes(bytes(raw))
        refused = await asyncio.to_thread(stack.deploy, "promote", MODEL, "--version", "3")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        # refused by its probes: a wrong answer, or (where the damage reaches NaN, as these
        # flipped exponent bits do) the engine's refusal to sample from NaN logits
        assert "REFUSED" in refused.stdout and ("expected the answer to begin" in refused.stdout
                                                or "the model returned NaN logits" in refused.stdout)
        assert {await version_now(http, u) for u in urls} == {"1"}
        status = json.loads((await asyncio.to_thread(stack.deploy, "status", MODEL)).stdout)
        assert status["serving"]["version"] == 1 and status["previous"] == 2
        assert list(status["loaded"].values()) == [[1, 2]]  # the candidate was unloaded again

        # -- retire unloads version 2 only after its streams are done -----------------
        async def pinned(first: asyncio.Event) -> dict:
            r = await one_stream(http, urls[0], f"{MODEL}@2", max_tokens=230, first=first)
            r["end"] = time.monotonic()
            return r

        # As many as the model's slots (8), so that none waits for admission or gets a 429;
        # all streaming from version 2 before the retire begins.
        firsts = [asyncio.Event() for _ in range(8)]
        streams = [asyncio.ensure_future(pinned(f)) for f in firsts]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
        retire_started = time.monotonic()
        retired = await asyncio.to_thread(stack.deploy, "--timeout", "20", "retire", MODEL)
        assert retired.returncode == 0, retired.stdout + retired.stderr
        done = await asyncio.gather(*streams)
        assert all(r["status"] == 200 and r["done"] and r["error"] is None and r["version"] == "2" for r in done)
        assert max(r["end"] for r in done) > retire_started  # they ran while version 2 was being retired
        status = json.loads((await asyncio.to_thread(stack.deploy, "status", MODEL)).stdout)
        assert list(status["loaded"].values()) == [[1]] and status["previous"] is None
        assert "version_policy: { specific: { versions: [ 1 ] } }" in (stack.repo / MODEL / "config.pbtxt").read_text()

        # -- a canary (version 2 loaded again): half of new requests, side by side ----
        canary = await asyncio.to_thread(stack.deploy, "promote", MODEL, "--version", "2", "--canary", "50",
                                         "--max-slowdown", "100")
        assert canary.returncode == 0, canary.stdout + canary.stderr
        await asyncio.sleep(1.5)  # every adapter reads the route
        seen = [await version_now(http, urls[i % 2]) for i in range(40)]
        assert 5 <= seen.count("2") <= 35 and seen.count("1") + seen.count("2") == 40  # about half each
        status = json.loads((await asyncio.to_thread(stack.deploy, "status", MODEL)).stdout)
        assert status["canary"]["version"] == 2 and status["canary"]["percent"] == 50
        stats = status["canary_stats"]
        assert stats["1"]["requests"] >= 5 and stats["2"]["requests"] >= 5  # side by side, from the ledger
        assert {"error_rate", "ttft_ms_p50", "duration_ms_p50"} <= set(stats["2"])
        finished = await asyncio.to_thread(stack.deploy, "promote", MODEL, "--finish")
        assert finished.returncode == 0, finished.stdout + finished.stderr
        for u in urls:
            while await version_now(http, u) != "2":
                await asyncio.sleep(0.05)
        rolled = await asyncio.to_thread(stack.deploy, "rollback", MODEL)  # back to 1, 2 stays loaded
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert {await version_now(http, u) for u in urls} <= {"1", "2"}


async def test_first_promotion_of_a_model_exported_after_the_servers_started(stack):
    """Servers start on a store without the model (a new cluster); the first promote loads it."""
    proc = subprocess.run([sys.executable, "-m", "export.cli", str(stack.ckpt), "--name", "late", "--repository",
                           str(stack.repo), "--max-num-seqs", "4", "--quiet"], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = await asyncio.to_thread(stack.deploy, "promote", "late")
    assert first.returncode == 0 and "takes the traffic" in first.stdout, first.stdout + first.stderr
    async with httpx.AsyncClient(timeout=60) as http:
        for a in stack.adapters:
            for _ in range(60):
                r = await http.post(a.url + "/v1/chat/completions", json={**BODY, "model": "late", "stream": False,
                                                                          "max_tokens": 2})
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.2)
            assert r.status_code == 200 and r.headers["x-model-version"] == "1", r.text
