"""Run the real adapter app under uvicorn with the tests' FakeClient as its model.
Settings come from the environment, as for `openai-adapter`."""
import importlib.util
import logging
import sys
from pathlib import Path

import uvicorn

_spec = importlib.util.spec_from_file_location("adapter_testlib",
                                               Path(__file__).parents[1] / "adapter" / "adapter_testlib.py")
_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lib)

from openai_adapter.app import create_app  # noqa: E402
from openai_adapter.settings import Settings  # noqa: E402

if __name__ == "__main__":
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, client=_lib.FakeClient())
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log)
    sys.exit(0)
