"""deploy/gpu_check.py, the script a GPU lease runs, as a dry run on the CPU: the same
tritonserver, adapter, prompts and load, so it works before a GPU is at hand. Its first
run on a GPU failed on a setting nothing had exercised (the adapter lacked the Triton
repository key): this test runs it without that key in its environment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_REPOSITORY_KEY"}
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "gpu_check.py"), "--device", "cpu",
                           "--streams", "4", "--tokens", "16", "--out", str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (result_file,) = tmp_path.glob("gpu-check-*.json")
    result = json.loads(result_file.read_text())
    assert result["device"] == "cpu" and result["streams"] == 4
    assert 0 < result["output_tokens"] <= 4 * 16 and result["throughput_tok_s"] > 0   # answers may end early
    assert len(result["single_stream_ttft_ms"]) == 8        # every fixed prompt answered
    assert "Paris" in proc.stdout                          # "What is the capital of France?"
