"""Weight forms of the default model against the default w8a8 export: fidelity and decode steps.

    python -m bench.levers [--chunks 12] [--rounds 6]

Issue 13 asks for one stream at 1.5x llama-server with the default export within 0.1
nats of the source. A one-row decode step moves every weight once, so its time follows
the bytes of the weights; this measures, in one run, the forms that trade those bytes
against fidelity, each derived from the fp32 export (the GGUF dequantized):

  w8a8                the default export: int8 weights per column, int8 activations per
                      row (export/w8a8.py), six nodes per weight product
  int4                `llm-export --precision int4`: activation-aware, blocks of 64/32
  int4, int8 head     the same with the LM head as 8-bit MatMulNBits in blocks of 32,
                      which is the GGUF's own Q8_0 head, exactly
  int8 blocks         every weight product as one 8-bit MatMulNBits node, blocks of 32
  Q4_1, integer zero points
                      the GGUF's own 4-bit grid, w = d*q + m, as MatMulNBits d*(q - z)
                      with z = round(-m/d): the kernel's fast path, but each block off by
                      up to half a step (the head as in "int4, int8 head")
  Q4_1 exact          the same, and the residual m + d*z put back in the same product:
                      the block sums of x appended to x, the residuals as 4-bit weight
                      rows under them (three small nodes before it). Exact to the fp32
                      export but for the int8 activations (and 1/30 of the residual's
                      spread), as llama.cpp's Q4_1 x Q8_1 product is.

Fidelity: KL(fp32 || form) of the next-token distribution at every position of held-out
text (bench.int4_fidelity's), and how often the top-1 token agrees. Speed: the median
decode step at 1 and at 16 rows (each row 100 positions filled), the forms taking turns
(`--rounds` turns of 20 steps each, one session loaded at a time). A one-row step reads
every weight once: the table sets the bytes of the weights a step reads (all but the
embedding table, of which it reads one row) against the step, as GB/s, beside the
machine's own read rate (an onnxruntime ReduceSum over 256 MB, measured in the same
run). Writes docs/bench-results/levers-<time>.json and .md. Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.int4_fidelity import fidelity, held_out_text, onnx_logits
from bench.results import write_run
from export.int4_requant import pack4

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench-results"
BLOCK = 32
DOMAIN = "com.microsoft"


def int8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] fp32 -> MatMulNBits 8-bit weights [N, K/32, 32] (q + 128) and scales, symmetric."""
    k, n = w.shape
    wt = w.T.reshape(n, k // BLOCK, BLOCK)
    scale = np.maximum(np.abs(wt).max(axis=2), np.finfo(np.float32).tiny) / 127.0
    q = np.clip(np.rint(wt / scale[..., None]), -127, 127) + 128
    return q.astype(np.uint8), scale.astype(np.float32).reshape(-1)


def q4_1_grid(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[K, N] weights dequantized from Q4_1 -> (q [N, K/32, 32] in 0..15, d, m [N, K/32]).
    Q4_1 maps a block's minimum to 0 and its maximum to 15, so both are in the block."""
    k, n = w.shape
    wt = w.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    m, top = wt.min(axis=2), wt.max(axis=2)
    d = (top - m) / 15.0
    q = np.clip(np.rint((wt - m[..., None]) / np.where(d > 0, d, 1.0)[..., None]), 0, 15)
    off = np.abs(q * d[..., None] + m[..., None] - wt).max() / max(float(d.max()), 1e-30)
    if off > 1e-3:
        raise ValueError(f"weights are not on a Q4_1 grid (off by {off:.3f} of a step)")
    return q.astype(np.uint8), d, m


def q4_1_as_nbits(w: np.ndarray, residual: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """[K, N] weights on a Q4_1 grid -> MatMulNBits (K', weights, scales, zero points).

    Each block becomes d * (q - z) with the integer zero point z = round(-m / d), the
    kernel's fast path; what that leaves, r = m + d*z (the same for the whole block; at
    most half a step, unless the block lies all on one side of zero and z is clipped to
    0..15: none is in SmolLM2's GGUF), is the block's error. With `residual`, r goes into
    the same product as extra input rows: the input gets its block sums appended
    (x' = [x, blocksum(x)], K' = K + K/32) and the weight rows under them hold r, quantized
    to 4 bits per output column and group of 32 blocks over a range that includes zero
    (an error of at most 1/30 of that range). blocksum(x) * r then adds back what z left out, so the product is
    the Q4_1 one but for that and the int8 activations."""
    q, d, m = q4_1_grid(w)
    n, kb = d.shape
    z = np.clip(np.rint(-m / np.where(d > 0, d, 1.0)), 0, 15)
    blocks, scales, zeros, k = q, d, z, w.shape[0]
    if residual:
        extra = -(-kb // BLOCK)                                # blocks holding the kb residuals
        r = np.zeros((n, extra * BLOCK))
        r[:, :kb] = m + d * z
        r = r.reshape(n, extra, BLOCK)
        # zero inside the range keeps the zero point within 0..15 (else r clips)
        lo, hi = np.minimum(r.min(axis=2), 0.0), np.maximum(r.max(axis=2), 0.0)
        rs = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
        rz = np.clip(np.rint(-lo / rs), 0, 15)
        rq = np.clip(np.rint(r / rs[..., None] + rz[..., None]), 0, 15)
        blocks, scales = np.concatenate([q, rq], axis=1), np.concatenate([d, rs], axis=1)
        zeros, k = np.concatenate([z, rz], axis=1), k + kb
    return (k, pack4(blocks.astype(np.uint8)), scales.astype(np.float32).reshape(-1),
            pack4(zeros.astype(np.uint8)))


def rewrite(model, form: str) -> None:
    """Every MatMul with a constant 2-D weight of an fp32 export, in `form` ("int8 blocks",
    "Q4_1 exact" or "Q4_1, integer zero points"); the LM head as 8-bit blocks in all."""
    from onnx import helper, numpy_helper

    from export.graph_rewrite import drop_unused_initializers, group_by_input, replace_groups, split_node

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    vocab = max(t.dims[-1] for t in g.initializer if len(t.dims) == 2)

    def key(node):
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        return node.input[0] if w is not None and len(w.dims) == 2 else None

    groups = group_by_input(g, key)
    if form == "Q4_1 exact":
        g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "levers/axes"))

    def nbits(x, y, p, k, n, bits, b, s, zp=None):
        g.initializer.extend([numpy_helper.from_array(b, f"{p}/B"), numpy_helper.from_array(s, f"{p}/S")])
        inputs = [x, f"{p}/B", f"{p}/S"]
        if zp is not None:
            g.initializer.append(numpy_helper.from_array(zp, f"{p}/Z"))
            inputs.append(f"{p}/Z")
        return helper.make_node("MatMulNBits", inputs, [y], domain=DOMAIN, name=f"{p}/MatMulNBits",
                                K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=4)

    def emit(nodes):
        x, p = nodes[0].input[0], f"{nodes[0].output[0]}/levers"
        ws = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        w = np.concatenate(ws, axis=1)
        k, n = w.shape
        outputs = [nd.output[0] for nd in nodes]
        y = outputs[0] if len(nodes) == 1 else f"{p}/y"
        if form == "int8 blocks" or n == vocab:
            out = [nbits(x, y, p, k, n, 8, *int8_blocks(w))]
        elif form == "Q4_1, integer zero points":
            k4, b, s, zp = q4_1_as_nbits(w, residual=False)
            out = [nbits(x, y, p, k4, n, 4, b, s, zp)]
        else:   # Q4_1 exact: the block sums appended to x, the residuals as weight rows under them
            kr, b, s, zp = q4_1_as_nbits(w, residual=True)
            g.initializer.append(numpy_helper.from_array(np.array([0, 0, k // BLOCK, BLOCK], np.int64),
                                                         f"{p}/blocks_shape"))
            out = [helper.make_node("Reshape", [x, f"{p}/blocks_shape"], [f"{p}/blocks"], name=f"{p}/Reshape"),
                   helper.make_node("ReduceSum", [f"{p}/blocks", "levers/axes"], [f"{p}/block_sums"], keepdims=0,
                                    name=f"{p}/ReduceSum"),
                   helper.make_node("Concat", [x, f"{p}/block_sums"], [f"{p}/x_sums"], axis=-1, name=f"{p}/Concat"),
                   nbits(f"{p}/x_sums", y, p, kr, n, 4, b, s, zp)]
        if len(nodes) > 1:
            out.append(split_node(g, y, outputs, [a.shape[1] for a in ws], p))
        return out

    replace_groups(g, groups, emit)
    drop_unused_initializers(g, {nd.input[1] for nodes in groups.values() for nd in nodes})
    if not any(op.domain == DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def int8_head(model, head: np.ndarray) -> None:
    """Replace the int4 export's head (the MatMulNBits with N = vocabulary) by 8-bit blocks."""
    from onnx import numpy_helper

    from export.graph_rewrite import drop_unused_initializers

    g = model.graph
    node = next(nd for nd in g.node if nd.op_type == "MatMulNBits"
                and any(a.name == "N" and a.i == head.shape[1] for a in nd.attribute))
    old = set(node.input[1:])
    b, s = int8_blocks(head)
    g.initializer.extend([numpy_helper.from_array(b, "levers/head/B"), numpy_helper.from_array(s, "levers/head/S")])
    del node.input[1:]
    node.input.extend(["levers/head/B", "levers/head/S"])
    for a in node.attribute:
        a.i = {"bits": 8, "block_size": BLOCK}.get(a.name, a.i)
    drop_unused_initializers(g, old)


def derive(src: Path, dst: Path, fn) -> Path:
    from export.graph_rewrite import rewrite_in_place

    shutil.copytree(src, dst)
    rewrite_in_place(dst, lambda model: fn(model) or {})
    return dst


def lm_head(fp32_dir: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32_dir / "model.onnx"))
    return max((numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2),
               key=lambda a: a.shape[1]).astype(np.float32)


def weight_bytes(version_dir: Path) -> int:
    """Bytes of the initializers a decode step reads whole: all but those only gathered
    from (the embedding table, of which a step reads one row per token), also where the
    graph transposes the table first (a tied head: onnxruntime folds that at load)."""
    import onnx

    g = onnx.load(str(version_dir / "model.onnx")).graph
    gathers = ("Gather", "GatherBlockQuantized")
    gathered = {n.input[0] for n in g.node if n.op_type in gathers}
    while True:
        more = {n.input[0] for n in g.node if n.op_type in ("Transpose", "Cast", "Reshape")
                and set(n.output) <= gathered} - gathered
        if not more:
            break
        gathered |= more
    read = {i for n in g.node if not set(n.output) <= gathered and n.op_type not in gathers for i in n.input}
    return sum(len(t.raw_data) for t in g.initializer if t.name in read)


def read_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """GB/s of an onnxruntime ReduceSum over `mb` MB of fp32 (the engine's threads): what
    reading the weights once per step could reach here at best."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from llm_backend.decoder import cpu_count

    n = mb * 2**20 // 4
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "read",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    so = ort.SessionOptions()
    so.intra_op_num_threads = cpu_count()
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                   .SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones(n, np.float32)
    session.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - start)
    return n * 4 / best / 1e9


def step_times(dirs: dict[str, Path], rounds: int, steps: int = 20, rows: tuple[int, ...] = (1, 16)) -> dict:
    """Median decode step (ms) of each form at each row count, the forms taking turns.
    One session at a time, as the engine runs it (workers spin-waiting): idle sessions
    loaded beside it, their workers spinning, made every step up to a third slower."""
    import gc

    from llm_backend.decoder import Decoder

    times: dict = {(name, r): [] for name in dirs for r in rows}
    names = list(dirs)
    for turn in range(rounds):
        for name in names if turn % 2 else names[::-1]:
            dec = Decoder(dirs[name], num_slots=max(rows), max_len=512)
            for r in rows:
                tokens, lengths = np.arange(100, 100 + r), np.full(r, 100)
                for _ in range(3):
                    dec.decode(tokens, lengths)         # warm up
                start = time.perf_counter()
                for _ in range(steps):
                    dec.decode(tokens, lengths)
                times[(name, r)].append((time.perf_counter() - start) / steps * 1000)
            del dec
            gc.collect()
    return {name: {f"step_ms_{r}_rows": round(float(np.median(times[(name, r)])), 2) for r in rows} for name in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=12, help="held-out text chunks (default 12)")
    ap.add_argument("--rounds", type=int, default=6, help="turns of the step timing (default 6)")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    from llm_backend.decoder import int8_gemm_is_exact
    from stack.default_model import ensure_default_model

    if not int8_gemm_is_exact():
        print("this CPU has no VNNI: the w8a8 export cannot run here", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        tmp = Path(tmp)
        print("exports (cached after the first run) and the derived forms ...", flush=True)
        base = {p: ensure_default_model(tmp / p, precision=p) / "1" for p in ("fp32", "w8a8", "int4")}
        head = lm_head(base["fp32"])
        forms = {"w8a8 (default)": base["w8a8"], "int4": base["int4"],
                 "int4, int8 head": derive(base["int4"], tmp / "int4-head8", lambda m: int8_head(m, head)),
                 "int8 blocks": derive(base["fp32"], tmp / "int8-blocks", lambda m: rewrite(m, "int8 blocks")),
                 "Q4_1, integer zero points": derive(base["fp32"], tmp / "q4_1-zp",
                                                     lambda m: rewrite(m, "Q4_1, integer zero points")),
                 "Q4_1 exact": derive(base["fp32"], tmp / "q4_1-exact", lambda m: rewrite(m, "Q4_1 exact"))}
        tok = Tokenizer.from_file(str(base["fp32"] / "tokenizer.json"))
        samples = [tok.encode(t).ids for t in held_out_text(args.chunks)]
        ref = onnx_logits(base["fp32"], samples)
        rows = {name: fidelity(ref, onnx_logits(d, samples)) for name, d in forms.items()}
        print("decode steps by turns ...", flush=True)
        for name, t in step_times(forms, args.rounds).items():
            rows[name].update(t)
            rows[name]["bytes_MB"] = round(sum(f.stat().st_size for f in forms[name].glob("model.onnx*")) / 1e6)
            rows[name]["step_reads_MB"] = round(weight_bytes(forms[name]) / 1e6, 1)
        bandwidth = read_bandwidth()
    w = rows["w8a8 (default)"]
    lines = ["| form | file MB | KL mean | KL p90 | KL max | top-1 agrees | step at 1 row | at 16 rows "
             "| weights a step reads | read at 1 row |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        r["read_GBps_1_row"] = round(r["step_reads_MB"] / r["step_ms_1_rows"], 1)
        lines.append(f"| {name} | {r['bytes_MB']} | {r['kl_mean']} | {r['kl_p90']} | {r['kl_max']} | "
                     f"{r['top1_agree']:.1%} | {r['step_ms_1_rows']} ms ({r['step_ms_1_rows'] / w['step_ms_1_rows']:.2f}x) | "
                     f"{r['step_ms_16_rows']} ms ({r['step_ms_16_rows'] / w['step_ms_16_rows']:.2f}x) | "
                     f"{r['step_reads_MB']} MB | {r['read_GBps_1_row']} GB/s |")
    table = (f"# bench.levers {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
             f"KL(fp32 || form) at {w['positions']} positions of held-out text ({args.chunks} chunks); median "
             f"decode step over {args.rounds} turns of 20 steps, rows at 100 positions, one session loaded at a time; "
             "ratios to w8a8. "
             "The file size includes the fp32 embedding table every form keeps; a step reads every other "
             f"weight once. This machine reads {bandwidth:.1f} GB/s at best (onnxruntime ReduceSum over 256 MB, "
             "same run).\n\n" + "\n".join(lines) + "\n")
    print("\n" + table)
    write_run(OUT, "levers", {"rows": rows, "read_GBps": round(bandwidth, 1), "settings": vars(args)}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
