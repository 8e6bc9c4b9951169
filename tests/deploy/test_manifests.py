"""deploy/'s Kubernetes manifests, offline: every kustomization renders, every object validates against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail), and the ports, model name, probes, access key
header and command lines in them are lumireg's own.

Custom resources have no schema in kubernetes-validate. They are checked in two parts: the core types they embed
(the InferenceService's predictor container and volumes, the ServiceMonitor's label selector) against the Kubernetes
schemas of those types, and their own fields against the short list of fields KServe's ``serving.kserve.io/v1beta1``
and the Prometheus Operator's ``monitoring.coreos.com/v1`` API references give, so a misspelt field fails here.
The HorizontalPodAutoscaler is core (``autoscaling/v2``); its custom metric must be the one the prometheus-adapter
rule in deploy/prometheus-adapter/values.yaml serves, from series the real server exports.
"""

import shlex
import shutil
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

sys.path.insert(0, str(Path(__file__).parent))  # kustomize.py beside this file (pytest runs in importlib mode)

from kustomize import render, render_kubectl, render_python  # noqa: E402

from lumireg.benchmarks.serving import scrape  # noqa: E402
from lumireg.cli import build_parser  # noqa: E402
from lumireg.contract import (  # noqa: E402
    ACCESS_KEY_HEADER,
    ENTRY_MODEL,
    GRPC_PORT,
    HEALTH_LIVE_PATH,
    HEALTH_READY_PATH,
    HTTP_PORT,
    METRICS_PATH,
    METRICS_PORT,
    MIN_PING_INTERVAL_MS,
    RESTRICTED_PROTOCOLS,
)

DEPLOY = Path(__file__).parents[2] / "deploy"
KUSTOMIZATIONS = ("base", "overlays/cluster", "overlays/kserve", "cohort")
# the oldest Kubernetes the manifests promise to run on, and the newest kubernetes-validate knows
VERSIONS = ("1.29.0", "1.37.0")
PORTS = {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
CUSTOM = {"ServiceMonitor", "InferenceService"}
# the fields deploy/ may use from the custom resources' API references (KServe v1beta1, Prometheus Operator v1)
KSERVE_PREDICTOR = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "model", "volumes"}
KSERVE_MODEL = {"modelFormat", "protocolVersion", "runtime", "runtimeVersion", "storageUri"}
MONITOR_ENDPOINT = {"port", "path", "interval", "scheme", "scrapeTimeout"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(DEPLOY / name) for name in KUSTOMIZATIONS}


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["kind"] for o in objects])
    return found[0]


def _core(definition: str, value, version: str) -> None:
    """``value`` against the Kubernetes schema of ``io.k8s...`` type ``definition`` (strict)."""
    definitions = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{definition}"}
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(value)


def test_every_kustomization_renders_and_every_object_validates(rendered):
    kinds = {name: sorted(o["kind"] for o in objects) for name, objects in rendered.items()}
    assert kinds == {
        "base": ["Deployment", "PodDisruptionBudget", "Service", "Service"],
        "overlays/cluster": [
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceMonitor",
        ],
        "overlays/kserve": ["InferenceService"],
        "cohort": ["Job"],
    }
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] in CUSTOM:
                continue
            for version in VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)


def test_a_misspelt_field_fails_validation(rendered):
    deployment = _one(rendered["base"], "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed: the Python renderer alone")
def test_the_python_renderer_agrees_with_kubectl():
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    for name in KUSTOMIZATIONS:
        assert sorted(render_python(DEPLOY / name), key=key) == sorted(render_kubectl(DEPLOY / name), key=key), name


