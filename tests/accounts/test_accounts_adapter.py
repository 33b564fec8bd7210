"""The accounts through the adapter's HTTP API, in process over the fake model: which
routes need a key, OpenAI's 429 answers and headers, the ledger per request, and the
official SDK's retry rules."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import sqlalchemy as sa

from adapter_testlib import FakeClient, app_client  # type: ignore[import-not-found]
from openai_adapter.accounts import manage
from openai_adapter.accounts.schema import ledger, reservations
from openai_adapter.accounts.store import make_engine, migrate

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def accounts_db(db_url):
    """(url, engine) of a migrated database; keys made here exist before the app starts."""
    e = make_engine(db_url)
    migrate(e)
    yield db_url, e
    e.dispose()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _routes(app) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from the app itself (FastAPI keeps included
    routers' routes behind an indirection)."""
    found = []
    for r in app.routes:
        found += r.effective_candidates() if hasattr(r, "effective_candidates") else [r]
    out = []
    for r in found:
        path = r.path.replace("{model_id:path}", "fake").replace("{model_id}", "fake")
        out += [(m, path) for m in sorted(r.methods) if m != "HEAD"]
    return out


async def test_every_route_but_health_needs_a_valid_key(accounts_db):
    url, e = accounts_db
    good = manage.create_key(e, "good")
    revoked = manage.create_key(e, "revoked")
    manage.revoke_key(e, "revoked")
    expired = manage.create_key(e, "expired", expires_ms=1)
    other_model = manage.create_key(e, "other", models=["not-fake"])
    async with app_client(database_url=url) as (http, _):
        routes = _routes(http.app)
        assert {p for _, p in routes} >= {"/v1/models", "/v1/models/fake", "/v1/chat/completions", "/v1/completions",
                                         "/metrics", "/health/live", "/health/ready", "/openapi.json"}
        bad_auth = {"no key": {}, "wrong key": _bearer(good.key[:-2] + "xx"), "revoked": _bearer(revoked.key),
                    "expired": _bearer(expired.key), "not bearer": {"Authorization": f"Basic {good.key}"},
                    "static-looking": _bearer("sk-anything")}
        for method, path in routes + [("GET", "/no/such/route")]:
            body = {"json": CHAT} if path == "/v1/chat/completions" else \
                {"json": {"model": "fake", "prompt": "hi", "max_tokens": 2}} if path == "/v1/completions" else {}
            if path.startswith("/health/"):
                assert (await http.request(method, path)).status_code == 200, path
                continue
            for why, headers in bad_auth.items():
                r = await http.request(method, path, headers=headers, **body)
                assert r.status_code == 401, (method, path, why, r.text)
                err = r.json()["error"]
                assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key", err
                assert set(err) == {"message", "type", "param", "code"}
            r = await http.request(method, path, headers=_bearer(good.key), **body)
            assert r.status_code == (404 if path == "/no/such/route" else 200), (method, path, r.text)
        messages = {why: (await http.get("/v1/models", headers=h)).json()["error"]["message"]
                    for why, h in bad_auth.items()}
        assert "revoked" in messages["revoked"] and "expired" in messages["expired"]
        assert "Bearer" in messages["not bearer"] and "missing" in messages["no key"]
        # A key limited to other models: the model does not exist for it (404, as OpenAI answers).
        h = _bearer(other_model.key)
        assert (await http.get("/v1/models", headers=h)).json()["data"] == []
        for r in (await http.get("/v1/models/fake", headers=h), await http.post("/v1/chat/completions", headers=h,
                                                                                  json=CHAT)):
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_open_without_keys_and_static_keys_still_work(tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/a.db"
    with caplog.at_level("WARNING"):
        async with app_client(database_url=url) as (http, _):
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert any("open to anyone" in r.message for r in caplog.records)
    async with app_client(database_url=url, api_keys=["static-1"]) as (http, _):
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 401
        r = await http.post("/v1/chat/completions", json=CHAT, headers=_bearer("static-1"))
        assert r.status_code == 200
    e = make_engine(url)
    labels = [row.key_label for row in e.connect().execute(sa.select(ledger))]
    assert labels == ["anonymous", "static-key-1"]


async def test_metrics_token_lets_prometheus_scrape_with_keys_on(accounts_db):
    url, e = accounts_db
    key = manage.create_key(e, "app")
    async with app_client(database_url=url, metrics_token="prom-secret") as (http, _):
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=_bearer(key.key))).status_code == 401  # keys cannot scrape
        r = await http.get("/metrics", headers=_bearer("prom-secret"))
        assert r.status_code == 200 and "adapter_requests_total" in r.text
        assert (await http.get("/v1/models", headers=_bearer("prom-secret"))).status_code == 401
    async with app_client(database_url=url) as (http, _):  # no metrics token: an API key scrapes
        assert (await http.get("/metrics", headers=_bearer(key.key))).status_code == 200


