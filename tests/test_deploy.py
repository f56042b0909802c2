"""deploy/: the container image, the compose demo and the Kubernetes manifests.

Checked offline, without a Docker daemon or a cluster: ``kubectl kustomize`` renders
the manifests and ``docker-compose config`` the compose file (both missing: a skip,
a failure under CI=true), the Dockerfile is read as text, and every pacsnode
configuration they carry is loaded with :func:`node.config.load_settings` under the
environment they give it, so a wrong key, path or reference fails here rather than at
the first start.

Each rule is a function returning the problems it finds; the tests assert there are
none, and ``test_rules_catch_*`` break a copy of the rendering to show that each rule
does find what it is meant to find.
"""

from __future__ import annotations

import base64
import copy
import functools
import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from node.config import Settings, load_settings
from tests.conftest import free_port, require_tool

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
RENDERINGS = {"base": K8S, "production": K8S / "overlays" / "production"}
COMPOSE_FILE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
UID = 10001
PACSNODE_SERVICES = ("migrate", "node", "worker", "web")



@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PACSNODE"):
            monkeypatch.delenv(key)


def _load(config: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``config`` loaded as a container would: with its environment (PACSNODE__*)."""
    overrides = {k: v for k, v in env.items() if k.startswith("PACSNODE__")}
    with monkeypatch.context() as patch:
        for key, value in overrides.items():
            patch.setenv(key, value)
        return load_settings(config)


def _pipelines_exist(settings: Settings) -> None:
    from node.app import check_pipelines

    check_pipelines(settings)


# -- Kubernetes: rendering ------------------------------------------------------------


@functools.cache
def _kustomize(folder: Path) -> str:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
    return result.stdout


def render(name: str) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders for ``name`` (a fresh copy each time)."""
    require_tool("kubectl")
    return [doc for doc in yaml.safe_load_all(_kustomize(RENDERINGS[name])) if doc]


@pytest.fixture(params=sorted(RENDERINGS))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in _of_kind(docs, kind) if d["metadata"]["name"] == name), None)


