"""The whole suite: one Triton repository key, shared by every tritonserver the tests
start and every adapter process they launch (both read TRITON_REPOSITORY_KEY), and the
adapter test helpers importable as `adapter_testlib` from every test package."""
import importlib.util
import os
import secrets
import sys
from pathlib import Path

os.environ.setdefault("TRITON_REPOSITORY_KEY", "test-" + secrets.token_urlsafe(16))

if "adapter_testlib" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("adapter_testlib",
                                                   Path(__file__).parent / "adapter" / "adapter_testlib.py")
    _lib = importlib.util.module_from_spec(_spec)
    sys.modules["adapter_testlib"] = _lib
    _spec.loader.exec_module(_lib)
