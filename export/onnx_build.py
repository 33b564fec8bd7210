"""Run onnxruntime-genai's model builder on a checkpoint directory.

The builder converts Llama-family decoders (with KV cache, GroupQueryAttention)
offline in seconds. We run it as a subprocess: it holds the whole model in memory
and imports heavy modules, and a separate process gives all of that back at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Files the builder writes that the version directory keeps.
ARTIFACTS = ("model.onnx", "model.onnx.data", "genai_config.json")


# k_quant instead of plain round-to-nearest for int4: on SmolLM2-135M RTN moved the
# next-token distribution by up to 4 nats KL and changed the top-1 token on 2 of 3
# prompts; k_quant stays under 0.75 nats with the same top-1 (same size, same speed).
DEFAULT_OPTIONS = {"int4": {"algo_config": "k_quant"}}
# When int4_requant.py quantizes the int4 weights again (CPU exports), the builder only
# lays out the graph: its round-to-nearest (asymmetric, so that the graph has zero
# points) saves ~35 s of k_quant per export.
REQUANT_OPTIONS = {"int4": {"algo_config": "rtn", "is_symmetric": "false"}}


def builder_options(precision: str, overrides: dict[str, str] | None = None,
                    requantized: bool = False) -> dict[str, str]:
    """The builder's extra_options for a precision, with the user's overrides on top."""
    defaults = REQUANT_OPTIONS if requantized else DEFAULT_OPTIONS
    return {**defaults.get(precision, {}), **(overrides or {})}


class BuildError(RuntimeError):
    """The builder failed; the message carries the tail of its log."""


def run_builder(checkpoint: Path, out_dir: Path, precision: str, device: str,
                log_path: Path, extra_options: dict[str, str] | None = None,
                timeout_s: int = 3600) -> float:
    """Build `out_dir/model.onnx` (+ external data, genai_config.json); return seconds taken."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir.parent / (out_dir.name + "-builder-cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder",
           "-i", str(checkpoint.resolve()), "-o", str(out_dir.resolve()),
           "-p", precision, "-e", device, "-c", str(cache_dir.resolve())]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.monotonic()
    with open(log_path, "w") as log:
        # cwd outside the onnxruntime_genai package: importing it from inside aborts.
        try:
            proc = subprocess.run(cmd, cwd=out_dir.parent, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise BuildError(f"the ONNX model builder did not finish within {timeout_s} s") from err
    elapsed = time.monotonic() - start
    _remove_tree(cache_dir)
    if proc.returncode != 0 or not (out_dir / "model.onnx").exists():
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise BuildError(f"the ONNX model builder failed (exit {proc.returncode}); last lines of "
                         f"{log_path.name}:\n  " + "\n  ".join(tail))
    return elapsed


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
