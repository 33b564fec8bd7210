"""W8A8: rewrite an fp32 ONNX decoder to int8 weights and per-row int8 activations.

Every MatMul with a constant 2-D weight becomes

    x ─ Abs ─ ReduceMax(last axis) ─▶ m                   (one absolute maximum per row)
    x ─ ÷m ─ QuantizeLinear(1/127, zero point 128) ─▶ uint8 ─┐
    int8 weights, one scale per output column (÷127 folded in) ─┴ MatMulIntegerToFloat ─ ×m ─▶ y

the scheme vLLM calls W8A8-INT8 with dynamic per-token activations. Why here: on this
machine onnxruntime's int8 GEMM (MLAS QGEMM, AVX-512 VNNI / AMX) runs the decoder's
shapes 3-4x faster than fp32 and than the 4-bit `MatMulNBits` kernels from 16 rows on
(`python -m bench.matmulnbits`), and int8 weights are far more faithful than int4 ones
(KL to the source ~0.05 nats vs ~0.75 for k-quant int4 on SmolLM2).

Scales are per row, not per tensor (onnxruntime's `DynamicQuantizeMatMul`): a row's
result then depends on that row alone, and with integer accumulation it is bit for bit
the same whatever else is in the batch. MatMuls that read the same activation (an MLP's
gate and up projections) are fused into one wider product and split after it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .graph_rewrite import drop_unused_initializers, group_by_input, replace_groups, rewrite_in_place, split_node

OPSET = 18          # ReduceMax with axes as an input
DOMAIN = "com.microsoft"
# Recorded in the manifest; a cached export made by another version of the rewrite is rebuilt.
SCHEME = ("w8a8: int8 weights per output column, int8 activations per row (absmax); rewrite "
          + hashlib.sha256(Path(__file__).read_bytes()
                           + (Path(__file__).parent / "graph_rewrite.py").read_bytes()).hexdigest()[:12])


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: (int8 [K, N], fp32 scale [N])."""
    scale = np.maximum(np.abs(w).max(axis=0), np.finfo(np.float32).tiny) / 127.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def rewrite_w8a8(model) -> dict:
    """Rewrite an onnx ModelProto (weights loaded) in place; returns counts for the manifest."""
    from onnx import helper, numpy_helper

    g = model.graph
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)
    if opset < OPSET:
        raise ValueError(f"the graph uses ONNX opset {opset}; the W8A8 rewrite needs {OPSET} or newer "
                         "(ReduceMax with axes as an input)")
    inits = {t.name: t for t in g.initializer}

    def key(node):   # MatMuls with a constant 2-D weight, by the activation they read
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        return node.input[0] if weight is not None and len(weight.dims) == 2 else None

    groups = group_by_input(g, key)
    if not groups:
        raise ValueError("the graph has no MatMul with a constant weight to quantize")
    consts = {"inv127": np.array(1 / 127, np.float32), "one": np.array(1.0, np.float32),
              "axes": np.array([-1], np.int64), "zero_point": np.array(128, np.uint8)}
    g.initializer.extend(numpy_helper.from_array(v, f"w8a8/{k}") for k, v in consts.items())

    def emit(nodes):
        x, p = nodes[0].input[0], f"{nodes[0].output[0]}/w8a8"
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        q, scale = quantize_weight(np.concatenate(weights, axis=1))
        # x/m is in [-1, 1]: quantized with scale 1/127, so the activation's own scale is
        # m/127; its 1/127 goes into the weight scales and m is applied after the product
        # (one node fewer per activation than dividing by m/127).
        g.initializer.extend([numpy_helper.from_array(q, f"{p}/weight"),
                              numpy_helper.from_array(scale / np.float32(127.0), f"{p}/weight_scale")])
        outputs = [n.output[0] for n in nodes]
        y = outputs[0] if len(nodes) == 1 else f"{p}/y"
        out = [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
            helper.make_node("ReduceMax", [f"{p}/abs", "w8a8/axes"], [f"{p}/absmax"], keepdims=1,
                             name=f"{p}/ReduceMax"),
            # An all-zero row has m = 0: 0/0 quantizes to some finite value, and the
            # final x0 makes its output exactly 0, as it should be.
            helper.make_node("Div", [x, f"{p}/absmax"], [f"{p}/x_scaled"], name=f"{p}/Div"),
            helper.make_node("QuantizeLinear", [f"{p}/x_scaled", "w8a8/inv127", "w8a8/zero_point"],
                             [f"{p}/x_uint8"], name=f"{p}/QuantizeLinear"),
            helper.make_node("MatMulIntegerToFloat", [f"{p}/x_uint8", f"{p}/weight", "w8a8/one",
                                                      f"{p}/weight_scale", "w8a8/zero_point"],
                             [f"{p}/y_unscaled"], domain=DOMAIN, name=f"{p}/MatMulIntegerToFloat"),
            helper.make_node("Mul", [f"{p}/y_unscaled", f"{p}/absmax"], [y], name=f"{p}/Mul"),
        ]
        if len(nodes) > 1:
            out.append(split_node(g, y, outputs, [w.shape[1] for w in weights], p))
        return out

    fused = replace_groups(g, groups, emit)
    drop_unused_initializers(g, {n.input[1] for nodes in groups.values() for n in nodes})
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return {"scheme": SCHEME, "quantized_matmuls": sum(len(nodes) for nodes in groups.values()),
            "int8_products": len(groups), "fused_groups": fused}


def quantize_export(version_dir: Path) -> dict:
    """Rewrite `version_dir/model.onnx` (+ its external data) to W8A8 in place."""
    return rewrite_in_place(version_dir, rewrite_w8a8)
