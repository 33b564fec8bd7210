"""bench.attention_floor's C kernel against onnxruntime's GroupQueryAttention: the same
outputs and the same keys and values written (compare refuses to time kernels that differ)."""
import ctypes
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import attention_floor as af

pytestmark = pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text() or not shutil.which("gcc"),
                                reason="the C kernel is written with AVX-512 and built with gcc: this machine "
                                       "lacks one of them")


@pytest.fixture(scope="module")
def attend(tmp_path_factory):
    return af.build_kernel(tmp_path_factory.mktemp("attend"))


@pytest.mark.parametrize("rows,context", [(1, 5), (3, 37)])
def test_the_one_read_kernel_matches_onnxruntime(attend, rows, context):
    row = af.compare(attend, rows, context, rounds=1, threads=2)
    assert row["max_difference"] <= 1e-5
    assert row["onnxruntime_ms"] > 0 and row["one read_ms"] > 0


def test_a_kernel_that_reads_the_wrong_head_is_refused(attend):
    def wrong(q, k_new, v_new, kc, vc, lengths, out, rows, qh, kvh, d, max_len, scratch):
        attend(q, k_new, v_new, kc, vc, lengths, out, rows, qh, kvh, d, max_len, scratch)
        o = np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_float)), shape=(rows, qh, d))
        o[:, [0, 1]] = o[:, [1, 0]]          # two heads' outputs swapped
    with pytest.raises(RuntimeError, match="disagree"):
        af.compare(wrong, 2, 9, rounds=1, threads=2)
