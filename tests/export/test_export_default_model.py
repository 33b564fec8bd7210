"""The default model (SmolLM2-135M-Instruct) exported and verified, through
`stack.default_model` so that its cache is shared with the other test modules."""

from __future__ import annotations

import json
import time

import pytest

from export.verify import CRITERIA
from stack.default_model import ensure_default_model

pytestmark = pytest.mark.slow


def manifest(model_dir):
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    return json.loads((model_dir / str(versions[-1]) / "manifest.json").read_text())


def test_default_model_fp32_parity(tmp_path):
    model_dir = ensure_default_model(tmp_path, precision="fp32")
    m = manifest(model_dir)
    v = m["verification"]
    print("fp32 parity:", json.dumps({"logits": v["logits"], "greedy": v["greedy"]}))
    assert m["precision"] == "fp32" and v["status"] == "passed"
    assert v["logits"]["max_abs_diff"] <= CRITERIA["fp32"].rel_tol * v["logits"]["logit_scale"]
    assert v["logits"]["max_abs_diff"] < 1e-2
    assert v["greedy"]["tokens"] >= 24
    assert v["greedy"]["agreed"] == [v["greedy"]["tokens"]] * len(v["greedy"]["agreed"])
    assert m["engine_params"]["context_length"] == 8192 and m["engine_params"]["max_model_len"] == 2048
    assert m["engine_params"]["eos_token"] == "<|im_end|>"


def test_default_model_int4_parity(tmp_path):
    model_dir = ensure_default_model(tmp_path, precision="int4")
    m = manifest(model_dir)
    q = m["quantization"]
    assert q["fused_groups"] == 30          # gate+up of each layer (graph_rewrite)
    # every weight product quantized again (int4_requant): 30 x (qkv, o) in blocks of 32,
    # 30 x (gate, up, down) and the head in blocks of 64
    assert q["requantized"] == 151 and q["blocks"] == {"32": 60, "64": 91}
    v = m["verification"]
    print("int4 parity:", json.dumps({"logits": v["logits"], "greedy": v["greedy"]}))
    assert v["status"] == "passed"
    assert v["logits"]["kl_max"] <= CRITERIA["int4"].max_kl
    assert v["logits"]["top1_agree"] == v["logits"]["prompts"]
    greedy = v["greedy"]   # a first divergence at a near tie of the source is no error (verify.py)
    assert all(agreed >= CRITERIA["int4"].min_greedy or tie
               for agreed, tie in zip(greedy["agreed"], greedy["near_tie_at_divergence"]))


def test_repeated_calls_are_cheap_and_rerender_config(tmp_path):
    ensure_default_model(tmp_path, precision="fp32")
    start = time.monotonic()
    model_dir = ensure_default_model(tmp_path, precision="fp32", max_num_seqs=3, max_model_len=512)
    assert time.monotonic() - start < 5  # cached: links and a config, no export
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    config = (model_dir / "config.pbtxt").read_text()
    assert '{ key: "max_num_seqs" value: { string_value: "3" } }' in config
    assert '{ key: "max_model_len" value: { string_value: "512" } }' in config
    # Another precision in the same directory becomes the next version.
    ensure_default_model(tmp_path, precision="int4")
    assert manifest(model_dir)["precision"] == "int4"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt"]
