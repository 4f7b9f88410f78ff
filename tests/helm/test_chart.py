"""The Helm chart: lint, render scenarios, validate manifests, CRD schema, values schema."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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
    assert sd["spec"]["kvRedis"] == {"urlSecretRef": {"name": "specdec-kv-redis", "key": "url"}}
    assert ("Deployment", "rel-specdec-kv-redis") not in ext
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


def secret_data(doc: dict[str, Any]) -> dict[str, str]:
    import base64

    return {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}


def test_everything_secure_renders_what_the_services_read() -> None:
    """cert-manager scenario: Certificates named as the services check them, generated Secrets
    in the formats the services read, secrets reaching pods only by reference."""
    import hashlib

    from redis.connection import parse_url

    from specdec.rpc.auth import AccessPolicy, load_key_hashes
    from specdec.rpc.tls import COORDINATOR_PEER_NAME, TIER_SERVER_NAME
    from specdec_operator import resources

    docs = objects(str(CHART / "ci" / "security-cert-manager-values.yaml"))
    coord, tier, redis_cert = (
        docs[("Certificate", f"rel-specdec-{n}-tls")]["spec"] for n in ("coordinator", "tier", "redis")
    )
    assert coord["commonName"] == COORDINATOR_PEER_NAME and {"server auth", "client auth"} <= set(coord["usages"])
    assert {"default-coordinator", "default-coordinator.specdec.svc", "specdec.example.com"} <= set(coord["dnsNames"])
    assert TIER_SERVER_NAME in tier["dnsNames"] and {"server auth", "client auth"} <= set(tier["usages"])
    assert "rel-specdec-redis.specdec.svc" in redis_cert["dnsNames"]
    for cert in (coord, tier, redis_cert):
        assert cert["issuerRef"] == {"name": "specdec-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert cert["privateKey"]["rotationPolicy"] == "Always"

    # The API key: the digest file in the format the coordinator loads, matching the key handed out.
    keys = secret_data(docs[("Secret", "rel-specdec-api-keys")])
    assert (
        len(keys["api-key"]) >= 32 and keys["api-keys"] == hashlib.sha256(keys["api-key"].encode()).hexdigest() + "\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "keys").write_text(keys["api-keys"])
        policy = AccessPolicy(key_hashes=load_key_hashes(str(Path(tmp) / "keys")))
    assert policy.key_ok(keys["api-key"]) and not policy.key_ok(keys["api-key"] + "x")

    # Valkey: a password from its Secret, TLS only, and a client URL carrying both.
    auth = secret_data(docs[("Secret", "rel-specdec-redis-auth")])
    url = parse_url(auth["url"])
    assert url["password"] == auth["password"] and len(auth["password"]) >= 32
    assert (url["host"], url["port"]) == ("rel-specdec-redis.specdec.svc", 6380)
    assert auth["url"].startswith("rediss://")  # the CA: SPECDEC_REDIS_CA, below
    redis = docs[("StatefulSet", "rel-specdec-redis")]["spec"]["template"]["spec"]
    valkey = redis["containers"][0]
    args = valkey["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--port") + 1] == "0" and args[args.index("--tls-port") + 1] == "6380"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in valkey["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": "rel-specdec-redis-auth", "key": "password"}
    assert {"name": "tls", "secret": {"secretName": "rel-specdec-redis-tls", "defaultMode": 0o440}} in redis["volumes"]
    assert "CONFIG SET tls-cert-file" in valkey["livenessProbe"]["exec"]["command"][-1]
    ports = docs[("Service", "rel-specdec-redis")]["spec"]["ports"]
    assert [p["port"] for p in ports] == [6380]

    # The operator: its Redis URL from the Secret, the CA where the URL says.
    op = docs[("Deployment", "rel-specdec-operator")]["spec"]["template"]["spec"]
    assert operator_env(docs)["SPECDEC_OPERATOR_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "rel-specdec-redis-auth",
        "key": "url",
    }
    mount = next(m for m in op["containers"][0]["volumeMounts"] if m["name"] == "redis-ca")
    volume = next(v for v in op["volumes"] if v["name"] == "redis-ca")
    assert mount["mountPath"] + "/" + volume["secret"]["items"][0]["path"] == resources.REDIS_CA_FILE
    assert operator_env(docs)["SPECDEC_REDIS_CA"]["value"] == resources.REDIS_CA_FILE

    # No secret value in plaintext outside its Secret.
    text = yaml.safe_dump_all([d for d in docs.values() if d["kind"] != "Secret"])
    for value in (auth["password"], keys["api-key"], keys["api-keys"].strip()):
        assert value not in text
    for value in secret_data(docs[("Secret", "rel-specdec-internal")]).values():
        assert len(value) >= 32 and value not in text


REDIS_TLS_ENV = {"SPECDEC_REDIS_CA"}  # read by specdec_records (RedisTls.from_env), not a Settings field


def test_the_chart_decoder_reaches_the_tier_pods_secure() -> None:
    """The chart's SpeculativeDecoder, rendered by the operator: every tier mounts its certificate
    (whole Secret volumes: renewals reach the files), the coordinator its API keys; every SPECDEC_*
    variable is a setting of the services."""
    import dataclasses

    from specdec.config import Settings
    from specdec_operator import resources
    from specdec_operator.spec import parse
    from specdec_records.connect import RedisTls

    settings = {f"SPECDEC_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    assert RedisTls.from_env({"SPECDEC_REDIS_CA": resources.REDIS_CA_FILE}).ca_file == resources.REDIS_CA_FILE
    docs = objects(str(CHART / "ci" / "security-cert-manager-values.yaml"))
    sd = docs[("SpeculativeDecoder", "default")]
    spec = parse(sd["spec"])
    owner = {"metadata": {"name": "default", "namespace": "specdec", "uid": "u"}}
    for tier, secret in (("coordinator", "coordinator"), ("draft", "tier"), ("target", "tier")):
        deployment = resources.deployment(owner, spec, tier, 1)
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)  # what the operator applies, too
        kubernetes_validate.validate(resources.service(owner, spec, tier), K8S_VERSION, strict=True)
        pod = deployment["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        assert {n for n in env if n.startswith("SPECDEC_")} <= settings | REDIS_TLS_ENV
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"rel-specdec-{secret}-tls"
        assert all("subPath" not in m for m in c["volumeMounts"])
        assert env["SPECDEC_TLS_CERT_FILE"]["value"] == "/etc/specdec/tls/tls.crt"
        assert env["SPECDEC_TLS_CA_FILE"]["value"] == "/etc/specdec/tls/ca.crt"
        assert env["SPECDEC_TLS_CLIENT_AUTH"]["value"] == "true"  # clientAuth in these values; tiers always
        assert env["SPECDEC_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "rel-specdec-redis-auth", "key": "url"}
        assert env["SPECDEC_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rel-specdec-internal"
        assert "redis-ca" in volumes and env["SPECDEC_REDIS_CA"]["value"] == resources.REDIS_CA_FILE
        assert c["readinessProbe"]["exec"]["command"][0] == "specdec-health"
        if tier == "coordinator":
            assert env["SPECDEC_API_KEYS_FILE"]["value"] == resources.API_KEYS_FILE
            assert env["SPECDEC_API_KEY_MAX_CALLS"]["value"] == "16" and env["SPECDEC_HTTP_PORT"]["value"] == "8443"
            assert volumes["api-keys"]["secret"]["items"] == [{"key": "api-keys", "path": "api-keys"}]
            assert {"name": "http", "containerPort": 8443, "protocol": "TCP"} in c["ports"]
            assert c["readinessProbe"]["exec"]["command"][-1] == "default-coordinator"  # a DNS name of its certificate
            http = next(p for p in resources.service(owner, spec, tier)["spec"]["ports"] if p["name"] == "http")
            assert (http["port"], http["appProtocol"]) == (8443, "https")
        else:
            assert "SPECDEC_API_KEYS_FILE" not in env and "api-keys" not in volumes
            assert env["SPECDEC_KV_SECRET"]["valueFrom"]["secretKeyRef"] == {
                "name": "rel-specdec-internal",
                "key": "kv-secret",
            }
            assert c["readinessProbe"]["exec"]["command"][-1] == "specdec-tier"


def test_existing_secrets_are_used_and_nothing_is_generated() -> None:
    docs = objects(str(CHART / "ci" / "security-existing-secrets-values.yaml"))
    assert not [k for k in docs if k[0] in ("Secret", "Certificate")]
    sd = docs[("SpeculativeDecoder", "default")]["spec"]
    assert sd["tls"] == {
        "coordinatorSecretName": "specdec-coordinator-tls",
        "tierSecretName": "specdec-tier-tls",
        "caSecretRef": {"name": "specdec-ca", "key": "ca.pem"},
        "clientAuth": False,
    }
    assert sd["apiKeys"]["secretRef"] == {"name": "specdec-api-keys", "key": "digests"}
    assert sd["redis"] == {
        "urlSecretRef": {"name": "specdec-redis-auth", "key": "url"},
        "tls": {"caSecretRef": {"name": "specdec-redis-tls", "key": "ca.crt"}},
    }
    assert sd["kvRedis"] == {"urlSecretRef": {"name": "specdec-kv-redis-auth", "key": "url"}}
    kv = docs[("Deployment", "rel-specdec-kv-redis")]["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "specdec-redis-tls", "defaultMode": 0o440}} in kv["volumes"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in kv["containers"][0]["env"]} == {"specdec-kv-redis-auth"}
    assert sd["internalTokenSecretRef"] == {"name": "specdec-internal", "key": "internal-token"}
    redis = docs[("StatefulSet", "rel-specdec-redis")]["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "specdec-redis-tls", "defaultMode": 0o440}} in redis["volumes"]
    from specdec_operator import resources
    from specdec_operator.spec import parse

    owner = {"metadata": {"name": "default", "namespace": "specdec", "uid": "u"}}
    pod = resources.deployment(owner, parse(sd), "target", 1)["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["SPECDEC_TLS_CA_FILE"] == resources.TLS_CA_FILE and env["SPECDEC_TLS_CLIENT_AUTH"] == "true"
    ca = next(v for v in pod["volumes"] if v["name"] == "tls-ca")
    assert ca["secret"] == {
        "secretName": "specdec-ca",
        "defaultMode": 0o440,
        "items": [{"key": "ca.pem", "path": "ca.crt"}],
    }


def test_defaults_protect_redis_and_the_tiers_without_certificates(tmp_path: Path) -> None:
    """Without cert-manager or Secrets to hand: Valkey gets a generated password, the tiers an
    internal token and KV MAC key; TLS and API keys wait for values; the HTTP port is on."""
    docs = objects(None)
    assert not [k for k in docs if k[0] == "Certificate"]
    sd = docs[("SpeculativeDecoder", "default")]["spec"]
    assert sd["redis"] == {"urlSecretRef": {"name": "rel-specdec-redis-auth", "key": "url"}}
    assert "tls" not in sd and "apiKeys" not in sd and sd["http"] == {"enabled": True, "port": 8000}
    assert sd["kvSecretRef"] == {"name": "rel-specdec-internal", "key": "kv-secret"}
    auth = secret_data(docs[("Secret", "rel-specdec-redis-auth")])
    assert auth["url"] == f"redis://:{auth['password']}@rel-specdec-redis.specdec.svc:6379/0"
    valkey = docs[("StatefulSet", "rel-specdec-redis")]["spec"]["template"]["spec"]["containers"][0]
    assert valkey["readinessProbe"]["exec"]["command"] == ["valkey-cli", "-p", "6379", "ping"]  # REDISCLI_AUTH
    assert "$(REDIS_PASSWORD)" in valkey["args"]
    off_values = tmp_path / "off.yaml"
    off_values.write_text("redis:\n  auth:\n    enabled: false\ndecoder:\n  http:\n    enabled: false\n")
    off = objects(str(off_values))
    assert off[("SpeculativeDecoder", "default")]["spec"]["redis"] == {
        "url": "redis://rel-specdec-redis.specdec.svc:6379/0"
    }
    assert ("Secret", "rel-specdec-redis-auth") not in off
    coord = off[("NetworkPolicy", "rel-specdec-coordinator")]["spec"]["ingress"][0]
    assert coord["ports"] == [{"port": 50051, "protocol": "TCP"}]


@pytest.mark.parametrize(
    "bad,problem",
    [
        ("tls:\n  enabled: true\n", "tls.enabled: set tls.certManager.enabled"),
        ("tls:\n  enabled: true\n  certManager:\n    enabled: true\n", "tls.certManager.issuerRef.name is required"),
        (
            "tls:\n  enabled: true\n  existingSecret: x\n  certManager:\n    enabled: true\n"
            "    issuerRef:\n      name: ca\n",
            "not both",
        ),
        ("redis:\n  tls:\n    enabled: true\n", "redis.tls.enabled: set redis.tls.existingSecret"),
        ("decoder:\n  http:\n    port: 9464\n", "decoder.http.port is also"),
    ],
)
def test_security_values_are_checked(tmp_path: Path, bad: str, problem: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(bad)
    out = helm("template", "rel", str(CHART), "-f", str(f))
    assert out.returncode != 0 and problem in out.stderr, out.stderr


def valkey_args(docs: dict[tuple[str, str], dict], kind: str, name: str) -> dict[str, str]:
    """The Valkey container's `--flag value` pairs."""
    args = docs[(kind, name)]["spec"]["template"]["spec"]["containers"][0]["args"]
    return {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}


