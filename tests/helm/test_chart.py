"""The Helm chart: lint, render scenarios, validate manifests, CRD schema, values schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from helmbin import helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specdec"
K8S_VERSION = "1.33.0"
SCENARIOS = [None] + sorted(str(p) for p in (CHART / "ci").glob("*-values.yaml"))
CRD_KINDS = {"SpeculativeDecoder", "KopfPeering", "ClusterKopfPeering"}
# Custom resources of other projects' CRDs (the Prometheus Operator, cert-manager): kubernetes-validate
# has no schema; Certificates are checked against CERTIFICATE below.
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "Certificate"}
# The cert-manager.io/v1 Certificate fields the chart sets, as cert-manager accepts them.
CERT_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip
CERTIFICATE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "usages": {"type": "array", "items": {"enum": CERT_USAGES}},
                "duration": {"type": "string", "pattern": "^([0-9.]+(h|m|s))+$"},
                "renewBefore": {"type": "string", "pattern": "^([0-9.]+(h|m|s))+$"},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    },
                },
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1}, "kind": {}, "group": {}},
                },
            },
        },
    },
}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)


def render(values: str | None) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", "specdec", "--include-crds"]
    if values:
        args += ["-f", values]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def crd_schema() -> dict:
    crd = yaml.safe_load((CHART / "files" / "crds" / "speculativedecoders.specdec.io.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def openapi_to_jsonschema(x):
    """nullable -> type union; int-or-string -> union; x-kubernetes-* dropped."""
    if isinstance(x, list):
        return [openapi_to_jsonschema(i) for i in x]
    if not isinstance(x, dict):
        return x
    out = {k: openapi_to_jsonschema(v) for k, v in x.items() if not k.startswith("x-kubernetes") and k != "nullable"}
    if x.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if x.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and not x.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False  # the API server prunes unknown fields
    return out


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda v: Path(v).name if v else "defaults")
def test_lint_strict(values: str | None) -> None:
    out = helm("lint", "--strict", str(CHART), *(["-f", values] if values else []))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda v: Path(v).name if v else "defaults")
def test_rendered_manifests_validate_strictly(values: str | None) -> None:
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
    schema = openapi_to_jsonschema(crd_schema())
    for doc in docs:
        if doc["kind"] in CRD_KINDS | FOREIGN_KINDS:
            if doc["kind"] == "Certificate":
                jsonschema.validate(doc, CERTIFICATE)
            if doc["kind"] == "SpeculativeDecoder":
                jsonschema.validate(doc, schema)
                from specdec_operator.spec import parse

                parse(doc["spec"])  # and the operator accepts it
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
                assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_default_render_has_every_component() -> None:
    docs = render(None)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("SpeculativeDecoder", "default") in names
    assert ("StatefulSet", "rel-specdec-redis") in names
    assert ("ClusterKopfPeering", "specdec") in names
    assert sum(1 for k, _ in names if k == "NetworkPolicy") >= 3
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(cm["data"]["specdec.json"])["panels"]
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "rel-specdec-operator")
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    assert "*" not in verbs
    # The one Secret the operator reads: the bundled Valkey's client URL (it carries the password).
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["rel-specdec-redis-auth"], "verbs": ["get"]}
    ]


def test_scenarios_change_what_they_should() -> None:
    ext = {(d["kind"], d["metadata"]["name"]): d for d in render(str(CHART / "ci" / "external-redis-values.yaml"))}
    assert ("StatefulSet", "rel-specdec-redis") not in ext
    sd = ext[("SpeculativeDecoder", "default")]
    assert sd["spec"]["redis"] == {"urlSecretRef": {"name": "specdec-redis", "key": "url"}}
    none = render(str(CHART / "ci" / "no-default-resource-values.yaml"))
    assert not [d for d in none if d["kind"] == "SpeculativeDecoder"]
    assert {d["metadata"]["namespace"] for d in none if d["kind"] == "Role"} == {"team-a", "team-b"}
    gpu = {(d["kind"], d["metadata"]["name"]): d for d in render(str(CHART / "ci" / "gpu-node-pools-values.yaml"))}
    spec = gpu[("SpeculativeDecoder", "default")]["spec"]
    assert spec["target"]["gpu"]["count"] == 1 and spec["drafter"]["type"] == "model"
    assert spec["model"]["cache"] == {"size": "400Gi", "storageClassName": "filestore-rwx"}
    assert spec["model"]["tokenSecretRef"] == {"name": "hf-token", "key": "token"}


@pytest.mark.parametrize("example", sorted((ROOT / "helm" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_resources_match_the_crd(example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    jsonschema.validate(doc, openapi_to_jsonschema(crd_schema()))
    from specdec_operator.spec import parse

    parse(doc["spec"])  # and the operator accepts them


def test_crd_rejects_a_bad_resource() -> None:
    bad = {
        "apiVersion": "specdec.io/v1alpha1",
        "kind": "SpeculativeDecoder",
        "metadata": {"name": "x"},
        "spec": {"model": {"name": "m"}, "drafter": {"type": "lstm"}, "target": {"minReplicas": -1}},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, openapi_to_jsonschema(crd_schema()))


@pytest.mark.parametrize(
    "bad,message",
    [
        ("decoder:\n  drafter:\n    type: lstm\n", "/decoder/drafter/type"),
        ("decoder:\n  target:\n    minReplicas: -1\n", "/decoder/target/minReplicas"),
        ("redis:\n  external:\n    url: http://nope\n", "/redis/external/url"),
        ("operator:\n  replicaz: 2\n", "replicaz"),
    ],
)
def test_values_schema_rejects_bad_values(tmp_path: Path, bad: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(bad)
    out = helm("template", "rel", str(CHART), "-f", str(f))
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_validate_values_gathers_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "redis:\n  enabled: false\ndecoder:\n  drafter:\n    type: model\n"
        "operator:\n  replicas: 2\n  peering:\n    enabled: false\n"
    )
    out = helm("template", "rel", str(CHART), "-f", str(f))
    assert out.returncode != 0
    for problem in ("redis:", "decoder.drafter.model", "peering"):
        assert problem in out.stderr, out.stderr


def objects(values: str | None) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render(values)}


def operator_env(docs: dict[tuple[str, str], dict]) -> dict[str, dict]:
    pod = docs[("Deployment", "rel-specdec-operator")]["spec"]["template"]["spec"]
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def test_ha_operator_pods_get_distinct_peering_priorities() -> None:
    docs = objects(str(CHART / "ci" / "ha-external-values.yaml"))
    dep = docs[("Deployment", "rel-specdec-operator")]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    env = operator_env(docs)
    # No shared fixed priority: each pod's comes from its name (kopf pauses equal ones).
    assert "SPECDEC_OPERATOR_PRIORITY" not in env
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["SPECDEC_OPERATOR_PEERING_LIFETIME_S"]["value"] == "20"
    assert dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    from specdec_operator.config import name_priority

    assert name_priority("rel-specdec-operator-5f7c9-abcde") != name_priority("rel-specdec-operator-5f7c9-fghij")


def test_existing_secret_is_readable_by_the_operator_without_listing_it() -> None:
    docs = objects(str(CHART / "ci" / "ha-external-values.yaml"))
    role = docs[("ClusterRole", "rel-specdec-operator")]
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["specdec-redis"], "verbs": ["get"]}
    ]
    assert any("speculativedecoders/finalizers" in r["resources"] for r in role["rules"])


def test_crds_are_templates_upgraded_with_the_release_and_kept() -> None:
    """helm upgrade applies templates, never crds/: the CRDs are rendered, with keep."""
    out = helm("template", "rel", str(CHART), "--namespace", "specdec")  # no --include-crds
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {"speculativedecoders.specdec.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    for crd in crds.values():
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not (CHART / "crds").exists()
    none = helm("template", "rel", str(CHART), "--set", "crds.install=false")
    assert "CustomResourceDefinition" not in none.stdout


def test_uninstall_hook_runs_before_the_operator_goes() -> None:
    job = objects(None)[("Job", "rel-specdec-uninstall")]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "rel-specdec-operator"
    assert pod["containers"][0]["command"][:3] == ["python3", "-m", "specdec_operator.uninstall"]


def test_metrics_are_declared_and_monitored() -> None:
    docs = objects(str(CHART / "ci" / "ha-external-values.yaml"))
    sd = docs[("SpeculativeDecoder", "default")]["spec"]
    assert sd["metrics"] == {"enabled": True, "port": 9464}
    pod = docs[("Deployment", "rel-specdec-operator")]["spec"]["template"]["spec"]
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in pod["containers"][0]["ports"]
    assert operator_env(docs)["SPECDEC_OPERATOR_METRICS_PORT"]["value"] == "9464"
    for kind in ("ServiceMonitor", "PodMonitor"):
        for name in ("rel-specdec-tiers", "rel-specdec-operator"):
            labels = docs[(kind, name)]["metadata"]["labels"]
            assert kind == "PodMonitor" or labels["release"] == "kube-prometheus-stack"
    assert ("ServiceMonitor", "rel-specdec-tiers") not in objects(None)
    # The operator puts the port on every tier (container and Service), named metrics.
    from specdec_operator import resources
    from specdec_operator.spec import parse

    spec = parse(sd)
    owner = {"metadata": {"name": "default", "namespace": "specdec", "uid": "u"}}
    for tier in ("coordinator", "draft", "target"):
        c = resources.deployment(owner, spec, tier, 1)["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in c["ports"]
        assert {"name": "SPECDEC_METRICS_PORT", "value": "9464"} in c["env"]
        assert any(p["name"] == "metrics" for p in resources.service(owner, spec, tier)["spec"]["ports"])
    assert resources.deployment(owner, spec, "target", None)["spec"].get("replicas") is None


def test_network_policies_follow_ports_namespaces_and_redis_tls(tmp_path: Path) -> None:
    f = tmp_path / "ports.yaml"
    f.write_text(
        "decoder:\n  coordinator: {port: 7001}\n  target: {port: 7003}\n"
        "networkPolicy:\n  clientNamespaces: [apps]\n  metricsNamespaces: [monitoring]\n"
        "  redisPorts: [6380]\n"
    )
    docs = objects(str(f))
    coord = docs[("NetworkPolicy", "rel-specdec-coordinator")]["spec"]["ingress"][0]
    assert coord["ports"] == [{"port": 7001, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]  # gRPC, HTTP
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}} in coord["from"]
    inner = docs[("NetworkPolicy", "rel-specdec-inner-tiers")]["spec"]["ingress"][0]["ports"]
    assert [p["port"] for p in inner] == [50052, 7003]
    metrics = docs[("NetworkPolicy", "rel-specdec-tier-metrics")]["spec"]["ingress"][0]
    assert metrics["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    egress = docs[("NetworkPolicy", "rel-specdec-operator")]["spec"]["egress"]
    assert {"port": 6380, "protocol": "TCP"} in egress[1]["ports"]


def test_openshift_leaves_uids_to_the_platform() -> None:
    docs = objects(str(CHART / "ci" / "openshift-values.yaml"))
    for key in (
        ("Deployment", "rel-specdec-operator"),
        ("StatefulSet", "rel-specdec-redis"),
        ("Job", "rel-specdec-uninstall"),
    ):
        ctx = docs[key]["spec"]["template"]["spec"]["securityContext"]
        assert ctx["runAsNonRoot"] is True and not {"runAsUser", "runAsGroup", "fsGroup"} & set(ctx), key
    assert operator_env(docs)["SPECDEC_OPERATOR_RUN_AS_USER"]["value"] == ""
    from specdec_operator import resources
    from specdec_operator.spec import parse

    spec = parse(docs[("SpeculativeDecoder", "default")]["spec"])
    owner = {"metadata": {"name": "default", "namespace": "specdec", "uid": "u"}}
    pod = resources.deployment(owner, spec, "target", 1, run_as_user=None)["spec"]["template"]["spec"]
    assert "fsGroup" not in pod["securityContext"] and "runAsUser" not in pod["containers"][0]["securityContext"]
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "models"
    assert [c["topologyKey"] for c in pod["topologySpreadConstraints"]] == [
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    ]


def test_multi_gpu_replicas_are_refused_until_sharding_exists(tmp_path: Path) -> None:
    f = tmp_path / "gpus.yaml"
    f.write_text("decoder:\n  target:\n    gpu: {count: 4}\n")
    out = helm("template", "rel", str(CHART), "-f", str(f))
    assert out.returncode != 0 and "gpu.count > 1 is refused" in out.stderr, out.stderr
    rule = crd_schema()["properties"]["spec"]["properties"]["target"]["properties"]["gpu"]["properties"]["count"]
    assert rule["x-kubernetes-validations"][0]["rule"] == "self <= 1"
