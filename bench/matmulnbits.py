"""Micro-benchmark: one weight matmul at the shapes of the default model's decode.

    python -m bench.matmulnbits [--threads 2]

A decode step of SmolLM2-135M is ~120 small matmuls (K=576); at 16 rows their speed,
not memory bandwidth, bounds the step. This times one K=576 x N=1536 product for M rows
in each form an export can take: int4 `MatMulNBits` with int8 activations
(accuracy_level 4, what the builder writes for CPU) and with fp32 compute (level 0);
W8A8 exactly as `export/w8a8.py` writes it (per-row activation quantization +
`MatMulIntegerToFloat`); onnxruntime fp32 `MatMul`; numpy fp32. Prints microseconds
per op and GFLOP/s. Not a test.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, BLOCK = 576, 1536, 32


def _options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def dense_session(threads: int, w8a8: bool) -> ort.InferenceSession:
    """fp32 MatMul, or the same graph after the W8A8 rewrite of the export."""
    from export.w8a8 import rewrite_w8a8

    w = (np.random.default_rng(2).standard_normal((K, N)) * 0.04).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="proj/MatMul")], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if w8a8:
        rewrite_w8a8(model)
    return ort.InferenceSession(model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"])


def session(accuracy_level: int, threads: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    blocks = K // BLOCK
    weights = rng.integers(0, 255, size=(N, blocks, BLOCK // 2), dtype=np.uint8)
    scales = (rng.random(N * blocks) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "W", "S"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
                              [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"])


def timed(fn, repeat: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 38, 64, 100])
    args = parser.parse_args()
    sessions = [session(4, args.threads), session(0, args.threads),
                dense_session(args.threads, w8a8=True), dense_session(args.threads, w8a8=False)]
    weights = np.random.default_rng(1).random((K, N), dtype=np.float32)
    print(f"K={K} N={N} (int4 block {BLOCK}), {args.threads} threads: microseconds per op (GFLOP/s)")
    print("| rows | int4, int8 activations | int4, fp32 compute | W8A8 (export/w8a8.py) | onnxruntime fp32 | numpy fp32 |")
    print("|---|---|---|---|---|---|")
    for m in args.rows:
        a = np.random.default_rng(m).random((m, K), dtype=np.float32)
        cells = []
        for fn in [*(lambda s=s: s.run(None, {"A": a}) for s in sessions), lambda: a @ weights]:
            dt = timed(fn)
            cells.append(f"{dt * 1e6:.0f} ({2 * m * K * N / dt / 1e9:.0f})")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
