"""The Helm chart (helm/distmerge), rendered by the real helm binary and checked offline.

- ``helm lint --strict`` with the default values and with every file of tests/helm-values/.
- ``helm template`` with the default values and each values file; every rendered object is
  checked:
  - custom resources (RayJob ray.io/v1, PodMonitor monitoring.coreos.com/v1) against the
    ``openAPIV3Schema`` of the matching version in the CRDs of ../shared/k8s-schemas/, with
    jsonschema. What the API server would add is added here: an object schema with
    ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
    rejects unknown fields (kubectl's default ``--validate=strict``: a typo is an error, not a
    silently pruned field); ``nullable`` allows null; ``x-kubernetes-int-or-string`` without
    ``anyOf`` means integer or string. CEL rules (``x-kubernetes-validations``) are not evaluated:
    a test checks that the chart sets no field that carries one. Their ``metadata`` (a bare
    ``object`` in a CRD) is checked against Kubernetes' ObjectMeta schema instead.
  - core kinds (ConfigMap) and the pod templates inside the RayJob against the Kubernetes
    OpenAPI schemas shipped in the ``kubernetes-validate`` package (strict variants: unknown
    fields rejected), for the oldest Kubernetes the chart supports and the newest the package
    knows. ``kubectl apply --dry-run=client`` cannot do this offline: kubectl 1.30 needs an API
    server for discovery (to map a kind to a resource) and for the OpenAPI schema it validates
    against, even with ``--dry-run=client`` (and ``kubectl create --dry-run=client
    --validate=false`` still needs discovery); see ``test_kubectl_dry_run_needs_a_server``.
- the pipeline in the ConfigMap parses with distmerge's own schema and method registry.
- names fit KubeRay's limits (see helm/distmerge/templates/_helpers.tpl for where they come from).
"""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import require

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "distmerge"
VALUES_DIR = REPO / "tests" / "helm-values"
DASHBOARD = REPO / "deploy" / "grafana" / "distmerge.json"
# The shared folder sits beside the checkout (also in CI's fresh clone).
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"

VALUES_FILES = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))
CASES = [None] + VALUES_FILES               # None: the chart's default values
LONG_RELEASE = "merge-of-the-llama-3-70b-experts-for-the-q3-evaluatio"  # 53: Helm's maximum

# KubeRay's limits (ray-operator/controllers/ray/utils/constant.go, validation.go, util.go)
MAX_RAYJOB_NAME = 47                        # MaxRayJobNameLength = MaxRayClusterNameLength - 6
MAX_RAYCLUSTER_NAME = 53                    # 63 - len("-serve-svc")
CLUSTER_SUFFIX = 6                          # GenerateRayClusterName: "-" + 5 random characters
MAX_POD_PREFIX = 50                         # PodName: 63 - len("-worker-") - 5
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Kubernetes versions the core kinds are checked against: the chart's kubeVersion floor, and
# the newest that kubernetes-validate ships.
K8S_OLDEST = "1.25.0"


# ----------------------------------------------------------------------------- helpers


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _helm() -> str:
    return require("helm")


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


def _values_args(case: str | None) -> list[str]:
    return [] if case is None else ["-f", str(VALUES_DIR / case)]


@functools.lru_cache(maxsize=None)
def _template(case: str | None, release: str = "merge", extra: tuple[str, ...] = ()) -> str:
    if not DASHBOARD.exists():
        pytest.fail(f"{DASHBOARD.relative_to(REPO)} is missing: the chart's files/distmerge.json "
                    "links to it (helm refuses a dangling link)")
    r = _run([_helm(), "template", release, str(CHART), *_values_args(case), *extra])
    assert r.returncode == 0, f"helm template failed:\n{r.stderr}"
    return r.stdout


def render(case: str | None, release: str = "merge", extra: tuple[str, ...] = ()) -> list[dict]:
    """The objects ``helm template`` renders (a fresh copy each call)."""
    docs = [d for d in yaml.safe_load_all(_template(case, release, extra)) if d]
    return copy.deepcopy(docs)


def render_fails(*extra: str, case: str | None = None) -> str:
    """helm template that must fail: its stderr."""
    r = _run([_helm(), "template", "merge", str(CHART), *_values_args(case), *extra])
    assert r.returncode != 0, f"helm template should have failed with {extra}:\n{r.stdout[:2000]}"
    return r.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, suffix: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind)
             if suffix is None or d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} ({suffix}), found {len(found)}"
    return found[0]


