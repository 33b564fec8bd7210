"""The default model (SmolLM2-135M-Instruct), exported into a model repository, cheaply.

`ensure_default_model(repo)` is what tests, benchmarks and `make model` call. The
first call ever fetches the checkpoint, exports and verifies it; the verified
version directory is kept under `.cache/exports/<weights sha256>-<precision>/`.
Every later call (any repository, any process) hard-links that cached version
into the repository and re-renders config.pbtxt with the caller's engine
overrides, which takes milliseconds.

    python -m stack.default_model [--precision w8a8|int4|fp32|int8] [--repository model_repository]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from export.default_model import MODEL_ID, fetch_default_model
from export.manifest import read_manifest, tool_versions, weights_checksum
from export.onnx_build import builder_options
from export.pipeline import (ExportOptions, apply_overrides, instance_kind, requantizes_int4, rewrite_scheme,
                             run_export)
from export.publish import link_or_copy, publish_version, staging, versions, write_config
from llm_backend.decoder import int8_gemm_is_exact
from llm_backend.model_config import EngineParams

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPORT_CACHE = REPO_ROOT / ".cache" / "exports"
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"


@contextmanager
def _locked(path: Path):
    """An exclusive lock across processes (parallel test runs share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _checkpoint_sha256(checkpoint: Path) -> str:
    """Weights checksum, memoized by (file, size, mtime): hashing 540 MB costs seconds."""
    files = sorted(checkpoint.glob("*.safetensors")) or sorted(checkpoint.glob("pytorch_model*.bin"))
    key = ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    memo = EXPORT_CACHE / "checksums.json"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in known:
        known[key] = weights_checksum(files)["sha256"]
        EXPORT_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, memo)
    return known[key]


def cached_export(checkpoint: Path, precision: str, name: str) -> Path:
    """The verified version directory for (checkpoint weights, precision), built once."""
    key = f"{_checkpoint_sha256(checkpoint)[:16]}-{precision}"
    cache_repo = EXPORT_CACHE / key
    with _locked(EXPORT_CACHE / f"{key}.lock"):
        for number in reversed(versions(cache_repo / name)):
            candidate = cache_repo / name / str(number)
            if _is_current(candidate, precision):
                return candidate
        opts = ExportOptions(name=name, repository=cache_repo, precision=precision, device="cpu")
        fresh = run_export(checkpoint, opts).version_dir
        for number in versions(cache_repo / name):  # stale builds; repositories keep their hard links
            if cache_repo / name / str(number) != fresh:
                shutil.rmtree(cache_repo / name / str(number), ignore_errors=True)
        return fresh


def _is_current(version_dir: Path, precision: str) -> bool:
    """A cached export is reused only if it passed verification with today's builder and tools."""
    try:
        m = read_manifest(version_dir)
    except (OSError, ValueError):
        return False
    return (m.get("verification", {}).get("status") == "passed"
            and m.get("builder_options") == builder_options(precision, requantized=requantizes_int4(precision, "cpu"))
            and (m.get("quantization") or {}).get("scheme") == rewrite_scheme(precision, "cpu")
            and m.get("tools") == tool_versions())  # a bumped pin means a new export


# W8A8 is the fastest export here, but needs a CPU with an exact int8 dot product.
DEFAULT_PRECISION = "w8a8" if int8_gemm_is_exact() else "int4"


def ensure_default_model(repository: Path, precision: str | None = None, name: str = MODEL_ID,
                         **engine_overrides) -> Path:
    """Return `repository/name`, exported (verified, cached) on first use.

    A new version is published when the directory has none, or when its latest
    version is not the current cached export for `precision` (another precision,
    an older build). `engine_overrides` are `EngineParams` fields (e.g. max_num_seqs=4) plus
    `instance_count`; config.pbtxt is re-rendered with them on every call
    (and left untouched when nothing changed).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    precision = precision or DEFAULT_PRECISION
    repository = Path(repository)
    model_dir = repository / name
    instance_count = int(engine_overrides.pop("instance_count", 1))
    # One caller at a time per model directory (make serve beside a test run),
    # so two callers never publish two versions of the same export.
    lock = EXPORT_CACHE / "locks" / (hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16] + ".lock")
    with _locked(lock):
        latest = versions(model_dir)
        if latest and _same_export(model_dir / str(latest[-1]), precision):
            manifest = read_manifest(model_dir / str(latest[-1]))
            _write_config(model_dir, name, manifest, engine_overrides, instance_count)
            return model_dir
        source = cached_export(fetch_default_model(), precision, name)
        with staging(model_dir) as stage:
            staged = stage / "version"
            staged.mkdir()
            for f in source.iterdir():
                link_or_copy(f, staged / f.name)
            manifest = read_manifest(staged)
            _write_config(model_dir, name, manifest, engine_overrides, instance_count)
            publish_version(staged, model_dir)
    return model_dir


def _same_export(version_dir: Path, precision: str) -> bool:
    """Is this published version a copy of a current cached export for `precision`?"""
    if not _is_current(version_dir, precision):
        return False
    manifest = read_manifest(version_dir)
    if manifest["precision"] != precision:
        return False
    cached = EXPORT_CACHE / f"{manifest['source']['weights']['sha256'][:16]}-{precision}"
    text = (version_dir / "manifest.json").read_bytes()
    # Hard links or copies of the cache carry the very same manifest (same date).
    return any(m.read_bytes() == text for m in cached.glob("*/*/manifest.json"))


def _write_config(model_dir: Path, name: str, manifest: dict, overrides: dict, instance_count: int) -> None:
    params = apply_overrides(EngineParams(**manifest["engine_params"]), overrides)
    write_config(model_dir, name, params, instance_kind=instance_kind(manifest["device"]),
                 instance_count=instance_count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the default model into a model repository.")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--precision", choices=["w8a8", "fp32", "int4", "int8"], default=DEFAULT_PRECISION,
                        help=f"default {DEFAULT_PRECISION} (w8a8 where the CPU has VNNI, else int4)")
    parser.add_argument("--name", default=MODEL_ID)
    args = parser.parse_args(argv)
    model_dir = ensure_default_model(args.repository, args.precision, args.name)
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
