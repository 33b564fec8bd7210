"""How fast decode attention could be here: onnxruntime's kernel against one that reads
each row's keys and values once.

    python -m bench.attention_floor [--rows 16] [--context 100] [--rounds 5]

At 16 rows `GroupQueryAttention` is a third of a decode step (`bench.op_profile`). Its
CPU kernel takes each row and query head on its own, so the model's three query heads
per key-value head read the same keys and values three times. This measures, on the
default model's attention shapes (9 query heads, 3 key-value heads of 64, 30 layers, the
engine's KV layout [slots, heads, positions, 64] in fp32, every row at `--context`
positions):

  onnxruntime   one GroupQueryAttention node, as the export has it (no rotary: that
                is the same for both), run through an IOBinding with the KV buffers
                bound as past and present, 30 times a step
  one read      a small C kernel compiled here (AVX-512, gcc -O3 -march=native,
                OpenMP on the process's cores): per row and key-value head, one pass
                over the keys scoring its three query heads, a softmax each, one pass
                over the values

Both write the new token's key and value into the buffer and return the same numbers
(checked to 1e-5 before timing). The C kernel is a measurement, not part of the engine:
the engine runs onnxruntime, which takes a kernel only as a custom op. Writes
docs/bench-results/attention-floor-<time>.json and .md. Not a test.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.results import write_run
from bench.serving import OUT

LAYERS, Q_HEADS, KV_HEADS, HEAD = 30, 9, 3, 64

KERNEL = r"""
#include <math.h>
#include <string.h>
#include <stdint.h>
#include <immintrin.h>

/* q [rows, qh, 64], k_new/v_new [rows, kvh, 64], kc/vc [rows, kvh, max_len, 64],
   lengths [rows] (positions already in the cache), out [rows, qh, 64]; qh = 3 kvh.
   Per row and key-value head: one pass over the keys scores its three query heads
   (AVX-512, the three heads' query vectors held in registers), a softmax each, one pass
   over the values accumulates the three outputs in registers. */