def pipeline_of(docs: list[dict]) -> dict:
    cm = one(docs, "ConfigMap", "-pipeline")
    return yaml.safe_load(cm["data"]["pipeline.yaml"])


def pod_templates(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]
    out = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"]}
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        out[f"worker:{g['groupName']}"] = g["template"]
    if "submitterPodTemplate" in spec:
        out["submitter"] = spec["submitterPodTemplate"]
    return out


def ray_containers(rayjob: dict) -> dict[str, dict]:
    return {k: t["spec"]["containers"][0] for k, t in pod_templates(rayjob).items()
            if k != "submitter"}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------- CRD schemas (jsonschema)


VENDORED = REPO / "tests" / "k8s-schemas"


def _crd_texts() -> list[tuple[str, str]]:
    """(file name, text) of the CRDs: the shared folder when it is beside the checkout, else the
    gzipped copies in tests/k8s-schemas (identical: see test_vendored_crds_match_the_shared_ones)."""
    if SCHEMAS.is_dir():
        return [(p.name, p.read_text()) for p in sorted(SCHEMAS.glob("*.yaml"))]
    return [(p.name[:-3], gzip.decompress(p.read_bytes()).decode()) for p in sorted(VENDORED.glob("*.yaml.gz"))]


def test_vendored_crds_match_the_shared_ones():
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is not beside this checkout; the vendored copies are used")
    for p in sorted(VENDORED.glob("*.yaml.gz")):
        assert gzip.decompress(p.read_bytes()) == (SCHEMAS / p.name[:-3]).read_bytes(), p.name


def structural_to_jsonschema(node):
    """A CRD's OpenAPI v3 structural schema as a JSON schema that judges like the API server
    with strict field validation (see the module docstring)."""
    if isinstance(node, list):
        return [structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: structural_to_jsonschema(v) for k, v in value.items()}
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "default"):
            continue
        else:
            out[key] = structural_to_jsonschema(value)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "oneOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_schema(group: str, kind: str, version: str) -> dict:
    """The openAPIV3Schema of ``kind`` in ``group``/``version`` from ../shared/k8s-schemas."""
    for name, text in _crd_texts():
        crd = yaml.safe_load(text)
        spec = crd.get("spec", {})
        if crd.get("kind") != "CustomResourceDefinition" or spec.get("group") != group:
            continue
        if spec.get("names", {}).get("kind") != kind:
            continue
        for v in spec["versions"]:
            if v["name"] == version:
                assert v.get("served", False), f"{group}/{version} {kind} is not served"
                return v["schema"]["openAPIV3Schema"]
        raise AssertionError(f"{name} has no version {version} of {kind}")
    raise AssertionError(f"no CRD for {kind}.{group} in {SCHEMAS}")


def _k8s_validate():
    try:
        import kubernetes_validate
    except ImportError:
        if _in_ci():
            pytest.fail("kubernetes-validate is not installed: pip install -e '.[test]'")
        pytest.skip("kubernetes-validate is not installed: pip install -e '.[test]'")
    return kubernetes_validate


@functools.lru_cache(maxsize=None)
def object_meta_validator():
    """A validator of ObjectMeta, from kubernetes-validate's strict definitions."""
    import jsonschema
    from referencing import Registry, Resource

    _k8s_validate()
    from kubernetes_validate import utils

    version = utils.latest_version()
    defs = utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json",
                                 version)
    registry = Resource.from_contents(defs) @ Registry()
    ref = f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def validate_custom_resource(doc: dict) -> None:
    import jsonschema

    group, version = doc["apiVersion"].split("/")
    schema = structural_to_jsonschema(crd_schema(group, doc["kind"], version))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{doc['kind']} {'.'.join(map(str, e.path))}: {e.message[:300]}" for e in errors[:20])
    errors = list(object_meta_validator().iter_errors(doc["metadata"]))
    assert not errors, "\n".join(f"{doc['kind']} metadata: {e.message[:300]}" for e in errors)


