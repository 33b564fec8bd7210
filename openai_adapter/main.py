"""`openai-adapter` / `python -m openai_adapter.main`: settings, logging, uvicorn, SIGTERM drain."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import uvicorn

from .app import create_app
from .settings import Settings

log = logging.getLogger("openai_adapter")


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="openai-adapter", description="OpenAI-compatible API over Triton "
                                "(every flag has an environment variable; see openai_adapter/README.md)")
    env_names = Settings.env_names()
    for name, f in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = env_names[name]
        if isinstance(f.default, list):
            extra = "; prefer the variable: flags show in ps" if name in Settings.SECRET else ""
            p.add_argument(flag, dest=name, default=None, help=f"comma-separated (env {env}{extra})")
        elif isinstance(f.default, bool):
            p.add_argument(flag, dest=name, default=None, choices=["true", "false"], help=f"env {env}")
        else:
            extra = "; prefer the variable: flags show in ps" if name in Settings.SECRET else ""
            p.add_argument(flag, dest=name, default=None, type=type(f.default), help=f"env {env}{extra}")
    args = vars(p.parse_args(argv))
    # Flags win over the environment and are validated by the same types.
    return Settings.from_env(os.environ, **args)


class _Server(uvicorn.Server):
    """On SIGTERM/SIGINT: answer 503 to new requests while in-flight ones finish."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:
        deps = getattr(self._app.state, "deps", None)
        if deps is not None and not deps.draining:
            deps.draining = True
            log.info("signal %s: draining (grace %.0f s)", sig, deps.settings.shutdown_grace_s)
        # Like uvicorn's, minus re-raising the signal at exit: a drained shutdown exits 0.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv)
    except ValueError as err:
        print(f"openai-adapter: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s, access_log=settings.access_log,
                            lifespan="on")
    server = _Server(config, app)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
