"""Make the shared helpers importable as `adapter_testlib` (tests import by path)."""
import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("adapter_testlib", Path(__file__).with_name("adapter_testlib.py"))
_lib = importlib.util.module_from_spec(_spec)
sys.modules["adapter_testlib"] = _lib
_spec.loader.exec_module(_lib)
