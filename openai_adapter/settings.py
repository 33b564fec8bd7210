"""One settings object, read from environment variables (and CLI flags in main.py).

Each field's alias is its environment variable; `Settings(field=value)` (tests) and
`Settings.from_env()` (the process) both validate through the same types.
"""
from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Lists are comma-separated in the environment (not JSON, as pydantic-settings assumes).
CsvList = Annotated[list[str], NoDecode]


def _env(name: str, field: str, default: Any, **kw: Any) -> Any:
    """A field whose environment variable is `name` (also settable by field name)."""
    return Field(default, validation_alias=AliasChoices(field, name), **kw)


class Settings(BaseSettings):
    """Every knob of the adapter."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=True)

    host: str = _env("ADAPTER_HOST", "host", "0.0.0.0")
    port: int = _env("ADAPTER_PORT", "port", 9000)
    triton_grpc_urls: CsvList = _env("TRITON_GRPC_URLS", "triton_grpc_urls", ["127.0.0.1:8001"])
    triton_http_urls: CsvList = _env("TRITON_HTTP_URLS", "triton_http_urls", [])
    # Triton's model-repository API (the model index) answers only with this key.
    triton_repository_key: str = _env("TRITON_REPOSITORY_KEY", "triton_repository_key", "")
    api_keys: CsvList = _env("ADAPTER_API_KEYS", "api_keys", [])
    metrics_token: str = _env("ADAPTER_METRICS_TOKEN", "metrics_token", "")
    # Accounts (keys, limits, budgets, ledger). "" turns the ledger off.
    database_url: str = _env("ADAPTER_DATABASE_URL", "database_url", "sqlite:///data/accounts.db")
    db_migrate: bool = _env("ADAPTER_DB_MIGRATE", "db_migrate", True)
    heartbeat_s: float = _env("ADAPTER_HEARTBEAT_S", "heartbeat_s", 2.0, gt=0)
    routes_poll_s: float = _env("ADAPTER_ROUTES_POLL_S", "routes_poll_s", 1.0, gt=0)  # llm-deploy's switches
    dns_refresh_s: float = _env("ADAPTER_DNS_REFRESH_S", "dns_refresh_s", 5.0, gt=0)  # dns: Triton endpoints
    instance_stale_s: float = _env("ADAPTER_INSTANCE_STALE_S", "instance_stale_s", 15.0, gt=0)
    max_in_flight: int = _env("ADAPTER_MAX_IN_FLIGHT", "max_in_flight", 64, ge=1)
    max_waiting: int = _env("ADAPTER_MAX_WAITING", "max_waiting", 64, ge=0)
    # Admission per model: its slots (0: max_num_seqs from its Triton config), and how long
    # a request may be expected to wait for one before it gets 429 instead.
    model_slots: int = _env("ADAPTER_MODEL_SLOTS", "model_slots", 0, ge=0)
    max_queue_wait_s: float = _env("ADAPTER_MAX_QUEUE_WAIT_S", "max_queue_wait_s", 0.5, ge=0)
    body_timeout_s: float = _env("ADAPTER_BODY_TIMEOUT_S", "body_timeout_s", 30.0, gt=0)
    request_timeout_s: float = _env("ADAPTER_REQUEST_TIMEOUT_S", "request_timeout_s", 600.0, ge=0)
    max_body_bytes: int = _env("ADAPTER_MAX_BODY_BYTES", "max_body_bytes", 4 * 1024 * 1024, ge=0)
    max_n: int = _env("ADAPTER_MAX_N", "max_n", 8, ge=1)
    # 1 s: a backend process that dies is found by the next probe (Triton answers it at once).
    health_interval_s: float = _env("ADAPTER_HEALTH_INTERVAL_S", "health_interval_s", 1.0, ge=0)
    # Streams open on an endpoint and nothing heard from it for this long: probe it at once
    # (a dead backend process shows only as silence; 0: only the regular probes).
    silence_probe_s: float = _env("ADAPTER_SILENCE_PROBE_S", "silence_probe_s", 0.3, ge=0)
    health_max_age_s: float = _env("ADAPTER_HEALTH_MAX_AGE_S", "health_max_age_s", 10.0)
    health_probe_generation: bool = _env("ADAPTER_HEALTH_PROBE_GENERATION", "health_probe_generation", True)
    # /health/ready with several models: "any" is ready while one of them works (a router
    # that can serve stays in the Service; a broken model shows in the body, in
    # adapter_model_ready and its alert); "all" needs every model working, so one broken
    # model takes every adapter replica out, for all models. One model: the same.
    ready_when: Literal["any", "all"] = _env("ADAPTER_READY_WHEN", "ready_when", "any")
    upstream_timeout_s: float = _env("ADAPTER_UPSTREAM_TIMEOUT_S", "upstream_timeout_s", 5.0)
    breaker_failures: int = _env("ADAPTER_BREAKER_FAILURES", "breaker_failures", 3, ge=1)
    breaker_open_s: float = _env("ADAPTER_BREAKER_OPEN_S", "breaker_open_s", 1.0)
    retry_after_s: int = _env("ADAPTER_RETRY_AFTER_S", "retry_after_s", 1)
    shutdown_grace_s: float = _env("ADAPTER_SHUTDOWN_GRACE_S", "shutdown_grace_s", 30.0)
    shutdown_delay_s: float = _env("ADAPTER_SHUTDOWN_DELAY_S", "shutdown_delay_s", 0.0, ge=0)
    log_level: str = _env("ADAPTER_LOG_LEVEL", "log_level", "info")
    access_log: bool = _env("ADAPTER_ACCESS_LOG", "access_log", True)

    SECRET: ClassVar[frozenset[str]] = frozenset({"api_keys", "metrics_token", "database_url",
                                                  "triton_repository_key"})

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Only what the caller passes: from_env() hands the environment in explicitly,
        # so a test's Settings(...) never picks up a variable of the machine.
        return (init_settings,)

    @field_validator("triton_grpc_urls", "triton_http_urls", "api_keys", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if not self.triton_grpc_urls:
            raise ValueError("TRITON_GRPC_URLS is empty")
        if not self.triton_http_urls:
            # Triton's convention: HTTP on the port below gRPC (8000 / 8001).
            object.__setattr__(self, "triton_http_urls", [_http_beside(u) for u in self.triton_grpc_urls])
        if len(self.triton_grpc_urls) != len(self.triton_http_urls):
            raise ValueError(f"TRITON_GRPC_URLS has {len(self.triton_grpc_urls)} entries and "
                             f"TRITON_HTTP_URLS {len(self.triton_http_urls)}; give one HTTP URL per gRPC URL")
        return self

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """field name -> environment variable."""
        return {name: f.validation_alias.choices[1] for name, f in cls.model_fields.items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from `environ` (default os.environ); keyword overrides win (CLI flags).
        Raises ValueError naming the variable."""
        environ = os.environ if environ is None else environ
        names = cls.env_names()
        values: dict[str, Any] = {f: environ[v] for f, v in names.items() if v in environ}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as err:
            first = err.errors()[0]
            field = str(first["loc"][0]) if first.get("loc") else ""
            if field in names:
                raise ValueError(f"{names[field]}={values.get(field)!r} is not valid: {first['msg']}") from None
            raise ValueError(str(first.get("msg", err)).removeprefix("Value error, ")) from None

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log, secrets replaced."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "database_url":
                value = _redact_url(value)
            elif name in self.SECRET:
                value = (f"<{len(value)} redacted>" if isinstance(value, list) else "<redacted>") if value else "<none>"
            out[name] = value
        return out


def _redact_url(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db"""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def _http_beside(grpc_url: str) -> str:
    if grpc_url.startswith("dns:"):  # every pod of a headless Service
        host, _, port = grpc_url[4:].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"TRITON_GRPC_URLS entry {grpc_url!r} is not dns:HOST:PORT")
        return f"dns:{host}:{int(port) - 1}"
    host, _, port = grpc_url.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"TRITON_GRPC_URLS entry {grpc_url!r} is not host:port; set TRITON_HTTP_URLS too")
    return f"http://{host}:{int(port) - 1}"
