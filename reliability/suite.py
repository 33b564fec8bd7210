"""The suite: start the stack the way `make serve` does, run each part under its own hard
time bound, record what every client got, and stop the stack as Ctrl-C would."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import psutil

from .faults import FAULTS, run_fault
from .fuzz import schemathesis_run
from .hostile import hostile
from .load import cancellation_flood, many_streams
from .profile import Profile, check
from .stack import REPO_ROOT, ServeStack

Part = Callable[[ServeStack, Profile], Awaitable[dict[str, Any]]]


def _fault_part(name: str) -> Part:
    fault = next(f for f in FAULTS if f.name == name)
    return lambda stack, p: run_fault(stack, p, fault)


PARTS: dict[str, Part] = {
    "load": many_streams,
    "cancellation_flood": cancellation_flood,
    "schemathesis": schemathesis_run,
    "hostile": hostile,
    **{f.name: _fault_part(f.name) for f in FAULTS},
}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version()}


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def others(stack: ServeStack, interval: float = 1.0) -> dict[str, Any]:
    """The machine's load, and what else used the CPU (not the stack, not this suite)."""
    ours = {os.getpid()} | {p.pid for p in stack.processes().values()}
    procs = [p for p in psutil.process_iter() if p.pid not in ours]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval)
    busy: dict[str, list[float]] = {}
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            if pct >= 15:
                busy.setdefault(" ".join(p.cmdline())[:90] or p.name(), []).append(pct)
        except psutil.Error:
            pass
    return {"loadavg_1m": round(os.getloadavg()[0], 2),
            "busy": [f"{cmd} ({len(pcts)} x, {sum(pcts):.0f}% CPU)" if len(pcts) > 1 else f"{cmd} ({pcts[0]:.0f}% CPU)"
                     for cmd, pcts in sorted(busy.items(), key=lambda kv: -sum(kv[1]))[:5]]}


async def run_suite(p: Profile, workdir: Path, parts: Optional[list[str]] = None,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    names = parts or list(PARTS)
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
        "machine": machine(), "profile": p.as_dict(), "parts": {}, "memory": {}, "machine_load": {},
    }
    stack = ServeStack(workdir, env=p.stack_env())
    say(f"reliability: starting make serve (python -m stack.serve) on port {stack.port}")
    report["stack"] = {"command": "python -m stack.serve", "settings": p.stack_env(),
                       "ready_after_s": round(await asyncio.to_thread(stack.start), 1), "logs": stack.logs}
    report["memory"]["at start"] = stack.memory()
    try:
        for name in names:
            ready = await asyncio.to_thread(stack.wait_ready, p.recover_timeout_s)
            report["machine_load"][name] = await asyncio.to_thread(others, stack)
            say(f"reliability: {name} (load {report['machine_load'][name]['loadavg_1m']})")
            t = time.monotonic()
            try:
                if ready is None:
                    raise RuntimeError(f"the stack was not ready within {p.recover_timeout_s:g} s before this part")
                async with asyncio.timeout(p.part_budget_s):
                    result = await PARTS[name](stack, p)
            except TimeoutError:
                result = {"checks": [check(f"finished within its bound of {p.part_budget_s:g} s", False)]}
            except Exception as e:  # record and go on: the next parts still say something
                result = {"checks": [check("ran", False, f"{type(e).__name__}: {e}")],
                          "traceback": traceback.format_exc()}
            result["part_seconds"] = round(time.monotonic() - t, 1)
            report["parts"][name] = result
            report["memory"][f"after {name}"] = stack.memory()
            failed = [c["check"] + (" (target)" if c["target"] else "") for c in result.get("checks", [])
                      if not c["ok"]]
            say(f"reliability: {name}: {result['part_seconds']} s, "
                + ("all checks passed" if not failed else f"FAILED: {'; '.join(failed)}"))
    finally:
        stop = await asyncio.to_thread(stack.stop, p.grace_s + 60)
        report["stop"] = {**stop, "checks": [
            check("make serve stops on SIGTERM with exit code 0", stop.get("exit_code") == 0, stop.get("exit_code")),
            check(f"within the grace period + 10 s ({p.grace_s + 10:g} s)", stop.get("seconds", 1e9) <= p.grace_s + 10,
                  f"{stop.get('seconds')} s"),
            check("no process left behind", not stop.get("left_behind"), stop.get("left_behind")),
        ]}
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["checks"] = [{"part": name, **c} for name, r in [*report["parts"].items(), ("stop", report["stop"])]
                        for c in r.get("checks", [])]
    report["passed"] = all(c["ok"] for c in report["checks"] if not c["target"])
    return report