def _containers(pod: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    return (pod.get("initContainers", []) if init else []) + pod["containers"]


def _pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(Deployment name, pod spec) for every Deployment."""
    for deploy in _of_kind(docs, "Deployment"):
        yield deploy["metadata"]["name"], deploy["spec"]["template"]["spec"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _selected(docs: list[dict[str, Any]], selector: dict[str, str]) -> list[dict[str, Any]]:
    """Pod specs of the Deployments whose pods ``selector`` picks."""
    return [d["spec"]["template"]["spec"] for d in _of_kind(docs, "Deployment")
            if _matches(selector, d["spec"]["template"]["metadata"].get("labels", {}))]


def _object_data(obj: dict[str, Any]) -> dict[str, str]:
    """The keys and values of a rendered ConfigMap or Secret (data is base64 in a Secret)."""
    data = dict(obj.get("stringData", {}))
    for key, value in (obj.get("data") or {}).items():
        data[key] = base64.b64decode(value).decode() if obj["kind"] == "Secret" else value
    return data


def _env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it (envFrom, then env)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                obj = _named(docs, kind, source[key]["name"])
                env.update(_object_data(obj) if obj else {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            ref = item.get("valueFrom", {}).get(key)
            if ref:
                obj = _named(docs, kind, ref["name"])
                env[item["name"]] = _object_data(obj).get(ref["key"], "") if obj else ""
    return env


# -- Kubernetes: the rules --------------------------------------------------------------


def _serves_http(container: dict[str, Any]) -> bool:
    return any(port.get("name") == "http" for port in container.get("ports", []))


def probe_problems(docs: list[dict[str, Any]]) -> list[str]:
    """A container with an http port: liveness GET /health, readiness GET /ready, on
    that port. One without: no HTTP probe (it would fail for ever)."""
    problems = []
    for name, pod in _pods(docs):
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            probes = {kind: container.get(kind) for kind in
                      ("livenessProbe", "readinessProbe", "startupProbe")}
            if not _serves_http(container):
                problems += [f"{where}: {kind} over HTTP, but no http port"
                             for kind, probe in probes.items() if probe and "httpGet" in probe]
                continue
            for kind, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
                get = (probes[kind] or {}).get("httpGet", {})
                if get.get("path") != path or get.get("port") not in ("http", 8080):
                    problems.append(f"{where}: {kind} must GET {path} on port http, got {get}")
    return problems


_CPU = {"m": 1e-3, "": 1.0}
_MEMORY = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | float, units: dict[str, float]) -> float:
    """A Kubernetes quantity ("500m", "2", "1Gi") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if not match or match.group(2) not in units:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * units[match.group(2)]


def resource_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every container, init containers too: requests and limits of cpu and memory,
    requests no larger than limits."""
    problems = []
    for name, pod in _pods(docs):
        for container in _containers(pod):
            resources = container.get("resources", {})
            for resource, units in (("cpu", _CPU), ("memory", _MEMORY)):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                where = f"{name}/{container['name']} {resource}"
                if request is None or limit is None:
                    problems.append(f"{where}: needs a request and a limit")
                elif quantity(request, units) > quantity(limit, units):
                    problems.append(f"{where}: request {request} above limit {limit}")
    return problems


def security_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Non-root as the image's UID, no privilege escalation, no capabilities, the
    runtime's seccomp profile; a read-only root filesystem with /tmp on an emptyDir."""
    problems = []
    for name, pod in _pods(docs):
        pod_ctx = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken must be false")
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in _containers(pod):
            ctx = {**pod_ctx, **container.get("securityContext", {})}
            where = f"{name}/{container['name']}"
            if container.get("securityContext", {}).get("runAsNonRoot") is not True:
                problems.append(f"{where}: securityContext.runAsNonRoot must be true")
            if ctx.get("runAsUser") != UID:
                problems.append(f"{where}: runAsUser must be {UID} (the image's user)")
            if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities must drop ALL")
            if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile must be RuntimeDefault")
            if ctx.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem must be true")
            elif not any(m["mountPath"] == "/tmp" and m["name"] in empty_dirs
                         for m in container.get("volumeMounts", [])):
                problems.append(f"{where}: a read-only root needs /tmp on an emptyDir")
    return problems


def reference_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every ConfigMap, Secret and PVC a pod names exists in the rendering (under the
    name kustomize gave it, hash suffix included), with the keys asked for; every
    volumeMount names a volume of its pod."""
    problems = []

    def need(kind: str, name: str, where: str, key: str | None = None) -> None:
        obj = _named(docs, kind, name)
        if obj is None:
            problems.append(f"{where}: no {kind} {name!r} in the rendering")
        elif key is not None and key not in _object_data(obj):
            problems.append(f"{where}: {kind} {name!r} has no key {key!r}")

    for name, pod in _pods(docs):
        volumes = {}
        for volume in pod.get("volumes", []):
            volumes[volume["name"]] = volume
            where = f"{name} volume {volume['name']}"
            for kind, field, ref in (("ConfigMap", "configMap", "name"),
                                     ("Secret", "secret", "secretName"),
                                     ("PersistentVolumeClaim", "persistentVolumeClaim",
                                      "claimName")):
                if field in volume:
                    need(kind, volume[field][ref], where)
                    for item in volume[field].get("items", []):
                        need(kind, volume[field][ref], where, item["key"])
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{where}: mounts {mount['name']!r}, not a volume of the pod")
            for source in container.get("envFrom", []):
                for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if field in source:
                        need(kind, source[field]["name"], f"{where} envFrom")
            for item in container.get("env", []):
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    ref = item.get("valueFrom", {}).get(field)
                    if ref:
                        need(kind, ref["name"], f"{where} env {item['name']}", ref["key"])
    return problems


def service_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Each Service selects pods, and each of its ports targets a port they declare."""
    problems = []
    for service in _of_kind(docs, "Service"):
        name = service["metadata"]["name"]
        pods = _selected(docs, service["spec"].get("selector", {}))
        if not pods:
            problems.append(f"Service {name}: its selector matches no pod")
            continue
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in pods:
                declared = [p for c in pod["containers"] for p in c.get("ports", [])]
                if not any(target in (p.get("name"), p["containerPort"]) for p in declared):
                    problems.append(f"Service {name} port {port['port']}: no container "
                                    f"port {target!r} in the pods it selects")
    return problems


def disruption_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Each PodDisruptionBudget selects pods; each Deployment has one."""
    problems = []
    budgets = _of_kind(docs, "PodDisruptionBudget")
    for budget in budgets:
        if not _selected(docs, budget["spec"]["selector"].get("matchLabels", {})):
            problems.append(f"PodDisruptionBudget {budget['metadata']['name']}: selects no pod")
    for deploy in _of_kind(docs, "Deployment"):
        labels = deploy["spec"]["template"]["metadata"].get("labels", {})
        if not any(_matches(b["spec"]["selector"].get("matchLabels", {}), labels)
                   for b in budgets):
            problems.append(f"Deployment {deploy['metadata']['name']}: no PodDisruptionBudget")
    return problems


def storage_problems(docs: list[dict[str, Any]]) -> list[str]:
    """The shared volume can be mounted by pods on several nodes at once."""
    return [f"PersistentVolumeClaim {claim['metadata']['name']}: must be ReadWriteMany "
            f"(receiver and workers share it), got {claim['spec'].get('accessModes')}"
            for claim in _of_kind(docs, "PersistentVolumeClaim")
            if claim["spec"].get("accessModes") != ["ReadWriteMany"]]


def label_problems(docs: list[dict[str, Any]]) -> list[str]:
    """app.kubernetes.io/name: pacsnode and a component on everything, pods included."""
    problems = []
    for doc in docs:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        labelled = [(where, doc["metadata"].get("labels", {}))]
        if doc["kind"] == "Deployment":
            labelled.append((f"{where} pods", doc["spec"]["template"]["metadata"]["labels"]))
        for what, labels in labelled:
            if labels.get("app.kubernetes.io/name") != "pacsnode":
                problems.append(f"{what}: needs app.kubernetes.io/name: pacsnode")
            if doc["kind"] != "Namespace" and not labels.get("app.kubernetes.io/component"):
                problems.append(f"{what}: needs app.kubernetes.io/component")
    return problems


RULES = [probe_problems, resource_problems, security_problems, reference_problems,
         service_problems, disruption_problems, storage_problems, label_problems]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_kubernetes_rule(rendered: list[dict[str, Any]], rule: Any) -> None:
    assert rule(rendered) == []


def test_rendering_has_the_parts() -> None:
    """Receiver and worker Deployments, the DICOM (plain and TLS) and web Services,
    the PVC, a migration before each pacsnode container, placeholders marked."""
    docs = render("base")
    assert {d["metadata"]["name"] for d in _of_kind(docs, "Deployment")} == {
        "pacsnode-receiver", "pacsnode-worker"}
    dicom = _named(docs, "Service", "pacsnode-dicom")
    assert dicom is not None
    assert {p["port"] for p in dicom["spec"]["ports"]} == {11112, 2762}
    # The allow-list sees the senders' addresses only with Local.
    assert dicom["spec"]["externalTrafficPolicy"] == "Local"
    web = _named(docs, "Service", "pacsnode-web")
    assert web is not None and [p["port"] for p in web["spec"]["ports"]] == [8080]
    for name, pod in _pods(docs):
        assert [c["args"] for c in pod.get("initContainers", [])] == [["db", "upgrade"]], name
    for secret in _of_kind(docs, "Secret"):
        for key, value in _object_data(secret).items():
            assert "CHANGE-ME" in value, f"Secret {secret['metadata']['name']} {key}: " \
                                         "a placeholder must say CHANGE-ME"


def test_production_overlay_changes_what_it_says() -> None:
    base, production = render("base"), render("production")
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"]
                for d in _of_kind(production, "Deployment")}
    assert replicas == {"pacsnode-receiver": 2, "pacsnode-worker": 4}
    for name, pod in _pods(production):
        for container in _containers(pod):
            image = container["image"]
            assert image.startswith("registry.example.com/pacsnode:"), (name, image)
            assert not image.endswith((":latest", "pacsnode")), "a release tag, not latest"
    assert {d["metadata"].get("namespace") for d in production
            if d["kind"] != "Namespace"} == {"pacsnode"}
    claim = _of_kind(production, "PersistentVolumeClaim")[0]
    assert claim["spec"]["storageClassName"]
    assert "storageClassName" not in _of_kind(base, "PersistentVolumeClaim")[0]["spec"]

    def limits(docs: list[dict[str, Any]]) -> dict[str, float]:
        return {name: quantity(pod["containers"][0]["resources"]["limits"]["memory"], _MEMORY)
                for name, pod in _pods(docs)}

    assert all(limits(production)[name] > value for name, value in limits(base).items())


def _mount_for(container: dict[str, Any], path: PurePosixPath) -> dict[str, Any] | None:
    return next((m for m in container.get("volumeMounts", [])
                 if PurePosixPath(m["mountPath"]) == path), None)


def _file_in_volume(docs: list[dict[str, Any]], pod: dict[str, Any],
                    container: dict[str, Any], path: PurePosixPath, kind: str) -> str:
    """The content of ``path`` if a ``kind`` (ConfigMap/Secret) volume provides it."""
    mount = _mount_for(container, path.parent)
    assert mount is not None, f"{container['name']}: nothing mounted at {path.parent}"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    field, ref = ("configMap", "name") if kind == "ConfigMap" else ("secret", "secretName")
    assert field in volume, f"{path.parent} must be a {kind} volume, got {volume}"
    items = {i["path"]: i["key"] for i in volume[field].get("items", [])}
    key = items.get(path.name, path.name) if items else path.name
    obj = _named(docs, kind, volume[field][ref])
    assert obj is not None and key in _object_data(obj), f"{kind} has no {key!r} for {path}"
    return _object_data(obj)[key]


def test_configuration_loads_in_every_container(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap's pacsnode.yaml, at PACSNODE_CONFIG, loads with the environment
    each container gets, and the files it names are where the pod mounts them."""
    for name, pod in _pods(rendered):
        for container in _containers(pod):
            where = f"{name}/{container['name']}"
            env = _env(rendered, container)
            config_path = PurePosixPath(env["PACSNODE_CONFIG"])
            text = _file_in_volume(rendered, pod, container, config_path, "ConfigMap")
            local = tmp_path / f"{name}-{container['name']}.yaml"
            local.write_text(text)
            settings = _load(local, env, monkeypatch)
            _pipelines_exist(settings)
            # PostgreSQL from the Secret, never the default SQLite on a shared volume.
            assert settings.database_url.startswith("postgresql+psycopg://"), where
            if container in pod.get("initContainers", []):
                continue
            data = _mount_for(container, PurePosixPath(settings.storage.data_dir))
            assert data is not None and not data.get("readOnly"), \
                f"{where}: storage.data_dir {settings.storage.data_dir} is not mounted writable"
            volume = next(v for v in pod["volumes"] if v["name"] == data["name"])
            assert "persistentVolumeClaim" in volume, f"{where}: data_dir must be the PVC"
            tls = settings.node.tls
            assert tls is not None, "the manifests mount a TLS Secret for node.tls"
            for path in (tls.certificate, tls.private_key, tls.ca_certificates):
                assert path is not None
                _file_in_volume(rendered, pod, container, PurePosixPath(path), "Secret")
            if _serves_http(container):
                assert settings.web.enabled and settings.web.host == "0.0.0.0", \
                    f"{where}: the kubelet probes the pod's address, not loopback"
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert ports == {"dicom": settings.node.port, "dicom-tls": tls.port,
                                 "http": settings.web.port}, where


def test_container_commands_parse(rendered: list[dict[str, Any]]) -> None:
    """Each container's args are a pacsnode command line the CLI accepts."""
    from node.cli import build_parser

    parser = build_parser()
    checked = 0
    for _name, pod in _pods(rendered):
        for container in _containers(pod):
            args = container["args"]
            parser.parse_args(args)  # SystemExit on a command or option it does not know
            checked += 1
    assert checked >= 3


def test_celery_settings_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifests' and compose's Celery wiring loads: every container is on it."""
    docs = render("base")
    for name, pod in _pods(docs):
        container = pod["containers"][0]
        env = _env(docs, container)
        local = tmp_path / f"{name}.yaml"
        local.write_text(_file_in_volume(docs, pod, container,
                                         PurePosixPath(env["PACSNODE_CONFIG"]), "ConfigMap"))
        settings = _load(local, env, monkeypatch)
        assert settings.jobs.executor == "celery"
    service = compose_config()["services"]["worker"]
    settings = _load(_compose_config_file(service), service["environment"], monkeypatch)
    assert settings.jobs.executor == "celery"


def _break(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    """The pod spec of ``deployment`` in ``docs``, to break it."""
    return next(pod for name, pod in _pods(docs) if name == deployment)


def test_rules_catch_what_they_are_for() -> None:
    """Each rule finds a fault put into a copy of the (good) base rendering."""
    good = render("base")

    def broken(change: Any) -> list[dict[str, Any]]:
        docs = copy.deepcopy(good)
        change(docs)
        return docs

    def receiver(docs: list[dict[str, Any]]) -> dict[str, Any]:
        return _break(docs, "pacsnode-receiver")["containers"][0]

    def worker_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
        return _break(docs, "pacsnode-worker")

    faults = [
        (probe_problems, lambda d: receiver(d).pop("livenessProbe"), "livenessProbe"),
        (probe_problems, lambda d: receiver(d)["readinessProbe"]["httpGet"].update(
            path="/health"), "readinessProbe"),
        (probe_problems, lambda d: worker_pod(d)["containers"][0].update(
            livenessProbe={"httpGet": {"path": "/health", "port": 8080}}), "no http port"),
        (resource_problems, lambda d: worker_pod(d)["initContainers"][0]["resources"].pop(
            "limits"), "migrate memory"),
        (resource_problems, lambda d: receiver(d)["resources"]["requests"].update(
            memory="8Gi"), "above limit"),
        (security_problems, lambda d: receiver(d)["securityContext"].update(
            allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
        (security_problems, lambda d: worker_pod(d)["containers"][0]["securityContext"].update(
            runAsUser=0), "runAsUser"),
        (security_problems, lambda d: worker_pod(d)["securityContext"].pop(
            "seccompProfile"), "seccompProfile"),
        (security_problems, lambda d: receiver(d)["securityContext"].pop(
            "runAsNonRoot"), "runAsNonRoot"),
        (security_problems, lambda d: receiver(d).update(volumeMounts=[
            m for m in receiver(d)["volumeMounts"] if m["mountPath"] != "/tmp"]), "/tmp"),
        (reference_problems, lambda d: _named(d, "Secret", "pacsnode-broker")[
            "stringData"].pop("url"), "no key 'url'"),
        (reference_problems, lambda d: d.remove(_named(d, "PersistentVolumeClaim",
                                                       "pacsnode-data")), "pacsnode-data"),
        (reference_problems, lambda d: _of_kind(d, "ConfigMap")[0]["metadata"].update(
            name="pacsnode-config"), "no ConfigMap"),  # the hash suffix matters
        (service_problems, lambda d: receiver(d)["ports"].pop(), "'http'"),
        (service_problems, lambda d: _named(d, "Service", "pacsnode-dicom")["spec"][
            "selector"].update({"app.kubernetes.io/component": "dicom"}), "matches no pod"),
        (disruption_problems, lambda d: _named(d, "PodDisruptionBudget", "pacsnode-worker")[
            "spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "w"}),
         "selects no pod"),
        (storage_problems, lambda d: _of_kind(d, "PersistentVolumeClaim")[0]["spec"].update(
            accessModes=["ReadWriteOnce"]), "ReadWriteMany"),
        (label_problems, lambda d: _of_kind(d, "Deployment")[0]["spec"]["template"][
            "metadata"]["labels"].pop("app.kubernetes.io/name"), "pods"),
    ]
    for rule, change, expected in faults:
        found = rule(broken(change))
        assert any(expected in problem for problem in found), (rule.__name__, expected, found)


def test_configuration_check_catches_a_wrong_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render("base")
    for config in _of_kind(docs, "ConfigMap"):
        if "pacsnode.yaml" in config.get("data", {}):
            config["data"]["pacsnode.yaml"] = config["data"]["pacsnode.yaml"].replace(
                "/etc/pacsnode/tls/ca.crt", "/etc/pacsnode/tls/ca.pem")
    with pytest.raises(AssertionError, match="no 'ca.pem'"):
        test_configuration_loads_in_every_container(docs, tmp_path, monkeypatch)


# -- compose -------------------------------------------------------------------------


@functools.cache
def _compose_config_text() -> str:
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"docker-compose config:\n{result.stderr}"
    return result.stdout


def compose_config() -> dict[str, Any]:
    """deploy/compose.yaml as ``docker-compose config`` resolves it (merge keys, paths)."""
    require_tool("docker-compose")
    return yaml.safe_load(_compose_config_text())


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{target: source} of a service's volumes (docker-compose 1 prints the short
    syntax, SOURCE:TARGET[:MODE]; Compose 2 the long one)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source", "")
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = source
    return mounts


def _compose_config_file(service: dict[str, Any]) -> Path:
    """The host file bind-mounted at the service's PACSNODE_CONFIG."""
    target = service["environment"]["PACSNODE_CONFIG"]
    source = _mounts(service).get(target)
    assert source, f"nothing mounted at {target}"
    return Path(source)


def _url_parts(url: str) -> tuple[str, str, str, int]:
    """(user, password, host, port) of a database or broker URL."""
    match = re.match(r"^[\w+]+://([^:@]+):([^@]+)@([^:/]+):(\d+)/", url)
    assert match, url
    return match.group(1), match.group(2), match.group(3), int(match.group(4))


def compose_problems(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    services = config["services"]
    problems = [f"no service {name}" for name in
                (*PACSNODE_SERVICES, "postgres", "rabbitmq", "orthanc") if name not in services]
    if problems:
        return problems
    if services["worker"].get("deploy", {}).get("replicas") != 2:
        problems.append("worker: deploy.replicas must be 2")
    if services["migrate"]["command"] != ["db", "upgrade"]:
        problems.append("migrate: command must be db upgrade")
    for name in ("node", "worker", "web"):
        condition = services[name].get("depends_on", {}).get("migrate", {}).get("condition")
        if condition != "service_completed_successfully":
            problems.append(f"{name}: must wait for migrate to complete successfully")
    if services["worker"].get("healthcheck", {}).get("test") != ["NONE"]:
        problems.append("worker: serves no HTTP, the image's healthcheck must be disabled")
    published = {p.split(":")[-2] if isinstance(p, str) else str(p["published"])
                 for p in services["node"].get("ports", [])}
    if not {"11112", "8080"} <= published:
        problems.append(f"node: must publish DICOM 11112 and web 8080, got {published}")

    postgres = services["postgres"]["environment"]
    rabbit = services["rabbitmq"]["environment"]
    orthanc = services["orthanc"]["environment"]
    data_volumes = set()
    for name in PACSNODE_SERVICES:
        service = services[name]
        settings = _load(_compose_config_file(service), service["environment"], monkeypatch)
        _pipelines_exist(settings)
        db_user, db_password, db_host, _ = _url_parts(settings.database_url)
        if (db_user, db_password, db_host) != (postgres["POSTGRES_USER"],
                                               postgres["POSTGRES_PASSWORD"], "postgres"):
            problems.append(f"{name}: database URL does not match the postgres service")
        broker = service["environment"].get("PACSNODE__JOBS__BROKER_URL", "")
        # RabbitMQ lets guest in from localhost only; the workers are elsewhere.
        if broker and _url_parts(broker)[:3] != (rabbit.get("RABBITMQ_DEFAULT_USER"),
                                                 rabbit.get("RABBITMQ_DEFAULT_PASS"),
                                                 "rabbitmq"):
            problems.append(f"{name}: broker URL does not match the rabbitmq service's user")
        data = [source for target, source in _mounts(service).items()
                if PurePosixPath(target) == PurePosixPath(settings.storage.data_dir)]
        if not data and name != "migrate":
            problems.append(f"{name}: storage.data_dir {settings.storage.data_dir} not mounted")
        data_volumes.update(data)
        if name != "node":
            continue
        destinations = {dest.name: dest for dest in settings.destinations}
        targets = {d for route in settings.routes for d in settings.route_destinations(route)}
        pacs = [dest for dest in destinations.values() if dest.host == "orthanc"]
        if not pacs:
            problems.append("node: no destination is the orthanc service")
        for dest in pacs:
            if (dest.ae_title, dest.port) != (orthanc["ORTHANC__DICOM_AET"],
                                              int(orthanc.get("ORTHANC__DICOM_PORT", 4242))):
                problems.append(f"destination {dest.name}: AE title or port is not Orthanc's")
            if dest.name not in targets:
                problems.append(f"destination {dest.name}: no route sends to it")
        modality = next(iter(json.loads(orthanc["ORTHANC__DICOM_MODALITIES"]).values()))
        if modality != [settings.node.ae_title, "node", settings.node.port]:
            problems.append(f"orthanc: its pacsnode modality {modality} is not the node")
    if len(data_volumes) != 1:
        problems.append(f"node, worker and web must share one storage volume: {data_volumes}")
    return problems


def test_compose_file_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose config accepts it; its services are wired to each other; the
    pacsnode configuration each service mounts loads with its environment."""
    assert compose_problems(compose_config(), monkeypatch) == []


def test_compose_rules_catch_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    good = compose_config()
    faults = [
        (lambda s: s["worker"]["deploy"].update(replicas=1), "replicas"),
        (lambda s: s["web"]["depends_on"].pop("migrate"), "web: must wait"),
        (lambda s: s["orthanc"]["environment"].update(ORTHANC__DICOM_AET="PACS"),
         "not Orthanc's"),
        (lambda s: s["rabbitmq"]["environment"].pop("RABBITMQ_DEFAULT_USER"), "broker URL"),
        (lambda s: s["worker"].update(volumes=[
            v for v in s["worker"]["volumes"] if "/var/lib/pacsnode" not in str(v)]),
         "worker: storage.data_dir"),
        (lambda s: s["worker"].pop("healthcheck"), "healthcheck"),
    ]
    for change, expected in faults:
        config = copy.deepcopy(good)
        change(config["services"])
        found = compose_problems(config, monkeypatch)
        assert any(expected in problem for problem in found), (expected, found)


def test_compose_config_error_is_caught(tmp_path: Path) -> None:
    """docker-compose config itself refuses a broken file (what the test relies on)."""
    require_tool("docker-compose")
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace(
        "condition: service_completed_successfully", "condition: service_finished", 1))
    result = subprocess.run(["docker-compose", "-f", str(broken), "config"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0


# -- the image -----------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _exec_form(arguments: str) -> list[str]:
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    steps = dockerfile_instructions(text)
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    stages = [a for k, a in steps if k == "FROM"]
    if len(stages) < 2:
        problems.append("multi-stage: needs a builder and a final stage")
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM"):]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), stages[-1].split()[0])
    if base != "python:3.11-slim":
        problems.append(f"final stage must be python:3.11-slim, got {base}")
    users = [a for k, a in final if k == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0") or \
            not users[-1].split(":")[0].isdigit():
        problems.append(f"the final USER must be a numeric non-root UID, got {users}")
    elif int(users[-1].split(":")[0]) != UID:
        problems.append(f"USER must be {UID}, the runAsUser of the manifests")
    checks = [a for k, a in final if k == "HEALTHCHECK"]
    if not checks or "/ready" not in checks[-1] or "curl" in checks[-1]:
        problems.append("HEALTHCHECK must probe /ready (with Python: slim has no curl)")
    entry = [_exec_form(a) for k, a in final if k == "ENTRYPOINT"]
    cmd = [_exec_form(a) for k, a in final if k == "CMD"]
    if entry[-1:] != [["pacsnode"]] or cmd[-1:] != [["serve"]]:
        problems.append(f"ENTRYPOINT pacsnode and CMD serve, got {entry} {cmd}")
    exposed = {port for k, a in final if k == "EXPOSE" for port in a.split()}
    if not {"11112", "2762", "8080"} <= exposed:
        problems.append(f"EXPOSE 11112 2762 8080, got {exposed}")
    if not any("optional-dependencies']['postgres']" in a or "[postgres]" in a
               for k, a in steps if k == "RUN"):
        problems.append("the postgres extra must be installed")
    if not any("MODELS_DIR" in a for k, a in steps if k == "RUN"):
        problems.append("the build must check that the shipped models are in the image")
    return problems


def test_dockerfile() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_dockerfile_rules_catch_faults() -> None:
    good = DOCKERFILE.read_text()
    faults = [
        ("USER 10001:10001", "USER root", "non-root"),
        ("USER 10001:10001", "USER pacsnode", "numeric"),
        ('"/ready"]', '"/health"]', "HEALTHCHECK"),
        ('ENTRYPOINT ["pacsnode"]', 'ENTRYPOINT ["python"]', "ENTRYPOINT"),
        ("FROM ${PYTHON_IMAGE} AS builder", "", "multi-stage"),
        ("EXPOSE 11112 2762 8080", "EXPOSE 11112", "EXPOSE"),
    ]
    for old, new, expected in faults:
        assert old in good, old
        found = dockerfile_problems(good.replace(old, new))
        assert any(expected in problem for problem in found), (old, found)


def _final_stage() -> list[tuple[str, str]]:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    return steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM"):]


def test_image_default_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config the image carries loads; its data_dir is the VOLUME, its ports EXPOSEd."""
    final = _final_stage()
    copies = {_exec_form(a)[-1]: _exec_form(a)[0] for k, a in final
              if k == "COPY" and not a.startswith("--from")}
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in final if k == "ENV")))
    source = copies[env["PACSNODE_CONFIG"]]
    settings = _load(REPO / source, {}, monkeypatch)
    volumes = {v for k, a in final if k == "VOLUME" for v in _exec_form(a)}
    assert str(settings.storage.data_dir) in volumes
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert {settings.node.port, 2762, settings.web.port} <= exposed
    assert settings.web.host == "0.0.0.0" and settings.node.host == "0.0.0.0"


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out (last matching pattern wins; a pattern
    matching a parent folder matches what is inside it)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch(c, pattern) or (pattern.startswith("**/") and
                                       fnmatch(c, pattern[3:])) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore() -> None:
    """Local state stays out of the build context; what the Dockerfile copies is in it."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv/bin/python", "var/pacsnode.db", "var/studies/1/2/3.dcm",
                 "bench/out/run.json", ".git/HEAD", "tests/conftest.py",
                 ".pytest_cache/v/x", "node/__pycache__/app.cpython-311.pyc"):
        assert _ignored(patterns, path), f"{path} must not be in the build context"
    copied = [src for k, a in dockerfile_instructions(DOCKERFILE.read_text())
              if k == "COPY" and not a.startswith("--from") for src in _exec_form(a)[:-1]]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert not _ignored(patterns, source), f"COPY {source}: left out by .dockerignore"
    for shipped in ("analysis/models/lungs/unet.keras", "analysis/models/region/model.joblib",
                    "db/migrations/env.py", "node/web/templates/base.html"):
        assert not _ignored(patterns, shipped), shipped


# -- the image's HEALTHCHECK ------------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("pacsnode_healthcheck",
                                                  DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_url_follows_the_configuration(healthcheck: Any) -> None:
    from node.config_web import WebConfig, WebTLS

    assert healthcheck.probe_url(WebConfig()) == "http://127.0.0.1:8080/ready"
    assert healthcheck.probe_url(WebConfig(host="0.0.0.0", port=9000), "/health") == \
        "http://127.0.0.1:9000/health"
    assert healthcheck.probe_url(WebConfig(host="::")) == "http://127.0.0.1:8080/ready"
    tls = WebTLS(certificate=Path("c.pem"), private_key=Path("k.pem"))
    assert healthcheck.probe_url(WebConfig(host="::1", tls=tls)) == "https://[::1]:8080/ready"


@pytest.fixture
def ready_server() -> Iterator[int]:
    """/ready answers 200, /busy 503 (as /ready does when a check fails)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 200 if self.path == "/ready" else 503
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}' if status == 200 else b'{"status": "not"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_healthcheck_exit_status(ready_server: int, tmp_path: Path) -> None:
    """Run as the image runs it: exit 0 on 200, 1 on 503 or when nothing listens."""
    config = tmp_path / "pacsnode.yaml"

    def run(port: int, path: str) -> subprocess.CompletedProcess[str]:
        config.write_text(f"web: {{host: 0.0.0.0, port: {port}}}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE")}
        env.update(PACSNODE_CONFIG=str(config), PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), path],
                              env=env, capture_output=True, text=True, timeout=60,
                              check=False)

    assert run(ready_server, "/ready").returncode == 0
    busy = run(ready_server, "/busy")
    assert busy.returncode == 1 and "503" in busy.stderr
    assert run(free_port(), "/ready").returncode == 1
