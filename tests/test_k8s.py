"""The Kubernetes manifests in ``k8s/``: schema-valid, complete, and wired to each other and to the service.

No cluster is needed. Every resource is validated in strict mode (unknown fields fail) against the
Kubernetes OpenAPI schemas shipped with ``kubernetes-validate``; the rest checks what a schema cannot:
names, ports, labels, paths and settings that must agree across files and with ``service.settings``.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import TypeAdapter

from service.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "k8s"
# The oldest Kubernetes minor the manifests target and the newest one the validator ships schemas for.
K8S_VERSIONS = ("1.31", "1.37")
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "servicemonitor.yaml", "secret.example.yaml"}
# Read by the image entrypoint (train / reindex), not by service.settings.Settings.
ENTRYPOINT_VARS = {
    "MEMREC_DATASET",
    "MEMREC_DATA_DIR",
    "MEMREC_TRAIN_ARGS",
    "MEMREC_RETRAIN_ARGS",
    "MEMREC_KEEP_VERSIONS",
}
SECRET_NAME = "memrec-secrets"
NAMESPACED_KINDS = {
    "ConfigMap",
    "CronJob",
    "Deployment",
    "HorizontalPodAutoscaler",
    "Job",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "Service",
    "StatefulSet",
}

Obj = dict[str, Any]


# ------------------------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[Obj]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    assert docs, f"{path.name} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
    return docs


def kustomization() -> Obj:
    (doc,) = load_docs(K8S / "kustomization.yaml")
    return doc


def resource_files() -> list[str]:
    files = kustomization()["resources"]
    assert isinstance(files, list)
    return [str(name) for name in files]


def all_resources() -> list[Obj]:
    return [doc for name in resource_files() for doc in load_docs(K8S / name)]


def one(kind: str, name: str) -> Obj:
    found = [r for r in all_resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def config() -> dict[str, str]:
    data = one("ConfigMap", "memrec-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    return {str(k): str(v) for k, v in data.items()}


def pod_template(workload: Obj) -> Obj:
    """The pod template of a workload (a CronJob's is its job template's)."""
    spec = workload["spec"]["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else workload["spec"]
    template: Obj = spec["template"]
    return template


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = pod_template(workload)["spec"]
    return spec


def containers(workload: Obj) -> list[Obj]:
    pod = pod_spec(workload)
    found: list[Obj] = [*pod.get("initContainers", []), *pod["containers"]]
    return found


def the_container(workload: Obj) -> Obj:
    (container,) = pod_spec(workload)["containers"]
    assert isinstance(container, dict)
    return container


def workloads() -> list[Obj]:
    return [r for r in all_resources() if r["kind"] in {"Deployment", "StatefulSet", "Job", "CronJob"}]


def memrec_workloads() -> list[Obj]:
    """The workloads running the memrec image (API, training and retraining)."""
    return [one("Deployment", "memrec-api"), one("Job", "memrec-train"), one("CronJob", "memrec-retrain")]


def env_names(container: Obj) -> set[str]:
    return {str(e["name"]) for e in container.get("env", [])}


def effective_env(container: Obj) -> dict[str, str]:
    """Plain values the container sees: its ConfigMap sources, overridden by literal ``env`` values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "memrec-config"
        env.update(config())
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
    return env


