"""One settings object, read from environment variables (and CLI flags in main.py)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class Settings:
    """Every knob of the adapter. `ENV` maps each field to its environment variable."""

    host: str = "0.0.0.0"
    port: int = 9000
    triton_grpc_urls: list[str] = field(default_factory=lambda: ["127.0.0.1:8001"])
    triton_http_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000"])
    api_keys: list[str] = field(default_factory=list)
    max_in_flight: int = 64
    max_waiting: int = 64
    request_timeout_s: float = 600.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 8
    health_interval_s: float = 2.0
    health_max_age_s: float = 10.0
    health_probe_generation: bool = True
    upstream_timeout_s: float = 5.0
    breaker_failures: int = 3
    breaker_open_s: float = 1.0
    retry_after_s: int = 1
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    access_log: bool = True

    ENV = {
        "host": "ADAPTER_HOST",
        "port": "ADAPTER_PORT",
        "triton_grpc_urls": "TRITON_GRPC_URLS",
        "triton_http_urls": "TRITON_HTTP_URLS",
        "api_keys": "ADAPTER_API_KEYS",
        "max_in_flight": "ADAPTER_MAX_IN_FLIGHT",
        "max_waiting": "ADAPTER_MAX_WAITING",
        "request_timeout_s": "ADAPTER_REQUEST_TIMEOUT_S",
        "max_body_bytes": "ADAPTER_MAX_BODY_BYTES",
        "max_n": "ADAPTER_MAX_N",
        "health_interval_s": "ADAPTER_HEALTH_INTERVAL_S",
        "health_max_age_s": "ADAPTER_HEALTH_MAX_AGE_S",
        "health_probe_generation": "ADAPTER_HEALTH_PROBE_GENERATION",
        "upstream_timeout_s": "ADAPTER_UPSTREAM_TIMEOUT_S",
        "breaker_failures": "ADAPTER_BREAKER_FAILURES",
        "breaker_open_s": "ADAPTER_BREAKER_OPEN_S",
        "retry_after_s": "ADAPTER_RETRY_AFTER_S",
        "shutdown_grace_s": "ADAPTER_SHUTDOWN_GRACE_S",
        "log_level": "ADAPTER_LOG_LEVEL",
        "access_log": "ADAPTER_ACCESS_LOG",
    }
    SECRET = frozenset({"api_keys"})

    def __post_init__(self) -> None:
        if len(self.triton_grpc_urls) != len(self.triton_http_urls):
            raise ValueError(f"TRITON_GRPC_URLS has {len(self.triton_grpc_urls)} entries and "
                             f"TRITON_HTTP_URLS {len(self.triton_http_urls)}; give one HTTP URL per gRPC URL")
        if not self.triton_grpc_urls:
            raise ValueError("TRITON_GRPC_URLS is empty")
        for name in ("max_in_flight", "max_n", "breaker_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.ENV[name]} must be at least 1, got {getattr(self, name)}")
        for name in ("max_waiting", "request_timeout_s", "max_body_bytes", "health_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.ENV[name]} must not be negative, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from `environ` (default os.environ); keyword overrides win (CLI flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        defaults = cls()
        for f in fields(cls):
            var = cls.ENV.get(f.name)
            if var is None or var not in environ:
                continue
            raw = environ[var]
            default = getattr(defaults, f.name)
            try:
                values[f.name] = _parse(raw, default)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {type(default).__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "triton_grpc_urls" in values and "triton_http_urls" not in values:
            # Triton's convention: HTTP on the port below gRPC (8000 / 8001).
            values["triton_http_urls"] = [_http_beside(u) for u in values["triton_grpc_urls"]]
        return cls(**values)

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log, secrets replaced."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.SECRET:
                value = f"<{len(value)} redacted>" if value else "<none>"
            out[f.name] = value
        return out


def _http_beside(grpc_url: str) -> str:
    host, _, port = grpc_url.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"TRITON_GRPC_URLS entry {grpc_url!r} is not host:port; set TRITON_HTTP_URLS too")
    return f"http://{host}:{int(port) - 1}"


def _parse(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if isinstance(default, list):
        return _csv(raw)
    return type(default)(raw.strip())