async def test_rate_limit_answers_and_headers_stream_too(accounts_db):
    url, e = accounts_db
    key = manage.create_key(e, "app", rpm=2, tpm=10_000)
    h = _bearer(key.key)
    async with app_client(database_url=url) as (http, _):
        r = await http.post("/v1/chat/completions", json=CHAT, headers=h)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "1"
        assert r.headers["x-ratelimit-limit-tokens"] == "10000" and "x-ratelimit-reset-tokens" in r.headers
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=h) as s:
            assert s.status_code == 200 and s.headers["x-ratelimit-remaining-requests"] == "0"
            assert [line async for line in s.aiter_lines() if line][-1] == "data: [DONE]"
        r = await http.post("/v1/chat/completions", json=CHAT, headers=h)
        assert r.status_code == 429
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "requests", "param": None,
                                     "code": "rate_limit_exceeded"}
        assert "limit 2" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        metrics = (await http.get("/metrics", headers=h)).text
        assert 'adapter_refused_requests_total{key="app",reason="requests"} 1.0' in metrics


async def test_budget_answers_insufficient_quota_not_to_be_retried(accounts_db):
    url, e = accounts_db
    key = manage.create_key(e, "app")
    manage.set_budget(e, "app", "day", "tokens", 60)  # the fake model's context is 64 tokens
    async with app_client(database_url=url) as (http, _):
        h = _bearer(key.key)
        r = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60}, headers=h)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "insufficient_quota" and r.json()["error"]["type"] == "insufficient_quota"
        assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers


async def test_ledger_row_per_request_with_the_reported_usage(accounts_db):
    url, e = accounts_db
    key = manage.create_key(e, "app")
    manage.set_price(e, "fake", 1_000_000, 2_000_000)  # 1 and 2 per million tokens
    async with app_client(database_url=url) as (http, _):
        h = _bearer(key.key)
        a = (await http.post("/v1/chat/completions", json=CHAT, headers=h)).json()
        b = (await http.post("/v1/completions", json={"model": "fake", "prompt": ["one two", "three"], "n": 2,
                                                       "max_tokens": 3}, headers=h)).json()
        lines = []
        async with http.stream("POST", "/v1/chat/completions", headers=h, json={
                **CHAT, "stream": True, "stream_options": {"include_usage": True}}) as s:
            lines = [json.loads(x[6:]) for x in [line async for line in s.aiter_lines()]
                     if x.startswith("data: {")]
        c = {"id": lines[-1]["id"], "usage": lines[-1]["usage"]}
    with e.connect() as conn:
        rows = {r.request_id: r for r in conn.execute(sa.select(ledger))}
        assert conn.execute(sa.select(sa.func.count()).select_from(reservations)).scalar() == 0
    assert set(rows) == {a["id"], b["id"], c["id"]}
    for resp in (a, b, c):
        row = rows[resp["id"]]
        assert (row.prompt_tokens, row.completion_tokens) == (resp["usage"]["prompt_tokens"],
                                                              resp["usage"]["completion_tokens"])
        assert row.cost_micros == -(-(row.prompt_tokens * 1_000_000 + row.completion_tokens * 2_000_000) // 10**6)
        assert row.key_label == "app" and row.model == "fake" and row.model_version == "1"
        assert row.outcome == "length" and row.ttft_ms is not None and row.duration_ms >= row.ttft_ms


async def test_failed_and_refused_requests(accounts_db):
    url, e = accounts_db
    key = manage.create_key(e, "app")
    async with app_client(database_url=url, max_in_flight=1, max_waiting=0) as (http, _):
        h = _bearer(key.key)
        r = await http.post("/v1/completions", headers=h, json={"model": "fake", "prompt": "[[fail_at=2]]",
                                                                 "max_tokens": 5})
        assert r.status_code == 500
        r = await http.post("/v1/completions", headers=h, json={"model": "fake", "prompt": "[[error=over_capacity: "
                                                                 "busy]]", "max_tokens": 5})
        assert r.status_code == 429
    with e.connect() as conn:
        outcomes = sorted(r.outcome for r in conn.execute(sa.select(ledger)))
        assert conn.execute(sa.select(sa.func.count()).select_from(reservations)).scalar() == 0
    assert outcomes == ["failed", "failed"]  # admitted by the accounts, failed in the model


async def test_official_sdk_retries_rate_limits_but_not_spent_budgets(accounts_db):
    url, e = accounts_db
    limited = manage.create_key(e, "limited", max_concurrent=0)
    broke = manage.create_key(e, "broke")
    manage.set_budget(e, "broke", "total", "tokens", 0)
    async with app_client(database_url=url) as (http, _):
        transport = httpx.ASGITransport(app=http.app)
        seen: list[tuple[str, int]] = []

        async def log(response: httpx.Response) -> None:
            seen.append((response.request.headers["authorization"][-4:], response.status_code))

        def sdk(key: str) -> openai.AsyncOpenAI:
            client = httpx.AsyncClient(transport=transport, base_url="http://adapter/v1",
                                       event_hooks={"response": [log]})
            return openai.AsyncOpenAI(api_key=key, base_url="http://adapter/v1", http_client=client, max_retries=2)

        with pytest.raises(openai.RateLimitError) as err:
            await sdk(broke.key).chat.completions.create(**CHAT)
        assert err.value.code == "insufficient_quota"
        assert seen == [(broke.key[-4:], 429)]  # not retried
        seen.clear()
        with pytest.raises(openai.RateLimitError) as err:
            await sdk(limited.key).chat.completions.create(**CHAT)
        assert err.value.code == "rate_limit_exceeded"
        assert seen == [(limited.key[-4:], 429)] * 3  # retried twice, after Retry-After
