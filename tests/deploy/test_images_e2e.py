"""Each image's lock file as a fresh virtual environment, started the way the image and
the manifests start it: the CPU twin of the serving image (serving-cpu.txt: the GPU
set's versions with onnxruntime's CPU build) runs tritonserver through the images'
entrypoint with the default model; the adapter image's set runs `llm-admin migrate`,
the adapter with the rendered ConfigMap and the Secret's keys, and `llm-deploy status`;
the export image's set imports its pipeline and answers `llm-export --help`.

Against that running stack: the manifests' probes answer, a request is served, the
metrics the HPA, prometheus-adapter and the alerts name are really exported, Prometheus'
token scrapes the adapter where an API key cannot, and SIGTERM drains the adapter within
its termination grace. The venvs are cached under .cache/image-venvs/ by lock content
(about 30 s each here the first time, the export set about 2 minutes)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from deploy_testlib import (DOCKER, REPO_ROOT, config_map_env, image_venv, load_yaml, one, pod_spec, render,
                            venv_env, K8S)

pytestmark = pytest.mark.e2e

KEY = "sk-deploy-test-key"
METRICS_TOKEN = "metrics-token-for-prometheus"
ENTRYPOINT = DOCKER / "triton_entrypoint.py"


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180, status: int = 200,
          headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not {status} after {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from stack.default_model import DEFAULT_PRECISION, ensure_default_model
    from stack.ports import free_port
    tmp = tmp_path_factory.mktemp("images")
    twin, adapter_venv = image_venv("serving-cpu"), image_venv("adapter")
    model_dir = ensure_default_model(tmp / "models", precision=DEFAULT_PRECISION, max_num_seqs=4, max_model_len=512)
    model = model_dir.name
    key = "repo-" + os.urandom(8).hex()
    http, grpc, metrics, port = free_port(), free_port(), free_port(), free_port()
    subprocess.run([str(twin / "bin" / "python"), str(ENTRYPOINT), "--assemble-backends", str(tmp / "backends"),
                    str(REPO_ROOT / "llm_backend" / "model.py")], check=True, env=venv_env(twin), capture_output=True)
    triton_env = venv_env(twin, TRITON_REPOSITORY_KEY=key, MODEL_REPOSITORY=str(tmp / "models"),
                          TRITON_ADDRESS="127.0.0.1", TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc),
                          TRITON_METRICS_PORT=str(metrics), TRITON_BACKEND_DIRECTORY=str(tmp / "backends"),
                          LLM_HOME=str(REPO_ROOT))
    triton_log = tmp / "triton.log"
    # the container's command: ENTRYPOINT + the Deployment's args
    args = pod_spec(one(render("cpu"), "Deployment", "llm-triton"))["containers"][0]["args"]
    triton = subprocess.Popen([str(twin / "bin" / "python"), str(ENTRYPOINT), *args], env=triton_env,
                              stdout=open(triton_log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    procs = [triton]
    try:
        _wait(f"http://127.0.0.1:{http}/v2/health/ready", triton, triton_log)
        docs = render("gpu")
        container = pod_spec(one(docs, "Deployment", "openai-adapter"))["containers"][0]
        db = f"sqlite:///{tmp}/accounts.db"
        secrets = {"TRITON_REPOSITORY_KEY": key, "ADAPTER_DATABASE_URL": db,
                   "ADAPTER_METRICS_TOKEN": METRICS_TOKEN, "ADAPTER_API_KEYS": KEY}
        base = venv_env(adapter_venv, **secrets)
        migrate = subprocess.run(load_yaml(K8S / "jobs" / "llm-admin-migrate.yaml")[0]["spec"]["template"]["spec"]
                                 ["containers"][0]["command"], env=base, cwd=tmp, capture_output=True, text=True)
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        # the ConfigMap as rendered; only the addresses are this machine's
        env = {**base, **config_map_env(docs, container), "ADAPTER_HOST": "127.0.0.1", "ADAPTER_PORT": str(port),
               "TRITON_GRPC_URLS": f"127.0.0.1:{grpc}", "TRITON_HTTP_URLS": f"http://127.0.0.1:{http}"}
        adapter_log = tmp / "adapter.log"
        adapter = subprocess.Popen(["openai-adapter"], env=env, cwd=tmp, stdout=open(adapter_log, "ab"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(adapter)
        _wait(f"http://127.0.0.1:{port}/health/ready", adapter, adapter_log, timeout=60)
        yield {"tmp": tmp, "model": model, "key": key, "http": http, "grpc": grpc, "metrics": metrics,
               "adapter": adapter, "adapter_url": f"http://127.0.0.1:{port}", "adapter_env": base,
               "twin": twin, "docs": docs, "container": container, "triton": triton, "triton_log": triton_log}
    finally:
        for p in reversed(procs):
            _stop(p)


def _run_check(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), str(DOCKER / "check_image.py"), *args],
                          env=venv_env(venv, LLM_HOME=str(REPO_ROOT), **env), capture_output=True, text=True)


def test_serving_twin_passes_the_images_build_check(stack):
    proc = _run_check(stack["twin"], "serving", "--backends", str(stack["tmp"] / "backends"),
                      "--package", str(REPO_ROOT / "llm_backend"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_adapter_set_passes_the_images_build_check():
    proc = _run_check(image_venv("adapter"), "adapter")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_export_set_imports_its_pipeline_and_starts_llm_export():
    venv = image_venv("export")
    proc = _run_check(venv, "export")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    help_ = subprocess.run(["llm-export", "--help"], env=venv_env(venv), capture_output=True, text=True)
    assert help_.returncode == 0 and "--repository" in help_.stdout, help_.stderr


def test_triton_serves_a_request_through_the_entrypoint(stack):
    r = httpx.post(f"http://127.0.0.1:{stack['http']}/v2/models/{stack['model']}/generate",
                   json={"text_input": "The capital of France is", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"]
    # the repository API is locked: without the key, no load
    r = httpx.post(f"http://127.0.0.1:{stack['http']}/v2/repository/index", json={}, timeout=10)
    assert r.status_code != 200


def test_the_manifests_probes_answer_on_the_running_processes(stack):
    triton = pod_spec(one(render("gpu"), "Deployment", "llm-triton"))["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = triton[probe]["httpGet"]["path"]
        assert triton[probe]["httpGet"]["port"] == "http"
        assert httpx.get(f"http://127.0.0.1:{stack['http']}{path}", timeout=5).status_code == 200, (probe, path)
    for probe in ("readinessProbe", "livenessProbe"):
        path = stack["container"][probe]["httpGet"]["path"]
        assert httpx.get(stack["adapter_url"] + path, timeout=5).status_code == 200, (probe, path)


def test_a_chat_completion_through_the_adapter(stack):
    r = httpx.post(stack["adapter_url"] + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": stack["model"], "max_tokens": 8, "temperature": 0,
                         "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert httpx.post(stack["adapter_url"] + "/v1/chat/completions", json={}, timeout=10).status_code == 401


def _families(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) \S+", text, re.M))


def _names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\b((?:llm|adapter)_[a-z_]+)\b", expr)}


def test_the_autoscaler_and_the_alerts_name_metrics_the_stack_exports(stack):
    """Defect 5: the HPA's metric, the prometheus-adapter rule's series and every alert's
    metric, scraped from the running processes."""
    import yaml
    triton = httpx.get(f"http://127.0.0.1:{stack['metrics']}/metrics", timeout=10).text
    adapter = httpx.get(stack["adapter_url"] + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                        timeout=10).text
    exported = _families(triton) | _families(adapter)
    hpa = one(stack["docs"], "HorizontalPodAutoscaler", "llm-triton")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa in _families(triton), f"{hpa} is not on Triton's metrics port"
    assert re.search(rf"^{hpa}\{{[^}}]*model=\"{stack['model']}\"", triton, re.M)
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    for rule in values["rules"]["custom"]:
        assert _names(rule["seriesQuery"]) <= exported
    named = set()
    for group in one(stack["docs"], "PrometheusRule", "llm-serving")["spec"]["groups"]:
        for r in group["rules"]:
            named |= _names(r["expr"])
    assert named and named <= exported, f"alerts on metrics nobody exports: {named - exported}"
    assert 'status="200"' in adapter and "adapter_time_to_first_token_seconds_bucket{" in adapter


def test_prometheus_token_scrapes_and_nothing_else_does(stack):
    """Defect 7: with API keys on, /metrics answered 401 to Prometheus."""
    url = stack["adapter_url"] + "/metrics"
    assert httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).status_code == 200
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 401


def test_llm_deploy_from_the_adapter_image_reads_the_stack(stack):
    job = load_yaml(K8S / "jobs" / "llm-deploy.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    command = list(job["command"])
    command[command.index("--triton") + 1] = f"http://127.0.0.1:{stack['http']}"
    command[command.index("--triton-grpc") + 1] = f"127.0.0.1:{stack['grpc']}"
    command[command.index("--repository") + 1] = str(stack["tmp"] / "models")
    proc = subprocess.run([*command, "status", stack["model"]], env=stack["adapter_env"], cwd=stack["tmp"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stack["model"] in proc.stdout


def test_adapter_drains_on_sigterm_within_its_termination_grace(stack):
    """Defect 6: the drain was unreachable. With the manifest's settings: readiness fails
    at once, liveness stays, and the process is gone within terminationGracePeriodSeconds."""
    adapter = stack["adapter"]
    grace = pod_spec(one(stack["docs"], "Deployment", "openai-adapter"))["terminationGracePeriodSeconds"]
    started = time.monotonic()
    os.killpg(adapter.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    ready = 200
    while time.monotonic() < deadline and ready == 200:
        ready = httpx.get(stack["adapter_url"] + "/health/ready", timeout=2).status_code
    assert ready == 503
    assert httpx.get(stack["adapter_url"] + "/health/live", timeout=2).status_code == 200
    adapter.wait(grace)
    assert adapter.returncode == 0
    assert time.monotonic() - started < grace
