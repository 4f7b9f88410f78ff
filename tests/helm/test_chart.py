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
from helmbin import helm_binary  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specdec"
K8S_VERSION = "1.33.0"
SCENARIOS = [None] + sorted(str(p) for p in (CHART / "ci").glob("*-values.yaml"))
CRD_KINDS = {"SpeculativeDecoder", "KopfPeering", "ClusterKopfPeering"}


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
    crd = yaml.safe_load((CHART / "crds" / "speculativedecoders.specdec.io.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def openapi_to_jsonschema(x):
    """nullable -> type union; int-or-string -> union; x-kubernetes-* dropped."""
    if isinstance(x, list):
        return [openapi_to_jsonschema(i) for i in x]
    if not isinstance(x, dict):
        return x
    out = {k: openapi_to_jsonschema(v) for k, v in x.items()
           if not k.startswith("x-kubernetes") and k != "nullable"}
    if x.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if x.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.get("type") == "object" and "properties" in out and \
            not x.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
        out["additionalProperties"] = False   # the API server prunes unknown fields
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
        if doc["kind"] in CRD_KINDS:
            if doc["kind"] == "SpeculativeDecoder":
                jsonschema.validate(doc, schema)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] in ("Deployment", "StatefulSet"):
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
    assert "*" not in verbs and not any("secrets" in r["resources"] for r in role["rules"])


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
    assert spec["target"]["gpu"]["count"] == 4 and spec["drafter"]["type"] == "model"


@pytest.mark.parametrize("example", sorted((ROOT / "helm" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_resources_match_the_crd(example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    jsonschema.validate(doc, openapi_to_jsonschema(crd_schema()))
    from specdec_operator.spec import parse
    parse(doc["spec"])   # and the operator accepts them


def test_crd_rejects_a_bad_resource() -> None:
    bad = {"apiVersion": "specdec.io/v1alpha1", "kind": "SpeculativeDecoder", "metadata": {"name": "x"},
           "spec": {"model": {"name": "m"}, "drafter": {"type": "lstm"}, "target": {"minReplicas": -1}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, openapi_to_jsonschema(crd_schema()))


@pytest.mark.parametrize("bad,message", [
    ("decoder:\n  drafter:\n    type: lstm\n", "/decoder/drafter/type"),
    ("decoder:\n  target:\n    minReplicas: -1\n", "/decoder/target/minReplicas"),
    ("redis:\n  external:\n    url: http://nope\n", "/redis/external/url"),
    ("operator:\n  replicaz: 2\n", "replicaz"),
])
def test_values_schema_rejects_bad_values(tmp_path: Path, bad: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(bad)
    out = helm("template", "rel", str(CHART), "-f", str(f))
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_validate_values_gathers_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("redis:\n  enabled: false\ndecoder:\n  drafter:\n    type: model\n"
                 "operator:\n  replicas: 2\n  peering:\n    enabled: false\n")
    out = helm("template", "rel", str(CHART), "-f", str(f))
    assert out.returncode != 0
    for problem in ("redis:", "decoder.drafter.model", "peering"):
        assert problem in out.stderr, out.stderr
