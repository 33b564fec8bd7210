"""Our own CPU kernels (llm_backend/cpu_ops): RowQuantize computes the same bytes as the
four nodes of W8A8's activation quantization, the rewrite finds exactly those chains,
and the engine serves the graph as exported where the library cannot be built."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.w8a8 import rewrite_w8a8
from llm_backend import cpu_ops

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to build the kernels with")


@pytest.fixture(scope="module")
def library():
    lib = cpu_ops.library()
    assert lib is not None, "gcc is here but the kernels did not build (see the log)"
    return str(lib)


def _session(model, library=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if library:
        so.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _quantize_chain(k: int, extra_reader: bool = False, scale: float = 1 / 127):
    """x [rows, 1, k] -> (q, m) through the four nodes export/w8a8.py emits."""
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "w8a8/axes"),
             numpy_helper.from_array(np.array(scale, np.float32), "w8a8/inv127"),
             numpy_helper.from_array(np.array(128, np.uint8), "w8a8/zero_point")]
    nodes = [helper.make_node("Abs", ["x"], ["a"], name="Abs"),
             helper.make_node("ReduceMax", ["a", "w8a8/axes"], ["m"], keepdims=1, name="ReduceMax"),
             helper.make_node("Div", ["x", "m"], ["xs"], name="Div"),
             helper.make_node("QuantizeLinear", ["xs", "w8a8/inv127", "w8a8/zero_point"], ["q"], name="q")]
    outputs = [helper.make_tensor_value_info("q", TensorProto.UINT8, ["R", 1, k]),
               helper.make_tensor_value_info("m", TensorProto.FLOAT, ["R", 1, 1])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["xs"], ["xs_too"], name="reader"))
        outputs.append(helper.make_tensor_value_info("xs_too", TensorProto.FLOAT, ["R", 1, k]))
    graph = helper.make_graph(nodes, "quantize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["R", 1, k])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(cpu_ops.DOMAIN, 1)])


def _hard_rows(k: int) -> np.ndarray:
    """Rows that probe the edges: ties that round half to even, a row of zeros, an
    outlier, tiny values, and random ones."""
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(k), np.zeros(k), rng.standard_normal(k) * 1e-30,
            np.concatenate([[1e6], rng.standard_normal(k - 1)])]
    ties = (np.arange(k) % 9 - 4) + 0.5          # x/m*127 lands on k + 0.5 exactly
    rows.append(np.concatenate([[127.0], ties[1:]]))
    rows.append(-np.abs(rng.standard_normal(k)))
    return np.stack(rows).astype(np.float32)[:, None, :]


@pytest.mark.parametrize("k", [576, 1536, 70, 5])   # the model's widths; widths off the 16-lane step
def test_row_quantize_gives_the_same_bytes_as_the_four_nodes(library, k):
    exported = _quantize_chain(k)
    fused = _quantize_chain(k)
    assert cpu_ops.fuse_row_quantize(fused.graph) == 1
    assert [n.op_type for n in fused.graph.node] == ["RowQuantize"]
    assert not fused.graph.initializer            # the axes, 1/127 and 128 went with their nodes
    x = _hard_rows(k)
    want = _session(exported).run(None, {"x": x})
    got = _session(fused, library).run(None, {"x": x})
    assert got[0].dtype == np.uint8 and got[0].shape == x.shape and got[1].shape == (len(x), 1, 1)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert len(np.unique(got[0])) > 2                # not a constant


def test_a_prefill_of_many_rows_split_over_the_threads_gives_the_same_bytes(library):
    """1000 rows of 1536 (a batched prefill) go to onnxruntime's threads in chunks of
    rows; 37 rows of 999 split into chunks that do not divide them evenly."""
    for rows, k in ((1000, 1536), (37, 999)):
        exported, fused = _quantize_chain(k), _quantize_chain(k)
        cpu_ops.fuse_row_quantize(fused.graph)
        x = np.random.default_rng(rows).standard_normal((rows, 1, k)).astype(np.float32)
        x[::7] *= 40.0
        want = _session(exported).run(None, {"x": x})
        got = _session(fused, library).run(None, {"x": x})
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_the_fused_node_takes_the_abs_place_and_only_its_constants_go():
    """A reader of m between the ReduceMax and the QuantizeLinear still comes after the
    node that now makes m; a one-element initializer nothing reads, and one the graph
    lists as an output, stay."""
    model = _quantize_chain(64)
    g = model.graph
    g.node.insert(2, helper.make_node("Identity", ["m"], ["m_copy"], name="early_reader"))
    g.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), "unrelated"),
                          numpy_helper.from_array(np.array(1 / 127, np.float32), "w8a8/inv127_out")])
    g.node[-1].input[1] = "w8a8/inv127_out"
    g.output.append(helper.make_tensor_value_info("w8a8/inv127_out", TensorProto.FLOAT, []))
    assert cpu_ops.fuse_row_quantize(g) == 1
    order = [n.op_type for n in g.node]
    assert order == ["RowQuantize", "Identity"]
    # the axes and the zero point went with their nodes; the rest was not theirs to drop
    assert {t.name for t in g.initializer} == {"unrelated", "w8a8/inv127", "w8a8/inv127_out"}


def test_chains_read_elsewhere_or_with_other_constants_are_left_alone():
    for model in (_quantize_chain(64, extra_reader=True), _quantize_chain(64, scale=1 / 255)):
        before = [n.op_type for n in model.graph.node]
        assert cpu_ops.fuse_row_quantize(model.graph) == 0
        assert [n.op_type for n in model.graph.node] == before


def test_a_w8a8_graph_gives_the_same_output_with_the_kernels(library):
    """On export/w8a8.py's own rewrite of a small MLP: every product's quantization is
    fused and the output is bit for bit the exported graph's."""
    rng = np.random.default_rng(3)
    k, n = 64, 96
    w = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((k, n), (k, n), (2 * n, k))]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["ya"]), helper.make_node("MatMul", ["x", "B"], ["yb"]),
             helper.make_node("Concat", ["ya", "yb"], ["h"], axis=-1), helper.make_node("MatMul", ["h", "C"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", k])],
                              [numpy_helper.from_array(a, name) for a, name in zip(w, "ABC")])
    exported = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rewrite_w8a8(exported)
    fused = exported.__class__()
    fused.CopyFrom(exported)
    assert cpu_ops.fuse_row_quantize(fused.graph) == 2
    fused.opset_import.append(helper.make_opsetid(cpu_ops.DOMAIN, 1))
    assert {"Abs", "ReduceMax", "Div", "QuantizeLinear"}.isdisjoint(n.op_type for n in fused.graph.node)
    x = rng.standard_normal((4, 3, k)).astype(np.float32)
    x[1, 2] = 0.0
    want = _session(exported).run(None, {"x": x})[0]
    got = _session(fused, library).run(None, {"x": x})[0]
    assert np.array_equal(got, want) and np.abs(want).max() > 0


def _swiglu_mlp(k: int = 64, n: int = 96, extra_reader: bool = False):
    """A SwiGLU MLP as the model builder writes it (gate and up in one product, Split,
    Sigmoid, two Muls, down) after export/w8a8.py's rewrite; h (the gate's result) is an
    output too."""
    rng = np.random.default_rng(4)
    gate_up, down = rng.standard_normal((k, 2 * n)).astype(np.float32) * 0.3, rng.standard_normal((n, k)).astype(np.float32)
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "GU"], ["gu"]),
             helper.make_node("Split", ["gu", "halves"], ["g", "u"], axis=-1),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["act"]),
             helper.make_node("Mul", ["act", "u"], ["h"]), helper.make_node("MatMul", ["h", "DOWN"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", f, ["B", "S", k]), helper.make_tensor_value_info("h", f, ["B", "S", n])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("sg", f, ["B", "S", n]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", f, ["B", "S", k])], outputs,
                              [numpy_helper.from_array(gate_up, "GU"), numpy_helper.from_array(down, "DOWN"),
                               numpy_helper.from_array(np.array([n, n], np.int64), "halves")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rewrite_w8a8(model)
    return model


def test_swiglu_computes_the_five_nodes_within_float_rounding(library):
    """The gate after a W8A8 product: one SwiGLU node where there were the product's row
    scale, Split, Sigmoid and two Muls (their split sizes gone with them); its result
    within float rounding of theirs, rows at very different scales (one all zero, one
    with gates far below and above the sigmoid's range) and more rows than one thread
    takes; the next product reads it as it read theirs."""
    exported = _swiglu_mlp()
    fused = exported.__class__()
    fused.CopyFrom(exported)
    assert cpu_ops.fuse_row_quantize(fused.graph) == 2 and cpu_ops.fuse_swiglu(fused.graph) == 1
    fused.opset_import.append(helper.make_opsetid(cpu_ops.DOMAIN, 1))
    assert [n.op_type for n in fused.graph.node] == ["RowQuantize", "MatMulIntegerToFloat", "SwiGLU",
                                                     "RowQuantize", "MatMulIntegerToFloat", "Mul"]   # down's scale
    assert "halves" not in {t.name for t in fused.graph.initializer}
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 700, 64)).astype(np.float32)     # 2100 rows: over onnxruntime's threads
    x[0, 1] = 0.0
    x[1, 2] *= 1e4
    want_y, want_h = _session(exported).run(None, {"x": x})
    got_y, got_h = _session(fused, library).run(None, {"x": x})
    assert np.allclose(got_h, want_h, rtol=1e-5, atol=1e-6 * np.abs(want_h).max())
    assert np.isfinite(got_h).all() and (got_h[0, 1] == 0).all() and np.abs(got_h[1, 2]).max() > 1e4
    assert np.allclose(got_y, want_y, rtol=1e-2, atol=1e-2 * np.abs(want_y).max())


