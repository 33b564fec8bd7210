"""int4 for the CPU: the builder's graph, its 4-bit weights quantized again, activation-aware.

The builder's `k_quant` weighs each weight's rounding error by the weight's own size.
What matters is the error of the product, and an input channel that carries large
activations multiplies its weights' errors: here each error is weighed by the mean
squared activation of its input channel (the diagonal of the inputs' second moment,
what llama.cpp calls an importance matrix), measured on the builder's fp32 graph of the
same checkpoint over calibration text (calibration.py). Per block, the same k-quant
search (candidate ranges, least-squares scale and minimum) then picks an asymmetric
4-bit grid with an integer zero point, which is what `MatMulNBits` computes with.

That gain in fidelity pays for larger blocks where they are cheap in accuracy: the MLP
projections and the LM head (~80% of the weights) use blocks of 64, attention blocks
of 32. Fewer blocks is less work per weight for onnxruntime's one-row int8-activation
kernel. SmolLM2-135M, measured here:

| int4 export | KL to fp32, held-out text | top-1 agrees | one-row decode step |
|---|---|---|---|
| builder `k_quant`, blocks of 32 | 0.45 | 66% | 1.00 |
| this, blocks 64 (MLP, head) / 32 | 0.30 | 73% | 0.84-0.93 |

(`python -m bench.int4_fidelity`; the step from interleaved runs in one process.)
All blocks of 64 were faster still (0.885) but failed the export's own check (KL 1.1 on
one prompt), so attention stays at 32.

The price of blocks of 64: onnxruntime runs a one-row product through another kernel
than a batch of rows, and the two sum in another order (blocks of 32: bit for bit the
same). A sequence decoded alone and the same sequence decoded in a batch then differ in
the last bits of a product, which the next layer's int8 activations can turn into a
quantization step: up to ~0.6 in the logits on SmolLM2, and greedy text can part at a
near tie. `--int4-mlp-block 32` keeps every block at 32 and the output independent of
the batch, at the builder's speed.

The tied embedding (`GatherBlockQuantized`) reads the LM head's blocks and follows its
block size. Initializer names stay the builder's (`..._Q4G32` may hold blocks of 64).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .graph_rewrite import rewrite_in_place
from .verify import whole_sequence_feed

# Recorded in the manifest; a cached export made by another version of the files that
# decide its weights (this one, the calibration text, the rewrite helpers, the feed of
# the importance pass in verify.py) is rebuilt.
SCHEME = ("int4: activation-aware k-quant, block sizes in quantization.blocks; rewrite "
          + hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes() for name in (
              "int4_requant.py", "calibration.py", "graph_rewrite.py", "verify.py"))).hexdigest()[:12])

WIDE_BLOCK = 64                                 # MLP and head, unless the export asks for 32
NARROW_BLOCK = 32
WIDE_NODES = re.compile(r"/mlp/|lm_head")      # the builder's names for MLP projections and the head
CALIBRATION_MAX_TOKENS = 256
SEARCH_STEPS = 20                               # k-quant: candidate ranges per block
COLUMN_CHUNK = 1024                             # columns at a time: the search's arrays stay in cache


def block_for(node_name: str, k: int, wide: int = WIDE_BLOCK) -> int | None:
    """Block size for a product with K inputs; None keeps the builder's quantization."""
    if WIDE_NODES.search(node_name) and k % wide == 0:
        return wide
    return NARROW_BLOCK if k % NARROW_BLOCK == 0 else None


