"""deploy/ validated offline: Kubernetes objects against the Kubernetes 1.31 OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), InferenceServices against KServe's
v1beta1 CRD schema (deploy/schemas/), and the ports, paths, command line and environment in the
manifests equal to those of the KServe-mode TorchServe the integration tests start
(deploy/kserve_layout.py's config.properties, harness/kserve.py's command)."""
from __future__ import annotations

import copy
import gzip
import json
import re
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy import REPO
from deploy import kserve_layout as ks
from deploy.targets import models, targets
from harness.kserve import KServeTorchServe

DEPLOY = REPO / "deploy"
K8S_VERSION = "1.31.0"
NOT_OBJECTS = {"prometheus-adapter-values.yaml"}  # Helm values


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests():
    files = sorted((DEPLOY / "kserve").glob("*.yaml")) + sorted(p for p in (DEPLOY / "k8s").glob("*.yaml")
                                                                 if p.name not in NOT_OBJECTS)
    return [(p, d) for p in files for d in docs(p)]


def strict(schema):
    """Unknown fields fail, as `kubectl apply --validate=strict` reports them (the CRD schema
    itself leaves them to pruning)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def isvc_schema():
    with gzip.open(DEPLOY / "schemas" / "inferenceservice-v1beta1.schema.json.gz") as f:
        return strict(json.load(f))


def of_kind(kind):
    return [(p, d) for p, d in manifests() if d["kind"] == kind]


def config():
    return ks.config_properties("cpu", models())


def port(url):
    return urlparse(url).port


def test_every_manifest_is_found():
    kinds = sorted({d["kind"] for _, d in manifests()})
    assert kinds == ["ClusterServingRuntime", "Deployment", "HorizontalPodAutoscaler", "InferenceService",
                     "NetworkPolicy", "Service"]
    assert len(of_kind("InferenceService")) == 3


KSERVE_KINDS = ("InferenceService", "ClusterServingRuntime")


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in manifests() if d["kind"] not in KSERVE_KINDS],
                         ids=lambda v: getattr(v, "name", None) or v.get("kind"))
def test_kubernetes_objects_validate(path, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_hpa_uses_current_api():
    (_, hpa), = of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"


@pytest.mark.parametrize("path,doc", of_kind("InferenceService"), ids=lambda v: getattr(v, "name", None) or "isvc")
def test_inference_services_validate(path, doc, isvc_schema):
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    jsonschema.validate(doc, isvc_schema)


def test_strict_schema_catches_a_typo(isvc_schema):
    (_, doc), *_ = of_kind("InferenceService")
    bad = copy.deepcopy(doc)
    bad["spec"]["predictor"]["model"]["storageUrl"] = bad["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, isvc_schema)
    bad = copy.deepcopy(of_kind("Deployment")[0][1])
    bad["spec"]["template"]["spec"]["containers"][0]["port"] = 1
    with pytest.raises(Exception):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_inference_services_match_the_kserve_layout_and_runtime():
    seen = set()
    for path, doc in of_kind("InferenceService"):
        pred = doc["spec"]["predictor"]
        model = pred["model"]
        assert model["runtime"] == ks.RUNTIME_NAME and model["modelFormat"]["name"] == "pytorch"
        # protocolVersion -> the TS_SERVICE_ENVELOPE the local tests set (ENVELOPES)
        assert model["protocolVersion"] in ks.ENVELOPES
        target = model["storageUri"].rstrip("/").rsplit("/", 1)[1]
        assert target in targets(), f"{path.name}: storageUri must end in a target, got {target}"
        seen.add(target)
        # KServe's runtime supplies the command line: the manifests must not override it
        assert "args" not in model and "command" not in model
        assert {e["name"] for e in model.get("env", [])}.isdisjoint({"TS_SERVICE_ENVELOPE", "TS_CONFIG_FILE"})
        limits = model["resources"]["limits"]
        if target == "gpu":
            assert limits.get("nvidia.com/gpu") == "1"
        if target == "arm64":
            assert pred["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
        else:
            assert "nodeSelector" not in pred
    assert seen == {"cpu", "gpu", "arm64"}


def test_layout_config_is_what_kserve_needs_and_keeps_management_in_the_pod():
    cfg = config()
    assert port(cfg["inference_address"]) == ks.INFERENCE_PORT == 8085
    assert cfg["enable_envvars_config"] == "true" and "model_snapshot" in cfg
    assert cfg["model_store"] == ks.STORE_PATH
    assert KServeTorchServe.command(ks.STORE_PATH, ks.CONFIG_PATH) == ks.RUNTIME_ARGS
    # auth decision: token off (every pod makes its own keys); management stays in the pod
    assert cfg["disable_token_authorization"] == "true"
    for key in ("inference_address", "management_address"):
        assert urlparse(cfg[key]).hostname == "127.0.0.1", key
    assert cfg["grpc_inference_address"] == cfg["grpc_management_address"] == "127.0.0.1"
    assert cfg["enable_model_api"] == "false"


def test_deployment_runs_the_kserve_command_with_the_layout_ports():
    cfg = config()
    (_, dep), = of_kind("Deployment")
    c, = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ks.RUNTIME_ARGS
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"inference": port(cfg["inference_address"]), "metrics": port(cfg["metrics_address"])}
    env = {e["name"]: e["value"] for e in c["env"]}
    # only the inference address moves off loopback; management is never exposed
    assert env == {"TS_INFERENCE_ADDRESS": f"http://0.0.0.0:{ports['inference']}"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ping", "port": ports["inference"]}
    (_, svc), = of_kind("Service")
    assert {p["port"] for p in svc["spec"]["ports"]} == set(ports.values())
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    (_, pol), = of_kind("NetworkPolicy")
    assert {p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"]} == set(ports.values())
    assert ks.MANAGEMENT_PORT not in {p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"]}


def test_hpa_metric_is_the_adapter_rule():
    (_, hpa), = of_kind("HorizontalPodAutoscaler")
    (_, dep), = of_kind("Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    rule, = values["rules"]["external"]
    metric = hpa["spec"]["metrics"][0]["external"]["metric"]
    assert metric["name"] == rule["name"]["as"]
    assert "ts_queue_latency_microseconds" in rule["metricsQuery"]


def test_dockerfile_pins_its_base_and_defaults_to_the_production_config():
    """deploy/Dockerfile: a pinned default base (a build argument, `make image` passes its own),
    the serve pins, tini + deploy/image/serve.py as the entry point with the production config by
    default; the Deployment's and the runtime's args (RUNTIME_ARGS, starting with `torchserve`)
    are what serve.py runs as is."""
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "/opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt" in text
    assert re.search(r"^COPY .*outputs/kserve/\$\{TARGET\}/ /mnt/models/$", text, re.M)
    assert re.search(r"^COPY config\.production\.properties (\S+)$", text, re.M)
    installed = re.search(r"^COPY config\.production\.properties (\S+)$", text, re.M).group(1)
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    assert entry[:2] == ["/usr/bin/tini", "--"] and entry[-1].endswith("/serve.py")
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert f"--ts-config={installed}" in cmd
    assert re.search(r"^USER (?!root)\S+$", text, re.M)
    serve = (DEPLOY / "image" / "serve.py").read_text()
    assert 'if argv and argv[0] == "torchserve":\n        os.execvp(argv[0], argv)' in serve
    (_, dep), = of_kind("Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][0] == ks.RUNTIME_ARGS[0] == "torchserve"


def test_serving_runtime_runs_what_the_local_kserve_mode_runs():
    """The shipped ClusterServingRuntime's container = the command line and environment
    harness/kserve.py runs for tests/integration/test_kserve_server.py, with only the address
    differing (the pod's 0.0.0.0:8080 there, a free loopback port here)."""
    (path, runtime), = of_kind("ClusterServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["metadata"]["name"] == ks.RUNTIME_NAME
    spec = runtime["spec"]
    assert sorted(spec["protocolVersions"]) == sorted(ks.ENVELOPES)
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["pytorch"]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(port(config()["metrics_address"]))
    c, = spec["containers"]
    assert c["name"] == "kserve-container"
    # A Pod with this container validates against Kubernetes' own schema (unknown fields fail).
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
                                  "spec": {"containers": [c]}}, K8S_VERSION, strict=True)
    assert c["args"] == ks.RUNTIME_ARGS == KServeTorchServe.command(ks.STORE_PATH, ks.CONFIG_PATH)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == ks.RUNTIME_ENV
    for protocol, envelope in ks.ENVELOPES.items():
        local = KServeTorchServe(path.parent, protocol).runtime_env()
        assert set(local) == set(env)
        assert local["TS_SERVICE_ENVELOPE"] == envelope
        assert urlparse(local["TS_INFERENCE_ADDRESS"]).scheme == urlparse(env["TS_INFERENCE_ADDRESS"]).scheme
    (exposed,) = c["ports"]
    assert exposed["containerPort"] == port(env["TS_INFERENCE_ADDRESS"]) == ks.KSERVE_HTTP_PORT
    # Probes on that port: the layout's token is off, so /ping answers the kubelet.
    assert config()["disable_token_authorization"] == "true"
    assert c["readinessProbe"]["httpGet"] == {"path": "/ping", "port": ks.KSERVE_HTTP_PORT}
    assert c["livenessProbe"]["tcpSocket"] == {"port": ks.KSERVE_HTTP_PORT}
