"""Shared pieces of the deployment tests: the images' lock files as fresh virtual
environments (cached), the rendered Kubernetes manifests, and small readers."""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
LOCKS = DEPLOY / "requirements"
DOCKER = DEPLOY / "docker"
OVERLAYS = ("gpu", "cpu")
KUBERNETES_VERSION = "1.32.0"      # kubernetes-validate's schema; kubectl 1.32 on these machines
KUSTOMIZE_VERSION = "v5.5.0"        # the kustomize built into that kubectl
VENV_CACHE = REPO_ROOT / ".cache" / "image-venvs"
DOCS = REPO_ROOT / "docs" / "deploy.md"

sys.path.insert(0, str(LOCKS))
sys.path.insert(0, str(DOCKER))
import lock as locks  # noqa: E402  (deploy/requirements/lock.py)
import triton_entrypoint as entrypoint  # noqa: E402  (deploy/docker/triton_entrypoint.py)
import check_image  # noqa: E402,F401  (deploy/docker/check_image.py)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def image_venv(image: str) -> Path:
    """A virtual environment holding exactly deploy/requirements/<image>.txt, installed as
    the image installs it (--no-deps --require-hashes, wheels only). Built once per lock
    file content under .cache/image-venvs/ (minutes the first time), then reused."""
    lock_file = LOCKS / f"{image}.txt"
    digest = hashlib.sha256(lock_file.read_bytes()).hexdigest()[:16]
    target = VENV_CACHE / f"{image}-{digest}"
    with _locked(VENV_CACHE / f"{image}.lock"):
        if (target / ".complete").exists():
            return target
        for old in VENV_CACHE.glob(f"{image}-*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        building = VENV_CACHE / f".{image}-{digest}.building"
        shutil.rmtree(building, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(building)], check=True)
        py = building / "bin" / "python"
        proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--require-hashes", "--only-binary=:all:", "-r", str(lock_file)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"installing {lock_file.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"{lock_file.name} is not a complete set (pip check):\n{check.stdout}")
        building.rename(target)
        (target / ".complete").write_text(lock_file.name + "\n")
        return target


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment an image gives its processes: its packages, the code on PYTHONPATH
    (the images copy the code, they do not install the project), nothing of .venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join((str(venv / "bin"), str(DOCKER / "bin"), "/usr/bin:/bin"))
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def kustomize_version() -> str | None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
    m = re.search(r"Kustomize Version: (\S+)", out)
    return m.group(1) if m else None


@lru_cache(maxsize=None)
def render(overlay: str) -> tuple[dict, ...]:
    """The overlay as `kubectl kustomize` renders it (the pinned kustomize)."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def load_yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(docs, kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    return doc["spec"]["template"]["metadata"]["labels"]


def matches(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions) against labels."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def container_env(container: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def config_map_env(docs, container: dict) -> dict[str, str]:
    out = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            out.update(one(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    return out


def dockerfile_stages(text: str) -> dict[str, str]:
    """{stage name: its instructions} of a multi-stage Dockerfile."""
    stages: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = ""
        if current:
            stages[current] += line + "\n"
    return stages