def test_the_custom_resources_embed_valid_core_types_and_known_fields(rendered):
    service = _one(rendered["overlays/kserve"], "InferenceService")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and set(service["spec"]) == {"predictor"}
    predictor = service["spec"]["predictor"]
    assert set(predictor) <= KSERVE_PREDICTOR, set(predictor) - KSERVE_PREDICTOR
    model = dict(predictor["model"])
    assert model["modelFormat"] == {"name": "triton"} and model["runtime"] == "kserve-tritonserver"
    container = {k: v for k, v in model.items() if k not in KSERVE_MODEL}
    for version in VERSIONS:
        _core("io.k8s.api.core.v1.Container", {"name": "kserve-container", **container}, version)
        for volume in predictor.get("volumes", []):
            _core("io.k8s.api.core.v1.Volume", volume, version)
    monitor = _one(rendered["overlays/cluster"], "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and set(monitor["spec"]) == {"selector", "endpoints"}
    _core("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector", monitor["spec"]["selector"], VERSIONS[-1])
    assert all(set(e) <= MONITOR_ENDPOINT for e in monitor["spec"]["endpoints"])


def _container(obj: dict) -> dict:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return container


def _options(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_the_server_pods_listen_and_answer_probes_where_lumireg_serve_does(rendered):
    objects = rendered["overlays/cluster"]
    deployment = _one(objects, "Deployment")
    container = _container(deployment)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    assert container["command"] == ["lumireg", "serve"]
    args = build_parser().parse_args(["serve", *container["args"]])  # every flag is one lumireg serve takes
    assert (args.grpc_port, args.http_port, args.metrics_port) == (GRPC_PORT, HTTP_PORT, METRICS_PORT)
    assert args.host == args.http_host == args.metrics_host == "0.0.0.0"  # probes and Prometheus reach the pod IP
    for probe, path in (("startupProbe", HEALTH_READY_PATH), ("readinessProbe", HEALTH_READY_PATH)):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": HEALTH_LIVE_PATH, "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(METRICS_PORT), METRICS_PATH)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm", "/etc/lumireg/tls", "/etc/lumireg/key"}
    # the files lumireg serve is given are the Secrets' keys, where they are mounted
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert secrets == {"tls": "lumireg-tls", "access-key": "lumireg-access-key"}
    assert args.tls_cert == f"{mounts['tls']}/tls.crt" and args.tls_key == f"{mounts['tls']}/tls.key"
    assert args.access_key_file == f"{mounts['access-key']}/access-key"
    # both Services route to the pods' named ports; the headless one has no virtual IP
    labels = pod["metadata"]["labels"]
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["port"] == PORTS[port["name"]] and port["targetPort"] == port["name"]
    assert _one(objects, "Service", "lumireg-headless")["spec"]["clusterIP"] == "None"
    budget = _one(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = _one(objects, "ServiceMonitor")
    scraped = _one(objects, "Service", "lumireg")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= scraped["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == METRICS_PATH


def test_the_kserve_server_restricts_calls_as_lumireg_serve_does(rendered):
    model = _one(rendered["overlays/kserve"], "InferenceService")["spec"]["predictor"]["model"]
    options = _options(model["args"])
    assert options["grpc-port"] == str(GRPC_PORT) and model["ports"] == [
        {"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}
    ]
    expected = f"{','.join(RESTRICTED_PROTOCOLS)}:{ACCESS_KEY_HEADER}=$(LUMIREG_ACCESS_KEY)"
    assert options["grpc-restricted-protocol"] == options["http-restricted-api"] == expected
    assert {e["name"] for e in model["env"]} >= {"LUMIREG_ACCESS_KEY"}
    assert options["grpc-http2-min-recv-ping-interval-without-data"] == str(MIN_PING_INTERVAL_MS)  # the clients ping


def test_the_autoscaler_uses_the_adapters_metric_of_the_servers_queue(rendered, server):
    hpa = _one(rendered["overlays/cluster"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one(rendered["overlays/cluster"], "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    for text in (rule["seriesQuery"], rule["metricsQuery"]):
        assert f'model="{ENTRY_MODEL}"' in text
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # the series the rule reads are ones the real server exports for the entry model
    exported = {name for (name, labels) in scrape(server.metrics_url) if dict(labels).get("model") == ENTRY_MODEL}
    for series in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert series in rule["metricsQuery"] and f"{series}_total" in exported


def test_the_cohort_job_registers_its_pairs_through_the_headless_service(rendered):
    job = _one(rendered["cohort"], "Job")
    container = _container(job)
    args = build_parser().parse_args(["register", *container["args"]])
    assert args.url == f"lumireg-headless:{GRPC_PORT}" and args.pairs and args.transport == "grpc"
    assert args.concurrency >= 2
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {str(Path(args.pairs).parent), "/etc/lumireg/tls", "/etc/lumireg/key"} <= mounts
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # a failed pod resumes in a new one
    assert shlex.join(container["command"]) == "lumireg register"


def test_the_server_pods_run_the_images_user_and_model_repository(rendered):
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    pod = _one(rendered["base"], "Deployment")["spec"]["template"]["spec"]
    args = build_parser().parse_args(["serve", *_container({"spec": {"template": {"spec": pod}}})["args"]])
    assert f"--repository {args.repository}" in dockerfile  # where the image's build exports the models
    assert f"USER {pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" in dockerfile
    assert args.tritonserver == "/opt/tritonserver" and "FROM nvcr.io/nvidia/tritonserver:" in dockerfile
