"""Each image's contract, checked where it is built (a RUN step of the Dockerfile) and by
tests/deploy on the same lock files here.

    check_image.py serving --gpu    the Triton image: stub libraries, CUDA majors, imports
    check_image.py serving          the CPU Triton image (nvidia-pytriton's tritonserver)
    check_image.py adapter          the adapter image (also llm-deploy, llm-admin)
    check_image.py export           the export image

serving: the backend directory as the entrypoint lays it out has the Python backend, its
stub and our `llm` backend; `ldd` finds every library of the stub in the environment
tritonserver gives it, and the stub embeds this interpreter's Python; every third-party
module that llm_backend imports anywhere (lazily too: onnx is imported inside functions)
imports; on the CPU, the engine's own kernels (llm_backend/cpu_ops) load, prebuilt
in the image (it has no compiler). --gpu: onnxruntime is the CUDA build, and its CUDA provider, torch and the base
image link one CUDA major, with every library of the provider found by `ldd`.

Exit 1 with one line per problem. Standard library only, apart from what it checks.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import triton_entrypoint as entry  # noqa: E402

LLM_HOME = Path(os.environ.get("LLM_HOME", "/opt/llm"))
NOT_BACKEND: set[str] = set()  # every module of llm_backend is the backend's (the test client lives in bench/)
PROVIDED_BY_TRITON = {"triton_python_backend_utils", "c_python_backend_utils"}
GPU_ONLY = {"torch"}   # decoder.py imports it on the CUDA path only


def ldd(path: Path, env: dict[str, str]) -> str:
    return subprocess.run(["ldd", str(path)], env=env, capture_output=True, text=True).stdout


def missing_libraries(path: Path, env: dict[str, str]) -> list[str]:
    """Libraries the dynamic loader cannot find for `path` in `env`."""
    return re.findall(r"^\s*(\S+) => not found", ldd(path, env), re.M)


def cuda_major_linked(path: Path, env: dict[str, str]) -> int | None:
    m = re.search(r"libcudart[^ ]*\.so\.(\d+)", ldd(path, env))
    return int(m.group(1)) if m else None


def backend_imports(package_dir: Path) -> set[str]:
    """Top-level third-party modules imported anywhere in the backend package."""
    found: set[str] = set()
    for py in sorted(package_dir.glob("*.py")):
        if py.name in NOT_BACKEND:
            continue
        for node in ast.walk(ast.parse(py.read_text(), str(py))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    local = {package_dir.name, "__future__"}
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def check_serving(gpu: bool, backends: Path, package_dir: Path) -> list[str]:
    problems = []
    py = backends / "python"
    for f in (py / "libtriton_python.so", py / "triton_python_backend_utils.py",
              py / "triton_python_backend_stub", backends / entry.BACKEND_NAME / "model.py"):
        if not f.is_file():
            problems.append(f"missing {f}")
    stub = py / "triton_python_backend_stub"
    env = entry.run_environment()
    if stub.is_file():
        for lib in missing_libraries(stub, env):
            problems.append(f"the Python-backend stub cannot find {lib} (ldd {stub})")
        m = re.search(r"libpython(\d+\.\d+)", ldd(stub, env))
        mine = f"{sys.version_info.major}.{sys.version_info.minor}"
        if not m:
            problems.append(f"{stub} links no libpython")
        elif m.group(1) != mine:
            problems.append(f"the stub embeds Python {m.group(1)}, the packages are installed for {mine}")
    for module in sorted(backend_imports(package_dir) - PROVIDED_BY_TRITON - (set() if gpu else GPU_ONLY)):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any failure to import is the finding
            problems.append(f"llm_backend imports {module!r}, which does not import here: {err}")
    # every module of the package but model.py (it needs the stub's pb_utils)
    for py in sorted(package_dir.glob("*.py")):
        if py.name in NOT_BACKEND or py.name in ("model.py", "__init__.py"):
            continue
        module = f"{package_dir.name}.{py.stem}"
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            problems.append(f"cannot import {module}: {err}")
    if gpu:
        problems += check_cuda(env)
    else:
        try:
            kernels = importlib.import_module(f"{package_dir.name}.cpu_ops")
            lib = kernels.library()
            if lib is None:
                problems.append("the engine's CPU kernels neither build here nor are prebuilt for this CPU "
                                "in $LLM_KERNEL_DIR: W8A8 models would be served without them, slower")
            elif "RowQuantize" not in kernels.ops(lib):
                problems.append(f"{lib} lacks RowQuantize")
        except Exception as err:  # noqa: BLE001 - any failure to load them is the finding
            problems.append(f"the engine's CPU kernels do not load: {err}")
    return problems


def check_cuda(env: dict[str, str]) -> list[str]:
    problems = []
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [f"onnxruntime {ort.__version__} has no CUDAExecutionProvider: the CPU build is installed"]
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    for lib in missing_libraries(provider, env):
        problems.append(f"onnxruntime's CUDA provider cannot find {lib}: it would fall back to the CPU")
    majors = {"onnxruntime-gpu": cuda_major_linked(provider, env)}
    try:
        import torch
        majors["torch"] = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    except Exception as err:  # noqa: BLE001
        problems.append(f"cannot import torch (the engine's CUDA KV buffers): {err}")
    base = os.environ.get("CUDA_VERSION")   # set by NVIDIA's base images
    if base:
        majors["base image"] = int(base.split(".")[0])
    if len(set(majors.values())) != 1:
        problems.append(f"CUDA majors differ: {majors}")
    return problems


def check_adapter() -> list[str]:
    problems = []
    for module in ("openai_adapter.main", "openai_adapter.accounts.admin", "rollout.cli", "psycopg"):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            problems.append(f"cannot import {module}: {err}")
    return problems


def check_export() -> list[str]:
    problems = []
    for module in ("export.cli", "export.pipeline", "export.default_model", "transformers", "torch",
                   "onnxruntime", "gguf", "accelerate"):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            problems.append(f"cannot import {module}: {err}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", choices=["serving", "adapter", "export"])
    p.add_argument("--gpu", action="store_true", help="serving: the CUDA image")
    p.add_argument("--backends", type=Path, default=None, help="serving: the backend directory")
    p.add_argument("--package", type=Path, default=LLM_HOME / "llm_backend",
                   help="serving: the llm_backend package directory")
    args = p.parse_args(argv)
    if args.image == "serving":
        problems = check_serving(args.gpu, args.backends or entry.backend_directory(), args.package)
    elif args.image == "adapter":
        problems = check_adapter()
    else:
        problems = check_export()
    for line in problems:
        print(f"check_image {args.image}: {line}", file=sys.stderr)
    if not problems:
        print(f"check_image {args.image}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
