"""deploy/: static checks of the Kubernetes manifests and the Helm chart (no cluster here).

* deploy/k8s/ manifests against the Kubernetes 1.28 OpenAPI schemas (``kubernetes-validate``,
  strict) plus probes, ports, labels, security contexts, the NetworkPolicy, the plan cache
  volume and the HPA / prometheus-adapter metrics;
* deploy/helm/spine-wff: every ``.Values`` path a template reads exists, and the defaults
  agree with deploy/k8s/. Rendering the chart needs helm, which is not installed here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_files import (
    DOCKER,
    METRIC_NAME,
    ROOT,
    TRITON_METRICS,
    TRITON_PORTS,
    WRITABLE,
    dockerfile_args,
    entrypoint_exit_timeout_s,
    load_yaml,
)

K8S = ROOT / "deploy" / "k8s"
CHART = ROOT / "deploy" / "helm" / "spine-wff"
ADAPTER_VALUES = ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml"
K8S_VERSION = "1.28.0"
HPA_METRIC = "wff_avg_queue_time_per_request_us"
HPA_PREPROCESS_METRIC = "wff_preprocess_queue_time_per_request_us"


# --------------------------------------------------------------------------- Kubernetes manifests


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.fixture(scope="module")
def manifests():
    return k8s_docs()


def pod_containers(deployment):
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


class TestKubernetesManifests:
    def test_kustomization_lists_every_manifest(self):
        """kustomization.yaml names every manifest of the app (the adapter's ConfigMap lives in its own namespace)."""
        listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
        assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-config.yaml"}

    def test_schemas(self, manifests):
        """Core kinds validate strictly against the Kubernetes 1.28 OpenAPI schemas."""
        import kubernetes_validate as kv  # bundled Kubernetes OpenAPI schemas (dev dependency)

        core = {k: d for k, d in manifests.items() if not d["apiVersion"].startswith("monitoring.coreos.com")}
        assert {"Deployment/spine-wff", "Service/spine-wff", "HorizontalPodAutoscaler/spine-wff", "NetworkPolicy/spine-wff",
                "PersistentVolumeClaim/spine-wff-artifacts", "PersistentVolumeClaim/spine-wff-plans",
                "ConfigMap/adapter-config"} <= set(core)
        for doc in core.values():
            kv.validate(doc, K8S_VERSION, strict=True)

    def test_probes_ports_and_gpu(self, manifests):
        """tritonserver: live/ready probes on the named HTTP port, ports 8000-8002, one GPU, /dev/shm in memory."""
        deployment = manifests["Deployment/spine-wff"]
        containers = pod_containers(deployment)
        triton = containers["triton"]
        assert {p["name"]: p["containerPort"] for p in triton["ports"]} == TRITON_PORTS
        assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert triton["startupProbe"]["httpGet"]["port"] == "http"
        for c in containers.values():
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert containers["prepare"]["args"] == ["prepare"] and triton["args"] == ["serve"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert {m["mountPath"] for m in triton["volumeMounts"]} == {"/models/artifacts"} | WRITABLE

    def test_labels_and_selectors(self, manifests):
        """Service and ServiceMonitor select the pod template's labels; scrape annotations name port 8002."""
        deployment = manifests["Deployment/spine-wff"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == pod_labels
        assert pod_labels["app.kubernetes.io/name"] == "spine-wff"
        service = manifests["Service/spine-wff"]
        assert service["spec"]["selector"] == pod_labels
        assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {k: (v, k) for k, v in TRITON_PORTS.items()}
        monitor = manifests["ServiceMonitor/spine-wff"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002", "prometheus.io/path": "/metrics"}

    def test_hpa_metrics_served_by_adapter_rules(self, manifests):
        """The HPA's pods metrics are the adapter rules' outputs: rate(queue us) / rate(successes) of Triton counters,
        for the GPU models and for the preprocess step."""
        hpa = manifests["HorizontalPodAutoscaler/spine-wff"]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "spine-wff"}
        metrics = {m["pods"]["metric"]["name"]: m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert list(metrics) == [HPA_METRIC, HPA_PREPROCESS_METRIC] and len(hpa["spec"]["metrics"]) == 2
        config = yaml.safe_load(manifests["ConfigMap/adapter-config"]["data"]["config.yaml"])
        rules = {r["name"]["as"]: r for r in config["rules"]}
        assert list(rules) == list(metrics)
        models = {HPA_METRIC: 'model=~"detector|classifier"', HPA_PREPROCESS_METRIC: 'model="preprocess"'}
        for name, rule in rules.items():
            query = rule["metricsQuery"]
            assert re.search(r"rate\(nv_inference_queue_duration_us\{.*\}\[1m\]\).*/.*rate\(nv_inference_request_success\{", query)
            assert query.count(models[name]) == 2 and models[name] in rule["seriesQuery"], name
            assert set(METRIC_NAME.findall(query + rule["seriesQuery"])) <= TRITON_METRICS
            assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}

    def test_pods_run_unprivileged_on_a_read_only_root(self, manifests):
        """Pod: non-root as the image's uid/gid, RuntimeDefault seccomp, no API token; every container: no privilege
        escalation, no capabilities, read-only root with a volume at each place the server writes."""
        spec = manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        uid, gid = dockerfile_args()["WFF_UID"], dockerfile_args()["WFF_GID"]
        assert pod["runAsNonRoot"] is True and (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (int(uid), int(gid), int(gid))
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"} and spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for name, container in pod_containers(manifests["Deployment/spine-wff"]).items():
            context = container["securityContext"]
            assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}, name
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert writable == WRITABLE - ({"/dev/shm"} if name == "prepare" else set()), name
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, mount

    def test_plans_on_a_persistent_volume(self, manifests):
        """The plan cache and the timing cache live on the spine-wff-plans claim, mounted where the env points."""
        spec = manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]
        claim = manifests["PersistentVolumeClaim/spine-wff-plans"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["plans"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
        assert "ReadWriteMany" in claim["spec"]["accessModes"]
        for container in pod_containers(manifests["Deployment/spine-wff"]).values():
            env = {e["name"]: e["value"] for e in container["env"]}
            (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "plans"]
            assert env["WFF_TRT_PLAN_CACHE"] == mount and Path(env["WFF_TRT_TIMING_CACHE"]).parent == Path(mount)
        assert "WFF_TRT_TIMING_CACHE" in (DOCKER / "entrypoint.sh").read_text()  # the entrypoint passes it to wff trt build

    def test_termination_grace_exceeds_exit_timeout(self, manifests):
        """Kubernetes waits longer than tritonserver's wait for requests in flight."""
        spec = manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod_containers(manifests["Deployment/spine-wff"])["triton"]["env"]}
        exit_timeout = int(env.get("WFF_EXIT_TIMEOUT_S", entrypoint_exit_timeout_s()))
        assert spec["terminationGracePeriodSeconds"] >= exit_timeout + 10

    def test_network_policy(self, manifests):
        """Ingress: gRPC from labelled client pods/namespaces, metrics from Prometheus, nothing else; no egress."""
        policy = manifests["NetworkPolicy/spine-wff"]["spec"]
        pod_labels = manifests["Deployment/spine-wff"]["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"] == pod_labels
        assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
        named = {port["name"]: port["containerPort"] for container in manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]["containers"]
                 for port in container.get("ports", [])}
        # named ports, resolved to what the server listens on, so a changed Service port cannot open or close anything
        opened = {named[p["port"]]: rule["from"] for rule in policy["ingress"] for p in rule["ports"]}
        assert set(opened) == {TRITON_PORTS["grpc"], TRITON_PORTS["metrics"]}
        clients = opened[TRITON_PORTS["grpc"]]
        assert [set(peer) for peer in clients] == [{"podSelector"}, {"namespaceSelector"}]
        assert all(peer[next(iter(peer))]["matchLabels"] for peer in clients)
        (prometheus,) = opened[TRITON_PORTS["metrics"]]
        assert prometheus["namespaceSelector"]["matchLabels"] and prometheus["podSelector"]["matchLabels"]

    def test_adapter_rule_same_in_helm_values(self, manifests):
        """deploy/helm/prometheus-adapter-values.yaml carries the same rules as the ConfigMap."""
        config = yaml.safe_load(manifests["ConfigMap/adapter-config"]["data"]["config.yaml"])
        assert load_yaml(ADAPTER_VALUES)["rules"]["custom"] == config["rules"]

    @pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
    def test_kustomize_builds(self):
        """`kubectl kustomize deploy/k8s` builds the set offline."""
        out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True).stdout
        kinds = [d["kind"] for d in yaml.safe_load_all(out)]
        assert sorted(kinds) == sorted(d["kind"] for d in k8s_docs().values() if d["kind"] != "ConfigMap")


# --------------------------------------------------------------------------- Helm chart


VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def chart_templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").iterdir())}


class TestHelmChart:
    def test_chart_metadata(self):
        """Chart.yaml: apiVersion v2, semver version, appVersion = the image tag default."""
        chart = load_yaml(CHART / "Chart.yaml")
        values = load_yaml(CHART / "values.yaml")
        assert chart["apiVersion"] == "v2" and chart["name"] == "spine-wff"
        assert re.match(r"^\d+\.\d+\.\d+$", chart["version"])
        assert values["image"]["tag"] == chart["appVersion"]

    def test_values_paths_exist(self):
        """Every .Values path a template reads is defined in values.yaml."""
        values = load_yaml(CHART / "values.yaml")
        for name, text in chart_templates().items():
            for path in VALUES_REF.findall(text):
                node = values
                for key in path.strip(".").split("."):
                    assert isinstance(node, dict) and key in node, f"{name}: .Values{path}"
                    node = node[key]

    def test_includes_defined_and_braces_balanced(self):
        """Templates include only helpers defined in _helpers.tpl; {{ and }} pair up."""
        templates = chart_templates()
        defined = set(re.findall(r'define "([^"]+)"', templates["_helpers.tpl"]))
        for name, text in templates.items():
            assert set(re.findall(r'include "([^"]+)"', text)) <= defined, name
            assert text.count("{{") == text.count("}}"), name

    def test_templates_cover_the_objects(self):
        """The chart has the same kinds as deploy/k8s (the adapter rule lives in its own values file)."""
        kinds = {m for text in chart_templates().values() for m in re.findall(r"^kind: (\w+)$", text, flags=re.M)}
        assert kinds == {d["kind"] for d in k8s_docs().values()} - {"ConfigMap"}

    def test_defaults_match_plain_manifests(self, manifests):
        """values.yaml defaults = what deploy/k8s spells out (ports, resources, HPA, env names, probes)."""
        values = load_yaml(CHART / "values.yaml")
        assert values["service"]["ports"] == TRITON_PORTS
        deployment = manifests["Deployment/spine-wff"]
        triton = pod_containers(deployment)["triton"]
        assert triton["resources"] == values["resources"]
        hpa = manifests["HorizontalPodAutoscaler/spine-wff"]["spec"]
        auto = values["autoscaling"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (auto["minReplicas"], auto["maxReplicas"])
        for metric, settings in zip(hpa["metrics"], (auto, auto["preprocess"]), strict=True):
            assert metric["pods"]["target"]["averageValue"] == settings["targetAverageValue"]
            assert metric["pods"]["metric"]["name"] == settings["metricName"]
        assert [auto["metricName"], auto["preprocess"]["metricName"]] == [HPA_METRIC, HPA_PREPROCESS_METRIC]
        helper_env = re.findall(r"- name: (WFF_\w+)", chart_templates()["_helpers.tpl"])
        assert helper_env == [e["name"] for e in triton["env"]]
        for probe in ("startup", "liveness", "readiness"):
            assert triton[f"{probe}Probe"]["periodSeconds"] == values["probes"][probe]["periodSeconds"]
        deployment_tpl = chart_templates()["deployment.yaml"]
        assert "path: /v2/health/live" in deployment_tpl and "path: /v2/health/ready" in deployment_tpl

    def test_security_defaults_match_plain_manifests(self, manifests):
        """Security contexts, grace period, exit timeout, plan cache claim and NetworkPolicy peers: values.yaml = deploy/k8s."""
        values = load_yaml(CHART / "values.yaml")
        deployment = manifests["Deployment/spine-wff"]
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"] == values["podSecurityContext"]
        assert all(c["securityContext"] == values["securityContext"] for c in pod_containers(deployment).values())
        assert spec["terminationGracePeriodSeconds"] == values["terminationGracePeriodSeconds"]
        env = {e["name"]: e["value"] for e in pod_containers(deployment)["triton"]["env"]}
        assert env["WFF_EXIT_TIMEOUT_S"] == str(values["exitTimeoutSeconds"])
        claim = manifests["PersistentVolumeClaim/spine-wff-plans"]["spec"]
        assert (claim["accessModes"], claim["resources"]["requests"]["storage"]) == (values["plans"]["accessModes"], values["plans"]["size"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tmp"]["emptyDir"]["sizeLimit"] == values["tmpSizeLimit"]
        peers = manifests["NetworkPolicy/spine-wff"]["spec"]["ingress"]
        allowed = values["networkPolicy"]
        assert [p["podSelector"]["matchLabels"] for p in peers[0]["from"] if "podSelector" in p] == [allowed["clients"]["podLabels"]]
        assert [p["namespaceSelector"]["matchLabels"] for p in peers[0]["from"]
                if "namespaceSelector" in p] == [allowed["clients"]["namespaceLabels"]]
        (prometheus,) = peers[1]["from"]
        assert prometheus == {"namespaceSelector": {"matchLabels": allowed["prometheus"]["namespaceLabels"]},
                              "podSelector": {"matchLabels": allowed["prometheus"]["podLabels"]}}
        templates = chart_templates()
        mounts = re.findall(r"mountPath: (\S+)", templates["_helpers.tpl"] + templates["deployment.yaml"])
        assert set(mounts) == {m["mountPath"] for m in pod_containers(deployment)["triton"]["volumeMounts"]}