def test_swiglu_chains_read_elsewhere_are_left_alone():
    model = _swiglu_mlp(extra_reader=True)
    assert cpu_ops.fuse_row_quantize(model.graph) == 2
    before = [n.op_type for n in model.graph.node]
    assert cpu_ops.fuse_swiglu(model.graph) == 0
    assert [n.op_type for n in model.graph.node] == before


def _residual_block(k: int, normed_reader: bool = False):
    """x -> product -> the residual's SkipSimplifiedLayerNormalization -> product, as the
    model builder writes a layer's seam, after export/w8a8.py's rewrite; the sum (the
    next residual) and the second product are outputs."""
    rng = np.random.default_rng(8)
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("SkipSimplifiedLayerNormalization", ["res", "h", "gamma"], ["n", "", "", "sum"],
                              domain="com.microsoft", epsilon=1e-5, name="norm"),
             helper.make_node("MatMul", ["n", "W2"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", f, ["B", "S", 32]), helper.make_tensor_value_info("sum", f, ["B", "S", k])]
    if normed_reader:
        outputs.append(helper.make_tensor_value_info("n", f, ["B", "S", k]))
    graph = helper.make_graph(
        nodes, "seam", [helper.make_tensor_value_info("x", f, ["B", "S", 48]), helper.make_tensor_value_info("res", f, ["B", "S", k])],
        outputs, [numpy_helper.from_array(rng.standard_normal((48, k)).astype(np.float32), "W1"),
                  numpy_helper.from_array(rng.standard_normal((k, 32)).astype(np.float32), "W2"),
                  numpy_helper.from_array((rng.random(k) + 0.5).astype(np.float32), "gamma")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    rewrite_w8a8(model)
    return model


@pytest.mark.parametrize("k", [576, 1536, 40])
def test_skip_norm_quantize_gives_the_same_bytes_as_the_three_nodes(library, k):
    """A product's row scale, the residual's norm and the next quantization in one node:
    the next product's output and the residual sum equal the exported graph's bit for bit,
    on rows of very different scales (one all zero, one with an outlier) and more rows than
    one thread takes."""
    exported = _residual_block(k)
    fused = exported.__class__()
    fused.CopyFrom(exported)
    assert cpu_ops.fuse_row_quantize(fused.graph) == 2 and cpu_ops.fuse_skip_norm_quantize(fused.graph) == 1
    fused.opset_import.append(helper.make_opsetid(cpu_ops.DOMAIN, 1))
    assert [n.op_type for n in fused.graph.node] == ["RowQuantize", "MatMulIntegerToFloat", "SkipNormQuantize",
                                                     "MatMulIntegerToFloat", "Mul"]
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 600, 48)).astype(np.float32)
    res = rng.standard_normal((2, 600, k)).astype(np.float32) * 3
    x[0, 1], res[0, 1] = 0.0, 0.0
    x[1, 2] *= 1e3
    res[1, 3, 0] = 1e4
    want = _session(exported).run(None, {"x": x, "res": res})
    got = _session(fused, library).run(None, {"x": x, "res": res})
    for w, g in zip(want, got):
        assert np.array_equal(g, w) and np.abs(w).max() > 0


def test_skip_norm_quantize_leaves_a_norm_read_elsewhere_alone():
    model = _residual_block(64, normed_reader=True)
    assert cpu_ops.fuse_row_quantize(model.graph) == 2
    assert cpu_ops.fuse_skip_norm_quantize(model.graph) == 0


def test_loading_the_library_leaves_the_process_floating_point_mode_alone(library):
    """GroupAttention is compiled with -ffast-math; linked with it, gcc adds code that
    turns on flush-to-zero for the whole process that loads the library."""
    import subprocess

    assert "set_fast_math" not in subprocess.run(["nm", library], capture_output=True, text=True).stdout
    _session(_quantize_chain(16), library)            # loaded into this process
    assert np.float32(1e-39) * np.float32(1.0) != 0.0   # a subnormal survives


def test_without_gcc_the_library_is_none_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))          # no gcc on it
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_ops, "_built", {})
    with caplog.at_level(logging.WARNING, logger="llm_backend"):
        assert cpu_ops.library() is None
    assert "cannot build" in caplog.text and "serving the graph as exported" in caplog.text
    assert not list((tmp_path / "cache").glob("*"))    # no half-written library left behind


