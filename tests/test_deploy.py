"""deploy/: the Kubernetes manifests, the autoscaler and its adapter rules, the alert rules and
the Grafana dashboard, checked against each other and against the server's real /metrics.

Rendering uses `kubectl kustomize` (or `kustomize build`) where installed, and is skipped with
the reason otherwise; the schema check (kubernetes-validate, a dev dependency) and the
structural checks run on the raw files everywhere. scripts/check_deploy.sh does the same
from the command line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import kubernetes_validate
import promql_parser
import pytest
import yaml

from model_store.loader import load_store
from tests.http_server import running_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.glob("kubernetes*/kustomization.yaml"))
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests promise to work on
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources(folder: Path) -> list[dict]:
    """The resources a kustomization lists, following base folders (patches not applied)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        target = (folder / entry).resolve()
        docs += resources(target) if target.is_dir() else load_docs(target)
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _env(container: dict, name: str, default: str) -> str:
    return next((e["value"] for e in container.get("env", []) if e["name"] == name), default)


def test_the_grace_period_covers_the_longest_drain():
    """Kubernetes kills a pod terminationGracePeriodSeconds after it starts terminating:
    that must cover the preStop sleep and the longest a request may still run (its
    deadline, plus the HTTP layer's grace after it), or a drain cuts generations off."""
    from server.relay import DEADLINE_GRACE_S
    from server.settings import ServerSettings

    for deployment in by_kind(load_docs(DEPLOY / "kubernetes/deployment.yaml"), "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        (container,) = [c for c in spec["containers"] if c["name"] == "mage-server"]
        default = str(ServerSettings.model_fields["request_timeout_s"].default)
        timeout = float(_env(container, "MAGE_REQUEST_TIMEOUT_S", default))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        sleep = float(command[1]) if command[0] == "sleep" else 0.0
        assert spec["terminationGracePeriodSeconds"] >= sleep + timeout + DEADLINE_GRACE_S


def test_every_kustomization_is_consistent():
    assert {p.name for p in KUSTOMIZATIONS} >= {
        "kubernetes",
        "kubernetes-gpu",
        "kubernetes-autoscaling",
    }
    for folder in KUSTOMIZATIONS:
        docs = resources(folder)
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        (deployment,) = by_kind(docs, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items(), folder
        for service in by_kind(docs, "Service"):
            assert service["spec"]["selector"].items() <= pod_labels.items()
            ports = {
                p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            }
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
            for monitor in by_kind(docs, "ServiceMonitor"):
                matched = monitor["spec"]["selector"]["matchLabels"]
                assert matched.items() <= service["metadata"]["labels"].items()
                assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
                    p["name"] for p in service["spec"]["ports"]
                }
        for budget in by_kind(docs, "PodDisruptionBudget"):
            assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for patch in kustomization.get("patches", []):
            assert (patch["target"]["kind"], patch["target"]["name"]) in names, patch
            if "path" in patch:
                assert load_docs(folder / patch["path"]), patch


def test_the_autoscaler_targets_the_deployment_on_adapter_metrics():
    folder = DEPLOY / "kubernetes-autoscaling"
    docs = resources(folder)
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    (deployment,) = by_kind(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    wanted = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]}
    assert "mage_queue_size" in wanted
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert set(wanted) <= served
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    if "mage_running_requests" in wanted:  # a target at the cap could never be exceeded
        assert float(wanted["mage_running_requests"]["averageValue"]) < int(env["MAGE_MAX_RUNNING"])


def adapter_rules() -> list[dict]:
    return yaml.safe_load((DEPLOY / "prometheus/adapter-values.yaml").read_text())["rules"][
        "custom"
    ]


def test_raw_manifests_pass_the_kubernetes_schemas():
    checked = 0
    for path in sorted(DEPLOY.glob("kubernetes*/*.yaml")):
        if path.name == "kustomization.yaml" or is_patch(path):
            continue
        for doc in load_docs(path):
            if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
                continue
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 5  # deployment, service, pvc, hpa, pdb


def is_patch(path: Path) -> bool:
    kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    return path.name in {p.get("path") for p in kustomization.get("patches", [])}


