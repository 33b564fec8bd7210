"""Schemathesis over the adapter's own /openapi.json, against the running stack.

Its CLI runs with a fixed seed and a bounded number of examples per operation, its
generation phases (coverage: boundary and type-violating values of every field;
fuzzing: random valid and invalid bodies; stateful), and these checks:

    not_a_server_error            no 5xx
    status_code_conformance       every status is one the document lists
    content_type_conformance      and has a documented content type
    response_headers_conformance  and the documented headers (Retry-After on 429/503)
    response_schema_conformance   bodies match the documented schemas
    negative_data_rejection       a request that violates the schema is refused (4xx)
    missing_required_header, unsupported_method   (405 for methods a path does not have)

Not `positive_data_acceptance`: the API accepts fields it cannot honour (`tools`,
`logprobs`, `n` above ADAPTER_MAX_N, a chat template that refuses a role) only to refuse
them with a 400 that names the field, which JSON Schema cannot express; the document
lists that 400.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .client import count
from .profile import Profile, check
from .stack import REPO_ROOT, ServeStack

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method")
SEED = 14


def command(stack: ServeStack, p: Profile, report: Path) -> list[str]:
    return [sys.executable, "-m", "schemathesis.cli", "run", f"{stack.url}/openapi.json",
            "--checks", CHECKS, "--max-examples", str(p.fuzz_examples), "--seed", str(SEED),
            "--workers", "1", "--request-timeout", "60", "--generation-database", "none",
            "--report", "json", "--report-json-path", str(report), "--no-color", "--output-truncate", "true"]


async def schemathesis_run(stack: ServeStack, p: Profile) -> dict[str, Any]:
    report, log = stack.workdir / "schemathesis.json", stack.workdir / "schemathesis-statuses.log"
    for f in (report, log, stack.workdir / "schemathesis.out"):
        f.unlink(missing_ok=True)
    env = dict(os.environ, SCHEMATHESIS_HOOKS="reliability.schemathesis_hooks", RELIABILITY_MODEL=stack.model,
               RELIABILITY_FUZZ_LOG=str(log),
               PYTHONPATH=os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))))
    cmd = command(stack, p, report)
    t = time.monotonic()
    out_path = stack.workdir / "schemathesis.out"
    with open(out_path, "wb") as out:
        # In the work directory: schemathesis keeps its cache (.schemathesis/) where it runs.
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=stack.workdir, env=env, stdout=out, stderr=out)
        try:
            await asyncio.wait_for(proc.wait(), p.fuzz_timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    seconds = time.monotonic() - t
    doc = json.loads(report.read_text()) if report.exists() else {}
    statuses = log.read_text().splitlines() if log.exists() else []
    by_op: dict[str, dict[str, int]] = {}
    for line in statuses:
        method, path, status = line.rsplit(" ", 2)
        by_op.setdefault(f"{method} {path}", {})
        by_op[f"{method} {path}"][status] = by_op[f"{method} {path}"].get(status, 0) + 1
    server_errors = [line for line in statuses if line.rsplit(" ", 1)[1].startswith("5")]
    failures = doc.get("failures", [])
    errors = doc.get("errors", [])
    output = out_path.read_text(errors="replace")
    result = {
        "command": " ".join(["schemathesis", *cmd[3:]]).replace(stack.url, "http://ADAPTER")
                                                           .replace(str(report), "REPORT.json"),
        "seconds": round(seconds, 1), "exit_code": proc.returncode,
        "test_cases": (doc.get("test_cases") or {}).get("generated"), "requests": len(statuses),
        "statuses": dict(sorted(count(line.rsplit(" ", 1)[1] for line in statuses).items())),
        "by_operation": {op: dict(sorted(v.items())) for op, v in sorted(by_op.items())},
        "failures": failures, "errors": errors, "phases": doc.get("phases"),
        "output_tail": output[-4000:] if failures or errors or proc.returncode else "",
    }
    result["checks"] = [
        check("schemathesis ran to its end", doc.get("complete") is True and proc.returncode is not None,
              f"exit {proc.returncode}"),
        check("no 5xx", not server_errors, count(server_errors) or ""),
        check("no failed check (status, content type, headers, body schema, invalid input refused)", not failures,
              "; ".join(f"{f.get('code')} {f.get('title')} x{f.get('count')} {f.get('operations')}" for f in failures)),
        check("no run error", not errors, str(errors)[:300]),
    ]
    return result
