"""deploy/gpu_engine_check.py, the engine's GPU check, as its dry run on the CPU: the same
export for CUDA (fp16), verification, engine, greedy alone against batched and step
timings, with the CPU execution provider. A GPU lease is a few minutes, so the script
must work before one starts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_engine_check_runs_on_the_cpu(tmp_path):
    from export.default_model import fetch_default_model

    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "gpu_engine_check.py"), "--device", "cpu",
                           "--checkpoint", str(fetch_default_model()), "--quick", "--deadline", "500",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu-engine.json").read_text())
    assert all(stage["ok"] for stage in result["stages"].values()), result["stages"]
    assert result["verify"]["status"] == "passed"
    # the export itself, for CUDA, cannot be verified with this onnxruntime, and says so
    assert "no CUDA execution provider" in (tmp_path / "out" / "export.log").read_text()
    comparison = result["engine"]["comparison"]
    assert comparison["same_text"] == comparison["of"] == 16
    assert "Paris" in result["engine"]["alone"][0]["text"]
