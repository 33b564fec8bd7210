"""`llm-export` end to end on the tiny checkpoint, through the real console entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from export.pipeline import ExportOptions, VerificationFailed, run_export
from llm_backend.model_config import EngineParams

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def llm_export(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def parameters(config_text: str) -> dict[str, str]:
    """The parameters map of a config.pbtxt as rendered by render_config_pbtxt."""
    import re
    found = re.findall(r'\{ key: "([^"]+)" value: \{ string_value: "((?:[^"\\]|\\.)*)" \} \}', config_text)
    return {k: v.encode().decode("unicode_escape") for k, v in found}


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported (fp32, verified) into a fresh repository."""
    repo = tmp_path_factory.mktemp("repo")
    proc = llm_export(tiny_checkpoint, "--name", "tiny", "--repository", repo, "--max-num-seqs", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return repo / "tiny", proc


def test_export_writes_config_and_version_1(exported):
    model_dir, _ = exported
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "llm"' in config
    assert "model_transaction_policy { decoupled: true }" in config
    assert "dynamic_batching {" in config and "max_queue_delay_microseconds" in config
    assert "max_queue_size" in config
    assert "kind: KIND_CPU" in config
    params = EngineParams.from_parameters(parameters(config))
    assert (params.precision, params.device, params.max_num_seqs) == ("fp32", "cpu", 4)
    assert (params.bos_token, params.eos_token) == ("<s>", "</s>")
    assert params.context_length == 256 and params.max_model_len == 256  # min(context, 2048)
    assert params.chat_template.startswith("{% for m in messages %}")
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]  # no staging left
    files = {p.name for p in (model_dir / "1").iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "config.json", "generation_config.json", "manifest.json"} <= files


def test_manifest_records_verification(exported):
    model_dir, proc = exported
    m = json.loads((model_dir / "1" / "manifest.json").read_text())
    assert m["precision"] == "fp32" and m["device"] == "cpu"
    assert len(m["source"]["weights"]["sha256"]) == 64
    assert {"onnxruntime", "onnxruntime-genai", "transformers", "torch"} <= set(m["tools"])
    assert m["date"]
    v = m["verification"]
    assert v["status"] == "passed", v
    assert v["logits"]["max_abs_diff"] <= v["logits"]["tolerance"]
    assert v["greedy"]["agreed"] == [v["greedy"]["tokens"]] * len(v["greedy"]["agreed"])  # fp32: exact
    # progress lines and the summary
    assert "[llm-export] verifying" in proc.stdout
    assert "verification  PASSED" in proc.stdout and "max abs diff" in proc.stdout


def test_second_export_is_version_2(exported, tiny_checkpoint):
    model_dir, _ = exported
    proc = llm_export(tiny_checkpoint, "--name", "tiny", "--repository", model_dir.parent, "--skip-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.pbtxt"]
    v = json.loads((model_dir / "2" / "manifest.json").read_text())["verification"]
    assert v["status"] == "skipped" and "--skip-verify" in v["reason"]
    assert "SKIPPED" in proc.stdout


def test_missing_tokenizer_is_refused(ckpt_copy, tmp_path):
    (ckpt_copy / "tokenizer.json").unlink()
    proc = llm_export(ckpt_copy, "--name", "x", "--repository", tmp_path / "repo")
    assert proc.returncode == 2
    assert "tokenizer" in proc.stderr and "tokenizer.json" in proc.stderr
    assert not (tmp_path / "repo" / "x").exists()  # no version directory, no model directory


def test_gpu_target_is_marked_unverified(tiny_checkpoint, tmp_path):
    proc = llm_export(tiny_checkpoint, "--name", "g", "--repository", tmp_path, "--device", "cuda",
                      "--precision", "fp16", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kind: KIND_GPU" in (tmp_path / "g" / "config.pbtxt").read_text()
    v = json.loads((tmp_path / "g" / "1" / "manifest.json").read_text())["verification"]
    assert v["status"] == "skipped" and "NOT verified" in v["reason"]
    assert "no CUDA execution provider" in v["reason"]      # the CPU build of onnxruntime here
    assert "verification  SKIPPED" in proc.stdout


def test_failed_verification_publishes_nothing(exported, tiny_checkpoint, tmp_path, monkeypatch):
    # A previous good version and its config must survive a failed export untouched.
    good, _ = exported
    repo = tmp_path / "repo"
    shutil.copytree(good / "1", repo / "m" / "1")
    shutil.copy(good / "config.pbtxt", repo / "m" / "config.pbtxt")
    before = (repo / "m" / "config.pbtxt").read_text()

    def reuse_build(checkpoint, out_dir, *args, **kwargs):  # the builder is not under test here
        shutil.copytree(good / "1", out_dir)
        return 0.0

    def failing(ckpt, version_dir, opts):
        return {"status": "failed", "reason": "forced by the test"}

    monkeypatch.setattr("export.pipeline.run_builder", reuse_build)
    with pytest.raises(VerificationFailed):
        run_export(tiny_checkpoint, ExportOptions(name="m", repository=repo, quiet=True,
                                                  max_model_len=64), verifier=failing)
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt"]
    assert (repo / "m" / "config.pbtxt").read_text() == before


def test_help_explains_the_options():
    proc = llm_export("--help")
    assert proc.returncode == 0
    for word in ("--name", "--repository", "--precision", "--device", "--chat-template",
                 "--no-chat-template", "--max-model-len", "--skip-verify", "verify", "atomic"):
        assert word in proc.stdout, word


def test_staging_of_a_killed_exporter_is_cleaned_up(tmp_path):
    from export.publish import STAGING_PREFIX, staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    model_dir = tmp_path / "m"
    (model_dir / f"{STAGING_PREFIX}{dead}-abc" / "version").mkdir(parents=True)
    with staging(model_dir) as stage:
        assert stage.name.startswith(f"{STAGING_PREFIX}{os.getpid()}-")
        assert [p.name for p in model_dir.iterdir()] == [stage.name]
    assert list(model_dir.iterdir()) == []
    with staging(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()  # nothing published: the directory it created is gone too


def test_head_size_8_is_padded_and_verified(tmp_path, tiny_builder):
    # hidden 32 / 4 heads: GroupQueryAttention's CPU kernel needs multiples of 16.
    ckpt = tiny_builder(tmp_path / "ckpt", hidden=32, heads=4)
    proc = llm_export(ckpt, "--name", "h8", "--repository", tmp_path / "repo", "--verify-tokens", "16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = tmp_path / "repo" / "h8" / "1"
    assert json.loads((version / "genai_config.json").read_text())["model"]["decoder"]["head_size"] == 16
    m = json.loads((version / "manifest.json").read_text())
    assert m["head_padding"] == {"head_dim": 8, "exported_head_dim": 16}
    assert m["verification"]["status"] == "passed"
    assert m["verification"]["greedy"]["agreed"] == [16, 16, 16]
