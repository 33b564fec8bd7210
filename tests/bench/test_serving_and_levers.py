"""bench.serving's steady window and bench.levers' weight forms, on made-up numbers and a
one-product graph (no server, no export)."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.levers import int8_blocks, q4_1_grid, rewrite
from bench.serving import chunk_tokens, prompt_plan, render, steady_rate, summarize


def _request(client, start, first, n, step):
    return {"client": client, "start": start, "times": [first + i * step for i in range(n)]}


def test_steady_rate_counts_only_while_every_client_cycles():
    # two clients, two requests each, 10 tokens/s; client 1 starts 5 s after client 0
    results = [_request(0, 0.0, 0.0, 100, 0.1), _request(0, 10.0, 10.0, 100, 0.1),
               _request(1, 5.0, 5.0, 100, 0.1), _request(1, 15.0, 15.0, 100, 0.1)]
    rate, window = steady_rate(results)
    # from 15.0 (every client on its second request) to 19.9 (client 0's last token)
    assert window == pytest.approx(4.9)
    assert rate == pytest.approx(20.0, rel=0.03)  # both streams at 10 tokens/s
    # the whole run's rate is lower: 400 tokens over 24.9 s, the ramp and tail counted
    assert 400 / 24.9 < rate


def test_steady_rate_leaves_out_the_first_round():
    # The first round decodes with no newcomer: here 50 tokens/s a client, where the
    # cycling rounds after it make 10. Only those count.
    results = [_request(c, 0.0, 0.0, 100, 0.02) for c in (0, 1)]
    results += [_request(c, 2.0, 2.0, 100, 0.1) for c in (0, 1)]
    assert steady_rate(results)[0] == pytest.approx(20.0, rel=0.03)
    assert steady_rate([_request(0, 0.0, 0.0, 100, 0.1), _request(1, 0.0, 0.0, 100, 0.1)]) == (None, 0.0)


def test_steady_rate_refuses_a_short_or_broken_window():
    short = [_request(c, s, s, 10, 0.01) for c in (0, 1) for s in (0.0, 0.2)]
    assert steady_rate(short)[0] is None
    broken = [_request(0, 0.0, 0.0, 100, 0.1), _request(0, 10.0, 10.0, 100, 0.1),
              {"client": 1, "start": 1.0, "times": [], "error": "x"}]
    assert steady_rate(broken) == (None, 0.0)


def test_no_prompt_is_sent_twice_to_one_server():
    """The gRPC rows follow the API rows in the same Triton process: a prompt the API
    rows sent would come from the prompt cache, and gRPC's prefill would look free."""
    requests = {1: 16, 4: 16, 16: 64}
    offsets, warm_up, shift = prompt_plan(requests)
    api = [offsets[c] + i for c in requests for i in range(requests[c])]
    grpc = [shift + i for i in api]
    assert len(set(api)) == len(api) == sum(requests.values())
    assert warm_up not in api
    assert not set(api + [warm_up]) & set(grpc + [shift + warm_up])
    assert max(grpc + [shift + warm_up]) < 2 * shift      # prompts_for(tok, 2 * shift, ...)


def test_the_table_tells_requests_given_up_after_429s_from_other_errors():
    results = [_request(0, 0.0, 0.0, 4, 0.1),
               {"client": 1, "error": "429: b'over capacity'", "status": 429, "refused": 20},
               {"client": 2, "error": "ReadError: ...", "status": "connection", "refused": 3}]
    row = summarize(results, elapsed=1.0, output_len=4)
    assert (row["errors"], row["gave_up_429"], row["refused_429"]) == (2, 1, 23)
    table = render({"systems": {"ours": [{**row, "concurrency": 64}]}})
    assert "| 2 (1) | 23 / 0 |" in table
    assert "| 0 | " in render({"systems": {"ours": [{**summarize(results[:1], 1.0, 4), "concurrency": 1}]}})


def test_steady_rate_counts_the_tokens_of_each_chunk():
    # The same 10 tokens/s a client, sent as chunks of 4 tokens: the same rate.
    one = [_request(c, s, s, 100, 0.1) for c in (0, 1) for s in (0.0, 10.0)]
    four = [{**_request(c, s, s, 25, 0.4), "tokens": [4] * 25} for c in (0, 1) for s in (0.0, 10.0)]
    assert steady_rate(four)[0] == pytest.approx(steady_rate(one)[0], rel=0.05)


class _WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return type("E", (), {"ids": text.split()})()


def test_chunk_tokens_adds_up_to_the_request_and_follows_the_text():
    pieces = ["a", "b c d e", "f g h i", "j"]
    assert chunk_tokens(pieces, _WordTokenizer(), 10) == [1, 4, 4, 1]
    # scaled when tokenizing chunks alone miscounts; a chunk with no token counts one
    counts = chunk_tokens(["a b", " ", "c d e f"], _WordTokenizer(), 14)
    assert sum(counts) == 14 and counts[1] >= 1 and counts[2] > counts[0]