# -- quantizing one weight ---------------------------------------------------------------------
def quantize_blocks(w: np.ndarray, block: int, importance: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight [K, N] (x @ w) -> MatMulNBits' (packed [N, K/block, block/2] uint8,
    scales [N, K/block] fp32, packed zero points [N, ceil(K/block / 2)] uint8).

    Minimizes sum_k importance[k] * (w[k] - dequantized[k])^2 per block (importance
    None: all ones). Candidates: the block's min/max range, then the range scaled by
    (15 + t) / 15 for t in [-1, 0.9] with the least-squares scale and minimum for the
    rounding it gives (the k-quant search); each candidate is judged after rounding
    the zero point to an integer and the weights against it, as the kernel sees them."""
    k, n = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    imp = np.ones(k) if importance is None else np.asarray(importance, dtype=np.float64).reshape(-1)
    if imp.size != k:
        raise ValueError(f"importance has {imp.size} channels, the weight {k}")
    # a channel never seen active still counts a little: no block is without weight
    imp = imp + 1e-6 * max(float(imp.mean()), 1e-30)
    # numpy lets go of the GIL inside its loops: chunks on all cores
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)) or 1) as pool:
        parts = list(pool.map(lambda c: _quantize_columns(w[:, c:c + COLUMN_CHUNK], block, imp),
                              range(0, n, COLUMN_CHUNK)))
    return tuple(np.concatenate(arrays, axis=0) for arrays in zip(*parts))


def _quantize_columns(w: np.ndarray, block: int, imp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, n = w.shape
    nb = k // block
    x = np.ascontiguousarray(w.T, dtype=np.float64).reshape(n * nb, block)
    weight = np.broadcast_to(imp.reshape(nb, block), (n, nb, block)).reshape(n * nb, block)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    sw, swx = weight.sum(1, keepdims=True), (weight * x).sum(1, keepdims=True)
    best = None
    for step in range(-1, SEARCH_STEPS):
        inv = (15.0 if step < 0 else 14.0 + 0.1 * step) / span
        q = np.clip(np.round(inv * (x - lo)), 0, 15)
        if step < 0:
            scale, minimum = 1.0 / inv, lo
        else:   # weighted least squares of x ~ scale * q + minimum
            wq = weight * q
            sq, sqq, sxq = wq.sum(1, keepdims=True), (wq * q).sum(1, keepdims=True), (wq * x).sum(1, keepdims=True)
            det = sw * sqq - sq * sq
            det = np.where(np.abs(det) < 1e-30, 1e-30, det)
            scale = (sw * sxq - swx * sq) / det
            minimum = (sqq * swx - sq * sxq) / det
        scale = np.where(np.abs(scale) < 1e-12, 1e-12, scale)
        zero = np.clip(np.round(-minimum / scale), 0, 15)
        q = np.clip(np.round(x / scale + zero), 0, 15)
        err = (weight * (scale * (q - zero) - x) ** 2).sum(1, keepdims=True)
        if best is None:
            best = [err, scale, zero, q]
            continue
        better = err[:, 0] < best[0][:, 0]
        for slot, value in enumerate((err, scale, zero, q)):
            best[slot][better] = value[better]
    _, scale, zero, q = best
    packed = pack4(q.astype(np.uint8).reshape(n, nb, block))
    zero_packed = pack4(zero.astype(np.uint8).reshape(n, nb))
    return packed, scale.reshape(n, nb).astype(np.float32), zero_packed


def pack4(a: np.ndarray) -> np.ndarray:
    """4-bit values (0..15) -> bytes along the last axis, low nibble first (MatMulNBits'
    order for weights and zero points); an odd count is padded with a zero."""
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), a.dtype)], axis=-1)
    return (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zero_packed: np.ndarray) -> np.ndarray:
    """Inverse of quantize_blocks: the weight [K, N] the kernel multiplies with."""
    n, nb, half = packed.shape
    q = np.empty((n, nb, half * 2), np.float32)
    q[:, :, 0::2], q[:, :, 1::2] = packed & 15, packed >> 4
    zero = np.empty((n, zero_packed.shape[1] * 2), np.float32)
    zero[:, 0::2], zero[:, 1::2] = zero_packed & 15, zero_packed >> 4
    w = (q - zero[:, :nb, None]) * scales[:, :, None]
    return w.reshape(n, nb * half * 2).T


# -- importance from the fp32 graph --------------------------------------------------------------
def calibration_ids(ckpt, tokenizer_json: Path) -> list[list[int]]:
    """Token ids of the calibration text: chats through the checkpoint's template, plain text."""
    from tokenizers import Tokenizer

    from .calibration import CHATS, TEXTS

    tok = Tokenizer.from_file(str(tokenizer_json))
    samples = []
    for user, assistant in CHATS:
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        try:
            text = ckpt.render_chat(messages, add_generation_prompt=False)
        except Exception:   # a template that wants more than messages (tools, dates): plain text
            text = None
        samples.append(tok.encode(text, add_special_tokens=False).ids if text is not None
                       else tok.encode(f"{user}\n{assistant}", add_special_tokens=True).ids)
    samples += [tok.encode(t, add_special_tokens=True).ids for t in TEXTS]
    limit = min(CALIBRATION_MAX_TOKENS, ckpt.context_length - 1) if ckpt.context_length else CALIBRATION_MAX_TOKENS
    return [s[:limit] for s in samples if s]


