"""bench.settings: the config each setting is served with, and the CPU it counts."""
import os
import re
import subprocess
import sys
import time

import pytest

from bench.settings import configured, cpu_seconds
from llm_backend.model_config import EngineParams, render_config_pbtxt


def test_configured_sets_each_parameter_and_links_the_version(tmp_path):
    src = tmp_path / "src"
    (src / "1").mkdir(parents=True)
    (src / "config.pbtxt").write_text(render_config_pbtxt("m", EngineParams()))
    repo = configured(src, tmp_path / "repo", {"stream_interval": "1", "intra_op_threads": "2"})
    model = next(repo.iterdir())
    params = EngineParams.from_parameters(_parameters((model / "config.pbtxt").read_text()))
    assert (params.stream_interval, params.intra_op_threads) == (1, 2)
    assert params.max_num_seqs == EngineParams().max_num_seqs
    assert os.readlink(model / "1") == str(src / "1")
    with pytest.raises(SystemExit, match="no no_such_knob parameter"):
        configured(src, tmp_path / "repo2", {"no_such_knob": "1"})
    # an engine setting the export's config predates is added
    (src / "config.pbtxt").write_text(re.sub(r'  \{ key: "max_prefill_batch"[^\n]*\n', "",
                                             render_config_pbtxt("m", EngineParams())))
    assert "max_prefill_batch" not in (src / "config.pbtxt").read_text()
    repo = configured(src, tmp_path / "repo3", {"max_prefill_batch": "1"})
    model = next(repo.iterdir())
    assert EngineParams.from_parameters(_parameters((model / "config.pbtxt").read_text())).max_prefill_batch == 1


def _parameters(pbtxt: str) -> dict[str, str]:
    import re
    return dict(re.findall(r'key: "([^"]+)" value: \{ string_value: "([^"]*)" \}', pbtxt))


def test_cpu_seconds_counts_the_children():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {busy!r}])\n"
                               "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while cpu_seconds(parent.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cpu_seconds(parent.pid) >= 0.3   # the parent itself only sleeps (and starts Python)
        assert cpu_seconds(parent.pid, children=False) < 0.25
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()
