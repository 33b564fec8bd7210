"""What the accounts cost on the hot path (a benchmark, not a test).

Starts tritonserver with the scriptable fake model (tests/fixtures/fakellm: a word
every few milliseconds, so the adapter's own work is a visible part of each request)
and the real adapter process in three set-ups, in turns:

    off       ADAPTER_DATABASE_URL="" : no key, no ledger
    sqlite    a key with rpm, tpm, concurrency limits and a daily token and money budget
    postgres  the same on a PostgreSQL 16 server (pgserver wheel)

and measures, through the HTTP API:
    - latency of one-token requests one after another (p50 / p99): the added cost
      per request of authenticate + admit + settle
    - 16 concurrent streams (64 tokens each), aggregate tokens/s, versus off, with the
      fake model as fast as the real one at 16 streams here (30 ms a token) and much
      faster (4 ms a token: the adapter's own CPU is then the limit)

    python -m bench.accounts [--rounds 3] [--requests 200]

Prints the tables and writes bench/results/accounts-<time>.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Time per token of the fake model: 30 ms is what the default model takes per token at
# 16 streams on the 2-core machine (README); 4 ms makes the adapter itself the bottleneck.
TOKEN_MS = (30, 4)


def _fakellm():
    spec = importlib.util.spec_from_file_location("fakellm_fixture", ROOT / "tests" / "fixtures" / "fakellm" /
                                                  "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Adapter:
    def __init__(self, triton, env: dict[str, str], log: Path) -> None:
        from stack.ports import free_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = dict(os.environ, ADAPTER_HOST="127.0.0.1", ADAPTER_PORT=str(self.port), ADAPTER_ACCESS_LOG="false",
                    ADAPTER_LOG_LEVEL="warning", TRITON_GRPC_URLS=triton.grpc_url, TRITON_HTTP_URLS=triton.http_url,
                    ADAPTER_HEALTH_PROBE_GENERATION="false", TRITON_REPOSITORY_KEY=triton.repository_key, **env)
        self.proc = subprocess.Popen([sys.executable, "-m", "openai_adapter.main"], env=full, cwd=ROOT,
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"adapter did not start; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def sequential(url: str, headers: dict[str, str], n: int) -> list[float]:
    body = {"model": "fake", "prompt": "[[delay=1]] hello", "max_tokens": 1}
    out = []
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(n):
            t = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body, headers=headers)
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text}")
    return out[5:]  # the first ones warm connections and caches


async def streams(url: str, headers: dict[str, str], token_ms: float, clients: int = 16, tokens: int = 64) -> float:
    body = {"model": "fake", "prompt": f"[[delay={token_ms}]] go", "max_tokens": tokens, "stream": True}

    async def one(http: httpx.AsyncClient) -> int:
        n = 0
        async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as s:
            if s.status_code != 200:
                raise RuntimeError(f"{s.status_code}: {(await s.aread()).decode()}")
            async for line in s.aiter_lines():
                n += line.startswith("data: {")
        return n

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients * 2)) as http:
        await asyncio.gather(*(one(http) for _ in range(clients)))  # warm-up
        t = time.perf_counter()
        total = 0
        for _ in range(2):  # two waves of `clients` concurrent streams
            total += sum(await asyncio.gather(*(one(http) for _ in range(clients))))
        return total / (time.perf_counter() - t)


def setups(tmp: Path, pg_uri: str) -> dict[str, tuple[dict[str, str], str | None]]:
    """name -> (adapter environment, database URL to create a key in or None)."""
    return {"off": ({"ADAPTER_DATABASE_URL": ""}, None),
            "sqlite": ({"ADAPTER_DATABASE_URL": f"sqlite:///{tmp}/accounts.db"}, f"sqlite:///{tmp}/accounts.db"),
            "postgres": ({"ADAPTER_DATABASE_URL": pg_uri}, pg_uri)}


def make_key(url: str) -> str:
    from openai_adapter.accounts import manage
    from openai_adapter.accounts.store import make_engine, migrate
    e = make_engine(url)
    migrate(e)
    key = manage.create_key(e, "bench", rpm=1_000_000, tpm=10**9, max_concurrent=1000)
    manage.set_budget(e, "bench", "day", "tokens", 10**12)
    manage.set_budget(e, "bench", "month", "micros", 10**12)
    manage.set_price(e, "fake", 150_000, 600_000)
    e.dispose()
    return key.key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="turns of every set-up")
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per turn")
    args = ap.parse_args(argv)
    import pgserver

    from stack.triton import TritonServer
    tmp = Path(tempfile.mkdtemp(prefix="bench-accounts-"))
    os.environ.setdefault("XDG_RUNTIME_DIR", str(tmp))
    fake = _fakellm()
    fake.make_model_dir(tmp / "repo", "fake", max_model_len=1024)
    triton = TritonServer.on_free_ports(tmp / "repo", log_path=tmp / "triton.log",
                                        extra_backends={"fakellm": fake.MODEL_PY}).start_ready(timeout=120)
    pg = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    results: dict[str, dict[str, list[float]]] = {}
    try:
        plans = setups(tmp, pg.get_uri())
        keys = {name: (make_key(db) if db else None) for name, (_, db) in plans.items()}
        for turn in range(args.rounds):
            for name, (env, _) in plans.items():
                a = Adapter(triton, env, tmp / f"adapter-{name}.log")
                try:
                    h = {"Authorization": f"Bearer {keys[name]}"} if keys[name] else {}
                    lat = asyncio.run(sequential(a.url, h, args.requests))
                    tps = {ms: asyncio.run(streams(a.url, h, ms)) for ms in TOKEN_MS}
                finally:
                    a.stop()
                r = results.setdefault(name, {"latency": [], **{f"tps{ms}": [] for ms in TOKEN_MS}})
                r["latency"] += lat
                for ms in TOKEN_MS:
                    r[f"tps{ms}"].append(tps[ms])
                print(f"turn {turn + 1} {name:9s} p50 {_pct(lat, 50) * 1000:6.2f} ms  16 streams " +
                      "  ".join(f"{tps[ms]:7.1f} tok/s at {ms} ms/token" for ms in TOKEN_MS), flush=True)
    finally:
        triton.stop()
        pg.cleanup()
    base_p50 = _pct(results["off"]["latency"], 50)
    base_p99 = _pct(results["off"]["latency"], 99)
    base_tps = {ms: statistics.median(results["off"][f"tps{ms}"]) for ms in TOKEN_MS}
    rows = []
    for name, r in results.items():
        p50, p99 = _pct(r["latency"], 50), _pct(r["latency"], 99)
        row = {"setup": name, "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2),
               "added_p50_ms": round((p50 - base_p50) * 1000, 2), "added_p99_ms": round((p99 - base_p99) * 1000, 2)}
        for ms in TOKEN_MS:
            tps = statistics.median(r[f"tps{ms}"])
            row[f"streams16_{ms}ms_tok_s"] = round(tps, 1)
            row[f"streams16_{ms}ms_vs_off"] = round(tps / base_tps[ms], 3)
        rows.append(row)
    head = " | ".join(f"16 streams, {ms} ms/token: tok/s (vs off)" for ms in TOKEN_MS)
    lines = [f"| set-up | one-token request p50 / p99 ms | added p50 / p99 ms | {head} |",
             "|---|---|---|" + "---|" * len(TOKEN_MS)]
    for r in rows:
        cells = " | ".join(f"{r[f'streams16_{ms}ms_tok_s']} ({r[f'streams16_{ms}ms_vs_off']:.3f}x)" for ms in TOKEN_MS)
        lines.append(f"| {r['setup']} | {r['p50_ms']} / {r['p99_ms']} | {r['added_p50_ms']} / {r['added_p99_ms']} | "
                     f"{cells} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    meta = {"when": stamp, "rounds": args.rounds, "requests": args.requests, "cpus": os.cpu_count()}
    (RESULTS / f"accounts-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"accounts-{stamp}.md").write_text(f"# bench.accounts {stamp}\n\n{table}\n")
    print(f"wrote {RESULTS}/accounts-{stamp}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