def activation_importance(fp32_dir: Path, activations: set[str], samples: list[list[int]]) -> dict:
    """Mean squared value per channel of each named activation of the fp32 graph."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)
    produced = {o for node in model.graph.node for o in node.output}
    names = sorted(a for a in activations if a in produced)
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(fp32_dir.resolve()))
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    decoder = json.loads((fp32_dir / "genai_config.json").read_text())["model"]["decoder"]
    inputs = [i.name for i in session.get_inputs()]
    sums = {name: 0.0 for name in names}
    count = 0
    for ids in samples:
        outs = session.run(names, whole_sequence_feed(inputs, decoder, ids))
        for name, value in zip(names, outs):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums[name] + (flat ** 2).sum(0)
        count += len(ids)
    return {name: sums[name] / count for name in names}


# -- the rewrite -----------------------------------------------------------------------------
def _reference_weights(fp32_dir: Path) -> tuple[dict, callable]:
    """Weight products of the fp32 graph by node name, and a loader of their weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}

    def load(node) -> np.ndarray:
        return numpy_helper.to_array(inits[node.input[1]], base_dir=str(fp32_dir))
    return nodes, load


def _set_block_size(node, block: int) -> None:
    from onnx import helper

    node.attribute.remove(next(a for a in node.attribute if a.name == "block_size"))
    node.attribute.append(helper.make_attribute("block_size", block))


def requantize(version_dir: Path, fp32_dir: Path, samples: list[list[int]], wide_block: int = WIDE_BLOCK) -> dict:
    """Quantize the 4-bit MatMulNBits of `version_dir` again from the fp32 graph's weights
    (`wide_block`: the MLP's and the head's block size, 64 or 32)."""
    from onnx import numpy_helper

    ref_nodes, load = _reference_weights(fp32_dir)

    def rewrite(model) -> dict:
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        todo = []
        for node in g.node:
            attrs = {a.name: a.i for a in node.attribute}
            if node.op_type != "MatMulNBits" or attrs.get("bits") != 4:
                continue
            ref = ref_nodes.get(re.sub(r"_Q4$", "", node.name))
            block = block_for(node.name, attrs["K"], wide_block)
            if ref is not None and block is not None:
                todo.append((node, attrs, ref, block))
        importance = activation_importance(fp32_dir, {t[0].input[0] for t in todo}, samples)
        blocks = {}
        for node, attrs, ref, block in todo:
            w = load(ref)
            if w.shape != (attrs["K"], attrs["N"]):
                raise ValueError(f"{node.name}: K x N is {attrs['K']} x {attrs['N']}, the fp32 weight "
                                 f"{ref.input[1]} is {w.shape}")
            if len(node.input) < 4 or not node.input[3]:
                raise ValueError(f"{node.name}: the builder wrote no zero points; expected asymmetric int4")
            arrays = quantize_blocks(w, block, importance.get(node.input[0]))
            for slot, arr in zip((1, 2, 3), arrays):
                inits[node.input[slot]].CopyFrom(numpy_helper.from_array(arr, node.input[slot]))
            _set_block_size(node, block)
            blocks[node.input[1]] = block
        # The tied embedding gathers the head's blocks (directly or through a Reshape).
        producer = {o: n for n in g.node for o in n.output}
        for node in g.node:
            if node.op_type != "GatherBlockQuantized":
                continue
            data = node.input[0]
            if data in producer and producer[data].op_type == "Reshape":
                data = producer[data].input[0]
            if data in blocks:
                _set_block_size(node, blocks[data])
        sizes = sorted(set(blocks.values()))
        return {"requantized": len(todo),
                "blocks": {str(b): sum(v == b for v in blocks.values()) for b in sizes},
                "calibration_tokens": sum(len(s) for s in samples)}

    return rewrite_in_place(version_dir, rewrite)
