"""`python -m reliability [--short] [--parts load,hostile,...]`: run the suite against the
real stack, write docs/reliability.md and bench/results/reliability-<time>.json; exit 1
if a check failed."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

from .profile import FULL, SHORT
from .report import render
from .stack import REPO_ROOT
from .suite import PARTS, run_suite


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reliability", description=__doc__)
    ap.add_argument("--short", action="store_true", help="the short profile make test runs (a few clients)")
    ap.add_argument("--parts", default="", help=f"comma-separated, in this order: {','.join(PARTS)}")
    ap.add_argument("--markdown", default=str(REPO_ROOT / "docs" / "reliability.md"),
                    help="where to write the report (default docs/reliability.md; '' for none)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p] or None
    unknown = set(parts or []) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    profile = SHORT if args.short else FULL
    with tempfile.TemporaryDirectory(prefix="reliability-") as work:
        report = asyncio.run(run_suite(profile, Path(work), parts))
    command = "make reliability" if not (args.short or parts) else "python -m reliability " + " ".join(
        (["--short"] if args.short else []) + ([f"--parts {args.parts}"] if parts else []))
    results = REPO_ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = results / f"reliability-{stamp}.json"
    json_path.write_text(json.dumps({"command": command, **report}, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(render(report, command))
    guarantees = [c for c in report["checks"] if not c["target"]]
    targets = [c for c in report["checks"] if c["target"]]
    print(f"reliability: {sum(c['ok'] for c in guarantees)} of {len(guarantees)} checks passed, "
          f"{sum(c['ok'] for c in targets)} of {len(targets)} targets met, in {report['seconds'] / 60:.1f} min; "
          f"{json_path.relative_to(REPO_ROOT)}" + (f", {args.markdown}" if args.markdown else ""))
    for c in report["checks"]:
        if not c["ok"]:
            print(f"  {'missed target' if c['target'] else 'FAILED'} {c['part']}: {c['check']} ({c['detail']})",
                  file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
