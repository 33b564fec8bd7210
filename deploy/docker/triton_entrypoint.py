"""The Triton images' entrypoint: the team's tritonserver flags, CPU threads sized to the
container, then exec tritonserver.

    triton_entrypoint.py [EXTRA TRITONSERVER FLAGS]        start (the images' ENTRYPOINT)
    triton_entrypoint.py --print-command [FLAGS]           print it, key hidden, and exit
    triton_entrypoint.py --assemble-backends DEST          lay out the CPU image's backends

What it fixes, from the environment:

- the flags of stack/triton.py (TritonServer.command): explicit model control loading the
  whole repository at start, the model-repository API locked by TRITON_REPOSITORY_KEY
  (refuses to start without one), metrics on; listening on TRITON_ADDRESS (0.0.0.0 in a
  pod: the NetworkPolicy, not the address, keeps everyone but the adapters out);
- the CPU affinity. The engine sizes onnxruntime's threads by the CPUs it may run on
  (os.sched_getaffinity). Under Kubernetes' static CPU manager a Guaranteed pod's
  affinity is its cores; without it the affinity is every core of the node while the
  cgroup quota allows only the limit, and onnxruntime's spinning workers on 64+ threads
  would be throttled to a crawl. So when the affinity is wider than the quota, the
  process (and the Python stubs it starts) is narrowed to that many of its cores;
- the CPU image (the nvidia-pytriton wheel's tritonserver 2.51): where its binary, its
  bundled libraries and this interpreter's libpython are (as stack/triton.py does).

Standard library only: it runs with the base image's python3.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path

REPOSITORY_KEY_HEADER = "llm-repository-key"   # stack.triton.REPOSITORY_KEY_HEADER
BACKEND_NAME = "llm"
GPU_BACKENDS = Path("/opt/tritonserver/backends")
LLM_HOME = Path(os.environ.get("LLM_HOME", "/opt/llm"))


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup may use (limit), or None when unlimited or unknown."""
    v2 = cgroup_root / "cpu.max"
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q = cgroup_root / "cpu" / "cpu.cfs_quota_us"
        p = cgroup_root / "cpu" / "cpu.cfs_period_us"
        if q.exists() and p.exists():
            quota = int(q.read_text())
            return None if quota <= 0 else quota / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def narrowed_affinity(allowed: set[int], quota: float | None, key: str) -> set[int] | None:
    """The cores to keep when the affinity is wider than the quota, else None.

    The kept cores are a contiguous run of the allowed ones whose start depends on `key`
    (the pod name), so pods on one node spread over different cores."""
    if quota is None:
        return None
    want = max(1, math.ceil(quota - 1e-9))
    if want >= len(allowed):
        return None
    cores = sorted(allowed)
    start = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(cores)
    return {cores[(start + i) % len(cores)] for i in range(want)}


