"""The Kubernetes manifests as kubectl's kustomize renders them, validated against the
pinned Kubernetes schema (kubernetes-validate --strict), and the invariants a schema
cannot see: selectors that select, one PodDisruptionBudget per workload, the HPA alone
owning Triton's replicas, grace periods that fit the drains, /dev/shm, resources for
every container, Secrets defined or documented, the NetworkPolicy letting only the
adapters and llm-deploy reach Triton, the Ingress fit for server-sent events, the
prometheus-adapter rule in the file it reads, and llm-deploy.sh's Job."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_testlib import (DOCS, K8S, KUBERNETES_VERSION, KUSTOMIZE_VERSION, OVERLAYS, config_map_env,
                            container_env, find, kustomize_version, load_yaml, matches, one, pod_labels,
                            pod_spec, render)

JOBS = {p.stem: load_yaml(p)[0] for p in (K8S / "jobs").glob("*.yaml")}
SECRET_EXAMPLE = load_yaml(K8S / "secret.example.yaml")[0]
ADAPTER_VALUES = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


@pytest.fixture(scope="module", autouse=True)
def pinned_kustomize():
    version = kustomize_version()
    assert version == KUSTOMIZE_VERSION, (
        f"rendering needs kubectl with kustomize {KUSTOMIZE_VERSION} (these machines' kubectl 1.32); found {version}")


def _validate(docs: list[dict], tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    validate = Path(sys.executable).with_name("kubernetes-validate")
    proc = subprocess.run([str(validate), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    checked = set(re.findall(r"passed for resource (\S+)", out))
    core = [d for d in docs if "monitoring.coreos.com" not in d["apiVersion"]]
    assert len(checked) == len(core), f"validated {sorted(checked)} of {len(core)}\n{out}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_pinned_schema(overlay, tmp_path):
    _validate(list(render(overlay)), tmp_path, overlay)


def test_jobs_and_the_secret_template_validate(tmp_path):
    jobs = []
    for job in JOBS.values():   # created with generateName; the validator wants a name
        job = json.loads(json.dumps(job))
        job["metadata"]["name"] = job["metadata"]["generateName"] + "x7k2p"
        jobs.append(job)
    _validate([*jobs, SECRET_EXAMPLE], tmp_path, "jobs")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_objects_have_the_operators_shape(overlay):
    """No schema for the Operator's kinds here: their fields as monitoring.coreos.com/v1
    defines them (a typo there is silently ignored by the cluster)."""
    docs = render(overlay)
    pm = one(docs, "PodMonitor", "llm-triton")
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scheme", "authorization", "honorLabels"}
    sm = one(docs, "ServiceMonitor", "openai-adapter")
    assert set(sm["spec"]) == {"selector", "endpoints"}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scheme", "authorization", "honorLabels"}
        assert set(ep["authorization"]) == {"type", "credentials"} and set(ep["authorization"]["credentials"]) == {"name", "key"}
    rule = one(docs, "PrometheusRule", "llm-serving")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"} and r["alert"] and r["expr"]
    for d in docs:
        annotations = d["metadata"].get("annotations", {})
        pod_annotations = d.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {}) if d["kind"] in WORKLOADS else {}
        assert not [a for a in {**annotations, **pod_annotations} if a.startswith("prometheus.io/")], \
            f"{d['kind']}/{d['metadata']['name']}: prometheus.io annotations do nothing under the Operator"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_pods_they_are_for(overlay):
    docs = render(overlay)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for w in workloads:
        assert matches(w["spec"]["selector"], pod_labels(w)), w["metadata"]["name"]
    for svc in find(docs, "Service"):
        selected = [w for w in workloads if matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
        ports = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    for kind, ports_key in (("PodMonitor", "podMetricsEndpoints"), ("ServiceMonitor", "endpoints")):
        for mon in find(docs, kind):
            sel = mon["spec"]["selector"]
            targets = ([w for w in workloads if matches(sel, pod_labels(w))] if kind == "PodMonitor"
                       else [s for s in find(docs, "Service") if matches(sel, s["metadata"].get("labels", {}))])
            assert len(targets) == 1, f"{kind} {mon['metadata']['name']} selects {len(targets)}"
            names = ({p["name"] for c in pod_spec(targets[0])["containers"] for p in c.get("ports", [])}
                     if kind == "PodMonitor" else {p["name"] for p in targets[0]["spec"]["ports"]})
            for ep in mon["spec"][ports_key]:
                assert ep["port"] in names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_disruption_budget_per_workload(overlay):
    """Defect 6: one PodDisruptionBudget spanned both tracks."""
    docs = render(overlay)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for w in workloads:
        pdbs = [p for p in find(docs, "PodDisruptionBudget") if matches(p["spec"]["selector"], pod_labels(w))]
        assert len(pdbs) == 1, f"{w['metadata']['name']}: {len(pdbs)} PodDisruptionBudgets"
    for p in find(docs, "PodDisruptionBudget"):
        assert sum(matches(p["spec"]["selector"], pod_labels(w)) for w in workloads) == 1, p["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_hpa_alone_owns_triton_replicas_and_scales_on_queue_depth(overlay):
    """Defect 5: the HPA followed one track, and `replicas: 2` reset its count on apply."""
    docs = render(overlay)
    hpas = find(docs, "HorizontalPodAutoscaler")
    assert hpas
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        target = one(docs, ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], f"{ref['name']} has replicas: the HPA's count is reset on apply"
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    triton = one(docs, "HorizontalPodAutoscaler", "llm-triton")
    assert triton["spec"]["scaleTargetRef"]["name"] == "llm-triton"
    assert len([d for d in docs if d["kind"] == "Deployment" and "triton" in d["metadata"]["name"]]) == 1
    (metric,) = triton["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "llm_num_requests_waiting"


def test_prometheus_adapter_rule_is_in_the_file_it_reads_and_serves_the_hpa_metric():
    """Defect 5: a ConfigMap of rules that prometheus-adapter never mounts is inert. The
    chart's values file (rules.custom is written into its --config file) carries the rule;
    it exposes the HPA's metric per pod, from the series the PodMonitor gives."""
    rules = ADAPTER_VALUES["rules"]["custom"]
    hpa_metric = one(render("gpu"), "HorizontalPodAutoscaler", "llm-triton")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = [r for r in rules if r["name"]["as"] == hpa_metric]
    series = re.match(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], series.group(1)), "the rule renames the series it selects"
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert "<<.GroupBy>>" in rule["metricsQuery"]
    assert not list(K8S.rglob("*prometheus-adapter*rules*")), "no inert rules ConfigMap"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    docs = [*render(overlay), *JOBS.values()]
    for w in [d for d in docs if d["kind"] in (*WORKLOADS, "Job")]:
        for c in pod_spec(w)["containers"] + pod_spec(w).get("initContainers", []):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{w['metadata']['name']}/{c['name']} {part}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_pods_are_guaranteed_with_whole_cpus(overlay):
    """onnxruntime's threads follow the CPUs the pod may use: Guaranteed QoS with whole
    CPUs (the static CPU manager gives them as cores; the entrypoint narrows otherwise)."""
    (c,) = pod_spec(one(render(overlay), "Deployment", "llm-triton"))["containers"]
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert float(c["resources"]["limits"]["cpu"]).is_integer()
    if overlay == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_has_shared_memory_and_waits_for_the_adapters_before_stopping(overlay):
    """Defect 6: no /dev/shm (the Python backend's shared memory); no preStop."""
    docs = render(overlay)
    spec = pod_spec(one(docs, "Deployment", "llm-triton"))
    (c,) = spec["containers"]
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm
    vol = next(v for v in spec["volumes"] if v["name"] == shm[0]["name"])
    assert vol["emptyDir"]["medium"] == "Memory"
    assert int(vol["emptyDir"]["sizeLimit"].rstrip("Gi")) >= 1
    adapter_env = config_map_env(docs, pod_spec(one(docs, "Deployment", "openai-adapter"))["containers"][0])
    hook = c["lifecycle"]["preStop"]
    assert "sleep" not in hook, "the sleep action needs Kubernetes 1.30: exec sleep works everywhere"
    pre_stop = int(hook["exec"]["command"][-1])
    assert pre_stop >= 2 * float(adapter_env["ADAPTER_DNS_REFRESH_S"]), "adapters look up the pods again first"
    exit_timeout = int(next(a for a in c["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + exit_timeout + 10
    assert exit_timeout >= float(adapter_env["ADAPTER_SHUTDOWN_GRACE_S"]), "Triton outlasts the adapters' drain"
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_adapter_grace_fits_its_drain(overlay):
    """Defect 6: the drain unreachable. SIGTERM starts it; Kubernetes must wait out
    ADAPTER_SHUTDOWN_GRACE_S (counted from the signal, the delay inside it)."""
    docs = render(overlay)
    deployment = one(docs, "Deployment", "openai-adapter")
    spec = pod_spec(deployment)
    (c,) = spec["containers"]
    env = config_map_env(docs, c)
    delay, grace = float(env["ADAPTER_SHUTDOWN_DELAY_S"]), float(env["ADAPTER_SHUTDOWN_GRACE_S"])
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert delay + pre_stop >= 5, "someone keeps serving while the endpoints are withdrawn"
    assert delay < grace
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_name_no_model(overlay):
    """Defect 6: the readiness probe hard-coded the model name; llm-deploy changes models."""
    docs = render(overlay)
    for w in [d for d in docs if d["kind"] in WORKLOADS]:
        for c in pod_spec(w)["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    assert "/models/" not in c[probe]["httpGet"]["path"], (w["metadata"]["name"], probe)


def _documented_secrets() -> str:
    return DOCS.read_text() if DOCS.exists() else ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_and_config_map_is_defined_or_documented(overlay):
    """Defect 7: the Secret the adapter reads was defined nowhere."""
    docs = [*render(overlay), *JOBS.values()]
    defined = {(d["kind"], d["metadata"].get("name")) for d in docs}
    example = {k for k in SECRET_EXAMPLE["stringData"]}
    docs_text = _documented_secrets()
    refs: set[tuple[str, str, str | None]] = set()

    def walk(node):
        if isinstance(node, dict):
            for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if key in node:
                    refs.add((kind, node[key]["name"], node[key]["key"]))
            for key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                if key in node and "name" in node[key]:
                    refs.add((kind, node[key]["name"], None))
            if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
                refs.add(("Secret", node["secret"]["secretName"], None))
            if "secretName" in node and isinstance(node["secretName"], str):
                refs.add(("Secret", node["secretName"], None))
            if "credentials" in node and isinstance(node["credentials"], dict):
                refs.add(("Secret", node["credentials"]["name"], node["credentials"]["key"]))
            if "persistentVolumeClaim" in node:
                refs.add(("PersistentVolumeClaim", node["persistentVolumeClaim"]["claimName"], None))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(docs)
    assert refs
    for kind, name, key in refs:
        if (kind, name) in defined:
            continue
        if kind == "Secret" and name == SECRET_EXAMPLE["metadata"]["name"]:
            assert key is None or key in example, f"key {key} of {name} is not in secret.example.yaml"
            assert key is None or f"`{key}`" in docs_text, f"docs/deploy.md does not describe {name} key {key}"
            continue
        assert f"`{name}`" in docs_text, f"{kind} {name} is neither defined nor documented in docs/deploy.md"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_adapter_with_the_token_the_adapter_takes(overlay):
    """Defect 7: with API keys on, /metrics answered 401 to Prometheus."""
    docs = render(overlay)
    (ep,) = one(docs, "ServiceMonitor", "openai-adapter")["spec"]["endpoints"]
    creds = ep["authorization"]["credentials"]
    env = container_env(pod_spec(one(docs, "Deployment", "openai-adapter"))["containers"][0])
    ref = env["ADAPTER_METRICS_TOKEN"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (creds["name"], creds["key"])
    assert ref.get("optional") is not True
    assert ep["authorization"]["type"] == "Bearer" and ep["path"] == "/metrics"


def _policy_allows(policies, pod_labels_: dict, source_labels: dict, source_ns_labels: dict, port: int,
                   same_namespace: bool) -> bool:
    selecting = [p for p in policies if matches(p["spec"]["podSelector"], pod_labels_)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            if rule.get("ports") and port not in [x["port"] for x in rule["ports"]]:
                continue
            for peer in rule.get("from", [{}]):
                ns_ok = (matches(peer["namespaceSelector"], source_ns_labels) if "namespaceSelector" in peer
                         else same_namespace)
                pod_ok = matches(peer["podSelector"], source_labels) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_adapters_and_llm_deploy_reach_triton(overlay):
    """Defect 8: any pod could call Triton and bypass the adapter's keys."""
    docs = render(overlay)
    policies = find(docs, "NetworkPolicy")
    triton = pod_labels(one(docs, "Deployment", "llm-triton"))
    adapter = pod_labels(one(docs, "Deployment", "openai-adapter"))
    deploy_job = JOBS["llm-deploy"]["spec"]["template"]["metadata"]["labels"]
    ns = {"kubernetes.io/metadata.name": "llm"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for port in (8000, 8001):
        assert _policy_allows(policies, triton, adapter, ns, port, True)
        assert _policy_allows(policies, triton, deploy_job, ns, port, True)
        assert not _policy_allows(policies, triton, {"app": "anything"}, ns, port, True)
        assert not _policy_allows(policies, triton, adapter, {"kubernetes.io/metadata.name": "other"}, port, False)
        assert not _policy_allows(policies, triton, prometheus, monitoring, port, False)
    assert _policy_allows(policies, triton, prometheus, monitoring, 8002, False)
    assert not _policy_allows(policies, triton, {"app": "anything"}, ns, 8002, True)
    # the adapters find Triton through the headless Service the policy protects
    env = config_map_env(docs, pod_spec(one(docs, "Deployment", "openai-adapter"))["containers"][0])
    host, port = env["TRITON_GRPC_URLS"].removeprefix("dns:").split(":")
    svc = one(docs, "Service", host)
    assert svc["spec"]["clusterIP"] == "None" and int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert matches({"matchLabels": svc["spec"]["selector"]}, triton)
    triton_args = JOBS["llm-deploy"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"dns:{host}:8000" in triton_args and f"dns:{host}:{port}" in triton_args


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_fits_server_sent_events(overlay):
    docs = render(overlay)
    ing = one(docs, "Ingress", "openai-adapter")
    a = ing["metadata"]["annotations"]
    env = config_map_env(docs, pod_spec(one(docs, "Deployment", "openai-adapter"))["containers"][0])
    assert a["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(a[f"nginx.ingress.kubernetes.io/{key}"]) > float(env["ADAPTER_REQUEST_TIMEOUT_S"])
    size = a["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(size.rstrip("m")) * 2**20 >= int(env["ADAPTER_MAX_BODY_BYTES"])
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert one(docs, "Service", backend["name"])


def test_llm_deploy_sh_runs_the_command_as_a_job_and_returns_its_exit_code(tmp_path):
    """The cluster roll-out is llm-deploy itself (tests/rollout), run as a Job."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "kubectl"
    fake.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if "create" in args else ""
open({str(log)!r}, "a").write(json.dumps({{"args": args, "stdin": stdin}}) + "\\n")
if "create" in args: print("job.batch/llm-deploy-x7k2p")
elif "logs" in args: print("candidate failed validation")
elif "pods" in args: print("3", end="")
elif "get" in args: print("/1", end="")
""")
    fake.chmod(0o755)
    proc = subprocess.run([str(K8S / "llm-deploy.sh"), "promote", "smollm2-135m-instruct", "--canary", "10"],
                          env={**os.environ, "KUBECTL": str(fake), "IMAGE": "reg.example/adapter:1"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert "candidate failed validation" in proc.stdout
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    job = yaml.safe_load(calls[0]["stdin"])
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["promote", "smollm2-135m-instruct", "--canary", "10"]
    assert c["image"] == "reg.example/adapter:1"
    assert calls[0]["args"][:3] == ["-n", "llm", "create"]
    assert any(call["args"][2:4] == ["logs", "job.batch/llm-deploy-x7k2p"] for call in calls)
