"""Run perf_analyzer from the tritonclient 2.50.0 wheel against our models.

That binary needs two libraries under their plain names, libb64.so.0d and
libcudart.so.12; the nvidia-pytriton wheel carries both under hashed names. We
link them into build/perf_analyzer_libs/ and put that on LD_LIBRARY_PATH.

    python -m stack.perf_analyzer -m smollm2-135m-instruct -u 127.0.0.1:8001 -i grpc \\
        --streaming --input-data stack/perf_input.json --concurrency-range 4

Any perf_analyzer flags pass through.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stack.triton import REPO_ROOT, pytriton_paths


def perf_analyzer_env() -> dict[str, str]:
    _, libs = pytriton_paths()
    link_dir = REPO_ROOT / "build" / "perf_analyzer_libs"
    link_dir.mkdir(parents=True, exist_ok=True)
    for plain, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise SystemExit(f"error: {pattern} not found in {libs}; is nvidia-pytriton installed?")
        link = link_dir / plain
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(matches[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(link_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def binary() -> Path:
    return Path(sys.executable).parent / "perf_analyzer"


def main() -> None:
    os.execve(str(binary()), [str(binary()), *sys.argv[1:]], perf_analyzer_env())


if __name__ == "__main__":
    main()
