"""`openai-adapter` / `python -m openai_adapter.main`: settings, logging, uvicorn, SIGTERM drain."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from .app import create_app
from .drain import margin_s
from .http11 import OpenAIH11Protocol
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
    """uvicorn whose first SIGTERM/SIGINT drains (openai_adapter/drain.py) and whose
    shutdown starts only once the drain is over; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app
        self.forced_by: int | None = None
        self._said: set[str] = set()

    def _drain(self):
        deps = getattr(self._app.state, "deps", None)
        return None if deps is None else deps.drain

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler: set attributes only (on_tick logs and acts).
        drain = self._drain()
        if drain is not None and not self.should_exit and drain.begin():
            return
        if drain is None and not self.should_exit:
            self.should_exit = True  # still starting: stop as uvicorn would
            return
        self.should_exit = self.force_exit = True
        self.forced_by = sig

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        drain = self._drain()
        if drain is None or not drain.draining:
            return False
        self._say("begin", logging.INFO, "draining: not ready from now on; new requests get 503 after %g s; "
                  "in-flight requests have until %g s after the signal", drain.delay_s, drain.grace_s)
        done = drain.step()
        if drain.ended:
            self._say("end", logging.WARNING, "grace period nearly over: ending %d requests still running "
                      "(streams get an error event and [DONE])", drain.active)
        if done:
            self._say("done", logging.INFO, "drained (%d requests still running): shutting down", drain.active)
        return done

    def _say(self, key: str, level: int, msg: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)


def uvicorn_config(settings: Settings, app) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          # What uvicorn's own shutdown may still wait for requests: the drain
                          # has given them the grace period already, less this margin.
                          timeout_graceful_shutdown=margin_s(settings.shutdown_grace_s),
                          access_log=settings.access_log, lifespan="on",
                          http=OpenAIH11Protocol)  # its own 400s in the OpenAI body too


def serve(settings: Settings, app) -> int:
    """Run `app` under uvicorn until a signal and its drain; the process's exit code."""
    config = uvicorn_config(settings, app)
    server = _Server(config, app)
    server.run()
    if server.forced_by is not None:
        log.warning("signal %d during the drain: exited at once", server.forced_by)
        return 128 + server.forced_by
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_args(argv)
    except ValueError as err:
        print(f"openai-adapter: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings, create_app(settings))


if __name__ == "__main__":
    sys.exit(main())
