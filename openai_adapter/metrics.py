"""Prometheus metrics of the adapter, in a registry of its own (kept on app.state)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("adapter_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("adapter_time_to_first_token_seconds", "Request start to first token",
                              ["model"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("adapter_inter_token_latency_seconds", "Time between streamed pieces",
                             ["model"], buckets=_ITL, registry=r)
        self.e2e = Histogram("adapter_e2e_request_latency_seconds", "Request start to last token",
                             ["model"], buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("adapter_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("adapter_completion_tokens", "Completion tokens", ["model"], registry=r)
        self.in_flight = Gauge("adapter_requests_in_flight", "Requests admitted and running", registry=r)
        self.waiting = Gauge("adapter_requests_waiting", "Requests waiting for admission", registry=r)
        self.upstream_errors = Counter("adapter_upstream_errors", "Errors from Triton",
                                       ["endpoint", "kind"], registry=r)
        self.circuit_open = Gauge("adapter_circuit_open", "1 when the endpoint's circuit is open",
                                  ["endpoint"], registry=r)
        self.refused = Counter("adapter_refused_requests", "Requests refused by a key's limits or budgets (429)",
                               ["key", "reason"], registry=r)
        self.model_ready = Gauge("adapter_model_ready", "1 when the model passed its health probe",
                                 ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health/live", "/health/ready", "/metrics"}


class RequestCounter:
    """ASGI middleware: count every response by route and status (unknown routes as one label)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ROUTES else "other"
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def now() -> float:
    return time.monotonic()
