"""llama.cpp baseline for bench.engine: one stream on the default model's own Q4_1 GGUF.

    .cache/llama-venv/bin/python bench/llamacpp.py GGUF PROMPTS_JSON OUTPUT_LEN THREADS
    .cache/llama-venv/bin/python bench/llamacpp.py logits GGUF IDS_JSON OUT_NPZ

Runs in its own virtual environment (`make llama-venv`: llama-cpp-python compiles
from source for minutes, and the product does not need it), so it imports nothing from
this repository. PROMPTS_JSON is a list of token-id lists; each is decoded greedily
for OUTPUT_LEN tokens (end of sequence ignored), one after the other. Prints one JSON
object: time to first token and the times between tokens, per prompt. `logits` writes
the logits at every position of each token-id list instead (bench.int4_fidelity).

Weight repacking ("extra buffer types", llama.cpp's AMX/AVX-512 layouts) is off: with
it llama-cpp-python 0.3.36 crashed with a segmentation fault in its first decode on
this machine (a KVM guest with AMX), so the baseline is llama.cpp's plain CPU path.
"""

from __future__ import annotations

import json
import sys
import time


def load(gguf: str, threads: int, **kwargs):
    import llama_cpp

    default_params = llama_cpp.llama_model_default_params

    def no_repack():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = no_repack
    llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
    return llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512,
                           verbose=False, **kwargs)


def logits(gguf: str, ids_json: str, out_npz: str) -> int:
    """The logits at every position of each token-id list (bench.int4_fidelity)."""
    import numpy as np

    llm = load(gguf, 2, logits_all=True)
    arrays = {}
    for i, ids in enumerate(json.loads(open(ids_json).read())):
        llm.reset()
        llm.eval(ids)
        arrays[f"s{i}"] = np.array(llm.scores[:len(ids)], dtype=np.float32)
    np.savez(out_npz, **arrays)
    return 0


def main() -> int:
    if sys.argv[1] == "logits":
        return logits(*sys.argv[2:5])
    gguf, prompts_json, output_len, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import llama_cpp

    llm = load(gguf, threads)
    prompts = json.loads(open(prompts_json).read())
    runs = []
    for ids in prompts:
        llm.reset()
        stamps = []
        start = time.perf_counter()
        for _token in llm.generate(ids, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == output_len:
                break
        runs.append({"ttft_ms": (stamps[0] - start) * 1e3,
                     "itl_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
                     "seconds": stamps[-1] - start, "tokens": len(stamps)})
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "threads": threads, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
