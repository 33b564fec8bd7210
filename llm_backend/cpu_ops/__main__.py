"""python -m llm_backend.cpu_ops prebuild DIR: the kernels for each instruction set of
PREBUILT, for an image without a compiler (the Dockerfile's cpu-kernels stage)."""
import sys
from pathlib import Path

from llm_backend.cpu_ops import prebuild

if sys.argv[1:2] != ["prebuild"] or len(sys.argv) != 3:
    sys.exit("usage: python -m llm_backend.cpu_ops prebuild DIR")
for built in prebuild(Path(sys.argv[2])):
    print(built)