def test_the_schema_check_catches_a_wrong_field():
    hpa = load_docs(DEPLOY / "kubernetes-autoscaling/hpa.yaml")[0]
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValu"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_rendered_manifests_pass_the_kubernetes_schemas(folder):
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed (apt-get install kubectl)")
    done = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mage"
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (deployment,) = by_kind(docs, "Deployment")
    if folder.name == "kubernetes-autoscaling":
        # The HPA owns the replica count; rolling updates need a volume many pods can mount.
        assert "replicas" not in deployment["spec"]
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        (claim,) = by_kind(docs, "PersistentVolumeClaim")
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert by_kind(docs, "HorizontalPodAutoscaler")


# --- every metric a query names is one the server exports ----------------------------------


@pytest.fixture(scope="module")
def exported(tiny_store) -> dict[str, str]:
    """Sample name -> metric type, from the live /metrics of a server on the tiny store."""
    with running_server(load_store(tiny_store, "cpu", "float32")) as url:
        text = httpx.get(f"{url}/metrics").text
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names: dict[str, str] = {}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        base = family.removesuffix("_total") if kind == "counter" else family
        for suffix in suffixes.get(kind, ("",)):
            names[base + suffix] = kind
    assert "mage_requests_total" in names and "mage_queue_size" in names
    return names


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}


def promql(expr: str) -> set[str]:
    """The mage_* metric names of a PromQL expression, after checking that it parses."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    expr = expr.replace("<<.Series>>", "mage_series").replace("<<.LabelMatchers>>", 'a="b"')
    expr = expr.replace("<<.GroupBy>>", "pod")
    promql_parser.parse(expr)  # raises on a syntax error
    return set(re.findall(r"\bmage_[a-zA-Z0-9_]+", expr)) - {"mage_series"}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana/mage-dashboard.json").read_text())


def dashboard_queries() -> list[str]:
    board = dashboard()
    panels = [*board["panels"], *(p for row in board["panels"] for p in row.get("panels", []))]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            queries.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", text))
    return queries


def test_dashboard_queries_only_metrics_the_server_exports(exported):
    queries = dashboard_queries()
    assert len(queries) >= 15
    used: set[str] = set()
    for expr in queries:
        names = promql(expr)
        missing = names - set(exported)
        assert not missing, f"{sorted(missing)} not in /metrics: {expr}"
        for name in re.findall(r"rate\((mage_\w+)", expr):
            assert exported[name] in ("counter", "histogram"), f"rate() of a gauge: {expr}"
        for name in re.findall(r"histogram_quantile\([^,]+,[^)]*?\((mage_\w+)", expr):
            assert name.endswith("_bucket") and exported[name] == "histogram", expr
        used |= names
    # What the dashboard is for: throughput, TTFT/ITL percentiles, queue, running, cache
    # hit rate and errors by outcome.
    assert {
        "mage_generated_tokens_total",
        "mage_time_to_first_token_seconds_bucket",
        "mage_inter_token_latency_seconds_bucket",
        "mage_queue_size",
        "mage_running_requests",
        "mage_merge_cache_hits_total",
        "mage_merge_cache_misses_total",
        "mage_requests_total",
    } <= used
    assert any("by (outcome)" in q and "mage_requests_total" in q for q in queries)


def test_dashboard_is_importable_grafana_json():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"]  # the variables filter every query


def test_alert_and_adapter_rules_query_only_exported_metrics(exported):
    (rule_doc,) = load_docs(DEPLOY / "prometheus/alerts.yaml")
    exprs = [r["expr"] for g in rule_doc["spec"]["groups"] for r in g["rules"]]
    for rule in adapter_rules():
        exprs += [rule["seriesQuery"], rule["metricsQuery"]]
        assert re.fullmatch(rule["name"]["matches"], rule["name"]["as"])
        assert promql(rule["seriesQuery"]) == {rule["name"]["as"]}
    for expr in exprs:
        missing = promql(expr) - set(exported)
        assert not missing, f"{sorted(missing)} not in /metrics: {expr}"
