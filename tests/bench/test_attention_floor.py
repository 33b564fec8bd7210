"""bench.attention_floor's C kernel, called directly and as an onnxruntime custom op
(declared without onnxruntime's headers), against onnxruntime's GroupQueryAttention: the
same outputs and the same keys and values written (compare refuses to time kernels that
differ)."""
import ctypes
import subprocess
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
    assert row["onnxruntime_ms"] > 0 and row["one read_ms"] > 0 and row["one read, custom op_ms"] > 0


def _inputs(rows, context, max_len, seed=1):
    rng = np.random.default_rng(seed)
    past = [np.zeros((rows, af.KV_HEADS, max_len, af.HEAD), np.float32) for _ in range(2)]
    for p in past:
        p[:, :, :context] = rng.standard_normal((rows, af.KV_HEADS, context, af.HEAD))
    q = rng.standard_normal((rows, 1, af.Q_HEADS * af.HEAD)).astype(np.float32)
    k, v = rng.standard_normal((2, rows, 1, af.KV_HEADS * af.HEAD)).astype(np.float32)
    return {"query": q, "key": k, "value": v, "past_key": past[0], "past_value": past[1],
            "seqlens_k": np.full(rows, context, np.int32)}


def test_the_custom_op_copies_the_past_when_present_is_not_bound_onto_it(attend):
    rows, context, max_len = 2, 7, 12
    feeds = _inputs(rows, context, max_len)
    before = [feeds["past_key"].copy(), feeds["past_value"].copy()]
    got = af.op_session(attend.library, rows, max_len).run(None, feeds)
    want = af.gqa_session(rows, max_len, 2).run(None, {**feeds, "total_len": np.array(context + 1, np.int32)})
    assert np.abs(got[0] - want[0]).max() <= 1e-5
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])    # past + the new token
    assert np.array_equal(feeds["past_key"], before[0]) and np.array_equal(feeds["past_value"], before[1])


@pytest.mark.parametrize("position", [-1, 12])
def test_the_custom_op_refuses_a_position_outside_the_buffer(attend, position):
    rows, context, max_len = 2, 7, 12
    feeds = _inputs(rows, context, max_len)
    feeds["seqlens_k"][1] = position
    before = [feeds["past_key"].copy(), feeds["past_value"].copy()]
    sess = af.op_session(attend.library, rows, max_len)
    out = np.zeros((rows, 1, af.Q_HEADS * af.HEAD), np.float32)
    b = af.bind(sess, {k: feeds[k] for k in ("query", "key", "value", "seqlens_k")},
                [feeds["past_key"], feeds["past_value"]], out)
    sess.run_with_iobinding(b)
    assert np.isnan(out).all()
    assert np.array_equal(feeds["past_key"], before[0]) and np.array_equal(feeds["past_value"], before[1])


def test_a_kernel_that_reads_the_wrong_head_is_refused(attend):
    def wrong(q, k_new, v_new, kc, vc, lengths, out, rows, qh, kvh, d, max_len, scratch):
        attend(q, k_new, v_new, kc, vc, lengths, out, rows, qh, kvh, d, max_len, scratch)
        o = np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_float)), shape=(rows, qh, d))
        o[:, [0, 1]] = o[:, [1, 0]]          # two heads' outputs swapped
    wrong.library = attend.library       # the custom op stays right: the ctypes path is caught
    with pytest.raises(RuntimeError, match="disagree"):
        af.compare(wrong, 2, 9, rounds=1, threads=2)


def test_loading_the_library_leaves_the_process_floating_point_mode_alone(attend):
    # a library linked with -ffast-math sets flush-to-zero for the whole process
    tiny = np.float32(1e-39)                     # subnormal
    assert tiny * np.float32(1.0) != 0.0
    assert "set_fast_math" not in subprocess.run(["nm", attend.library], capture_output=True, text=True).stdout