def test_without_a_compiler_a_prebuilt_library_for_this_cpu_is_taken(monkeypatch, tmp_path):
    """The CPU image has no gcc: its build stage runs `python -m llm_backend.cpu_ops
    prebuild`, and the engine takes the best library this CPU runs; a library built from
    other sources is never taken."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llm_backend.cpu_ops", "prebuild", str(tmp_path / "prebuilt")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert sorted(m for p in out for m in cpu_ops.PREBUILT if p.endswith(f"-{m}.so")) == \
        ["x86-64-v2", "x86-64-v3", "x86-64-v4", "x86-64-v4-vnni"]
    monkeypatch.setenv("PATH", str(tmp_path))           # no gcc
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_KERNEL_DIR", str(tmp_path / "prebuilt"))
    monkeypatch.setattr(cpu_ops, "_built", {})
    lib = cpu_ops.library()
    flags = Path("/proc/cpuinfo").read_text()
    want = ("x86-64-v4-vnni" if " avx512_vnni" in flags and " avx512vl" in flags
            else "x86-64-v4" if " avx512vl" in flags else "x86-64-v3" if " avx2" in flags else "x86-64-v2")
    assert lib is not None and lib.name.endswith(f"-{want}.so")
    assert ("GroupAttention" in cpu_ops.ops(lib)) == want.startswith("x86-64-v4") and "RowQuantize" in cpu_ops.ops(lib)
    assert ("NibbleMatMul" in cpu_ops.ops(lib)) == (want == "x86-64-v4-vnni")
    exported, fused = _quantize_chain(70), _quantize_chain(70)
    cpu_ops.fuse_row_quantize(fused.graph)
    x = _hard_rows(70)
    assert all(np.array_equal(a, b) for a, b in zip(_session(exported).run(None, {"x": x}),
                                                    _session(fused, str(lib)).run(None, {"x": x})))
    for p in (tmp_path / "prebuilt").iterdir():          # built from other sources: not taken
        p.rename(p.with_name(p.name.replace("llm-kernels-", "llm-kernels-0")))
    monkeypatch.setattr(cpu_ops, "_built", {})
    assert cpu_ops.library() is None


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_ops, "_built", {})
    lib = cpu_ops.library()
    assert lib is not None and lib.parent == tmp_path and lib.stat().st_size > 0
    stamp = lib.stat().st_mtime_ns
    monkeypatch.setattr(cpu_ops, "_built", {})          # a new process: found in the cache, not rebuilt
    assert cpu_ops.library() == lib and lib.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_engine_serves_the_default_export_with_the_kernels(tmp_path, monkeypatch, library):
    """The Decoder the backend serves with. W8A8: each of the 121 quantizations is one
    node (with the norm before it where there is one), each attention a GroupAttention,
    each MLP gate a SwiGLU, and with the two exact kernels alone (RowQuantize,
    SkipNormQuantize) the logits are the exported graph's bit for bit. fp32: GroupAttention gives the exported graph's logits
    within float rounding. Without gcc the exported graph is loaded."""
    import onnx

    from llm_backend import decoder
    from llm_backend.decoder import Decoder, int8_gemm_is_exact, prepare_graph
    from stack.default_model import ensure_default_model

    if not int8_gemm_is_exact():
        pytest.skip("no VNNI: the engine refuses W8A8 exports here")
    version = ensure_default_model(tmp_path / "repo", precision="w8a8") / "1"
    graph, _ = prepare_graph(version / "model.onnx", prefill_variant=True,
                             cpu_kernels=frozenset(cpu_ops.ops(library)), head_size=64)
    ops = [n.op_type for n in onnx.load_from_string(graph).graph.node]
    # each product's quantization is one node: a RowQuantize, or the SkipNormQuantize of its norm
    assert ops.count("RowQuantize") + ops.count("SkipNormQuantize") == ops.count("MatMulIntegerToFloat") > 100
    assert "Abs" not in ops
    assert ops.count("GroupAttention") == 30 and "GroupQueryAttention" not in ops
    assert ops.count("SwiGLU") == 30 and "Sigmoid" not in ops and "Split" not in ops
    assert ops.count("SkipNormQuantize") == 59 and ops.count("SkipSimplifiedLayerNormalization") == 1   # the last
    exported = Decoder(version, num_slots=3, max_len=64, intra_op_threads=2, cpu_kernels=False)
    assert exported.kernel_library is None
    prompts = [list(range(1000 + 5 * i, 1030 + 3 * i)) for i in range(3)]
    lengths, tokens = np.array([len(p) for p in prompts]), np.array([42, 7, 9])
    monkeypatch.setattr(decoder, "cpu_library_ops", lambda lib: {"RowQuantize", "SkipNormQuantize"})
    quantize_only = Decoder(version, num_slots=3, max_len=64, intra_op_threads=2)   # the two exact ones
    assert quantize_only.kernel_library is not None
    assert np.array_equal(quantize_only.prefill_batch(0, prompts), exported.prefill_batch(0, prompts))
    assert np.array_equal(quantize_only.decode(tokens, lengths), exported.decode(tokens, lengths))
    monkeypatch.undo()

    fp32 = ensure_default_model(tmp_path / "fp32", precision="fp32") / "1"
    with_kernels = Decoder(fp32, num_slots=3, max_len=64, intra_op_threads=2)
    without = Decoder(fp32, num_slots=3, max_len=64, intra_op_threads=2, cpu_kernels=False)
    for a, b in ((with_kernels.prefill_batch(0, prompts), without.prefill_batch(0, prompts)),
                 (with_kernels.decode(tokens, lengths), without.decode(tokens, lengths))):
        assert np.abs(a - b).max() < 1e-3 and (a.argmax(-1) == b.argmax(-1)).all()

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_ops, "_built", {})
    no_gcc = Decoder(version, num_slots=1, max_len=64, intra_op_threads=2)
    assert no_gcc.kernel_library is None
    assert np.array_equal(no_gcc.prefill(0, prompts[0], 0), exported.prefill(0, prompts[0], 0))

H, HKV, D, M, P = 9, 3, 64, 40, 64   # the default model's heads; KV buffers of 40 positions


def _attention_graph(fused: bool, heads: int = H, scale: float | None = 0.1):
    """One GroupQueryAttention node as the export has it (packed QKV, rotary), or the
    GroupAttention that use_group_attention puts in its place."""
    angles = np.arange(P)[:, None] * (10000.0 ** (-np.arange(D // 2) / (D // 2)))[None, :]
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                    "cos_cache", "sin_cache"], ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=HKV, do_rotary=1,
                            rotary_interleaved=0, local_window_size=-1, softcap=0.0, name="attn",
                            **({"scale": scale} if scale is not None else {}))
    kv = ["B", HKV, M, D]
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info("qkv", f, ["B", "S", (heads + 2 * HKV) * D]),
         helper.make_tensor_value_info("past_key", f, kv), helper.make_tensor_value_info("past_value", f, kv),
         helper.make_tensor_value_info("seqlens_k", i32, ["B"]), helper.make_tensor_value_info("total", i32, [])],
        [helper.make_tensor_value_info("out", f, ["B", "S", heads * D]),
         helper.make_tensor_value_info("present_key", f, kv), helper.make_tensor_value_info("present_value", f, kv)],
        [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos_cache"),
         numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin_cache")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(cpu_ops.DOMAIN, 1)])
    if fused:
        assert cpu_ops.use_group_attention(model.graph, D) == 1
        assert [n.op_type for n in model.graph.node] == ["GroupAttention"]
    return model


def _run_attention(sess, qkv, kc, vc, seqlens, total, shared: bool):
    """Run one call; with `shared`, present bound onto the past buffers (the engine's
    way, the KV written in place), otherwise returned as outputs."""
    feeds = {"qkv": qkv, "past_key": kc, "past_value": vc, "seqlens_k": seqlens, "total": np.array(total, np.int32)}
    if not shared:
        return sess.run(None, feeds)
    b = sess.io_binding()
    b.bind_output("out", "cpu")                   # first: outputs come back in binding order
    for name in ("qkv", "seqlens_k", "total"):
        b.bind_cpu_input(name, feeds[name])
    for past, present, arr in (("past_key", "present_key", kc), ("past_value", "present_value", vc)):
        b.bind_input(past, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        b.bind_output(present, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
    sess.run_with_iobinding(b)
    return [b.get_outputs()[0].numpy(), kc, vc]


@pytest.mark.parametrize("shared,heads,scale", [(True, H, 0.1), (False, H, 0.1), (True, 12, None), (True, 3, 0.3)])
def test_group_attention_matches_group_query_attention(library, shared, heads, scale):
    """Decode steps of rows at different lengths, a right-padded first prompt of three
    rows, and a prompt's tail after cached positions: the outputs of every real token
    and the KV of every real position agree with onnxruntime's node. 3, 4 and 1 query
    heads per key-value head; a scale of its own, and none (1/sqrt(64))."""
    rng = np.random.default_rng(11)
    want_s = _session(_attention_graph(False, heads, scale))
    got_s = _session(_attention_graph(True, heads, scale), library)
    width = (heads + 2 * HKV) * D
    kv = [np.zeros((3, HKV, M, D), np.float32) for _ in range(2)]
    mine = [a.copy() for a in kv]

    def call(qkv, seqlens, total, real):
        """real[b]: how many of row b's S tokens are real (the rest right padding)."""
        nonlocal kv, mine
        seqlens = np.asarray(seqlens, np.int32)
        want = _run_attention(want_s, qkv, *kv, seqlens, total, shared)
        got = _run_attention(got_s, qkv, *mine, seqlens, total, shared)
        if not shared:
            kv, mine = want[1:], got[1:]
        for b, n in enumerate(real):
            assert np.allclose(got[0][b, :n], want[0][b, :n], rtol=1e-4, atol=2e-5), f"row {b} output"
            end = int(seqlens[b]) + 1
            for w, g in zip(kv, mine):
                assert np.allclose(g[b, :, :end], w[b, :, :end], rtol=1e-5, atol=1e-6), f"row {b} KV"
        assert np.isfinite(got[0]).all()

    lens = [7, 3, 5]                                  # a first prompt, right-padded to 7
    call(rng.standard_normal((3, 7, width), dtype=np.float32), [n - 1 for n in lens], 7, lens)
    for _ in range(4):                                # decode steps, rows at different lengths
        call(rng.standard_normal((3, 1, width), dtype=np.float32), lens, max(lens) + 1, [1, 1, 1])
        lens = [n + 1 for n in lens]
    # a tail of 6 tokens after the row's cached positions (prefix-cache hit, chunk), one row
    one = [a[1:2].copy() for a in kv], [a[1:2].copy() for a in mine]
    kv, mine = one
    call(rng.standard_normal((1, 6, width), dtype=np.float32), [lens[1] + 5], lens[1] + 6, [6])