def cel_rules_touched(schema: dict, instance, path: str = "") -> list[str]:
    """Paths of the rendered object where the CRD has a CEL rule (not evaluated here)."""
    found = []
    if schema.get("x-kubernetes-validations"):
        found.append(path or "(root)")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub:
                found += cel_rules_touched(sub, value, f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(instance):
            found += cel_rules_touched(schema["items"], value, f"{path}[{i}]")
    return found


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", CASES)
def test_helm_lint(case):
    if not DASHBOARD.exists():
        pytest.fail(f"{DASHBOARD.relative_to(REPO)} is missing (files/distmerge.json links to it)")
    r = _run([_helm(), "lint", "--strict", str(CHART), *_values_args(case)])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("case", CASES)
def test_renders_the_expected_objects(case):
    docs = render(case)
    values = yaml.safe_load((VALUES_DIR / case).read_text()) if case else {}
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "RayJob"]
    if values.get("dashboard", {}).get("enabled", True):
        expected.append("ConfigMap")
    if values.get("metrics", {}).get("enabled", True):
        expected.append("PodMonitor")
    assert kinds == sorted(expected)
    for d in docs:
        assert d["apiVersion"] == {"RayJob": "ray.io/v1", "PodMonitor": "monitoring.coreos.com/v1",
                                   "ConfigMap": "v1"}[d["kind"]]


@pytest.mark.parametrize("case", CASES)
def test_custom_resources_match_the_crd_schemas(case):
    docs = [d for d in render(case) if d["kind"] in ("RayJob", "PodMonitor")]
    assert docs
    for doc in docs:
        validate_custom_resource(doc)


@pytest.mark.parametrize("case", CASES)
def test_no_field_with_an_unevaluated_cel_rule_is_set(case):
    for doc in render(case):
        if doc["kind"] in ("RayJob", "PodMonitor"):
            group, version = doc["apiVersion"].split("/")
            touched = cel_rules_touched(crd_schema(group, doc["kind"], version), doc)
            assert touched == [], f"{doc['kind']}: CEL rules at {touched} are not checked by this test"


def test_crd_validation_catches_mistakes():
    """The schema check is not vacuous: typos, wrong types and bad quantities are refused."""
    import jsonschema

    rayjob = one(render(None), "RayJob")
    schema = structural_to_jsonschema(crd_schema("ray.io", "RayJob", "v1"))
    v = jsonschema.Draft7Validator(schema)
    assert not list(v.iter_errors(rayjob))
    bad = copy.deepcopy(rayjob)
    bad["spec"]["shutdownAfterJobFinish"] = True                      # typo
    bad["spec"]["backoffLimit"] = "two"                                # type
    worker = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["ports"][0]["containerPort"] = "http"      # type inside the pod spec
    worker["containers"][0]["resources"]["limits"]["cpu"] = "eight"    # quantity pattern
    worker["tolerations"] = [{"key": "a", "operatr": "Exists"}]        # nested typo
    messages = " ".join(e.message for e in v.iter_errors(bad))
    for fragment in ("shutdownAfterJobFinish", "'two'", "'http'", "'eight'", "operatr"):
        assert fragment in messages, messages
    podmonitor = one(render(None), "PodMonitor")
    podmonitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    pm = jsonschema.Draft7Validator(structural_to_jsonschema(
        crd_schema("monitoring.coreos.com", "PodMonitor", "v1")))
    assert any("15 seconds" in e.message for e in pm.iter_errors(podmonitor))


@pytest.mark.parametrize("case", CASES)
def test_core_kinds_and_pod_templates_match_the_kubernetes_schemas(case):
    kv = _k8s_validate()
    from kubernetes_validate import utils

    docs = render(case)
    checked = []
    for version in (K8S_OLDEST, utils.latest_version()):
        for doc in docs:
            if "." in doc["apiVersion"].split("/")[0] and "/" in doc["apiVersion"]:
                continue                                    # custom resources: see above
            kv.validate(doc, version, strict=True)
            checked.append(doc["kind"])
        # The pod templates embedded in the RayJob, as PodTemplate objects of that version.
        for role, template in pod_templates(one(docs, "RayJob")).items():
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": role.replace(":", "-")}, "template": template}
            kv.validate(wrapped, version, strict=True)
            checked.append(f"PodTemplate {role}")
    assert "ConfigMap" in checked and "PodTemplate head" in checked


def test_core_kind_validation_catches_mistakes():
    kv = _k8s_validate()
    cm = one(render(None), "ConfigMap", "-pipeline")
    kv.validate(cm, K8S_OLDEST, strict=True)
    bad = copy.deepcopy(cm)
    bad["data"]["n"] = 1
    with pytest.raises(Exception, match="1 is not of type"):
        kv.validate(bad, K8S_OLDEST, strict=True)
    bad = copy.deepcopy(cm)
    bad["dta"] = {}
    with pytest.raises(Exception, match="dta"):
        kv.validate(bad, K8S_OLDEST, strict=True)