def test_kv_chunks_get_their_own_valkey_and_records_a_noeviction_one(tmp_path: Path) -> None:
    """Every specdec key has a TTL, so one server cannot evict chunks and never records: the
    chunks' Valkey evicts (allkeys-lru), the state one refuses writes when full (noeviction)."""
    docs = objects(None)
    state = valkey_args(docs, "StatefulSet", "rel-specdec-redis")
    kv = valkey_args(docs, "Deployment", "rel-specdec-kv-redis")
    assert (state["--maxmemory-policy"], state["--maxmemory"]) == ("noeviction", "1gb")
    assert (kv["--maxmemory-policy"], kv["--maxmemory"], kv["--appendonly"]) == ("allkeys-lru", "6gb", "no")
    assert ("Service", "rel-specdec-kv-redis") in docs and ("NetworkPolicy", "rel-specdec-kv-redis") in docs
    kv_secret = secret_data(docs[("Secret", "rel-specdec-kv-redis-auth")])
    state_secret = secret_data(docs[("Secret", "rel-specdec-redis-auth")])
    assert kv_secret["url"] == f"redis://:{kv_secret['password']}@rel-specdec-kv-redis.specdec.svc:6379/0"
    assert kv_secret["password"] != state_secret["password"]
    sd = docs[("SpeculativeDecoder", "default")]["spec"]
    assert sd["kvRedis"] == {"urlSecretRef": {"name": "rel-specdec-kv-redis-auth", "key": "url"}}
    # The operator: default URLs for decoders naming no Redis, as Secret names (never the password).
    env = operator_env(docs)
    assert env["SPECDEC_OPERATOR_REDIS_URL_SECRET"]["value"] == "rel-specdec-redis-auth"
    assert env["SPECDEC_OPERATOR_KV_REDIS_URL_SECRET"]["value"] == "rel-specdec-kv-redis-auth"
    assert env["SPECDEC_OPERATOR_KV_REDIS_URL_SECRET_KEY"]["value"] == "url"
    # The decoder's tiers, as the operator renders them, read both URLs from their Secrets.
    from specdec_operator import resources
    from specdec_operator.spec import parse

    owner = {"metadata": {"name": "default", "namespace": "specdec", "uid": "u"}}
    pod = resources.deployment(owner, parse(sd), "target", 1)["spec"]["template"]["spec"]
    tier_env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert tier_env["SPECDEC_KV_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "rel-specdec-kv-redis-auth"
    assert kv_secret["password"] not in yaml.safe_dump(pod)
    # Off: one Valkey for all, back on allkeys-lru with the KV-sized cap.
    values = tmp_path / "one.yaml"
    values.write_text("kvRedis: {enabled: false}\n")
    one = objects(str(values))
    assert not [k for k in one if k[1].startswith("rel-specdec-kv-redis")]
    state = valkey_args(one, "StatefulSet", "rel-specdec-redis")
    assert (state["--maxmemory-policy"], state["--maxmemory"]) == ("allkeys-lru", "6gb")
    assert "kvRedis" not in one[("SpeculativeDecoder", "default")]["spec"]
    assert "SPECDEC_OPERATOR_KV_REDIS_URL_SECRET" not in operator_env(one)


def test_kv_valkey_without_auth_and_with_tls(tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("redis: {auth: {enabled: false}}\n")
    docs = objects(str(values))
    assert docs[("SpeculativeDecoder", "default")]["spec"]["kvRedis"] == {
        "url": "redis://rel-specdec-kv-redis.specdec.svc:6379/0"
    }
    assert "--requirepass" not in valkey_args(docs, "Deployment", "rel-specdec-kv-redis")
    values.write_text("redis: {tls: {enabled: true}}\ntls: {certManager: {enabled: true, issuerRef: {name: ca}}}\n")
    docs = objects(str(values))
    kv = valkey_args(docs, "Deployment", "rel-specdec-kv-redis")
    assert (kv["--port"], kv["--tls-port"]) == ("0", "6380")
    url = secret_data(docs[("Secret", "rel-specdec-kv-redis-auth")])["url"]
    assert url.startswith("rediss://") and url.endswith("@rel-specdec-kv-redis.specdec.svc:6380/0")
    cert = next(
        d for k, d in docs.items() if k[0] == "Certificate" and d["spec"]["secretName"] == "rel-specdec-redis-tls"
    )
    assert "rel-specdec-kv-redis.specdec.svc" in cert["spec"]["dnsNames"]