def test_group_attention_refuses_what_it_cannot_take(library):
    """A position past the buffer, a total length of no element, a negative length: the
    output NaN and the KV untouched (at API version 13 a kernel cannot return an error)."""
    sess = _session(_attention_graph(True), library)
    qkv = np.ones((1, 2, (H + 2 * HKV) * D), np.float32)
    for seqlens, total in (([M], M + 1), ([3], np.zeros(0, np.int32)), ([-3], 5)):
        kc, vc = (np.full((1, HKV, M, D), 3.0, np.float32) for _ in range(2))
        out = _run_attention(sess, qkv, kc, vc, np.array(seqlens, np.int32), total, shared=True)
        assert np.isnan(out[0]).all() and (kc == 3.0).all() and (vc == 3.0).all(), (seqlens, total)
    kc, vc = (np.full((1, HKV, M, D), 3.0, np.float32) for _ in range(2))   # not bound: past given back
    out, present_k, present_v = _run_attention(sess, qkv, kc, vc, np.array([M], np.int32), M + 1, shared=False)
    assert out.shape == (1, 2, H * D) and np.isnan(out).all()
    assert np.array_equal(present_k, kc) and np.array_equal(present_v, vc)
    kc, vc = (np.full((1, HKV, M, D), 3.0, np.float32) for _ in range(2))   # total as [1]: taken
    out = _run_attention(sess, qkv, kc, vc, np.array([4], np.int32), np.array([5], np.int32), shared=True)
    assert np.isfinite(out[0]).all() and (kc[0, :, 3:5] != 3.0).all()