def test_kubectl_dry_run_needs_a_server():
    """Why the core kinds are not checked with kubectl: even client-side dry runs ask an API
    server (discovery, OpenAPI). If a kubectl ever does it offline, use it here instead."""
    kubectl = require("kubectl")
    cm = yaml.safe_dump(one(render(None), "ConfigMap", "-pipeline"))
    env = dict(os.environ, KUBECONFIG=os.devnull)
    r = _run([kubectl, "apply", "--dry-run=client", "--server=http://127.0.0.1:9", "-f", "-"],
             input=cm, env=env)
    assert r.returncode != 0 and "127.0.0.1:9" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("case", CASES)
def test_the_pipeline_parses_with_distmerge(case):
    from distmerge.config import parse_pipeline
    from distmerge.methods import build

    docs = render(case)
    data = pipeline_of(docs)
    pipeline = parse_pipeline(data, source=f"ConfigMap ({case or 'defaults'})")
    build(pipeline.method.name, pipeline.method.params(),
          [(o.match, o.params()) for o in pipeline.overrides])
    assert pipeline.ray.address == "auto"
    # the workers the pipeline asks for fit the worker group
    group = one(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = int(next((v for k, v in limits.items() if k.endswith("/gpu")), 0))
    need = pipeline.resources.workers * pipeline.resources.gpus_per_worker
    assert need <= gpus * group["replicas"]
    if gpus:
        assert pipeline.resources.gpus_per_worker > 0


@pytest.mark.parametrize("case", CASES)
def test_entrypoint_config_map_and_mounts_agree(case):
    docs = render(case)
    rayjob = one(docs, "RayJob")
    cm = one(docs, "ConfigMap", "-pipeline")
    args = shlex.split(rayjob["spec"]["entrypoint"])
    assert args[:4] == ["distmerge", "run", "/etc/distmerge/pipeline.yaml", "--resume"]
    for role, template in pod_templates(rayjob).items():
        if role == "submitter":
            continue
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["pipeline"]["configMap"]["name"] == cm["metadata"]["name"]
        assert volumes["pipeline"]["configMap"]["items"] == [
            {"key": "pipeline.yaml", "path": "pipeline.yaml"}]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["/etc/distmerge"] == "pipeline"
        assert set(mounts.values()) <= set(volumes)
        assert "cache" in mounts.values() and mounts["/dev/shm"] == "dshm"
    spec = rayjob["spec"]
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    assert spec["backoffLimit"] >= 0 and spec["ttlSecondsAfterFinished"] >= 0


@pytest.mark.parametrize("case", CASES)
def test_metrics_port_entrypoint_container_and_podmonitor_agree(case):
    docs = render(case)
    rayjob = one(docs, "RayJob")
    args = shlex.split(rayjob["spec"]["entrypoint"])
    head = ray_containers(rayjob)["head"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    monitors = by_kind(docs, "PodMonitor")
    if "--metrics-port" not in args:
        assert not monitors and "dm-metrics" not in ports
        return
    port = int(args[args.index("--metrics-port") + 1])
    assert ports["dm-metrics"] == port
    assert len(set(ports.values())) == len(ports), "two container ports share a number"
    assert all(len(name) <= 15 for name in ports)          # IANA_SVC_NAME
    (pm,) = monitors
    endpoints = [e["port"] for e in pm["spec"]["podMetricsEndpoints"]]
    assert endpoints[0] == "dm-metrics"
    selector = pm["spec"]["selector"]["matchLabels"]
    for role, template in pod_templates(rayjob).items():
        labels = template["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items()), role


def test_metrics_port_and_linger_from_values():
    docs = render(None, extra=("--set", "metrics.port=9555", "--set", "metrics.lingerSeconds=120"))
    rayjob = one(docs, "RayJob")
    assert "--metrics-port 9555" in rayjob["spec"]["entrypoint"]
    assert {"name": "dm-metrics", "containerPort": 9555} in ray_containers(rayjob)["head"]["ports"]
    assert pipeline_of(docs)["metrics"] == {"linger_seconds": 120}
    assert pipeline_of(render(None))["metrics"] == {"linger_seconds": 60}
    # the pipeline's own setting wins
    own = render(None, extra=("--set", "pipeline.base=a", "--set", "pipeline.experts[0].path=b",
                              "--set", "pipeline.experts[1].path=c", "--set", "pipeline.method.name=linear",
                              "--set", "pipeline.output.path=s3://b/d",
                              "--set", "pipeline.metrics.linger_seconds=5"))
    assert pipeline_of(own)["metrics"] == {"linger_seconds": 5}


def test_entrypoint_parses_with_the_distmerge_cli():
    """The rendered entrypoint is a command line distmerge's parser accepts (not run)."""
    from distmerge.cli import build_parser

    parser = build_parser()
    for case in CASES:
        args = shlex.split(one(render(case), "RayJob")["spec"]["entrypoint"])
        ns = parser.parse_args(args[1:])
        assert ns.verb == "run" and ns.resume and ns.pipeline == "/etc/distmerge/pipeline.yaml"


def test_gpu_workers_with_tolerations_and_node_selector():
    values = yaml.safe_load((VALUES_DIR / "gpu-workers.yaml").read_text())
    rayjob = one(render("gpu-workers.yaml"), "RayJob")
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "h100"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    spec = group["template"]["spec"]
    assert spec["tolerations"] == values["workers"]["tolerations"]
    assert spec["nodeSelector"] == values["workers"]["nodeSelector"]
    assert spec["affinity"] == values["workers"]["affinity"]
    assert spec["imagePullSecrets"] == [{"name": "registry-pull"}]
    res = spec["containers"][0]["resources"]
    assert res["limits"] == {"cpu": "96", "memory": "1800Gi", "nvidia.com/gpu": "8"}
    assert res["requests"] == res["limits"]
    assert group["rayStartParams"] == {"object-store-memory": "200000000000"}
    assert spec["containers"][0]["image"] == "registry.example.com/ml/distmerge:0.1.0-cu12"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert rayjob["spec"]["activeDeadlineSeconds"] == 172800
    assert rayjob["spec"]["backoffLimit"] == 3
    assert rayjob["spec"]["entrypoint"].endswith("--slice-size 512MB")
    pipeline = pipeline_of(render("gpu-workers.yaml"))
    assert pipeline["resources"]["workers"] == 32 and pipeline["resources"]["gpus_per_worker"] == 1
    assert pipeline["name"] == "llama-48-experts"     # `pipeline` wins over the default pipelineYaml
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    pm = one(render("gpu-workers.yaml"), "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_s3_credentials_from_a_secret_under_the_pipelines_names():
    docs = render("s3-credentials.yaml")
    s3 = pipeline_of(docs)["storage"]["s3"]
    wanted = {s3["key_env"]: "access-key", s3["secret_env"]: "secret-key",
              s3["token_env"]: "session-token"}
    assert set(wanted) == {"MERGE_S3_KEY", "MERGE_S3_SECRET", "MERGE_S3_TOKEN"}
    for role, container in ray_containers(one(docs, "RayJob")).items():
        env = env_of(container)
        for name, key in wanted.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "merge-s3", "key": key}, role
            assert "value" not in env[name]
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert env["AWS_REQUEST_CHECKSUM_CALCULATION"]["value"] == "when_required"
    # no credential value anywhere in the rendered text: only Secret references
    assert "secretKeyRef" in _template("s3-credentials.yaml")


def test_s3_default_variable_names_without_key_env():
    docs = render(None, extra=("--set", "credentials.s3.secretName=aws"))
    env = env_of(ray_containers(one(docs, "RayJob"))["worker:gpu"])
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "aws",
                                                                      "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
    assert "AWS_SESSION_TOKEN" not in env


def test_existing_pvc_cache_and_gcs_key_file():
    docs = render("pvc-cache.yaml")
    rayjob = one(docs, "RayJob")
    for role, template in pod_templates(rayjob).items():
        if role == "submitter":
            continue
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "merge-models"}}
        assert volumes["gcs-credentials"]["secret"]["secretName"] == "gcs-sa"
        container = template["spec"]["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["cache"] == "/models"
        env = env_of(container)
        assert env["DISTMERGE_CACHE"]["value"] == "/models"
        path = env["GOOGLE_APPLICATION_CREDENTIALS"]["value"]
        assert path == f"{mounts['gcs-credentials']}/service-account.json"
    assert pipeline_of(docs)["resources"] == {"workers": 6, "gpus_per_worker": 1, "memory_per_worker": "16GB"}


def test_names_fit_kuberay_limits_with_a_very_long_release_name():
    assert len(LONG_RELEASE) == 53
    names = set()
    for case in ("long-name.yaml", None):
        docs = render(case, release=LONG_RELEASE)
        rayjob = one(docs, "RayJob")
        name = rayjob["metadata"]["name"]
        names.add(name)
        group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
        assert DNS1035.match(name) and len(name) <= MAX_RAYJOB_NAME
        assert len(name) + CLUSTER_SUFFIX <= MAX_RAYCLUSTER_NAME
        # the worker pods' prefix <cluster>-<group> is not cut by KubeRay's PodName
        assert len(name) + CLUSTER_SUFFIX + 1 + len(group) <= MAX_POD_PREFIX
        # cut names end with a hash of the whole name
        full = f"{LONG_RELEASE}-{'distmerge-for-the-llama-family-of-models' if case else 'distmerge'}"
        assert name.endswith("-" + hashlib.sha256(full.encode()).hexdigest()[:5])
        assert name.startswith(LONG_RELEASE[:20])
    assert len(names) == 2
    # another long release name with the same first 40 characters gets another name
    other = one(render(None, release=LONG_RELEASE[:-1] + "d"), "RayJob")["metadata"]["name"]
    assert other not in names


@pytest.mark.parametrize("case", CASES)
def test_every_name_and_label_is_valid(case):
    for release in ("merge", LONG_RELEASE):
        docs = render(case, release=release)
        for doc in docs:
            meta = doc["metadata"]
            assert DNS1123_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
            if doc["kind"] == "RayJob":
                assert DNS1035.match(meta["name"]) and len(meta["name"]) <= MAX_RAYJOB_NAME
            labels = dict(meta.get("labels", {}))
            if doc["kind"] == "RayJob":
                for template in pod_templates(doc).values():
                    labels.update(template["metadata"]["labels"])
                for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
                    assert DNS1123_LABEL.match(g["groupName"])
            for key, value in labels.items():
                assert len(value) <= 63 and LABEL_VALUE.match(value), (key, value)


def test_name_starting_with_a_digit_becomes_a_dns1035_label():
    name = one(render(None, release="7b-merge"), "RayJob")["metadata"]["name"]
    assert name == "dm-7b-merge-distmerge"
    assert one(render(None, release="distmerge-7b"), "RayJob")["metadata"]["name"] == "distmerge-7b"


def test_dashboard_config_map_is_the_grafana_json_through_the_link():
    link = CHART / "files" / "distmerge.json"
    assert link.is_symlink() and os.readlink(link) == "../../../deploy/grafana/distmerge.json"
    assert link.resolve() == DASHBOARD.resolve()
    cm = one(render(None), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = cm["data"]["distmerge.json"]
    assert text.strip() == DASHBOARD.read_text().strip()
    dashboard = json.loads(text)
    assert dashboard.get("uid")


def test_dashboard_labels_annotations_and_namespace():
    cm = one(render(None, extra=("--set", "dashboard.namespace=monitoring",
                                 "--set", "dashboard.annotations.grafana_folder=distmerge")),
             "ConfigMap", "-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "distmerge"}


def test_job_lifecycle_values():
    spec = one(render(None, extra=("--set", "job.backoffLimit=5", "--set", "job.ttlSecondsAfterFinished=60",
                                   "--set", "job.activeDeadlineSeconds=3600",
                                   "--set", "job.shutdownAfterJobFinishes=false")), "RayJob")["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"],
            spec["shutdownAfterJobFinishes"]) == (5, 60, 3600, False)
    defaults = one(render(None), "RayJob")["spec"]
    assert "activeDeadlineSeconds" not in defaults and defaults["shutdownAfterJobFinishes"] is True


def test_pipeline_from_set_file(tmp_path):
    """--set-file pipelineYaml=FILE, deploy/README.md's way: the repository's quickstart pipeline,
    its models and output moved onto a shared claim."""
    from distmerge.config import parse_pipeline

    original = yaml.safe_load((REPO / "pipelines" / "quickstart.yaml").read_text())
    text = (REPO / "pipelines" / "quickstart.yaml").read_text()
    text = text.replace("~/.cache/distmerge/demo/", "/models/demo/")
    text = text.replace("merged/quickstart", "/models/merged")
    src = tmp_path / "quickstart.yaml"
    src.write_text(text)
    docs = render(None, extra=("--set-file", f"pipelineYaml={src}", "--set", "workers.gpus=0",
                               "--set", "cache.type=existingClaim", "--set", "cache.existingClaim=models",
                               "--set", "cache.mountPath=/models"))
    data = pipeline_of(docs)
    assert data["method"] == original["method"] and data["overrides"] == original["overrides"]
    assert [e["path"] for e in data["experts"]] == [f"/models/demo/expert-{i}" for i in range(1, 5)]
    assert data["ray"] == {"address": "auto"}
    assert data["resources"]["workers"] == 2            # the pipeline's own, kept
    parse_pipeline(data)
    assert "output.path merged/quickstart is a local path" in render_fails(
        "--set-file", f"pipelineYaml={REPO / 'pipelines' / 'quickstart.yaml'}", "--set", "workers.gpus=0")


@pytest.mark.parametrize("extra, message", [
    (("--set", "image.pullPolicy=Sometimes"), "pullPolicy"),
    (("--set", "workers.replicas=0"), "workers.replicas"),
    (("--set", "workers.gpus=-1"), "workers.gpus"),
    (("--set", "workers.groupName=GPU_workers"), "workers.groupName"),
    (("--set", "metrics.port=8265"), "metrics.port"),
    (("--set", "cache.type=hostPath"), "cache.type"),
    (("--set", "cache.type=existingClaim"), "existingClaim"),
    (("--set", "job.backoffLimit=-1"), "job.backoffLimit"),
    (("--set", "credentials.hub.env=HF-TOKEN"), "credentials.hub.env"),
    (("--set", "unknownKey=1"), "unknownKey"),
    (("--set", "head.cpu=lots"), "head.cpu"),
])
def test_values_schema_refuses_bad_values(extra, message):
    assert message in render_fails(*extra)


MINIMAL = "base: a\nexperts: [{path: b}, {path: c}]\nmethod: {name: linear}\noutput: {path: s3://b/d}\n"


@pytest.mark.parametrize("pipeline_text, extra, message", [
    ("", (), "no pipeline"),
    ("just text", (), "pipelineYaml"),
    ("[1, 2]", (), "pipelineYaml"),
    ("base: a\n", (), "has no `experts`"),
    (MINIMAL + "resources: {workers: 4, gpus_per_worker: 1}",
     ("--set", "workers.replicas=1", "--set", "workers.gpus=1"), "would wait for GPUs"),
    (MINIMAL + "resources: {gpus_per_worker: 1}", ("--set", "workers.gpus=0"), "workers.gpus is 0"),
    (MINIMAL + "storage: {s3: {key_env: K, secret_env: S}}", (), "credentials.s3.secretName is empty"),
    (MINIMAL + "storage: {s3: {key_env: K, secret_env: S, token_env: T}}",
     ("--set", "credentials.s3.secretName=s3"), "sessionTokenKey"),
    (MINIMAL + "ray: {address: 'ray://elsewhere:10001'}", (), "ray.address"),
    # a local output must be on the shared claim
    (MINIMAL.replace("{path: s3://b/d}", "{path: /cache/out}"), (), "output.path /cache/out is a local path"),
    (MINIMAL.replace("{path: s3://b/d}", "{path: /elsewhere/out}"),
     ("--set", "cache.type=existingClaim", "--set", "cache.existingClaim=models"), "under cache.mountPath"),
])
def test_template_refuses_an_unusable_pipeline(tmp_path, pipeline_text, extra, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text)
    assert message in render_fails("--set-file", f"pipelineYaml={path}", *extra)


def test_dockerfile_builds_on_a_ray_gpu_image_without_secrets():
    """deploy/Dockerfile cannot be built here (no daemon, no registry): its shape is checked."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert froms == ["FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert args["RAY_VERSION"] == chart["rayVersion"]
    assert 'pip install --no-cache-dir ".[s3]"' in text
    # every COPY source exists (the build context is the repository root)
    for ln in lines:
        if ln.upper().startswith("COPY "):
            sources = [w for w in ln.split()[1:-1] if not w.startswith("--")]
            assert sources and all((REPO / src).exists() for src in sources), ln
    # nothing that looks like a credential is set in the image
    for ln in lines:
        if ln.upper().startswith(("ENV ", "ARG ")):
            assert not re.search(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIALS)", ln, re.I), ln
