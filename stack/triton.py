"""Start the real `tritonserver` shipped in the nvidia-pytriton wheel, with our backend.

Triton finds backends in a directory of `<name>/` folders. We assemble one under
`build/backends/`:

- `python/`: the Python backend from the wheel (`libtriton_python.so`, its utils
  module and the stub built for this interpreter's minor version);
- `llm/model.py`: our Python-based backend (a link to `llm_backend/model.py`), which
  every exported model directory names with `backend: "llm"`. The model code
  therefore exists once; model directories hold only configuration and artifacts.

Triton runs in explicit model-control mode and loads every model of the repository at
start (as before), so `llm-deploy` can load a new version beside the serving one and
unload an old one; it listens on loopback unless told otherwise, and its
model-repository API (load, unload, index) answers only requests that carry the
repository key (`TRITON_REPOSITORY_KEY`, header `llm-repository-key`): model control is
an administrator's power, and the adapter's API keys must not be bypassable.

The stub process embeds libpython. Left alone it finds the system's libpython,
which does not match this interpreter's standard library, so we put this
interpreter's LIBDIR first on LD_LIBRARY_PATH and the venv's bin/ first on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKEND_NAME = "llm"
REPOSITORY_KEY_HEADER = "llm-repository-key"
KEY_FILE = REPO_ROOT / "build" / "triton-repository-key"


def repository_key() -> str:
    """TRITON_REPOSITORY_KEY, else this checkout's key file (made once, mode 600), so
    `make serve`, `make triton` and `llm-deploy` on this machine agree without set-up."""
    key = os.environ.get("TRITON_REPOSITORY_KEY", "").strip()
    if key:
        return key
    if not KEY_FILE.exists():
        import secrets
        KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = KEY_FILE.with_name(f".{KEY_FILE.name}.{os.getpid()}")
        tmp.write_text(secrets.token_urlsafe(32) + "\n")
        tmp.chmod(0o600)
        os.replace(tmp, KEY_FILE)
    return KEY_FILE.read_text().strip()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0])


def pytriton_paths() -> tuple[Path, Path]:
    """(tritonserver root inside the wheel, directory of its bundled shared libraries)."""
    pkg = _package_dir("pytriton")
    return pkg / "tritonserver", pkg.parent / "nvidia_pytriton.libs"


def tritonserver_binary() -> Path:
    return pytriton_paths()[0] / "bin" / "tritonserver"


def build_backend_dir(dest: Path | None = None, extra: dict[str, Path] | None = None) -> Path:
    """Assemble a backend directory with `python/` and our `llm/` backend.

    `extra` maps further Python-based backend names to their model.py (tests use it
    for a scriptable fake model).
    """
    dest = dest or REPO_ROOT / "build" / "backends"
    server_root, _ = pytriton_paths()
    py_src = server_root / "backends" / "python"
    stub = server_root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    py_dst = dest / "python"
    py_dst.mkdir(parents=True, exist_ok=True)
    for src in (py_src / "libtriton_python.so", py_src / "triton_python_backend_utils.py", stub):
        target = py_dst / src.name
        if not target.exists() or target.stat().st_size != src.stat().st_size:
            tmp = py_dst / f".{src.name}.{os.getpid()}"
            shutil.copy2(src, tmp)
            os.replace(tmp, target)
    backends = {BACKEND_NAME: REPO_ROOT / "llm_backend" / "model.py", **(extra or {})}
    for name, model_py in backends.items():
        d = dest / name
        d.mkdir(parents=True, exist_ok=True)
        # Link under a unique name, then rename over: servers starting at the same
        # time (tests, replicas) never see a missing model.py.
        tmp = d / f".model.py.{os.getpid()}.{time.monotonic_ns()}"
        tmp.symlink_to(model_py.resolve())
        os.replace(tmp, d / "model.py")
    return dest


def triton_env() -> dict[str, str]:
    """Environment for tritonserver and the Python stubs it spawns."""
    _, libs = pytriton_paths()
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    # The stub imports our backend package from the repository, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class TritonServer:
    """A `tritonserver` subprocess on given ports; use as a context manager."""

    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_path: Path | None = None
    extra_backends: dict[str, Path] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    # Loopback unless told otherwise (TRITON_ADDRESS): only the adapter should reach it.
    address: str = field(default_factory=lambda: os.environ.get("TRITON_ADDRESS", "127.0.0.1"))
    repository_key: str = field(default_factory=repository_key)
    proc: subprocess.Popen | None = None
    # The Python-based backends' shared-memory regions (/dev/shm) start with this, one
    # prefix per server: a server killed with SIGKILL cannot remove its own, so
    # stop() and kill() remove them once the process group is gone.
    shm_prefix: str = field(default_factory=lambda: f"llmtriton_{uuid.uuid4().hex[:12]}_")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        backends = build_backend_dir(extra=self.extra_backends)
        return [
            str(tritonserver_binary()),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={backends}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            "--allow-metrics=true",
            "--log-info=true",
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-restricted-api=model-repository:{REPOSITORY_KEY_HEADER}={self.repository_key}",
            f"--grpc-restricted-protocol=model-repository:{REPOSITORY_KEY_HEADER}={self.repository_key}",
            *(f"--backend-config={name},shm-region-prefix-name={self.shm_prefix}{name}_"
              for name in ("python", BACKEND_NAME, *self.extra_backends)),
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # Own process group, so stop() also ends the Python stubs it spawned.
        self.proc = subprocess.Popen(self.command(), env=triton_env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode}\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._remove_shm()

    def kill(self) -> None:
        """Hard kill (failure-isolation tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._remove_shm()

    def _remove_shm(self) -> None:
        """Shared-memory regions the server's stubs left (all of them after a SIGKILL).
        Called once the server has exited: a clean exit has removed them already, and
        after a kill of the process group a stub still dying only loses the name."""
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    @classmethod
    def on_free_ports(cls, model_repository: Path, **kwargs) -> "TritonServer":
        """A server whose three ports are free loopback ports (tests, benchmarks)."""
        from stack.ports import free_port
        return cls(model_repository, free_port(), free_port(), free_port(), **kwargs)

    def start_ready(self, timeout: float = 180.0) -> "TritonServer":
        """Start and wait until ready; stopped again if it never gets there."""
        self.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "TritonServer":
        return self.start_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m stack.triton [REPO] [tritonserver flags]`: run tritonserver in the foreground."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Run the pinned tritonserver on a model repository with the `llm` backend installed. "
                    "Further flags go to tritonserver unchanged.")
    parser.add_argument("repository", nargs="?", default=str(REPO_ROOT / "model_repository"))
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("TRITON_HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("TRITON_GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("TRITON_METRICS_PORT", 8002)))
    parser.add_argument("--print-command", action="store_true",
                        help="print the environment and command line instead of running them")
    args, passthrough = parser.parse_known_args(argv)
    server = TritonServer(Path(args.repository), args.http_port, args.grpc_port, args.metrics_port,
                          extra_args=passthrough)
    cmd = server.command()
    env = triton_env()
    if args.print_command:
        for key in ("LD_LIBRARY_PATH", "PATH", "PYTHONPATH"):
            print(f"export {key}={env[key]}")
        print(" ".join(cmd).replace(server.repository_key, "$TRITON_REPOSITORY_KEY"))
        return 0
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