def _pytriton_dirs() -> tuple[Path, Path] | None:
    """(tritonserver root, bundled libraries) of the nvidia-pytriton wheel, if installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(list(spec.submodule_search_locations)[0])
    return pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"


def tritonserver_binary() -> str:
    explicit = os.environ.get("TRITONSERVER")
    if explicit:
        return explicit
    if (GPU_BACKENDS.parent / "bin" / "tritonserver").exists():
        return str(GPU_BACKENDS.parent / "bin" / "tritonserver")
    wheel = _pytriton_dirs()
    if wheel and (wheel[0] / "bin" / "tritonserver").exists():
        return str(wheel[0] / "bin" / "tritonserver")
    found = shutil.which("tritonserver")
    if found:
        return found
    raise SystemExit("no tritonserver: set TRITONSERVER, or install nvidia-pytriton")


def backend_directory() -> Path:
    if os.environ.get("TRITON_BACKEND_DIRECTORY"):
        return Path(os.environ["TRITON_BACKEND_DIRECTORY"])
    return GPU_BACKENDS if GPU_BACKENDS.is_dir() else LLM_HOME / "backends"


def assemble_backends(dest: Path, model_py: Path) -> Path:
    """The CPU image's backend directory: python/ from the wheel (the stub of this
    interpreter's minor version) and llm/model.py. The stub keeps needing the wheel's
    nvidia_pytriton.libs: run_environment() puts them on LD_LIBRARY_PATH."""
    wheel = _pytriton_dirs()
    if wheel is None:
        raise SystemExit("nvidia-pytriton is not installed")
    root, _ = wheel
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends" / "python" / "libtriton_python.so",
                root / "backends" / "python" / "triton_python_backend_utils.py",
                root / "python_backend_stubs" / minor / "triton_python_backend_stub"):
        shutil.copy2(src, py / src.name)
    (dest / BACKEND_NAME).mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_py, dest / BACKEND_NAME / "model.py")
    return dest


def run_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """tritonserver's environment (inherited by the Python stubs)."""
    env = dict(os.environ if env is None else env)
    paths = []
    wheel = _pytriton_dirs()
    if wheel is not None and "/opt/tritonserver" not in tritonserver_binary():
        # the CPU image: this interpreter's libpython first (the stub embeds it), then
        # the wheel's bundled libraries (libtritonserver, libcudart 12, libb64, ...)
        paths += [sysconfig.get_config_var("LIBDIR") or "", str(wheel[1])]
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    paths.append(env.get("LD_LIBRARY_PATH", ""))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def command(extra: list[str], env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    key = env.get("TRITON_REPOSITORY_KEY", "").strip()
    if not key:
        raise SystemExit("TRITON_REPOSITORY_KEY is not set: Triton's model-repository API (load, "
                         "unload) must be locked; the adapters and llm-deploy send the same key")
    address = env.get("TRITON_ADDRESS", "0.0.0.0")
    return [
        tritonserver_binary(),
        f"--model-repository={env.get('MODEL_REPOSITORY', '/models')}",
        f"--backend-directory={backend_directory()}",
        f"--http-port={env.get('TRITON_HTTP_PORT', '8000')}",
        f"--grpc-port={env.get('TRITON_GRPC_PORT', '8001')}",
        f"--metrics-port={env.get('TRITON_METRICS_PORT', '8002')}",
        f"--http-address={address}",
        f"--grpc-address={address}",
        f"--metrics-address={address}",
        "--allow-metrics=true",
        "--log-info=true",
        "--model-control-mode=explicit",
        "--load-model=*",
        # A pod stays ready while llm-deploy loads a new version on it (minutes for 8B):
        # strict readiness would take it out of the headless Service for the whole load.
        # The HTTP port opens only after the start-up loads, so probes still wait for them.
        "--strict-readiness=false",
        f"--http-restricted-api=model-repository:{REPOSITORY_KEY_HEADER}={key}",
        f"--grpc-restricted-protocol=model-repository:{REPOSITORY_KEY_HEADER}={key}",
        *extra,
    ]


def narrow_cpus() -> None:
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        return
    quota = cpu_quota()
    keep = narrowed_affinity(allowed, quota, os.environ.get("HOSTNAME") or socket.gethostname())
    if keep is not None:
        os.sched_setaffinity(0, keep)
        print(f"[entrypoint] CPU limit {quota:g} but {len(allowed)} CPUs in the affinity mask: running on "
              f"{sorted(keep)} (a static CPU manager policy gives the pod its own cores)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--assemble-backends"]:
        dest = Path(args[1])
        model_py = Path(args[2]) if len(args) > 2 else LLM_HOME / "llm_backend" / "model.py"
        print(assemble_backends(dest, model_py))
        return 0
    if args[:1] == ["--print-command"]:
        cmd = command(args[1:])
        key = os.environ["TRITON_REPOSITORY_KEY"].strip()
        print(" ".join(cmd).replace(key, "$TRITON_REPOSITORY_KEY"))
        return 0
    cmd = command(args)
    narrow_cpus()
    os.execve(cmd[0], cmd, run_environment())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
