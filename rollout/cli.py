"""`llm-deploy`: blue/green and canary roll-outs of model versions on running Triton servers.

    llm-deploy status NAME
    llm-deploy promote NAME [--version N] [--canary P]   load N beside the serving version,
                                                          validate, switch (or send P%)
    llm-deploy promote NAME --finish                      a canary takes all traffic
    llm-deploy rollback NAME                              traffic back to the previous version
    llm-deploy retire NAME                                unload what takes no traffic

Exit codes: 0 done; 2 bad usage or set-up (nothing changed); 3 the candidate failed
validation (traffic untouched, candidate unloaded); 4 a server failed or timed out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from openai_adapter.accounts.limits import now_ms
from openai_adapter.accounts.store import SchemaOutOfDate, check_schema, make_engine

from . import routes
from .routes import RouteRow
from .triton_admin import TritonAdmin, TritonError, resolve_servers
from .validate import check_answers, compare_speed

OK, USAGE, INVALID, SERVER = 0, 2, 3, 4
# For the speed comparison when neither version recorded answers: a short greedy run.
_SPEED_PROMPT = {"max_tokens": 32, "match_tokens": 0, "cases": [{"prompt_ids": [1, 2, 3, 4, 5, 6, 7, 8],
                                                                  "expected_prefix": ""}]}
# The adapters read routes every ADAPTER_ROUTES_POLL_S (1 s): a pin written before a
# candidate is loaded must reach them first.
ADAPTERS_SEE_S = 2.5


class Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _say(msg: str) -> None:
    print(f"llm-deploy: {msg}", flush=True)


def _default_key() -> str:
    key = os.environ.get("TRITON_REPOSITORY_KEY", "").strip()
    if key:
        return key
    from stack.triton import KEY_FILE  # the key `make serve` and `make triton` use on this checkout
    return KEY_FILE.read_text().strip() if KEY_FILE.exists() else ""


def versions_on_disk(repository: Path, model: str) -> list[int]:
    d = repository / model
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def _manifest(repository: Path, model: str, version: int) -> dict:
    path = repository / model / str(version) / "manifest.json"
    if not path.exists():
        raise Failed(USAGE, f"{path} does not exist")
    return json.loads(path.read_text())


class Deploy:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = args.model
        self.repository = Path(args.repository)
        try:
            urls = resolve_servers(args.triton)
            grpcs = [u.split("://", 1)[-1] for u in resolve_servers(args.triton_grpc)] if args.triton_grpc else []
        except (ValueError, OSError) as err:
            raise Failed(USAGE, f"--triton {args.triton!r}: {err}") from None
        if grpcs and len(grpcs) != len(urls):
            raise Failed(USAGE, f"--triton-grpc has {len(grpcs)} addresses and --triton {len(urls)}")
        self.servers = [TritonAdmin(u, args.key, args.timeout, grpcs[i] if grpcs else "") for i, u in enumerate(urls)]
        if not self.servers:
            raise Failed(USAGE, "no Triton server given (--triton)")
        self.engine = make_engine(args.database_url)
        try:
            check_schema(self.engine)
        except SchemaOutOfDate as err:
            raise Failed(USAGE, str(err)) from None

    # -- helpers ------------------------------------------------------------------
    def loaded(self) -> dict[str, set[int]]:
        try:
            return {s.url: s.loaded_versions(self.model) for s in self.servers}
        except TritonError as err:
            raise Failed(SERVER, str(err)) from None

    def serve_exactly(self, versions: list[int]) -> None:
        """Every server loads exactly `versions` (new ones load, the rest unload once their
        requests are done). The repository's config.pbtxt says so first, and the servers
        load from it: the repository stays the truth, also for a server that restarts."""
        from export.publish import set_served_versions
        config = self.repository / self.model / "config.pbtxt"
        before = config.read_text()
        set_served_versions(self.repository / self.model, versions)
        try:
            for s in self.servers:
                s.load(self.model)
        except TritonError as err:
            # Never leave the store naming a version that cannot load: every Triton that
            # (re)starts would refuse to come up. Back to what it said, and reload that.
            config.write_text(before)
            for s in self.servers:
                try:
                    s.load(self.model)
                except TritonError:
                    pass
            raise Failed(SERVER, f"loading versions {versions}: {err}") from None

    def current_route(self, first_ok: bool = False) -> Optional[RouteRow]:
        """The route, written now if the model has none (pinning what serves today).
        None (with `first_ok`) when no server has any version of it loaded: a first
        promotion, after the servers started on a store without this model."""
        route = routes.get(self.engine, self.model)
        if route is not None:
            return route
        loaded = self.loaded()
        common = set.intersection(*loaded.values())
        if not common:
            if first_ok and not any(loaded.values()):
                return None
            raise Failed(USAGE, f"no version of {self.model} is loaded on every server")
        route = RouteRow(self.model, max(common), now_ms())
        routes.put(self.engine, route)
        _say(f"{self.model}: version {route.serving} pinned as the serving version; waiting "
             f"{ADAPTERS_SEE_S:g} s for the adapters to see it")
        time.sleep(ADAPTERS_SEE_S)
        return route

    # -- commands -----------------------------------------------------------------
    def status(self) -> int:
        route = routes.get(self.engine, self.model)
        out = {"model": self.model, "on_disk": versions_on_disk(self.repository, self.model),
               "loaded": {url: sorted(v) for url, v in self.loaded().items()}}
        if route is None:
            out["traffic"] = "no route: the newest loaded version"
        else:
            out["serving"] = {"version": route.serving, "since": _when(route.serving_since_ms)}
            out["previous"] = route.previous
            if route.canary is not None:
                out["canary"] = {"version": route.canary, "percent": route.canary_percent,
                                 "since": _when(route.canary_since_ms)}
                out["canary_stats"] = routes.version_stats(self.engine, self.model, route.canary_since_ms or 0)
            else:
                out["stats_since_switch"] = routes.version_stats(self.engine, self.model, route.serving_since_ms)
        print(json.dumps(out, indent=2))
        return OK

    def promote(self) -> int:
        a = self.args
        route = self.current_route(first_ok=not a.finish)
        if route is None:
            return self.first_promotion()
        if a.finish:
            if route.canary is None:
                raise Failed(USAGE, f"{self.model} has no canary to finish")
            routes.put(self.engine, RouteRow(self.model, route.canary, now_ms(), previous=route.serving))
            _say(f"{self.model}: version {route.canary} takes all traffic (was the canary; "
                 f"version {route.serving} stays loaded for rollback)")
            return OK
        on_disk = versions_on_disk(self.repository, self.model)
        candidate = a.version if a.version is not None else (max(on_disk) if on_disk else None)
        if candidate is None or candidate not in on_disk:
            raise Failed(USAGE, f"version {candidate} of {self.model} is not in {self.repository / self.model}")
        if candidate == route.serving:
            _say(f"{self.model}: version {candidate} already takes the traffic")
            return OK
        probes = self.recorded_answers(candidate)
        keep = [v for v in (route.serving, route.previous) if v is not None]
        _say(f"{self.model}: loading version {candidate} beside {route.serving} on {len(self.servers)} server(s)")
        self.serve_exactly(keep + [candidate])
        problems, figures = [], {}
        try:
            for s in self.servers:
                s.wait_ready(self.model, candidate, a.load_timeout)
            for s in self.servers:
                if probes:
                    problems += [f"{s.url}: {p}" for p in check_answers(s.grpc_url, self.model, candidate, probes)]
            if not problems:
                s = self.servers[0]
                slow, figures = compare_speed(s.grpc_url, self.model, route.serving, candidate,
                                              probes or self.recorded_answers(route.serving, required=False)
                                              or _SPEED_PROMPT, a.speed_turns, a.max_slowdown)
                problems += slow
        except TritonError as err:
            problems.append(str(err))
        for version, f in figures.items():
            _say(f"  version {version}: time to first token {f['ttft_ms']} ms, decode {f['decode_tok_s']} tok/s")
        if problems:
            self.serve_exactly(keep)
            _say(f"{self.model}: version {candidate} REFUSED; traffic stays on version {route.serving}; "
                 f"version {candidate} unloaded:")
            for p in problems:
                _say(f"  - {p}")
            return INVALID
        answers = (f"{len(probes['cases'])} recorded answers came back (first {probes['match_tokens']} tokens)"
                   if probes else "answers NOT checked (--skip-answers)")
        _say(f"{self.model}: version {candidate} validated: {answers}, speed within {1 + a.max_slowdown:.2f}x")
        if a.canary is not None:
            routes.put(self.engine, RouteRow(self.model, route.serving, route.serving_since_ms, route.previous,
                                             candidate, a.canary, now_ms()))
            _say(f"{self.model}: {a.canary}% of new requests go to version {candidate}; watch "
                 f"`llm-deploy status {self.model}`, then `promote --finish` or `rollback`")
            return OK
        routes.put(self.engine, RouteRow(self.model, candidate, now_ms(), previous=route.serving))
        self.serve_exactly([route.serving, candidate])  # the one before the previous goes
        _say(f"{self.model}: version {candidate} takes the traffic (every adapter within 2 s); version "
             f"{route.serving} stays loaded for `llm-deploy rollback {self.model}`")
        return OK

    def recorded_answers(self, version: int, required: bool = True) -> Optional[dict]:
        probes = (_manifest(self.repository, self.model, version).get("verification") or {}).get("probes")
        if probes or not required:
            return probes
        if self.args.skip_answers:
            _say(f"{self.model}: version {version} has no recorded answers (an export for a GPU cannot be "
                 "verified on a machine without one): its answers are NOT checked, only its speed")
            return None
        raise Failed(USAGE, f"version {version} has no recorded answers in its manifest (verification.probes): "
                            "export it again with this llm-export, or promote with --skip-answers (an export "
                            "for a GPU, verified by other means)")

    def first_promotion(self) -> int:
        """No server has the model loaded (the servers started before it was exported):
        load the version, check its answers, and give it the traffic."""
        a = self.args
        on_disk = versions_on_disk(self.repository, self.model)
        candidate = a.version if a.version is not None else (max(on_disk) if on_disk else None)
        if candidate is None or candidate not in on_disk:
            raise Failed(USAGE, f"version {candidate} of {self.model} is not in {self.repository / self.model}")
        probes = self.recorded_answers(candidate)
        config = self.repository / self.model / "config.pbtxt"
        before = config.read_text()
        _say(f"{self.model}: no version is loaded yet; loading version {candidate} on {len(self.servers)} server(s)")
        self.serve_exactly([candidate])
        problems = []
        try:
            for s in self.servers:
                s.wait_ready(self.model, candidate, a.load_timeout)
                if probes:
                    problems += [f"{s.url}: {p}" for p in check_answers(s.grpc_url, self.model, candidate, probes)]
        except TritonError as err:
            problems.append(str(err))
        if problems:
            config.write_text(before)
            for s in self.servers:
                try:
                    s.unload(self.model)
                except TritonError:
                    pass
            _say(f"{self.model}: version {candidate} REFUSED and unloaded:")
            for p in problems:
                _say(f"  - {p}")
            return INVALID
        routes.put(self.engine, RouteRow(self.model, candidate, now_ms()))
        _say(f"{self.model}: version {candidate} takes the traffic (the first version: no speed to compare)")
        return OK

    def rollback(self) -> int:
        route = routes.get(self.engine, self.model)
        if route is None:
            raise Failed(USAGE, f"{self.model} has no route: nothing was promoted")
        if route.canary is not None:
            routes.put(self.engine, RouteRow(self.model, route.serving, route.serving_since_ms, route.previous))
            _say(f"{self.model}: canary version {route.canary} takes no more traffic; version {route.serving} "
                 "takes all of it (`retire` unloads the canary)")
            return OK
        if route.previous is None:
            raise Failed(USAGE, f"{self.model}: no previous version to go back to")
        loaded = set.intersection(*self.loaded().values())
        if route.previous not in loaded:
            raise Failed(USAGE, f"{self.model}: the previous version {route.previous} is no longer loaded "
                                f"(retired); promote it again with --version {route.previous}")
        routes.put(self.engine, RouteRow(self.model, route.previous, now_ms(), previous=route.serving))
        _say(f"{self.model}: traffic back on version {route.previous} (every adapter within 2 s); version "
             f"{route.serving} stays loaded")
        return OK

    def retire(self) -> int:
        route = self.current_route()
        keep = [route.serving] + ([route.canary] if route.canary is not None else [])
        before = self.loaded()
        going = sorted(set().union(*before.values()) - set(keep))
        if not going:
            _say(f"{self.model}: nothing to retire (loaded: {keep})")
            return OK
        self.serve_exactly(keep)
        if route.previous in going:
            routes.put(self.engine, RouteRow(self.model, route.serving, route.serving_since_ms, None,
                                             route.canary, route.canary_percent, route.canary_since_ms))
        # Triton takes no new request for them at once and unloads each once its requests
        # are done. Wait for that; a version still UNLOADING at the deadline holds requests
        # Triton never ended (seen with Triton 2.51 after some clients' streams): it takes
        # no traffic, but its memory is not given back until tritonserver restarts.
        deadline = time.monotonic() + self.args.timeout
        while self._still_there(going, ("READY", "UNLOADING")):
            if self._still_there(going, ("READY",)) or time.monotonic() < deadline:
                if time.monotonic() > deadline:
                    raise Failed(SERVER, f"versions {going} still take requests after {self.args.timeout:g} s")
                time.sleep(0.25)
                continue
            _say(f"{self.model}: versions {going} take no requests any more, but Triton has not finished "
                 f"unloading them after {self.args.timeout:g} s (requests it never ended); their memory comes "
                 "back when tritonserver restarts. Serving " + str(keep))
            return OK
        _say(f"{self.model}: versions {going} unloaded once their requests finished; serving {keep}")
        return OK

    def _still_there(self, versions: list[int], states: tuple[str, ...]) -> bool:
        return any(st in states for s in self.servers for v, st in s.states(self.model).items() if v in versions)


def _when(ms: Optional[int]) -> Optional[str]:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-deploy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--triton", default=os.environ.get("LLM_DEPLOY_TRITON", "http://127.0.0.1:8000"),
                   help="Triton HTTP URLs, comma-separated, or dns:HOST:PORT for every address of HOST "
                        "(a headless Service); gRPC is the port above (env LLM_DEPLOY_TRITON)")
    p.add_argument("--triton-grpc", default=os.environ.get("LLM_DEPLOY_TRITON_GRPC", ""),
                   help="their gRPC addresses in the same order (default: each HTTP port + 1), or dns:HOST:PORT "
                        "(env LLM_DEPLOY_TRITON_GRPC)")
    p.add_argument("--repository", default=os.environ.get("LLM_DEPLOY_REPOSITORY", "model_repository"),
                   help="the model repository the servers read (versions on disk, manifests)")
    p.add_argument("--database-url", default=os.environ.get("ADAPTER_DATABASE_URL", "sqlite:///data/accounts.db"),
                   help="the adapters' database, where routes live (env ADAPTER_DATABASE_URL)")
    p.add_argument("--key", default=None, help="Triton's repository key (env TRITON_REPOSITORY_KEY, or the key "
                                               "file of `make serve`)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for one server call or an unload")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("status", "rollback", "retire"):
        sub.add_parser(name).add_argument("model")
    pr = sub.add_parser("promote")
    pr.add_argument("model")
    pr.add_argument("--version", type=int, help="the version to promote (default: the newest on disk)")
    pr.add_argument("--canary", type=int, metavar="P", choices=range(1, 100), help="send P%% of new requests")
    pr.add_argument("--finish", action="store_true", help="the canary takes all traffic")
    pr.add_argument("--skip-answers", action="store_true",
                    help="promote a version without recorded answers (an export for a GPU, which cannot be "
                         "verified on a machine without one): only its speed is checked")
    pr.add_argument("--max-slowdown", type=float, default=0.5,
                    help="the candidate may be this much slower (0.5: 1.5x the time to first token, 1/1.5 "
                         "the decode rate)")
    pr.add_argument("--speed-turns", type=int, default=3, help="timed requests per version, in turns")
    pr.add_argument("--load-timeout", type=float, default=600.0, help="seconds for the candidate to load")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.key is None:
        args.key = _default_key()
    try:
        deploy = Deploy(args)
        return getattr(deploy, args.command)()
    except Failed as err:
        _say(str(err))
        return err.code
    except TritonError as err:
        _say(str(err))
        return SERVER


if __name__ == "__main__":
    sys.exit(main())
