"""CPU int4: the activation-aware re-quantization (export/int4_requant.py).

The packing is checked against onnxruntime's own kernels (MatMulNBits, and the tied
embedding's GatherBlockQuantized), the weighting against a plain fit, and the export
end to end on the tiny checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.int4_requant import SCHEME, block_for, dequantize_blocks, quantize_blocks
from export.pipeline import ExportOptions, run_export


def run_graph(nodes, inputs: dict, initializers: list, output: str) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, types[v.dtype], v.shape)
                                           for k, v in inputs.items()],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], inputs)[0]


@pytest.mark.parametrize("k,n,block", [(576, 40, 64), (576, 40, 32), (128, 24, 64)])
def test_packing_is_what_matmulnbits_computes(k, n, block):
    # 576 / 64 = 9 blocks: an odd count pads the packed zero points of every row.
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    packed, scales, zeros = quantize_blocks(w, block, rng.random(k) + 0.1)
    assert packed.shape == (n, k // block, block // 2) and scales.shape == (n, k // block)
    assert zeros.shape == (n, (k // block + 1) // 2)
    dense = dequantize_blocks(packed, scales, zeros)
    assert np.abs(dense - w).max() < np.abs(w).max() / 7     # a 4-bit grid, not garbage
    x = rng.standard_normal((3, k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "q", "s", "z"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=0)
    inits = [numpy_helper.from_array(a, name) for a, name in ((packed, "q"), (scales, "s"), (zeros, "z"))]
    y = run_graph([node], {"x": x}, inits, "y")
    np.testing.assert_allclose(y, x @ dense, rtol=1e-4, atol=1e-4)


def test_the_tied_embedding_reads_the_same_blocks():
    # The builder's tied embedding: Reshape of the head's packed weight, GatherBlockQuantized.
    from onnx import helper, numpy_helper

    k, n, block = 576, 50, 64
    w = (np.random.default_rng(1).standard_normal((k, n)) * 0.05).astype(np.float32)
    packed, scales, zeros = quantize_blocks(w, block)
    ids = np.array([[0, 7, 49]], dtype=np.int64)
    shape = numpy_helper.from_array(np.array([n, k // 2], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["q", "shape"], ["q2"]),
             helper.make_node("GatherBlockQuantized", ["q2", "ids", "s", "z"], ["e"], domain="com.microsoft",
                              bits=4, block_size=block, gather_axis=0, quantize_axis=1)]
    inits = [shape] + [numpy_helper.from_array(a, name) for a, name in ((packed, "q"), (scales, "s"), (zeros, "z"))]
    rows = run_graph(nodes, {"ids": ids}, inits, "e")
    np.testing.assert_allclose(rows[0], dequantize_blocks(packed, scales, zeros).T[ids[0]], rtol=1e-5, atol=1e-6)


def test_importance_moves_the_error_away_from_busy_channels():
    rng = np.random.default_rng(2)
    k, n, block = 128, 64, 64
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    busy = np.ones(k)
    busy[::8] = 100.0                      # channels that carry large activations
    err = {}
    for name, importance in (("plain", None), ("weighted", busy)):
        sq = ((dequantize_blocks(*quantize_blocks(w, block, importance)) - w) ** 2).sum(axis=1)
        err[name] = (float(sq[busy > 1].sum()), float(sq[busy == 1].sum()))
    # Only scale and zero point are free per block: the busy channels' error falls (by a
    # fifth here), the others' rises, and their weighted sum falls.
    assert err["weighted"][0] < 0.9 * err["plain"][0], err
    assert err["weighted"][1] > err["plain"][1], err
    assert 100 * err["weighted"][0] + err["weighted"][1] < 100 * err["plain"][0] + err["plain"][1]


def test_block_sizes_follow_the_builder_names():
    assert block_for("/model/layers.3/mlp/gate_proj/MatMul_Q4", 576) == 64
    assert block_for("/lm_head/MatMul_Q4", 576) == 64
    assert block_for("/model/layers.3/attn/qkv_proj/MatMul_Q4", 576) == 32
    assert block_for("/model/layers.3/mlp/down_proj/MatMul_Q4", 96) == 32      # 96 is no multiple of 64
    assert block_for("/model/layers.3/attn/o_proj/MatMul_Q4", 40) is None      # nor of 32: the builder's


@pytest.mark.slow
def test_tiny_int4_export_is_requantized_and_verified(tiny_checkpoint, tmp_path):
    import onnx

    result = run_export(tiny_checkpoint, ExportOptions(name="tiny4", repository=tmp_path, precision="int4",
                                                       quiet=True))
    m = result.manifest
    q = m["quantization"]
    assert q["scheme"] == SCHEME and m["builder_options"]["algo_config"] == "rtn"
    # 2 layers x (qkv, o, gate, up, down) + the head; K 64 and 128: MLP and head in blocks of 64
    assert q["requantized"] == 11 and q["blocks"] == {"32": 4, "64": 7} and q["fused_groups"] == 2
    assert q["calibration_tokens"] > 500
    graph = onnx.load(str(result.version_dir / "model.onnx"), load_external_data=False).graph
    blocks = {n.name: next(a.i for a in n.attribute if a.name == "block_size")
              for n in graph.node if n.op_type == "MatMulNBits"}
    assert blocks["/lm_head/MatMul_Q4"] == 64
    assert all(b == (64 if ("/mlp/" in name or "lm_head" in name) else 32) for name, b in blocks.items())
    assert m["verification"]["status"] == "passed", m["verification"]


@pytest.mark.slow
def test_int4_mlp_block_32_decodes_the_same_alone_or_batched(tiny_checkpoint, tmp_path):
    from llm_backend.decoder import Decoder

    result = run_export(tiny_checkpoint, ExportOptions(name="tiny32", repository=tmp_path, precision="int4",
                                                       int4_mlp_block=32, quiet=True))
    assert result.manifest["quantization"]["blocks"] == {"32": 11}
    dec = Decoder(result.version_dir, num_slots=4, max_len=64, intra_op_threads=2)
    prompts = [[5, 17, 40, 41, 99], [7, 8, 9, 200, 201, 202, 250]]
    first = [int(dec.prefill(row, p, 0).argmax()) for row, p in enumerate(prompts)]
    lengths = np.array([len(p) for p in prompts])
    batched = dec.decode(np.array(first), lengths)
    alone = dec.decode(np.array(first[:1]), lengths[:1])       # row 0 again, by itself
    assert np.array_equal(alone[0], batched[0])


@pytest.mark.slow
def test_builder_int4_weights_stay_on_request(tiny_checkpoint, tmp_path):
    result = run_export(tiny_checkpoint, ExportOptions(name="tiny4b", repository=tmp_path, precision="int4",
                                                       int4_weights="builder", quiet=True, skip_verify=True))
    q = result.manifest["quantization"]
    assert "requantized" not in q and q["fused_groups"] == 2
    assert result.manifest["builder_options"] == {"algo_config": "k_quant"}
    assert json.loads((result.version_dir / "manifest.json").read_text())["quantization"] == q


@pytest.mark.slow
def test_a_graph_without_zero_points_fails_clearly(tiny_checkpoint, tmp_path):
    from export.onnx_build import BuildError

    with pytest.raises(BuildError, match="no zero points.*--int4-weights builder"):
        run_export(tiny_checkpoint, ExportOptions(name="sym", repository=tmp_path, precision="int4", quiet=True,
                                                  skip_verify=True, builder_options={"is_symmetric": "true"}))
    assert not (tmp_path / "sym").exists() or not any(p.name.isdigit() for p in (tmp_path / "sym").iterdir())
