"""graph_rewrite.fuse_matmulnbits: products that read one activation become one, exactly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.graph_rewrite import FUSE_SCHEME, fuse_matmulnbits

K, BLOCK = 64, 32


def _nbits(name, x, n, rng, inits, accuracy_level=4, g_idx=False):
    blocks = K // BLOCK
    inits += [numpy_helper.from_array(rng.integers(0, 255, (n, blocks, BLOCK // 2), dtype=np.uint8), f"{name}.w"),
              numpy_helper.from_array((rng.random((n, blocks)) * 0.01).astype(np.float32), f"{name}.s"),
              numpy_helper.from_array(rng.integers(0, 255, (n, 1), dtype=np.uint8), f"{name}.zp")]
    inputs = [x, f"{name}.w", f"{name}.s", f"{name}.zp"]
    if g_idx:
        inits.append(numpy_helper.from_array(np.arange(K, dtype=np.int32) // BLOCK, f"{name}.g"))
        inputs.append(f"{name}.g")
    return helper.make_node("MatMulNBits", inputs, [f"{name}.y"], domain="com.microsoft", name=name,
                            K=K, N=n, bits=4, block_size=BLOCK, accuracy_level=accuracy_level)


def _model(nodes, inits, outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _run(model):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(9).standard_normal((3, K)).astype(np.float32)
    return sess.run(None, {"x": x})


def test_products_of_one_activation_fuse_into_one_with_the_same_numbers():
    rng, inits = np.random.default_rng(0), []
    nodes = [_nbits("gate", "x", 48, rng, inits), _nbits("up", "x", 80, rng, inits),
             _nbits("other_level", "x", 16, rng, inits, accuracy_level=0),
             _nbits("grouped", "x", 16, rng, inits, g_idx=True)]
    outputs = [n.output[0] for n in nodes]
    model = _model(nodes, inits, outputs)
    before = _run(model)
    assert fuse_matmulnbits(model) == {"scheme": FUSE_SCHEME, "fused_groups": 1}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("Split") == 1   # gate+up; the others alone
    assert not {"gate.w", "up.w"} & {t.name for t in model.graph.initializer}
    after = _run(model)
    for b, a in zip(before, after):
        assert np.array_equal(a, b)
