"""Decode attention alone: onnxruntime's GroupQueryAttention against the engine's own
GroupAttention (llm_backend/cpu_ops), on the default model's attention shapes.

    python -m bench.attention_floor [--rows 1 16] [--context 100] [--rounds 5]

At 16 rows `GroupQueryAttention` was a third of a decode step (`bench.op_profile`). Its
CPU kernel takes each row and query head on its own, so the model's three query heads
per key-value head read the same keys and values three times. GroupAttention reads them
once per key-value head for all three (AVX-512, on onnxruntime's own threads). This runs
one node of each, exactly as the engine's graph has them (packed QKV, rotary embedding,
9 query heads and 3 key-value heads of 64, fp32 KV buffers [rows, 3, positions, 64]
bound as past and present, every row at `--context` positions), 30 calls a step (one a
layer, each with its own buffers), in turns (`--rounds` of 20 steps each).

Both write the new token's key and value into the buffers; before timing, their outputs
are checked to agree (1e-4) and the KV they wrote to agree (1e-6). Writes
docs/bench-results/attention-floor-<time>.json and .md. Not a test.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.results import write_run
from bench.serving import OUT

LAYERS, Q_HEADS, KV_HEADS, HEAD, POSITIONS = 30, 9, 3, 64, 8192


def attention_model(fused: bool):
    """One attention node as the export has it (GroupQueryAttention: packed QKV, rotary
    from cos/sin tables), or with the engine's rewrite applied (GroupAttention)."""
    from onnx import TensorProto, helper, numpy_helper

    from llm_backend import cpu_ops

    inv = 10000.0 ** (-np.arange(HEAD // 2) / (HEAD // 2))
    angles = np.arange(POSITIONS)[:, None] * inv[None, :]
    f = TensorProto.FLOAT
    kv = ["rows", KV_HEADS, "max_len", HEAD]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                    "cos_cache", "sin_cache"],
                            ["output", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=Q_HEADS, kv_num_heads=KV_HEADS, scale=HEAD ** -0.5, do_rotary=1,
                            rotary_interleaved=0, name="attention")
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info("qkv", f, ["rows", 1, (Q_HEADS + 2 * KV_HEADS) * HEAD]),
         helper.make_tensor_value_info("past_key", f, kv), helper.make_tensor_value_info("past_value", f, kv),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["rows"]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("output", f, ["rows", 1, Q_HEADS * HEAD]),
         helper.make_tensor_value_info("present_key", f, kv), helper.make_tensor_value_info("present_value", f, kv)],
        [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos_cache"),
         numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin_cache")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(cpu_ops.DOMAIN, 1)])
    if fused and cpu_ops.use_group_attention(model.graph, HEAD) != 1:
        raise RuntimeError("the engine's rewrite did not take this attention node")
    return model


def session(model, threads: int, library: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bind(sess, qkv: np.ndarray, seqlens: np.ndarray, total: np.ndarray, caches: list, out: np.ndarray):
    """One IOBinding: the KV buffers bound as past and present, as the engine binds them."""
    b = sess.io_binding()
    b.feeds = (qkv, seqlens, total)   # a bound CPU input is read from the array's memory: keep it alive
    b.bind_output("output", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    b.bind_cpu_input("qkv", qkv)
    b.bind_cpu_input("seqlens_k", seqlens)
    b.bind_cpu_input("total", total)
    for past, present, arr in (("past_key", "present_key", caches[0]), ("past_value", "present_value", caches[1])):
        b.bind_input(past, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        b.bind_output(present, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
    return b


def check_agreement(want: list, got: list, want_kv: list, got_kv: list) -> float:
    """The largest output difference; raises when the two disagree (outputs beyond 1e-4,
    or the KV they wrote beyond 1e-6)."""
    diff = max(float(np.abs(w - g).max()) for w, g in zip(want, got))
    kv_diff = max(float(np.abs(w - g).max()) for lw, lg in zip(want_kv, got_kv) for w, g in zip(lw, lg))
    if not diff <= 1e-4 or not kv_diff <= 1e-6:
        raise RuntimeError(f"the kernels disagree: outputs {diff:.2e} apart, the KV written {kv_diff:.2e}")
    return diff


def compare(library: str, rows: int, context: int, rounds: int, threads: int, seed: int = 0) -> dict:
    """One row count: both nodes on copies of the same buffers, checked to agree, then
    timed in turns; their median step times (30 calls a step)."""
    rng = np.random.default_rng(seed)
    max_len = context + 8
    shape = (rows, KV_HEADS, max_len, HEAD)
    caches = {name: [[np.zeros(shape, np.float32) for _ in range(2)] for _ in range(LAYERS)] for name in ("ort", "op")}
    for layer in range(LAYERS):
        k, v = rng.standard_normal((2, *shape[:2], context, HEAD), dtype=np.float32)
        for name in caches:
            caches[name][layer][0][:, :, :context] = k
            caches[name][layer][1][:, :, :context] = v
    qkv = rng.standard_normal((rows, 1, (Q_HEADS + 2 * KV_HEADS) * HEAD), dtype=np.float32)
    seqlens = np.full(rows, context, np.int32)
    total = np.array(context + 1, np.int32)
    outs = {name: [np.full((rows, 1, Q_HEADS * HEAD), np.nan, np.float32) for _ in range(LAYERS)] for name in caches}
    sessions = {"ort": session(attention_model(False), threads), "op": session(attention_model(True), threads, library)}
    bindings = {name: [bind(sess, qkv, seqlens, total, caches[name][layer], outs[name][layer])
                       for layer in range(LAYERS)] for name, sess in sessions.items()}

    def step(name):
        sess = sessions[name]
        for b in bindings[name]:
            sess.run_with_iobinding(b)

    step("ort")
    step("op")
    diff = check_agreement(outs["ort"], outs["op"], caches["ort"], caches["op"])
    times = {"ort": [], "op": []}
    for _ in range(rounds):
        for name in times:
            for _ in range(20):
                t = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t)
    row = {"rows": rows, "context": context, "max_difference": diff,
           "onnxruntime_ms": round(float(np.median(times["ort"])) * 1e3, 3),
           "group_attention_ms": round(float(np.median(times["op"])) * 1e3, 3)}
    row["ratio"] = round(row["group_attention_ms"] / row["onnxruntime_ms"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="turns of 20 steps each (default 5)")
    args = ap.parse_args(argv)

    from llm_backend import cpu_ops
    from llm_backend.decoder import cpu_count

    library = cpu_ops.library()
    if library is None or "GroupAttention" not in cpu_ops.ops(library):
        raise SystemExit("the engine's GroupAttention does not build here (it needs gcc and AVX-512)")
    threads = cpu_count()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads, "settings": vars(args), "rows": []}
    for rows in args.rows:
        row = compare(str(library), rows, args.context, args.rounds, threads)
        report["rows"].append(row)
        print(f"{rows:2d} rows: GroupQueryAttention {row['onnxruntime_ms']:.2f} ms, GroupAttention "
              f"{row['group_attention_ms']:.2f} ms ({row['ratio']:.2f}x) a step of 30 layers", flush=True)
    lines = [f"# bench.attention_floor {report['date']}", "",
             f"Decode attention of the default model's 30 layers (packed QKV with rotary, 9 query heads, 3 "
             f"key-value heads of 64, fp32 KV bound as past and present), every row at {args.context} positions, "
             f"{threads} onnxruntime threads each; median of {args.rounds * 20} steps in turns. Both write the "
             "new key and value; outputs agree within 1e-4, the KV within 1e-6.", "",
             "| rows | onnxruntime GroupQueryAttention, ms a step | the engine's GroupAttention, ms | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['onnxruntime_ms']:.2f} | {r['group_attention_ms']:.2f} | {r['ratio']:.2f}x |"
              for r in report["rows"]]
    write_run(OUT, "attention-floor", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
