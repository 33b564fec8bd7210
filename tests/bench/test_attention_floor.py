"""bench.attention_floor: onnxruntime's GroupQueryAttention against the engine's
GroupAttention on the model's shapes; compare refuses to time nodes that disagree."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import attention_floor as af
from llm_backend import cpu_ops

pytestmark = pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text() or not shutil.which("gcc"),
                                reason="GroupAttention is written with AVX-512 and built with gcc: this machine "
                                       "lacks one of them")


@pytest.fixture(scope="module")
def library():
    lib = cpu_ops.library()
    assert lib is not None and "GroupAttention" in cpu_ops.ops(lib)
    return str(lib)


@pytest.mark.parametrize("rows,context", [(1, 5), (3, 37)])
def test_both_nodes_agree_and_are_timed(library, rows, context):
    row = af.compare(library, rows, context, rounds=1, threads=2)
    assert row["max_difference"] <= 1e-4
    assert row["onnxruntime_ms"] > 0 and row["group_attention_ms"] > 0


def test_outputs_with_two_heads_swapped_are_refused():
    rng = np.random.default_rng(0)
    out = [rng.standard_normal((2, 1, af.Q_HEADS * af.HEAD)).astype(np.float32)]
    kv = [[np.zeros((2, 3, 4, 64), np.float32)] * 2]
    swapped = out[0].reshape(2, af.Q_HEADS, af.HEAD)[:, [1, 0, *range(2, af.Q_HEADS)]].reshape(out[0].shape)
    assert af.check_agreement(out, [out[0].copy()], kv, kv) == 0
    with pytest.raises(RuntimeError, match="disagree"):
        af.check_agreement(out, [swapped], kv, kv)
    with pytest.raises(RuntimeError, match="disagree"):
        af.check_agreement(out, out, kv, [[kv[0][0] + 1e-3, kv[0][1]]])