def _half_kv_graph(heads: int = H):
    model = _attention_graph(False, heads)
    assert cpu_ops.use_group_attention(model.graph, D, kv_half=True) == 1
    kv_types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)
                if v.name.startswith(("past", "present"))}
    assert set(kv_types.values()) == {TensorProto.FLOAT16} and len(kv_types) == 4
    return model


def _run_half(sess, qkv, kc, vc, seqlens, total):
    """One call with float16 KV buffers bound as past and present (the engine's way)."""
    b = sess.io_binding()
    b.bind_output("out", "cpu")
    for name, value in (("qkv", qkv), ("seqlens_k", np.asarray(seqlens, np.int32)), ("total", np.array(total, np.int32))):
        b.bind_cpu_input(name, value)
    for past, present, arr in (("past_key", "present_key", kc), ("past_value", "present_value", vc)):
        b.bind_input(past, "cpu", 0, np.float16, list(arr.shape), arr.ctypes.data)
        b.bind_output(present, "cpu", 0, np.float16, list(arr.shape), arr.ctypes.data)
    sess.run_with_iobinding(b)
    return b.get_outputs()[0].numpy()


@pytest.mark.parametrize("heads", [H, 3])
def test_float16_kv_holds_the_float_kv_rounded_and_attends_alike(library, heads):
    """The same calls as above on float KV and on float16 KV (two kernels of the one op,
    picked by the graph's KV type): the float16 buffers hold the keys and values the float
    kernel wrote, rounded to nearest, bit for bit; the outputs agree within that rounding."""
    rng = np.random.default_rng(5)
    full_s, half_s = _session(_attention_graph(True, heads), library), _session(_half_kv_graph(heads), library)
    width = (heads + 2 * HKV) * D
    full = [np.zeros((3, HKV, M, D), np.float32) for _ in range(2)]
    half = [np.zeros((3, HKV, M, D), np.float16) for _ in range(2)]

    def call(qkv, seqlens, total, real):
        want = _run_attention(full_s, qkv, *full, np.asarray(seqlens, np.int32), total, shared=True)[0]
        got = _run_half(half_s, qkv, *half, seqlens, total)
        for b, n in enumerate(real):
            end = int(seqlens[b]) + 1
            for f, h in zip(full, half):
                assert np.array_equal(h[b, :, :end], f[b, :, :end].astype(np.float16)), f"row {b} KV"
            assert np.allclose(got[b, :n], want[b, :n], rtol=1e-2, atol=4e-3), f"row {b} output"
            assert not np.array_equal(got[b, :n], want[b, :n]) or end == 1, "float16 KV read as float"

    lens = [7, 3, 5]
    call(rng.standard_normal((3, 7, width), dtype=np.float32), [n - 1 for n in lens], 7, lens)
    for _ in range(4):
        call(rng.standard_normal((3, 1, width), dtype=np.float32), lens, max(lens) + 1, [1, 1, 1])
        lens = [n + 1 for n in lens]


