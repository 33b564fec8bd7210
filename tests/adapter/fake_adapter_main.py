"""`openai_adapter.main.serve` (the real uvicorn server with its SIGTERM drain) over the
tests' FakeClient: a real process and real sockets, no tritonserver. Run as a script it
serves (settings from the environment, as for `openai-adapter`); imported, it offers
`FakeModelAdapterProcess` to start one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    import importlib.util
    import logging

    _spec = importlib.util.spec_from_file_location("adapter_testlib", Path(__file__).with_name("adapter_testlib.py"))
    _lib = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_lib)

    from openai_adapter.app import create_app
    from openai_adapter.main import serve
    from openai_adapter.settings import Settings

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(serve(settings, create_app(settings, client=_lib.FakeClient())))

from adapter_testlib import REPO_ROOT, AdapterProcess  # type: ignore[import-not-found]  # noqa: E402


class FakeModelAdapterProcess(AdapterProcess):
    """This script in its own process, on a free port, with its own SQLite ledger."""

    def __init__(self, log_path: Path, **env: Any) -> None:
        super().__init__("127.0.0.1:1", "http://127.0.0.1:1", log_path, ADAPTER_ACCESS_LOG="false", **env)

    def start(self) -> "FakeModelAdapterProcess":
        self.proc = subprocess.Popen([sys.executable, __file__], env=self.env, cwd=REPO_ROOT,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        return self
