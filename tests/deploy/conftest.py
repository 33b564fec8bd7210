"""Make the shared helpers importable as `deploy_testlib` (tests import by path)."""
import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("deploy_testlib", Path(__file__).with_name("deploy_testlib.py"))
_lib = importlib.util.module_from_spec(_spec)
sys.modules["deploy_testlib"] = _lib
_spec.loader.exec_module(_lib)
