"""Make the shared fakes importable as `backend_testlib` (tests import by path), and the
TritonSender fixture."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("backend_testlib", Path(__file__).with_name("backend_testlib.py"))
_lib = importlib.util.module_from_spec(_spec)
sys.modules["backend_testlib"] = _lib
_spec.loader.exec_module(_lib)


@pytest.fixture
def triton_sender(monkeypatch):
    """model.TritonSender over a stand-in for triton_python_backend_utils (FINAL is 1)."""

    class TritonError:
        INVALID_ARG, UNAVAILABLE, CANCELLED, INTERNAL = range(4)

        def __init__(self, message, code):
            self.message, self.code = message, code

    pb = types.SimpleNamespace(TRITONSERVER_RESPONSE_COMPLETE_FINAL=1, TritonError=TritonError,
                               Tensor=lambda name, value: (name, value), InferenceResponse=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "llm_backend.model", raising=False)
    from llm_backend.model import TritonSender
    return TritonSender