def test_float16_kv_clamps_what_it_cannot_hold_and_keeps_nan(library):
    """Keys and values beyond float16's range are stored as +-65504, not infinity (which
    would turn every later softmax into NaN); a NaN stays NaN, and the Decoder then fails
    the call instead of sampling from it."""
    sess = _session(_half_kv_graph(), library)
    qkv = np.zeros((1, 1, (H + 2 * HKV) * D), np.float32)
    v = qkv[0, 0, (H + HKV) * D:]
    v[0], v[1], v[2] = 1e6, -1e6, np.nan
    kc, vc = (np.zeros((1, HKV, M, D), np.float16) for _ in range(2))
    out = _run_half(sess, qkv, kc, vc, [0], 1)
    assert vc[0, 0, 0, 0] == 65504 and vc[0, 0, 0, 1] == -65504 and np.isnan(vc[0, 0, 0, 2])
    assert np.isfinite(kc).all() and out[0, 0, 0] == 65504 and np.isnan(out[0, 0, 2])   # one position: v itself
    assert np.isfinite(out[0, 0, 3 * D:]).all()              # heads of the other key-value heads


def test_float16_kv_only_where_every_attention_owns_its_kv():
    """kv_half changes the graph's KV types only when every attention node was replaced
    and nothing else reads its KV; otherwise the KV stays float."""
    model = _attention_graph(False)
    model.graph.node.append(helper.make_node("Identity", ["past_key"], ["peek"]))
    model.graph.output.append(helper.make_tensor_value_info("peek", TensorProto.FLOAT, None))
    assert cpu_ops.use_group_attention(model.graph, D, kv_half=True) == 1
    assert {v.type.tensor_type.elem_type for v in model.graph.input if v.name.startswith("past")} == {TensorProto.FLOAT}
    model = _attention_graph(False)
    kept = helper.make_node("GroupQueryAttention", model.graph.node[0].input, ["o2", "k2", "v2"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=HKV, do_rotary=1, softcap=30.0)
    model.graph.node.append(kept)                   # one it does not compute: all KV stays float
    assert cpu_ops.use_group_attention(model.graph, D, kv_half=True) == 1
    assert {v.type.tensor_type.elem_type for v in model.graph.input if v.name.startswith("past")} == {TensorProto.FLOAT}


def test_only_attention_nodes_it_computes_the_same_way_are_replaced():
    for attr, value in (("softcap", 30.0), ("local_window_size", 16), ("rotary_interleaved", 1), ("do_rotary", 0)):
        model = _attention_graph(False)
        node = model.graph.node[0]
        for a in node.attribute:
            if a.name == attr:
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(attr, value))
        assert cpu_ops.use_group_attention(model.graph, D) == 0, attr
    model = _attention_graph(False)
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT16   # fp16 KV (a GPU export)
    assert cpu_ops.use_group_attention(model.graph, D) == 0
    # heads of 128 with rotary over 64 of them (cos/sin [P, 32], as here)
    assert cpu_ops.use_group_attention(_attention_graph(False).graph, 128) == 0
    assert cpu_ops.use_group_attention(_attention_graph(False, heads=15).graph, D) == 0   # 5 per key-value head


