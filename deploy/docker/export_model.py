"""The export image's build step: export a checkpoint of the build context, or the
default model, into a model repository.

    export_model.py [--checkpoint PATH] [--context DIR] -- LLM-EXPORT FLAGS

The checkpoint path is handed to llm-export in process. (The former shell step took it
from `$(python -m export.default_model)`, whose standard output also carries progress
lines on a first fetch, so llm-export got a multi-line path.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def checkpoint_path(checkpoint: str, context: Path, cache_dir: Path) -> Path:
    if checkpoint:
        path = context / checkpoint
        if not path.is_dir():
            raise SystemExit(f"CHECKPOINT={checkpoint!r}: no directory {path} in the build context")
        return path
    from export.default_model import fetch_default_model
    return fetch_default_model(cache_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="", help="checkpoint directory, relative to --context "
                                                     "(default: the default model, SmolLM2-135M-Instruct)")
    p.add_argument("--context", type=Path, default=Path("/context"))
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/checkpoints"))
    args, export_flags = p.parse_known_args(argv)
    if export_flags[:1] == ["--"]:
        export_flags = export_flags[1:]
    from export.cli import main as llm_export
    return llm_export([str(checkpoint_path(args.checkpoint, args.context, args.cache_dir)), *export_flags])


if __name__ == "__main__":
    sys.exit(main())
