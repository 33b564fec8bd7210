"""W8A8 rewrite (export/w8a8.py): accuracy, per-row independence, fusion, and the export path."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.cli import main as export_main
from export.w8a8 import SCHEME, quantize_weight, rewrite_w8a8
from llm_backend.decoder import int8_gemm_is_exact

# Without VNNI onnxruntime's u8s8 GEMM saturates: results are not what these tests check
# (and the engine refuses W8A8 models there: test below).
needs_exact_int8 = pytest.mark.skipif(not int8_gemm_is_exact(), reason="this CPU has no VNNI")

K, N1, N2 = 64, 48, 80


def _mlp_graph(rng):
    """x -> (x @ A, x @ B) -> concat, plus a MatMul on another input: the shapes of an MLP."""
    a = rng.standard_normal((K, N1)).astype(np.float32) * 0.1
    b = rng.standard_normal((K, N2)).astype(np.float32) * 0.1
    c = rng.standard_normal((N1 + N2, K)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "A"], ["ya"], name="gate/MatMul"),
             helper.make_node("MatMul", ["x", "B"], ["yb"], name="up/MatMul"),
             helper.make_node("Concat", ["ya", "yb"], ["h"], axis=-1, name="cat"),
             helper.make_node("MatMul", ["h", "C"], ["y"], name="down/MatMul")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", K])],
                              [numpy_helper.from_array(w, n) for w, n in ((a, "A"), (b, "B"), (c, "C"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model, (a, b, c)


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _reference(x, weights):
    a, b, c = weights
    return np.concatenate([x @ a, x @ b], axis=-1) @ c


@pytest.fixture(scope="module")
def quantized():
    rng = np.random.default_rng(0)
    model, weights = _mlp_graph(rng)
    stats = rewrite_w8a8(model)
    return _session(model), weights, stats, model


def test_rewrite_counts_and_fuses_matmuls_that_share_an_input(quantized):
    _, _, stats, model = quantized
    assert stats == {"scheme": SCHEME, "quantized_matmuls": 3, "int8_products": 2, "fused_groups": 1}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops and ops.count("Split") == 1
    names = {t.name for t in model.graph.initializer}
    assert not {"A", "B", "C"} & names                       # fp32 weights dropped


@needs_exact_int8
def test_quantized_output_is_close_to_fp32(quantized):
    sess, weights, _, _ = quantized
    x = np.random.default_rng(1).standard_normal((3, 5, K)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    ref = _reference(x, weights)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    assert np.abs(got - ref).max() > 0                       # it really is quantized


@needs_exact_int8
def test_each_row_is_independent_of_the_others_bit_for_bit(quantized):
    sess, _, _, _ = quantized
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 1, K)).astype(np.float32)
    x[3] *= 50.0                                             # an outlier row must not disturb the rest
    together = sess.run(None, {"x": x})[0]
    for i in range(len(x)):
        alone = sess.run(None, {"x": x[i:i + 1]})[0]
        assert np.array_equal(alone[0], together[i]), f"row {i} changed with its neighbours"


@needs_exact_int8
def test_an_all_zero_row_gives_zeros(quantized):
    sess, _, _, _ = quantized
    x = np.random.default_rng(3).standard_normal((2, 1, K)).astype(np.float32)
    x[1] = 0.0
    out = sess.run(None, {"x": x})[0]
    assert np.all(out[1] == 0.0) and np.all(np.isfinite(out))


def test_quantize_weight_is_symmetric_per_column():
    w = np.array([[1.0, -0.02], [-2.0, 0.01], [0.5, 0.0]], np.float32)
    q, scale = quantize_weight(w)
    assert q.dtype == np.int8 and scale.shape == (2,)
    assert q[1, 0] == -127 and q[0, 1] == -127                # each column's largest |w| maps to 127
    assert np.allclose(q * scale, w, atol=scale.max() / 2 + 1e-7)


@needs_exact_int8
def test_unnamed_nodes_are_rewritten_once_and_nothing_else_is_lost():
    """Node names are optional in ONNX: the rewrite must not rely on them."""
    rng = np.random.default_rng(4)
    a, c = (rng.standard_normal((K, K)).astype(np.float32) * 0.1 for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "C"], ["y"])]
    graph = helper.make_graph(nodes, "unnamed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, K])],
                              [numpy_helper.from_array(a, "A"), numpy_helper.from_array(c, "C")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert rewrite_w8a8(model)["int8_products"] == 2
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Relu") == 1 and ops.count("MatMulIntegerToFloat") == 2
    x = rng.standard_normal((2, K)).astype(np.float32)
    ref = np.maximum(x @ a, 0) @ c
    assert np.abs(_session(model).run(None, {"x": x})[0] - ref).max() < 0.03 * np.abs(ref).max()


def test_an_old_opset_is_refused():
    model, _ = _mlp_graph(np.random.default_rng(5))
    model.opset_import[0].version = 13
    with pytest.raises(ValueError, match="opset 13"):
        rewrite_w8a8(model)


def test_a_graph_without_weight_matmuls_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="no MatMul with a constant weight"):
        rewrite_w8a8(helper.make_model(graph))


@needs_exact_int8
def test_w8a8_export_of_a_new_checkpoint_serves_rows_independently(tiny_checkpoint, tmp_path):
    from llm_backend.decoder import Decoder

    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--name", "tiny", "--repository", str(repo),
                        "--precision", "w8a8", "--quiet"]) == 0
    version = repo / "tiny" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["precision"] == "w8a8" and manifest["verification"]["status"] == "passed"
    assert manifest["quantization"]["fused_groups"] == 2      # gate+up of each of the 2 layers
    assert 'key: "precision" value: { string_value: "w8a8" }' in (repo / "tiny" / "config.pbtxt").read_text()
    dec = Decoder(version, num_slots=3, max_len=64)
    prompts = [[5, 9, 14, 20], [7, 7, 30, 2], [11, 40, 3, 8]]
    for row, p in enumerate(prompts):
        dec.prefill(row, p, 0)
    alone = dec.decode(np.array([21]), np.array([4]))[0]           # row 0 by itself
    together = dec.decode(np.array([21, 3, 9]), np.array([4, 4, 4]))
    assert np.array_equal(together[0], alone)
    assert not np.array_equal(together[1], alone)


def test_a_w8a8_model_is_refused_on_a_cpu_without_vnni(tiny_checkpoint, tmp_path, monkeypatch):
    import llm_backend.decoder as engine

    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--name", "tiny", "--repository", str(repo),
                        "--precision", "w8a8", "--skip-verify", "--quiet"]) == 0
    monkeypatch.setattr(engine, "int8_gemm_is_exact", lambda: False)
    with pytest.raises(engine.ModelLoadError, match="no VNNI"):
        engine.Decoder(repo / "tiny" / "1", num_slots=1, max_len=32)


@pytest.mark.parametrize("flags, exact", [("fpu sse avx2 avx512f avx512bw", False),
                                          ("fpu avx2 avx512f avx512_vnni", True),
                                          ("fpu avx2 avx_vnni", True), ("fpu avx2 amx_int8 amx_tile", True)])
def test_vnni_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, exact):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert int8_gemm_is_exact(str(cpuinfo)) is exact


def test_w8a8_for_cuda_is_refused(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_main([str(tiny_checkpoint), "--name", "t", "--repository", str(tmp_path),
                     "--precision", "w8a8", "--device", "cuda"])
    assert exc.value.code == 2 and "w8a8 targets the CPU" in capsys.readouterr().err
