"""onnxruntime's threads when the config says 0: every core but one, at least one."""
from __future__ import annotations

from llm_backend import decoder


def test_default_threads_leave_one_core_to_the_rest(monkeypatch):
    for cores, threads in ((1, 1), (2, 1), (16, 15)):
        monkeypatch.setattr(decoder, "cpu_count", lambda c=cores: c)
        assert decoder.default_threads() == threads
