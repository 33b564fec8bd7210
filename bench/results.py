"""Where a benchmark run is written: `<dir>/<name>-<time>.json` and `.md`, one pair a run."""
from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_run(out_dir: Path, name: str, data, markdown: str) -> Path:
    """Write the run's data (JSON) and its Markdown, print where; returns their common
    path without a suffix, for files that go beside them (a plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(f"{base}.json").write_text(json.dumps(data, indent=1, default=str))
    Path(f"{base}.md").write_text(markdown)
    shown = base.relative_to(ROOT) if base.is_relative_to(ROOT) else base
    print(f"\nwritten: {shown}.json, .md")
    return base