def mount_for(container: Obj, path: str) -> Obj:
    """The volume mount that holds ``path`` (the deepest one), failing when none does."""
    holders = [
        m for m in container.get("volumeMounts", []) if PurePosixPath(path).is_relative_to(m["mountPath"])
    ]
    assert holders, f"{path} is under no volume mount of container {container['name']}"
    deepest: Obj = max(holders, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    return deepest


def volume(workload: Obj, name: str) -> Obj:
    (found,) = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert isinstance(found, dict)
    return found


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = pod_template(workload)["metadata"]["labels"]
    return labels


def validate(resource: Obj, version: str) -> None:
    validated = kubernetes_validate.validate(resource, version, strict=True)
    assert validated == version, f"validated against {validated}, wanted {version}"


# ------------------------------------------------------------------------------- schema and layout


def test_kustomization_lists_exactly_the_resource_files() -> None:
    listed = resource_files()
    assert len(listed) == len(set(listed)), "a resource file is listed twice"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists {name}, which does not exist"
    present = {p.name for p in K8S.iterdir() if p.suffix in {".yaml", ".yml"}}
    assert set(listed) == present - NOT_IN_KUSTOMIZATION
    for name in NOT_IN_KUSTOMIZATION - {"kustomization.yaml"}:
        assert (K8S / name).is_file(), f"{name} is missing"


def test_kustomization_settings() -> None:
    kust = kustomization()
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    assert kust["namespace"] == "memrec"
    (image,) = kust["images"]
    assert image["name"] == "memrec"
    for entry in kust.get("labels", []):
        # Deployment and StatefulSet selectors are immutable: common labels must stay out of them.
        assert entry.get("includeSelectors", False) is False


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", resource_files())
def test_manifest_is_schema_valid(name: str, version: str) -> None:
    for resource in load_docs(K8S / name):
        validate(resource, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_secret_example_is_schema_valid(version: str) -> None:
    (secret,) = load_docs(K8S / "secret.example.yaml")
    validate(secret, version)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME


def test_servicemonitor_scrapes_the_api_service() -> None:
    (monitor,) = load_docs(K8S / "servicemonitor.yaml")  # a CRD: no schema ships with the validator
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    service = one("Service", "memrec-api")
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [kustomization()["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"


def test_every_resource_is_labelled() -> None:
    docs = all_resources() + load_docs(K8S / "servicemonitor.yaml") + load_docs(K8S / "secret.example.yaml")
    for resource in docs:
        labels = resource["metadata"].get("labels", {})
        what = f"{resource['kind']}/{resource['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "memrec", what
        assert labels.get("app.kubernetes.io/component"), what
    for workload in workloads():
        labels = pod_labels(workload)
        assert labels.get("app.kubernetes.io/name") == "memrec"
        assert (
            labels.get("app.kubernetes.io/component")
            == workload["metadata"]["labels"]["app.kubernetes.io/component"]
        )


class _BrokenDeployment:
    """Mutations that a real validator must reject."""

    @staticmethod
    def replicas_as_text(d: Obj) -> None:
        d["spec"]["replicas"] = "two"

    @staticmethod
    def unknown_container_field(d: Obj) -> None:
        d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"

    @staticmethod
    def unknown_spec_field(d: Obj) -> None:
        d["spec"]["replica"] = 2

    @staticmethod
    def port_as_text(d: Obj) -> None:
        d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"

    @staticmethod
    def missing_selector(d: Obj) -> None:
        del d["spec"]["selector"]


@pytest.mark.parametrize(
    "breakage",
    [name for name in vars(_BrokenDeployment) if not name.startswith("_")],
)
def test_validator_rejects_a_broken_deployment(breakage: str) -> None:
    deployment = one("Deployment", "memrec-api")
    validate(deployment, K8S_VERSIONS[-1])  # the intact one passes: the failure below is the mutation's
    broken = copy.deepcopy(deployment)
    getattr(_BrokenDeployment, breakage)(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# The kustomization fields :func:`render_in_python` implements, and the kinds whose pod template the
# ``labels`` transformer reaches with ``includeTemplates`` (kustomize's own list is longer; these are
# the workload kinds the manifests may use).
RENDERED_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
LABEL_ENTRY_FIELDS = {"pairs", "includeSelectors", "includeTemplates"}
TEMPLATED_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
CLUSTER_KINDS = {"Namespace"}


def image_name(ref: str) -> str:
    """``registry:5000/app:tag@sha256:…`` → ``registry:5000/app``: the name kustomize's ``images`` match."""
    ref = ref.split("@", 1)[0]
    slash, colon = ref.rfind("/"), ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def render_in_python(kust: Obj) -> list[Obj]:
    """What ``kustomize build k8s/`` renders, for the fields ``k8s/kustomization.yaml`` uses: the
    namespace on namespaced kinds, ``labels`` on objects (and on pod and volume claim templates with
    ``includeTemplates``, never on selectors), ``images`` on containers. A field or option it does not
    implement fails the test rather than being rendered wrong. The render test compares it with the
    real renderer wherever kubectl or kustomize is installed."""
    unknown = set(kust) - RENDERED_FIELDS
    assert not unknown, f"render_in_python does not implement kustomization fields {sorted(unknown)}"
    out = []
    for resource in all_resources():
        r = copy.deepcopy(resource)
        kind = r["kind"]
        assert kind in NAMESPACED_KINDS | CLUSTER_KINDS, f"is {kind} namespaced? add it to a kind set"
        if kind in NAMESPACED_KINDS and "namespace" in kust:
            r["metadata"]["namespace"] = kust["namespace"]
        for entry in kust.get("labels", []):
            assert set(entry) <= LABEL_ENTRY_FIELDS, f"unknown labels options {sorted(entry)}"
            assert not entry.get("includeSelectors", False), "selector labelling is not implemented"
            r["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates", False) and kind in TEMPLATED_KINDS:
                # the pod template, a StatefulSet's volume claim templates and a CronJob's job template
                # as kustomize does
                claims = r["spec"].get("volumeClaimTemplates", []) if kind == "StatefulSet" else []
                jobs = [r["spec"]["jobTemplate"]] if kind == "CronJob" else []
                for template in [pod_template(r), *claims, *jobs]:
                    template.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
        for image in kust.get("images", []):
            assert set(image) <= {"name", "newName", "newTag"}, f"unknown images options {sorted(image)}"
            for container in containers(r) if kind in TEMPLATED_KINDS else []:
                if image_name(container["image"]) == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
        out.append(r)
    return out


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(K8S)]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(K8S)]
    return None


def _identity(resource: Obj) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def test_image_names_drop_tag_and_digest_only() -> None:
    assert image_name("memrec:0.1.0") == "memrec"
    assert image_name("registry.example.com:5000/team/memrec:0.1.0@sha256:ab12") == (
        "registry.example.com:5000/team/memrec"
    )
    assert image_name("registry.example.com:5000/memrec") == "registry.example.com:5000/memrec"


def test_kustomize_build_renders_valid_resources() -> None:
    # Never skipped: no Debian or PyPI package brings a kubectl that can render this kustomization
    # (Debian's kubernetes-client is 1.20, whose kustomize refuses the `labels` field), so where
    # neither kubectl nor kustomize is installed the Python rendering stands in; where one is, the
    # two must agree, which keeps render_in_python honest.
    expected = render_in_python(kustomization())
    command = _kustomize_command()
    if command is None:
        rendered = expected
    else:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        rendered = [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]
        assert sorted(rendered, key=_identity) == sorted(expected, key=_identity)
    assert len(rendered) == len(all_resources())
    image = kustomization()["images"][0]
    part_of = kustomization()["labels"][0]["pairs"]
    for resource in rendered:
        validate(resource, K8S_VERSIONS[-1])
        assert matches(part_of, resource["metadata"]["labels"]), _identity(resource)
        if resource["kind"] in NAMESPACED_KINDS:
            assert resource["metadata"]["namespace"] == "memrec"
        if resource["kind"] in {"Deployment", "Job", "CronJob"}:
            (container,) = pod_spec(resource)["containers"]
            assert container["image"] == f"{image['newName']}:{image['newTag']}"
        if resource["kind"] in TEMPLATED_KINDS:
            assert matches(part_of, pod_labels(resource)), _identity(resource)
            # Selectors are immutable: the common labels must stay out of them.
            selector = resource["spec"].get("selector", {}).get("matchLabels", {})
            assert not set(part_of) & set(selector), _identity(resource)


# -------------------------------------------------------------------------------------- settings


def test_memrec_env_names_are_settings_or_entrypoint_variables() -> None:
    fields = {f"MEMREC_{name.upper()}" for name in Settings.model_fields}
    names = set(config())
    for workload in memrec_workloads():
        for container in containers(workload):
            names |= env_names(container)
    memrec_names = {n for n in names if n.startswith("MEMREC_")}
    unknown = sorted(memrec_names - fields - ENTRYPOINT_VARS)
    assert not unknown, f"not fields of service.settings.Settings nor entrypoint variables: {unknown}"


def test_configmap_values_parse_as_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    for name in [n for n in os.environ if n.startswith("MEMREC_")]:
        monkeypatch.delenv(name)
    values = config()
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings(model_dir=tmp_path)  # the real model directory exists only in the cluster
    for name, value in values.items():
        field = name.removeprefix("MEMREC_").lower()
        if field in Settings.model_fields and field != "model_dir":
            annotation = Settings.model_fields[field].annotation
            assert annotation is not None
            parsed = TypeAdapter(annotation).validate_python(value)
            assert getattr(settings, field) == parsed, f"{name}={value!r} did not reach Settings.{field}"
    assert settings.host == "0.0.0.0", "the server must listen beyond loopback for probes and the Service"


def test_secrets_are_referenced_not_stored() -> None:
    assert not [r for r in all_resources() if r["kind"] == "Secret"], "a Secret is part of the kustomization"
    (example,) = load_docs(K8S / "secret.example.yaml")
    keys = set(example["stringData"])
    assert keys == {"redis-password", "api-key"}
    seen: dict[str, set[str]] = {}
    for workload in workloads():
        for container in containers(workload):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                assert ref["name"] == SECRET_NAME
                assert ref["key"] in keys
                assert bool(ref.get("optional", False)) == (ref["key"] == "api-key"), entry["name"]
                seen.setdefault(workload["metadata"]["name"], set()).add(entry["name"])
    for name in ("memrec-api", "memrec-train", "memrec-retrain"):
        assert seen[name] == {"MEMREC_REDIS_PASSWORD", "MEMREC_API_KEY"}
    assert seen["memrec-redis"] == {"REDIS_PASSWORD"}


# ---------------------------------------------------------------------------------------- the API


def test_probes_ports_and_service_agree() -> None:
    deployment = one("Deployment", "memrec-api")
    container = the_container(deployment)
    (port,) = [p for p in container["ports"] if p["name"] == "http"]
    assert port["containerPort"] == 8000 == int(config()["MEMREC_PORT"])
    expected = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/livez"}
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model and bank load take minutes"
    service = one("Service", "memrec-api")
    assert service["spec"]["type"] == "ClusterIP"
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == 80 and service_port["targetPort"] == "http"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_selectors_match_the_api_pods_only() -> None:
    deployment = one("Deployment", "memrec-api")
    labels = pod_labels(deployment)
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one("Service", "memrec-api")["spec"]["selector"],
        "PodDisruptionBudget": one("PodDisruptionBudget", "memrec-api")["spec"]["selector"]["matchLabels"],
    }
    for constraint in pod_spec(deployment).get("topologySpreadConstraints", []):
        selectors["topologySpread"] = constraint["labelSelector"]["matchLabels"]
    others = [pod_labels(w) for w in workloads() if w["metadata"]["name"] != "memrec-api"]
    for what, selector in selectors.items():
        assert selector and matches(selector, labels), what
        assert not any(matches(selector, other) for other in others), f"{what} also selects other pods"
    hpa = one("HorizontalPodAutoscaler", "memrec-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "memrec-api")


def test_autoscaling_and_disruption_budget_are_consistent() -> None:
    deployment = one("Deployment", "memrec-api")
    hpa = one("HorizontalPodAutoscaler", "memrec-api")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    assert "cpu" in the_container(deployment)["resources"]["requests"], "CPU utilization needs a CPU request"
    pdb = one("PodDisruptionBudget", "memrec-api")["spec"]
    assert pdb["minAvailable"] < hpa["minReplicas"], "the budget would block every voluntary eviction"


def test_graceful_shutdown_fits_the_grace_period() -> None:
    deployment = one("Deployment", "memrec-api")
    pre_stop = the_container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + float(config()["MEMREC_GRACEFUL_SHUTDOWN_S"])
    assert drain < pod_spec(deployment)["terminationGracePeriodSeconds"] == 30


def test_image_is_the_same_and_overridable() -> None:
    image = kustomization()["images"][0]
    images = {the_container(w)["image"] for w in memrec_workloads()}
    assert images == {f"{image['newName']}:{image['newTag']}"} == {"memrec:0.1.0"}
    assert image["name"] == "memrec" and all(i.split(":")[0] == image["name"] for i in images)
    assert the_container(one("Deployment", "memrec-api"))["args"] == ["serve"]
    assert the_container(one("Job", "memrec-train"))["args"] == ["train"]
    assert the_container(one("CronJob", "memrec-retrain"))["args"] == ["retrain"]


# -------------------------------------------------------------------------------- Redis and storage


def test_redis_url_points_at_the_redis_service() -> None:
    url = urlsplit(config()["MEMREC_REDIS_URL"])
    assert url.scheme == "redis" and url.password is None, "the password comes from the Secret"
    service = one("Service", "memrec-redis")
    assert url.hostname == service["metadata"]["name"]
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    redis = one("StatefulSet", "memrec-redis")
    assert redis["spec"]["serviceName"] == service["metadata"]["name"]
    assert matches(service["spec"]["selector"], pod_labels(redis))
    container = the_container(redis)
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports[port["targetPort"]] == port["port"] == 6379


def _expansions(container: Obj) -> Iterator[str]:
    for part in [*container.get("command", []), *container.get("args", [])]:
        yield from re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", part)


def test_redis_persists_and_requires_the_password() -> None:
    redis = one("StatefulSet", "memrec-redis")
    assert redis["spec"]["replicas"] == 1
    container = the_container(redis)
    assert container["image"].startswith("redis:7")
    argv = [*container.get("command", []), *container.get("args", [])]
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options["--appendonly"] == "yes" and options["--appendfsync"] == "everysec"
    assert options["--requirepass"] == "$(REDIS_PASSWORD)"
    # Kubernetes expands $(VAR) only for variables the container defines; otherwise the literal text
    # would become the password.
    assert set(_expansions(container)) <= env_names(container)
    data_dir = options["--dir"]
    (template,) = redis["spec"]["volumeClaimTemplates"]
    assert mount_for(container, data_dir)["name"] == template["metadata"]["name"] == "data"
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert template["spec"]["resources"]["requests"]["storage"] == "10Gi"
    for probe in ("livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["sh", "-c"] and 'redis-cli -a "$REDIS_PASSWORD"' in command[2], probe
        assert " ping" in command[2], probe


def test_volumes_and_claims_exist() -> None:
    claims = {r["metadata"]["name"]: r for r in all_resources() if r["kind"] == "PersistentVolumeClaim"}
    assert claims["memrec-models"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["memrec-data"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    for workload in workloads():
        declared = {v["name"] for v in pod_spec(workload).get("volumes", [])}
        declared |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, f"{workload['metadata']['name']}: {mount['name']}"
        for vol in pod_spec(workload).get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims, vol["name"]


def test_model_data_and_store_paths_are_mounted() -> None:
    for workload in memrec_workloads():
        container = the_container(workload)
        env = effective_env(container)
        writes_model = workload["kind"] in {"Job", "CronJob"}
        models = mount_for(container, env["MEMREC_MODEL_DIR"])
        claim = volume(workload, models["name"])["persistentVolumeClaim"]
        assert claim["claimName"] == "memrec-models"
        # The API reads the model; only the training Job writes it.
        assert bool(models.get("readOnly", False)) is not writes_model
        assert bool(claim.get("readOnly", False)) is not writes_model
        store = mount_for(container, env["MEMREC_STORE_DIR"])
        assert not store.get("readOnly", False)
        assert "emptyDir" in volume(workload, store["name"])
        assert not mount_for(container, "/tmp").get("readOnly", False)
    for trainer in (one("Job", "memrec-train"), one("CronJob", "memrec-retrain")):
        job = the_container(trainer)
        data = mount_for(job, effective_env(job)["MEMREC_DATA_DIR"])
        assert data["readOnly"] is True
        claim = volume(trainer, data["name"])["persistentVolumeClaim"]
        assert claim["claimName"] == "memrec-data"


def test_training_job() -> None:
    job = one("Job", "memrec-train")["spec"]
    assert job["backoffLimit"] == 2 and job["ttlSecondsAfterFinished"] > 0
    assert job["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    requests = the_container(one("Job", "memrec-train"))["resources"]["requests"]
    assert (str(requests["cpu"]), requests["memory"]) == ("2", "8Gi")


def test_retrain_cronjob() -> None:
    cron = one("CronJob", "memrec-retrain")
    spec = cron["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid", "two runs would publish over each other"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] <= 2 and job["ttlSecondsAfterFinished"] > 0
    assert job["activeDeadlineSeconds"] > 0
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    container = the_container(cron)
    env = effective_env(container)
    # the export reads the served version's own namespace; the retrained encoder keeps its shape
    assert "MEMREC_NAMESPACE" not in env and "MEMREC_REDIS_URL" in env
    assert "--max-len" not in env["MEMREC_RETRAIN_ARGS"] and int(env["MEMREC_KEEP_VERSIONS"]) >= 2
    # the same image, store, models and data as the training Job, whose resources it needs too
    train = the_container(one("Job", "memrec-train"))
    assert container["resources"] == train["resources"] and container["envFrom"] == train["envFrom"]
    for path in ("/models", "/data", "/var/lib/memrec/store", "/tmp"):
        assert mount_for(container, path) == mount_for(train, path), path


# -------------------------------------------------------------------------------------- security


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for workload in workloads():
        pod = pod_spec(workload)
        name = workload["metadata"]["name"]
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, name
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod.get("enableServiceLinks") is False, f"{name}: service links inject MEMREC_* variables"
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert not any("hostPath" in v for v in pod.get("volumes", [])), name
        for container in containers(workload):
            ctx = container.get("securityContext", {})
            user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
            assert isinstance(user, int) and user > 0, f"{name}: runs as root"
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, name
            assert ctx.get("readOnlyRootFilesystem") is True, name
            assert ctx.get("allowPrivilegeEscalation") is False, name
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not ctx.get("privileged", False), name
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits", {}).get("memory"), name
    api_ctx = pod_spec(one("Deployment", "memrec-api"))["securityContext"]
    assert (api_ctx["runAsUser"], api_ctx["runAsGroup"], api_ctx["fsGroup"]) == (10001, 10001, 10001)
    assert pod_spec(one("StatefulSet", "memrec-redis"))["securityContext"]["runAsUser"] == 999