def _q4_1_weights(k, n, seed=0, one_sided=0):
    """Weights as Q4_1 dequantizes them: per block of 32 along K, d * q + m. The minimum
    of a block around zero is 3 to 12 steps below it; the first `one_sided` blocks of each
    column lie all above zero (their zero point clips)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15                   # Q4_1 puts a block's min at 0 and max at 15
    d = rng.uniform(0.001, 0.02, size=(n, k // 32, 1)).astype(np.float16).astype(np.float32)
    steps = rng.uniform(3.0, 12.0, size=(n, k // 32, 1))
    steps[:, :one_sided] = -rng.uniform(2.0, 6.0, size=(n, one_sided, 1))
    m = (-d * steps).astype(np.float16).astype(np.float32)
    return (q * d + m).reshape(n, k).T.astype(np.float32)


def test_q4_1_grid_recovers_the_blocks_and_refuses_other_weights():
    w = _q4_1_weights(64, 8)
    q, d, m = q4_1_grid(w)
    assert np.allclose((q * d[..., None] + m[..., None]).reshape(8, 64).T, w, atol=1e-7)
    with pytest.raises(ValueError, match="not on a Q4_1 grid"):
        q4_1_grid(w + np.random.default_rng(1).normal(0, 0.003, w.shape).astype(np.float32))


def test_int8_blocks_are_exact_for_q8_0_weights():
    rng = np.random.default_rng(2)
    scale = rng.uniform(0.001, 0.01, size=(16, 2, 1)).astype(np.float32)
    q = rng.integers(-127, 128, size=(16, 2, 32))
    q[..., 0] = 127
    w = (q * scale).reshape(16, 64).T
    b, s = int8_blocks(w)
    assert np.array_equal(b.astype(np.int32) - 128, q)
    assert np.allclose(s.reshape(16, 2, 1), scale)


def _rewritten_errors(form, k=64, n=48, vocab=96, one_sided=0):
    """Largest error of the rewritten product and head against the fp32 ones, relative to
    the largest output; and the op types of the rewritten graph. The widest product is
    taken for the head (8-bit blocks); it reads its own input, as in a decoder."""
    w, head = _q4_1_weights(k, n, one_sided=one_sided), _q4_1_weights(k, vocab, seed=3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("MatMul", ["h", "H"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(a, TensorProto.FLOAT, [1, 1, k])
                                           for a in ("x", "h")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(head, "H")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rewrite(model, form)
    x, h = np.random.default_rng(4).normal(size=(2, 1, 1, k)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, logits = session.run(None, {"x": x, "h": h})
    rel = lambda got, want: float(np.abs(got - want).max() / np.abs(want).max())   # noqa: E731
    return rel(y, x @ w), rel(logits, h @ head), [nd.op_type for nd in model.graph.node]


@pytest.mark.parametrize("form", ["Q4_1 exact", "int8 blocks"])
def test_rewritten_product_equals_the_fp32_one(form):
    err, head_err, ops = _rewritten_errors(form)
    assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops
    # int8 activations per block of 32 are the only rounding left: within 1% of the output's scale
    assert err < 0.01 and head_err < 0.01


@pytest.mark.parametrize("one_sided", [2, 32])
def test_the_q4_1_residual_still_helps_where_zero_points_clip(one_sided):
    # 32 blocks a column, one full group of residuals. Blocks lying all above zero clip
    # their zero point to 0 and leave residuals of several steps, which 4 bits carry less
    # exactly (none clip in SmolLM2's GGUF); the product stays far closer than without them.
    exact, _, _ = _rewritten_errors("Q4_1 exact", k=1024, one_sided=one_sided)
    rounded, _, _ = _rewritten_errors("Q4_1, integer zero points", k=1024, one_sided=one_sided)
    assert exact < 0.05 and exact < rounded / 4


def test_the_q4_1_residual_is_what_makes_the_product_exact():
    exact, _, ops = _rewritten_errors("Q4_1 exact", k=256)
    rounded, _, rounded_ops = _rewritten_errors("Q4_1, integer zero points", k=256)
    assert ops.count("Concat") == 1 and rounded_ops.count("MatMulNBits") == 2 and "Concat" not in rounded_ops
    # zero points rounded to integers leave each block up to half a step off
    assert rounded > 5 * exact


def test_a_run_is_written_as_one_json_and_markdown_pair(tmp_path):
    from bench.results import write_run

    base = write_run(tmp_path / "out", "levers", {"rows": {"w8a8": {"kl_mean": 0.047}}}, "# table\n")
    assert base.parent == tmp_path / "out" and base.name.startswith("levers-")
    assert json.loads(Path(f"{base}.json").read_text()) == {"rows": {"w8a8": {"kl_mean": 0.047}}}
    assert Path(f"{base}.md").read_text() == "# table\n"