@pytest.mark.slow
def test_nan_logits_fail_the_call_instead_of_being_sampled(tmp_path, monkeypatch):
    """What our kernels cannot compute comes back as NaN (they cannot raise): the
    Decoder raises, and the engine fails the requests of that call with the reason."""
    from llm_backend.decoder import Decoder
    from stack.default_model import ensure_default_model

    version = ensure_default_model(tmp_path / "repo") / "1"
    dec = Decoder(version, num_slots=2, max_len=64, intra_op_threads=2)
    dec.prefill(0, [1000, 1001, 1002], 0)
    real = dec.session.run_with_iobinding

    def poisoned(binding):
        real(binding)
        dec._logits_out[1] = np.nan                    # row 1's logits, as a refusing kernel leaves them

    monkeypatch.setattr(dec.session, "run_with_iobinding", poisoned)
    with pytest.raises(RuntimeError, match=r"NaN logits \(rows \[1\]"):
        dec.decode(np.array([5, 6]), np.array([3, 3]))


# -- NibbleMatMul ----------------------------------------------------------------------

def _q4_int8_weights(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights [k, n] and their scales as export/w8a8.py makes them from a Q4_1
    checkpoint: each column's block of 32 is d * q + m, q in 0..15 (0 and 15 present)."""
    from export.w8a8 import quantize_weight

    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (k // 32, 32, n))
    q[:, 0], q[:, 1] = 0, 15
    d = rng.uniform(0.001, 0.02, (k // 32, 1, n)) * rng.choice([1, 1, 1, 8], (k // 32, 1, n))  # some wide blocks
    m = -d * rng.uniform(4, 11, (k // 32, 1, n))
    return quantize_weight((d * q + m).reshape(k, n).astype(np.float32))


def _product_graph(op: str, w: np.ndarray, scale: np.ndarray, a_scale: float = 1.0, zero_point: int = 128):
    k, n = w.shape
    domain = cpu_ops.DOMAIN if op == "NibbleMatMul" else "com.microsoft"
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "w", "a_scale", "scale", "zp"], ["y"], domain=domain)], "product",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["R", 1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", 1, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "scale"),
         numpy_helper.from_array(np.array(a_scale, np.float32), "a_scale"),
         numpy_helper.from_array(np.array(zero_point, np.uint8), "zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])


def _same_product(library, w, scale, rows: int, **kw) -> np.ndarray:
    rng = np.random.default_rng(rows)
    a = rng.integers(0, 256, (rows, 1, w.shape[0]), dtype=np.uint8)
    a[0, 0, :4] = [0, 255, 128, 1]
    want = _session(_product_graph("MatMulIntegerToFloat", w, scale, **kw)).run(None, {"a": a})[0]
    got = _session(_product_graph("NibbleMatMul", w, scale, **kw), library).run(None, {"a": a})[0]
    assert got.shape == want.shape and np.array_equal(got.view(np.int32), want.view(np.int32)), \
        np.abs(got - want).max()
    return got


@pytest.mark.parametrize("k,n", [(576, 960), (1536, 576), (64, 32)])
@pytest.mark.parametrize("rows", [1, 3])
def test_nibble_matmul_gives_matmul_integer_to_float_bit_for_bit(library, k, n, rows):
    if "NibbleMatMul" not in cpu_ops.ops(library):
        pytest.skip("no AVX-512 VNNI: NibbleMatMul is not registered here")
    w, scale = _q4_int8_weights(k, n)
    form = "steps" if "avx512_bitalg" in Path("/proc/cpuinfo").read_text() else "nibbles"
    assert cpu_ops.nibble_form(library, w) == form               # read packed: the smallest form
    y = _same_product(library, w, scale / 127, rows)
    assert len(np.unique(y)) > n // 2                            # real products, not a constant
    _same_product(library, w, scale, rows, a_scale=0.37, zero_point=3)   # other scales and zero points


def test_a_block_off_the_steps_of_q4_is_read_in_the_form_of_nibbles(library):
    """Sixteen values whose rises are not all lo or lo + 1 (15 rises of 2, then one of 6)
    fit the tables of 4-bit p, not those of 1-bit steps; exact either way."""
    if "NibbleMatMul" not in cpu_ops.ops(library):
        pytest.skip("no AVX-512 VNNI: NibbleMatMul is not registered here")
    w, scale = _q4_int8_weights(576, 64)
    w[32:64, 9] = [*range(-40, -10, 2), -6] * 2
    assert cpu_ops.nibble_form(library, w) == "nibbles"
    _same_product(library, w, scale / 127, 1)
    _same_product(library, w, scale / 127, 3)


def test_nibble_matmul_reads_weights_without_the_form_directly(library):
    """More than 16 values in a block, values that no base and lo fit, a width off the
    block: not packed (the rewrite leaves such products to onnxruntime), still exact."""
    if "NibbleMatMul" not in cpu_ops.ops(library):
        pytest.skip("no AVX-512 VNNI: NibbleMatMul is not registered here")
    rng = np.random.default_rng(1)
    wide = rng.integers(-127, 128, (64, 32), dtype=np.int8)             # up to 32 values a block
    gap = _q4_int8_weights(64, 32)[0]
    gap[:32, 5] = [*range(15), 40] * 2                                   # 16 values, a gap no table fits
    odd = _q4_int8_weights(64, 40)[0][:40]                               # k = 40: off the block of 32
    scale = np.full(40, 0.01, np.float32)
    for w in (wide, gap, odd):
        assert cpu_ops.nibble_form(library, w) is None
        _same_product(library, w, scale[:w.shape[1]], 2)


def test_the_one_row_branch_gives_the_default_exports_logits_bit_for_bit(tmp_path, library):
    """The default export: every layer's product (not the head: an 8-bit block there) reads
    packed in the one-row branch, the other calls keep onnxruntime's; the logits are the
    same bit for bit as without NibbleMatMul, alone and beside other rows."""
    import onnx

    from llm_backend.decoder import Decoder, int8_gemm_is_exact, prepare_graph
    from stack.default_model import ensure_default_model

    if not int8_gemm_is_exact() or "NibbleMatMul" not in cpu_ops.ops(library):
        pytest.skip("no VNNI here")
    version = ensure_default_model(tmp_path / "repo", precision="w8a8") / "1"
    graph, _ = prepare_graph(version / "model.onnx", prefill_variant=True, cpu_kernels=frozenset(cpu_ops.ops(library)),
                             head_size=64, kernel_library=Path(library))
    (branch,) = [n for n in onnx.load_from_string(graph).graph.node if n.op_type == "If"]
    ops = {a.name: [n.op_type for n in a.g.node] for a in branch.attribute}
    assert ops["then_branch"].count("NibbleMatMul") == 120 and ops["then_branch"].count("MatMulIntegerToFloat") == 1
    assert "NibbleMatMul" not in ops["else_branch"] and ops["else_branch"].count("MatMulIntegerToFloat") == 121

    nibble = Decoder(version, num_slots=3, max_len=64, intra_op_threads=2)
    plain = Decoder(version, num_slots=3, max_len=64, intra_op_threads=2, packed_decode=False)
    prompt = list(range(1000, 1030))
    for dec in (nibble, plain):
        dec.prefill(0, prompt, 0)
    for step in range(6):                                    # one row: NibbleMatMul against onnxruntime
        token, length = np.array([40 + step]), np.array([len(prompt) + step])
        a, b = nibble.decode(token, length), plain.decode(token, length)
        assert np.array_equal(a, b)
    prompts = [prompt + [7], list(range(2000, 2012)), list(range(3000, 3020))]
    assert np.array_equal(nibble.prefill_batch(0, prompts), plain.prefill_batch(0, prompts))   # else-branch
    lengths, tokens = np.array([len(p) for p in prompts]), np.array([5, 6, 7])
    assert np.array_equal(nibble.decode(tokens, lengths), plain.decode(tokens, lengths))


@pytest.mark.slow
def test_quantized_exports_keep_float16_kv_and_fit_twice_the_sequences(tmp_path, library):
    """kv_cache_dtype "auto": float16 KV for the W8A8 export (half a slot's bytes: a
    budget holds twice the sequences), float KV for the fp32 one (held identical to
    transformers). Rows stay independent with float16 KV: a batched prefill and a step
    of three rows give each row what it gets alone."""
    from llm_backend.decoder import Decoder, ModelLoadError, int8_gemm_is_exact
    from stack.default_model import ensure_default_model

    if not int8_gemm_is_exact() or "GroupAttention" not in cpu_ops.ops(library):
        pytest.skip("no VNNI or AVX-512 here")
    version = ensure_default_model(tmp_path / "repo", precision="w8a8") / "1"
    half = Decoder(version, num_slots=16, max_len=512, intra_op_threads=2, kv_cache_mb=100)
    full = Decoder(version, num_slots=16, max_len=512, intra_op_threads=2, kv_cache_mb=100, kv_cache_dtype="float32")
    assert half.kv_dtype == np.float16 and full.kv_dtype == np.float32
    assert half.row_bytes * 2 == full.row_bytes == 30 * 2 * 3 * 512 * 64 * 4
    assert (half.num_slots, full.num_slots) == (8, 4)            # 100 MiB in slots of 11.25 and 22.5 MiB
    with pytest.raises(ModelLoadError, match="kv_cache_dtype must be one of"):
        Decoder(version, num_slots=1, max_len=64, kv_cache_dtype="fp8")

    prompts = [list(range(1000 + 5 * i, 1030 + 3 * i)) for i in range(3)]
    together = half.prefill_batch(0, prompts)
    lengths, tokens = np.array([len(p) for p in prompts]), np.array([42, 7, 9])
    step = half.decode(tokens, lengths)
    for i, p in enumerate(prompts):
        alone = Decoder(version, num_slots=1, max_len=64, intra_op_threads=2)
        assert np.array_equal(alone.prefill_batch(0, [p])[0], together[i])
        assert np.array_equal(alone.decode(tokens[i:i + 1], lengths[i:i + 1])[0], step[i])

    fp32 = ensure_default_model(tmp_path / "fp32", precision="fp32") / "1"
    assert Decoder(fp32, num_slots=1, max_len=64, intra_op_threads=2).kv_dtype == np.float32
