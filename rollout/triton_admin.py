"""Triton's model-repository API (load, unload, index) and readiness, over HTTP, with
the repository key the stack's tritonserver requires (stack/triton.py)."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

REPOSITORY_KEY_HEADER = "llm-repository-key"


class TritonError(RuntimeError):
    pass


def resolve_servers(spec: str) -> list[str]:
    """HTTP URLs of the Triton servers: a comma-separated list of URLs, or
    `dns:HOST:PORT`, every address HOST resolves to (a headless Service: every pod)."""
    if spec.startswith("dns:"):
        host, _, port = spec[4:].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{spec!r}: write dns:HOST:PORT")
        addrs = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)})
        if not addrs:
            raise ValueError(f"{host} resolves to no address")
        return [f"http://{'[' + a + ']' if ':' in a else a}:{port}" for a in addrs]
    urls = [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]
    return [u if "://" in u else f"http://{u}" for u in urls]


def grpc_beside(http_url: str) -> str:
    """Triton's convention: gRPC on the port above HTTP (8000 / 8001)."""
    parts = urlsplit(http_url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{host}:{(parts.port or 80) + 1}"


@dataclass
class TritonAdmin:
    url: str
    key: str = ""
    timeout: float = 300.0
    grpc_url: str = ""

    def __post_init__(self) -> None:
        self.grpc_url = self.grpc_url or grpc_beside(self.url)

    def _call(self, method: str, path: str, body: Optional[dict] = None, admin: bool = False) -> Any:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        if admin and self.key:
            req.add_header(REPOSITORY_KEY_HEADER, self.key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except ValueError:
                pass
            raise TritonError(f"{self.url}{path}: {err.code} {detail}") from None
        except OSError as err:
            raise TritonError(f"{self.url}: not reachable ({err})") from None
        return json.loads(text) if text.strip() else None

    def index(self) -> list[dict]:
        return self._call("POST", "/v2/repository/index", {}, admin=True) or []

    def loaded_versions(self, model: str) -> set[int]:
        return {int(e["version"]) for e in self.index()
                if e.get("name") == model and e.get("state") == "READY" and str(e.get("version", "")).isdigit()}

    def states(self, model: str) -> dict[int, str]:
        return {int(e["version"]): e.get("state", "") for e in self.index()
                if e.get("name") == model and str(e.get("version", "")).isdigit()}

    def config(self, model: str) -> dict:
        return self._call("GET", f"/v2/models/{model}/config")

    def load(self, model: str) -> None:
        """(Re)load the model as its config.pbtxt in the repository says; versions whose
        files and configuration did not change keep serving without a reload."""
        self._call("POST", f"/v2/repository/models/{model}/load", {}, admin=True)

    def unload(self, model: str) -> None:
        self._call("POST", f"/v2/repository/models/{model}/unload", {}, admin=True)

    def load_versions(self, model: str, versions: list[int], config: dict) -> None:
        """Serve exactly these versions: the ones not loaded yet load, the others unload
        once their in-flight requests are done (Triton keeps serving unchanged ones)."""
        cfg = dict(config)
        cfg["version_policy"] = {"specific": {"versions": sorted(set(versions))}}
        self._call("POST", f"/v2/repository/models/{model}/load", {"parameters": {"config": json.dumps(cfg)}},
                   admin=True)

    def version_ready(self, model: str, version: int) -> bool:
        try:
            self._call("GET", f"/v2/models/{model}/versions/{version}/ready")
            return True
        except TritonError:
            return False

    def wait_ready(self, model: str, version: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.version_ready(model, version):
            if time.monotonic() > deadline:
                raise TritonError(f"{self.url}: version {version} of {model} not ready after {timeout:g} s")
            time.sleep(0.25)
