"""llm-deploy's validation and config handling without servers (pure)."""
from __future__ import annotations

from rollout import validate
from rollout.validate import Run


PROBES = {"max_tokens": 4, "match_tokens": 2, "cases": [{"prompt_ids": [1, 2, 3], "expected_prefix": "Paris is"}]}


def test_answers_must_begin_as_recorded(monkeypatch):
    answers = {1: Run(text="Paris is the capital"), 2: Run(text="London"), 3: Run(error="internal: boom")}
    monkeypatch.setattr(validate, "run_probe", lambda url, model, version, ids, n: answers[version])
    assert validate.check_answers("g", "m", 1, PROBES) == []
    (problem,) = validate.check_answers("g", "m", 2, PROBES)
    assert "expected the answer to begin 'Paris is', got 'London'" in problem
    assert "the model failed: internal: boom" in validate.check_answers("g", "m", 3, PROBES)[0]


def test_speed_bound_against_the_serving_version(monkeypatch):
    speed = {1: Run(ttft_s=0.010, decode_tok_s=100.0), 2: Run(ttft_s=0.014, decode_tok_s=70.0),
             3: Run(ttft_s=0.030, decode_tok_s=100.0), 4: Run(ttft_s=0.010, decode_tok_s=50.0)}
    monkeypatch.setattr(validate, "run_probe", lambda url, model, version, ids, n: speed[version])
    problems, figures = validate.compare_speed("g", "m", 1, 2, PROBES, turns=3, max_slowdown=0.5)
    assert problems == [] and figures[2] == {"ttft_ms": 14.0, "decode_tok_s": 70.0}
    (slow_start,), _ = validate.compare_speed("g", "m", 1, 3, PROBES, turns=3, max_slowdown=0.5)
    assert "time to first token 30.0 ms against 10.0 ms" in slow_start
    (slow_decode,), _ = validate.compare_speed("g", "m", 1, 4, PROBES, turns=3, max_slowdown=0.5)
    assert "decode rate 50.0 tok/s against 100.0 tok/s" in slow_decode


def test_served_versions_in_config_and_kept_by_a_new_export(tmp_path):
    from export.publish import set_served_versions, version_policy_line, write_config
    from llm_backend.model_config import EngineParams

    write_config(tmp_path, "m", EngineParams(), instance_kind="KIND_CPU")
    assert version_policy_line((tmp_path / "config.pbtxt").read_text()) is None
    set_served_versions(tmp_path, [2, 1, 2])
    line = "version_policy: { specific: { versions: [ 1, 2 ] } }"
    assert version_policy_line((tmp_path / "config.pbtxt").read_text()) == line
    write_config(tmp_path, "m", EngineParams(max_num_seqs=8), instance_kind="KIND_CPU")  # a new export
    text = (tmp_path / "config.pbtxt").read_text()
    assert text.count("version_policy") == 1 and line in text and '"8"' in text