void attend(const float *q, const float *k_new, const float *v_new, float *kc, float *vc,
            const int64_t *lengths, float *out, int rows, int qh, int kvh, int d, int max_len,
            float *scratch) {
    const float scale = 1.0f / sqrtf(64.0f);
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < rows * kvh; p++) {
        int r = p / kvh, h = p % kvh;
        int64_t len = lengths[r] + 1;
        float *K = kc + ((int64_t)(r * kvh + h) * max_len) * 64;
        float *V = vc + ((int64_t)(r * kvh + h) * max_len) * 64;
        memcpy(K + (len - 1) * 64, k_new + (r * kvh + h) * 64, 64 * sizeof(float));
        memcpy(V + (len - 1) * 64, v_new + (r * kvh + h) * 64, 64 * sizeof(float));
        float *s = scratch + (int64_t)p * 3 * max_len;
        const float *qs = q + (r * qh + h * 3) * 64;
        __m512 qv[3][4];
        for (int g = 0; g < 3; g++)
            for (int c = 0; c < 4; c++) qv[g][c] = _mm512_loadu_ps(qs + g * 64 + c * 16);
        for (int64_t j = 0; j < len; j++) {
            const float *kj = K + j * 64;
            __m512 k0 = _mm512_loadu_ps(kj), k1 = _mm512_loadu_ps(kj + 16),
                   k2 = _mm512_loadu_ps(kj + 32), k3 = _mm512_loadu_ps(kj + 48);
            for (int g = 0; g < 3; g++) {
                __m512 a = _mm512_mul_ps(qv[g][0], k0);
                a = _mm512_fmadd_ps(qv[g][1], k1, a);
                a = _mm512_fmadd_ps(qv[g][2], k2, a);
                a = _mm512_fmadd_ps(qv[g][3], k3, a);
                s[g * max_len + j] = _mm512_reduce_add_ps(a) * scale;
            }
        }
        for (int g = 0; g < 3; g++) {
            float *sg = s + g * max_len, m = sg[0], sum = 0.f;
            for (int64_t j = 1; j < len; j++) m = sg[j] > m ? sg[j] : m;
            for (int64_t j = 0; j < len; j++) { sg[j] = expf(sg[j] - m); sum += sg[j]; }
            float inv = 1.f / sum;
            for (int64_t j = 0; j < len; j++) sg[j] *= inv;
        }
        __m512 acc[3][4];
        for (int g = 0; g < 3; g++)
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < len; j++) {
            const float *vj = V + j * 64;
            __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16),
                   v2 = _mm512_loadu_ps(vj + 32), v3 = _mm512_loadu_ps(vj + 48);
            for (int g = 0; g < 3; g++) {
                __m512 w = _mm512_set1_ps(s[g * max_len + j]);
                acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(w, v2, acc[g][2]);
                acc[g][3] = _mm512_fmadd_ps(w, v3, acc[g][3]);
            }
        }
        float *o = out + (r * qh + h * 3) * 64;
        for (int g = 0; g < 3; g++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + g * 64 + c * 16, acc[g][c]);
    }
}
"""


def build_kernel(tmp: Path):
    src, lib = tmp / "attend.c", tmp / "attend.so"
    src.write_text(KERNEL)
    try:
        subprocess.run(["gcc", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC",
                        str(src), "-o", str(lib), "-lm"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:   # no gcc, or no AVX-512 here
        raise SystemExit(f"the C kernel does not build here (it needs gcc and AVX-512): "
                         f"{getattr(err, 'stderr', '') or err}")
    fn = ctypes.CDLL(str(lib)).attend
    fn.restype = None
    return fn


def gqa_session(rows: int, max_len: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    node = helper.make_node("GroupQueryAttention",
                            ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_len"],
                            ["output", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=Q_HEADS, kv_num_heads=KV_HEADS)
    kv = [rows, KV_HEADS, max_len, HEAD]
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("query", f, [rows, 1, Q_HEADS * HEAD]),
         helper.make_tensor_value_info("key", f, [rows, 1, KV_HEADS * HEAD]),
         helper.make_tensor_value_info("value", f, [rows, 1, KV_HEADS * HEAD]),
         helper.make_tensor_value_info("past_key", f, kv), helper.make_tensor_value_info("past_value", f, kv),
         helper.make_tensor_value_info("seqlens_k", i32, [rows]),
         helper.make_tensor_value_info("total_len", i32, [])],
        [helper.make_tensor_value_info("output", f, [rows, 1, Q_HEADS * HEAD]),
         helper.make_tensor_value_info("present_key", f, kv),
         helper.make_tensor_value_info("present_value", f, kv)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                     helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def compare(attend, rows: int, context: int, rounds: int, threads: int, seed: int = 0) -> dict:
    """One row count: both kernels on the same buffers, checked to agree, then timed in
    turns (`rounds` of 20 steps each); their median step times."""
    rng = np.random.default_rng(seed)
    max_len = context + 8
    shape = (rows, KV_HEADS, max_len, HEAD)
    # one KV buffer pair per layer, as the engine keeps them; each kernel its own copy
    caches = {name: [[np.zeros(shape, np.float32) for _ in range(2)] for _ in range(LAYERS)]
              for name in ("ort", "c")}
    for layer in range(LAYERS):
        k, v = rng.standard_normal((2, *shape[:2], context, HEAD), dtype=np.float32)
        for name in caches:
            caches[name][layer][0][:, :, :context] = k
            caches[name][layer][1][:, :, :context] = v
    q = rng.standard_normal((rows, 1, Q_HEADS * HEAD), dtype=np.float32)
    k_new, v_new = rng.standard_normal((2, rows, 1, KV_HEADS * HEAD), dtype=np.float32)
    lengths = np.full(rows, context, np.int64)
    sess = gqa_session(rows, max_len, threads)
    bindings, outs = [], []
    for layer in range(LAYERS):
        b = sess.io_binding()
        out = np.empty((rows, 1, Q_HEADS * HEAD), np.float32)
        for name, arr in (("query", q), ("key", k_new), ("value", v_new),
                          ("seqlens_k", lengths.astype(np.int32)),
                          ("total_len", np.array(context + 1, np.int32))):
            b.bind_cpu_input(name, arr)
        kc, vc = caches["ort"][layer]
        for past, present, arr in (("past_key", "present_key", kc), ("past_value", "present_value", vc)):
            b.bind_input(past, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            b.bind_output(present, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        b.bind_output("output", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        bindings.append(b)
        outs.append(out)
    c_outs = [np.empty((rows, Q_HEADS, HEAD), np.float32) for _ in range(LAYERS)]
    scratch = np.empty(rows * Q_HEADS * max_len, np.float32)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731

    def ort_step():
        for b in bindings:
            sess.run_with_iobinding(b)

    def c_step():
        for layer in range(LAYERS):
            kc, vc = caches["c"][layer]
            attend(ptr(q), ptr(k_new), ptr(v_new), ptr(kc), ptr(vc), ptr(lengths), ptr(c_outs[layer]),
                   rows, Q_HEADS, KV_HEADS, HEAD, max_len, ptr(scratch))

    ort_step()
    c_step()
    diff = max(float(np.abs(o.reshape(rows, Q_HEADS, HEAD) - c).max()) for o, c in zip(outs, c_outs))
    same_kv = all(np.array_equal(a, b) for la, lb in zip(caches["ort"], caches["c"]) for a, b in zip(la, lb))
    if diff > 1e-5 or not same_kv:
        raise RuntimeError(f"the kernels disagree: max difference {diff}, same KV written: {same_kv}")
    times = {"onnxruntime": [], "one read": []}
    for _ in range(rounds):
        for name, step in (("onnxruntime", ort_step), ("one read", c_step)):
            for _ in range(20):
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    row = {"rows": rows, "context": context, "max_difference": diff,
           **{f"{k}_ms": round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}}
    row["ratio"] = round(row["one read_ms"] / row["onnxruntime_ms"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="turns of 20 steps each (default 5)")
    args = ap.parse_args(argv)

    from llm_backend.decoder import cpu_count

    threads = cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads, "settings": vars(args), "rows": []}
    with tempfile.TemporaryDirectory(prefix="attention-floor-") as tmp:
        attend = build_kernel(Path(tmp))
        for rows in args.rows:
            row = compare(attend, rows, args.context, args.rounds, threads)
            report["rows"].append(row)
            print(f"{rows:2d} rows: onnxruntime {row['onnxruntime_ms']:.2f} ms, one read {row['one read_ms']:.2f} ms "
                  f"({row['ratio']:.2f}x) a step of 30 layers", flush=True)
    lines = [f"# bench.attention_floor {report['date']}", "",
             f"Decode attention of the default model's 30 layers (9 query heads, 3 key-value heads of 64, fp32 KV), "
             f"every row at {args.context} positions, {threads} threads; median of {args.rounds * 20} steps in turns. "
             "Both write the new key and value and agree within 1e-5. The C kernel is called through ctypes, "
             "30 calls a step.", "",
             "| rows | onnxruntime GroupQueryAttention, ms a step | one read per key-value head (C, OpenMP), ms | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['onnxruntime_ms']:.2f} | {r['one read_ms']:.2f} | {r['ratio']:.2f}x |"
              for r in report["rows"]]
    write_run(OUT, "attention-floor", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
