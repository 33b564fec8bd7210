"""The adapter test helpers, importable as `adapter_testlib` here too."""
import importlib.util
import sys
from pathlib import Path

if "adapter_testlib" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "adapter_testlib", Path(__file__).parents[1] / "adapter" / "adapter_testlib.py")
    _lib = importlib.util.module_from_spec(_spec)
    sys.modules["adapter_testlib"] = _lib
    _spec.loader.exec_module(_lib)
