"""llama.cpp's own C++ server, the CPU baseline llama.cpp users run, built from the
llama.cpp sources vendored in the llama-cpp-python sdist (PyPI; no other download).

    python -m bench.llama_server build     # once, about 6 minutes on 2 cores

Built with GGML_NATIVE (this CPU's instructions) and llama.cpp's defaults otherwise:
continuous batching, weight repacking for the CPU's fast paths. Run by `bench.serving`
as `llama-server -m GGUF -t THREADS -np SLOTS -c CTX` (one slot per concurrent client).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors the llama.cpp sources
CACHE = ROOT / ".cache" / "llama-server"
BINARY = CACHE / "build" / "bin" / "llama-server"


def build() -> Path:
    if BINARY.exists():
        return BINARY
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / f"llama_cpp_python-{VERSION}"
    if not src.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
        (sdist,) = CACHE.glob(f"llama_cpp_python-{VERSION}.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    llama = src / "vendor" / "llama.cpp"
    build_dir = CACHE / "build"
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", f"-j{os.cpu_count() or 2}"],
                   check=True)
    return BINARY


class LlamaServer:
    """A running llama-server on a port; `extra` flags are named in the results."""

    def __init__(self, gguf: Path, port: int, threads: int, slots: int, ctx_per_slot: int, log: Path,
                 extra: list[str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.extra = extra or []
        self.command = [str(BINARY), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                        "-tb", str(threads), "-np", str(slots), "-c", str(ctx_per_slot * slots), *self.extra]
        self.proc = subprocess.Popen(self.command, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop()
                raise RuntimeError(f"llama-server did not start (exit {code}); see {log}")
            time.sleep(0.3)

    @classmethod
    def for_clients(cls, clients: int, ctx_per_slot: int, log: Path) -> "LlamaServer":
        """The default model's GGUF served as its users size a server for `clients`: every
        core, one slot per client (-np), the context for those slots, one HTTP thread per
        client (its default pool is smaller than 64 connections)."""
        from export.default_model import fetch_default_gguf
        from stack.ports import free_port

        return cls(fetch_default_gguf(), free_port(), os.cpu_count() or 2, clients, ctx_per_slot, log,
                   extra=["--threads-http", str(clients + 4)])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(build())
    else:
        sys.exit(__doc__)
