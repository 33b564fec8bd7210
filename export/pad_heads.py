"""Pad attention heads to a size onnxruntime's GroupQueryAttention runs on the CPU.

The builder emits GroupQueryAttention, whose CPU kernel needs a head size that is
a multiple of 16; small models (hidden 32, 4 heads: head size 8) would export and
then fail at the first run. We build an exactly equivalent checkpoint with head
size D = lcm(d, 16) instead:

- original dimension j of each rotary half goes to padded index j * D/d of the
  same half, the rest are zeros. With RoPE frequencies theta^(-2i/D), index
  j * D/d rotates at theta^(-2j/d), the original frequency, and zero pairs stay zero;
- q is scaled by sqrt(D/d) so q.k / sqrt(D) equals the original q.k / sqrt(d);
- v and o_proj's input columns use the same placement, so zeros add nothing.

Verification then compares the padded export with the original model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

GQA_MULTIPLE = 16
ELEMENTWISE_ROPE = ("default", "linear")  # frequencies depend on the frequency alone


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def padded_head_dim(config: dict) -> int | None:
    """The head size to export with, or None when the checkpoint's own works."""
    d = head_dim(config)
    return None if d % GQA_MULTIPLE == 0 else math.lcm(d, GQA_MULTIPLE)


def rope_type(config: dict) -> str:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type") or rope.get("type") or "default"


def unsupported_reason(config: dict) -> str | None:
    """Why a checkpoint that needs padding cannot be padded exactly (None: it can)."""
    if padded_head_dim(config) is None:
        return None
    if head_dim(config) % 2:
        return f"head size {head_dim(config)} is odd"
    if rope_type(config) not in ELEMENTWISE_ROPE:
        return f"RoPE type {rope_type(config)!r} depends on the head size"
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings"
    return None


def _placement(d: int, D: int):
    """Padded index of each original index within a head."""
    import torch
    half, r = d // 2, D // d
    k = torch.arange(d)
    return (k // half) * (D // 2) + (k % half) * r


def _pad_rows(w, heads: int, d: int, D: int, scale: float = 1.0):
    """[heads*d, ...] -> [heads*D, ...] (projection outputs, biases)."""
    import torch
    idx = _placement(d, D)
    src = w.reshape(heads, d, *w.shape[1:])
    out = torch.zeros((heads, D, *w.shape[1:]), dtype=w.dtype)
    out[:, idx] = src * scale
    return out.reshape(heads * D, *w.shape[1:])


def _pad_cols(w, heads: int, d: int, D: int):
    """[out, heads*d] -> [out, heads*D] (o_proj input)."""
    return _pad_rows(w.t().contiguous(), heads, d, D).t().contiguous()


def write_padded_checkpoint(src: Path, weight_files: list[Path], config: dict, dest: Path) -> int:
    """Write the equivalent checkpoint with padded heads into `dest`; return the new head size."""
    import torch
    from safetensors.torch import load_file, save_file

    d, D = head_dim(config), padded_head_dim(config)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    state = {}
    for f in weight_files:
        state.update(load_file(f) if f.suffix == ".safetensors"
                     else torch.load(f, map_location="cpu", weights_only=True))
    scale = math.sqrt(D / d)
    for name in list(state):
        w = state[name].float() if state[name].dtype != torch.float32 else state[name]
        if ".self_attn.q_proj." in name:
            state[name] = _pad_rows(w, heads, d, D, scale)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            state[name] = _pad_rows(w, kv, d, D)
        elif ".self_attn.o_proj.weight" in name:
            state[name] = _pad_cols(w, heads, d, D)
    dest.mkdir(parents=True)
    # Tied embeddings are one tensor saved twice; safetensors refuses shared storage.
    save_file({k: v.contiguous().clone() for k, v in state.items()}, dest / "model.safetensors",
              metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and not f.name.endswith(".index.json"):
            shutil.copy2(f, dest / f.name)
    (dest / "config.json").write_text(json.dumps({**config, "head_dim": D}, indent=2))
    return D
