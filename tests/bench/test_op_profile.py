"""bench.op_profile's sums over an onnxruntime profile, on a made-up trace."""
import pytest

from bench.op_profile import by_op_type


def _run(ts):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 50}


def _node(ts, op, dur):
    return {"cat": "Node", "name": f"{op}_{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_only_the_decode_steps_after_the_prefills_count():
    trace = [_run(0), _node(1, "MatMulIntegerToFloat", 900), _node(2, "GroupQueryAttention", 700),   # a prefill
             _run(100), _node(101, "MatMulIntegerToFloat", 30), _node(102, "GroupQueryAttention", 10),
             _run(200), _node(201, "MatMulIntegerToFloat", 50), _node(202, "GroupQueryAttention", 30),
             _node(203, "Mul", 1)]
    us, nodes, runs = by_op_type(trace, skip_runs=1)
    assert runs == 2
    assert dict(us) == {"MatMulIntegerToFloat": 80, "GroupQueryAttention": 40, "Mul": 1}
    assert dict(nodes) == {"MatMulIntegerToFloat": 2, "GroupQueryAttention": 2, "Mul": 1}


def test_a_profile_without_decode_steps_is_refused():
    with pytest.raises(ValueError, match="no decode step"):
        by_op_type([_run(0), _node(1, "Mul", 5)], skip_runs=1)
