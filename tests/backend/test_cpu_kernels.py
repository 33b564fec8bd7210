"""Our own CPU kernels (llm_backend/cpu_ops): RowQuantize computes the same bytes as the
four nodes of W8A8's activation quantization, the rewrite finds exactly those chains,
and the engine serves the graph as exported where the library cannot be built."""

from __future__ import annotations

import logging
import shutil

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
    assert not fused.graph.initializer            # the axes and 1/127 went with their nodes
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


def test_without_gcc_the_library_is_none_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))          # no gcc on it
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_ops, "_built", {})
    with caplog.at_level(logging.WARNING, logger="llm_backend"):
        assert cpu_ops.library() is None
    assert "cannot build" in caplog.text and "serving the graph as exported" in caplog.text
    assert not list((tmp_path / "cache").glob("*"))    # no half-written library left behind


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_ops, "_built", {})
    lib = cpu_ops.library()
    assert lib is not None and lib.parent == tmp_path and lib.stat().st_size > 0
    stamp = lib.stat().st_mtime_ns
    monkeypatch.setattr(cpu_ops, "_built", {})          # a new process: found in the cache, not rebuilt
    assert cpu_ops.library() == lib and lib.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_engine_decodes_the_default_export_bit_for_bit_with_the_kernels(tmp_path, monkeypatch, library):
    """The Decoder the backend serves with: with the kernels, 121 quantizations are one
    node each and the logits of prefills and batched decode steps are the exported
    graph's exactly; without gcc it loads the exported graph."""
    import onnx

    from llm_backend.decoder import Decoder, int8_gemm_is_exact, prepare_graph
    from stack.default_model import ensure_default_model

    if not int8_gemm_is_exact():
        pytest.skip("no VNNI: the engine refuses W8A8 exports here")
    version = ensure_default_model(tmp_path / "repo", precision="w8a8") / "1"
    graph, _ = prepare_graph(version / "model.onnx", prefill_variant=True, cpu_kernels=True)
    ops = [n.op_type for n in onnx.load_from_string(graph).graph.node]
    assert ops.count("RowQuantize") == ops.count("MatMulIntegerToFloat") > 100 and "Abs" not in ops
    fused = Decoder(version, num_slots=3, max_len=64, intra_op_threads=2)
    exported = Decoder(version, num_slots=3, max_len=64, intra_op_threads=2, cpu_kernels=False)
    assert fused.kernel_library is not None and exported.kernel_library is None
    prompts = [list(range(1000 + 5 * i, 1030 + 3 * i)) for i in range(3)]
    assert np.array_equal(fused.prefill_batch(0, prompts), exported.prefill_batch(0, prompts))
    lengths = np.array([len(p) for p in prompts])
    tokens = np.array([42, 7, 9])
    assert np.array_equal(fused.decode(tokens, lengths), exported.decode(tokens, lengths))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_ops, "_built", {})
    without = Decoder(version, num_slots=1, max_len=64, intra_op_threads=2)
    assert without.kernel_library is None
    assert np.array_equal(without.prefill(0, prompts[0], 0), exported.prefill(0, prompts[0], 0))
