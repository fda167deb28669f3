"""deploy/ agrees with the code: every manifest parses, and names, ports, paths and variables match
ServeSettings, the tenants schema and what `faasmoe stack` writes for the functions."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import BaseModel

from faasmoe.server import settings as serve_settings
from faasmoe.server.settings import ServeSettings
from faasmoe.server.tenants import TenantsFile

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NAMESPACE = "faasmoe"
# Not Kubernetes objects: helm values for the OpenFaaS chart, and the kustomize file list.
HELM_VALUES = "openfaas-values.yaml"
KUSTOMIZATION = "kustomization.yaml"
NOT_MANIFESTS = {HELM_VALUES, KUSTOMIZATION}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
# nginx-unprivileged's document root (weights-server.yaml serves the plan below it).
NGINX_ROOT = PurePosixPath("/usr/share/nginx/html")
PLACEHOLDER_SECRET = "user:secret-from-a-secret"

PREFIX = ServeSettings.model_config["env_prefix"]
NESTED = ServeSettings.model_config["env_nested_delimiter"]


# --- loading -----------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.yml")])


def manifest_files() -> list[Path]:
    return [p for p in yaml_files() if p.name not in NOT_MANIFESTS]


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every Kubernetes object of deploy/, by (kind, name)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in manifest_files():
        for doc in load(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{path.name}: {key} is defined twice"
            found[key] = doc
    return found


def get(objects, kind: str, name: str) -> dict[str, Any]:
    assert (kind, name) in objects, f"deploy/ defines no {kind} {name}"
    return objects[(kind, name)]


@pytest.fixture(scope="module")
def control_plane(objects) -> dict[str, Any]:
    return get(objects, "Deployment", "faasmoe-control-plane")


@pytest.fixture(scope="module")
def container(control_plane) -> dict[str, Any]:
    containers = control_plane["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_env(objects, container) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then env (which wins).

    Values from Secrets are placeholders; the Secret name and key are checked separately."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) <= {"configMapRef", "secretRef", "prefix"}, source
        assert "secretRef" not in source, "secrets are given one key at a time (secretKeyRef)"
        config_map = get(objects, "ConfigMap", source["configMapRef"]["name"])
        for key, value in config_map.get("data", {}).items():
            assert isinstance(value, str), f"ConfigMap value {key} must be a string, not {value!r}"
            env[source.get("prefix", "") + key] = value
    for var in container.get("env", []):
        if "value" in var:
            assert isinstance(var["value"], str), f"{var['name']} must be a string, not {var['value']!r}"
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = get(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            assert "secretKeyRef" in var["valueFrom"], var
            env[var["name"]] = PLACEHOLDER_SECRET
    return env


@pytest.fixture(scope="module")
def env(objects, container) -> dict[str, str]:
    return pod_env(objects, container)


@pytest.fixture
def settings(env, monkeypatch) -> ServeSettings:
    """ServeSettings exactly as the control plane's container reads them."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(PREFIX.upper()):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return ServeSettings()


def serve_env_names() -> set[str]:
    """FAASMOE_SERVE_<FIELD>, and FAASMOE_SERVE_<FIELD>__<SUBFIELD> for nested models (upper case)."""
    names = set()
    for field, info in ServeSettings.model_fields.items():
        names.add(f"{PREFIX}{field}".upper())
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= {f"{PREFIX}{field}{NESTED}{sub}".upper() for sub in annotation.model_fields}
    return names


def mount_for(container, path: PurePosixPath) -> dict[str, Any]:
    """The volumeMount that holds ``path`` (the deepest one)."""
    mounts = [m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def volume(deployment, name: str) -> dict[str, Any]:
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    assert name in volumes, f"volume {name} is mounted but not defined"
    return volumes[name]


def container_port(container, port: int | str) -> int:
    """A probe's or Service's port, by number or by name, as the container's port number."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in ports, f"container {container['name']} has no port named {port}"
        return ports[port]
    assert port in ports.values(), f"container {container['name']} does not expose port {port}"
    return port


def go_duration_s(text: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"{text!r} is not a Go duration"
    return sum(float(n) * units[u] for n, u in parts)


def readme_weights_uri() -> str:
    """The --weights-uri given to `faasmoe stack` in deploy/README.md."""
    text = (DEPLOY / "README.md").read_text().replace("\\\n", " ")
    commands = [line for line in text.splitlines() if line.strip().startswith("faasmoe stack")]
    assert len(commands) == 1, "deploy/README.md shows one `faasmoe stack` command"
    args = shlex.split(commands[0])
    return args[args.index("--weights-uri") + 1]


# --- every file parses -------------------------------------------------------------------------


def test_every_yaml_file_parses_and_manifests_are_kubernetes_objects():
    files = yaml_files()
    assert {p.name for p in files} >= {
        "control-plane.yaml",
        "weights-pvc.yaml",
        "tenants.example.yaml",
        HELM_VALUES,
    }
    for path in files:
        docs = load(path)
        assert docs, f"{path.name} is empty"
        if path.name in NOT_MANIFESTS:
            continue
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: not a Kubernetes object"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']} namespace"


def test_namespace_is_defined(objects):
    get(objects, "Namespace", NAMESPACE)


def test_kustomization_lists_existing_manifests():
    kustomization = load(DEPLOY / KUSTOMIZATION)[0]
    resources = kustomization["resources"]
    for resource in resources:
        assert (DEPLOY / resource).is_file(), resource
        assert resource not in NOT_MANIFESTS
    # The long-running objects; example tenants and the upload pod stay out on purpose.
    assert {"namespace.yaml", "weights-pvc.yaml", "weights-server.yaml", "control-plane.yaml"} <= set(resources)
    assert "tenants.example.yaml" not in resources


def test_services_select_their_deployments(objects):
    for (kind, name), service in objects.items():
        if kind != "Service":
            continue
        deployment = get(objects, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), f"Service {name} selects no pod of its Deployment"
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for port in service["spec"]["ports"]:
            container_port(container, port["targetPort"])


def test_pvc_claims_exist(objects):
    for (kind, _), obj in objects.items():
        spec = obj["spec"]["template"]["spec"] if kind == "Deployment" else obj["spec"] if kind == "Pod" else None
        if spec is None:
            continue
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                get(objects, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])


def test_weights_pvc_can_be_shared(objects):
    pvc = get(objects, "PersistentVolumeClaim", "faasmoe-weights")
    assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}


# --- the control plane's environment is ServeSettings ---------------------------------------------


def test_every_serve_variable_is_a_settings_field(env):
    known = serve_env_names()
    assert f"{PREFIX}MODEL".upper() in known  # derived from the model, not a hard-coded list
    serve_vars = [name for name in env if name.upper().startswith(PREFIX.upper())]
    assert serve_vars
    for name in serve_vars:
        assert name.upper() in known, f"{name} is no ServeSettings field (known: {sorted(known)})"


def test_required_settings_are_set(env):
    required = [name for name, info in ServeSettings.model_fields.items() if info.is_required()]
    assert {"model", "plan", "tenants"} <= set(required)
    given = {name.upper() for name in env}
    for field in required:
        assert f"{PREFIX}{field}".upper() in given, f"the Deployment does not set {PREFIX}{field.upper()}"


def test_settings_parse_from_the_deployment(settings):
    assert settings.host == "0.0.0.0"  # reachable through the Service, not only on the pod's loopback
    assert settings.gateway is not None
    gateway = urlparse(settings.gateway)
    # The helm chart's gateway Service, in its namespace (openfaas-values.yaml's release namespace).
    assert (gateway.scheme, gateway.hostname, gateway.port) == ("http", "gateway.openfaas", 8080)
    assert settings.gateway_basic_auth is not None


def test_gateway_credentials_come_from_a_secret(container):
    by_name = {var["name"]: var for var in container.get("env", [])}
    auth = by_name.get(f"{PREFIX}GATEWAY_BASIC_AUTH")
    assert auth is not None and "secretKeyRef" in auth.get("valueFrom", {}), "basic auth must come from a Secret"
    ref = auth["valueFrom"]["secretKeyRef"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"secret generic {ref['name']}" in readme and f"--from-literal={ref['key']}=" in readme


def test_threads_match_the_functions(settings):
    from faasmoe.planning.stack import StackSettings

    assert settings.threads == StackSettings().threads  # exactness: the same intra-op thread count


def test_ports_agree(objects, container, settings):
    assert settings.port == serve_settings.DEFAULT_PORT
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    service = get(objects, "Service", "faasmoe-control-plane")
    (service_port,) = service["spec"]["ports"]
    assert container_port(container, service_port["targetPort"]) == settings.port
    annotations = objects[("Deployment", "faasmoe-control-plane")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes(container, settings):
    probes = {kind: container[kind] for kind in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in probes.values():
        assert container_port(container, probe["httpGet"]["port"]) == settings.port
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "loading a large trunk takes minutes"


def test_resources_are_set(container):
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


# --- volumes: model, plan and tenants are where the settings say ------------------------------------


def test_model_and_plan_are_on_the_weights_volume(control_plane, container, settings):
    for path in (settings.model, settings.plan):
        mount = mount_for(container, PurePosixPath(path))
        assert mount.get("readOnly") is True
        claim = volume(control_plane, mount["name"])["persistentVolumeClaim"]["claimName"]
        assert claim == "faasmoe-weights"
    # One layout everywhere: the plan sits where stack.yml's default FAASMOE_WEIGHTS_URI (and the
    # function image's) expects a mounted plan directory.
    from faasmoe.planning.stack import DEFAULT_WEIGHTS_URI

    assert str(settings.plan) == DEFAULT_WEIGHTS_URI


def test_tenants_file_is_mounted_from_the_tenants_secret(objects, control_plane, container, settings):
    path = PurePosixPath(settings.tenants)
    mount = mount_for(container, path)
    secret_volume = volume(control_plane, mount["name"])["secret"]
    relative = str(path.relative_to(mount["mountPath"]))
    items = {item["path"]: item["key"] for item in secret_volume.get("items", [])}
    key = items.get(relative, relative) if items else relative
    example = get(objects, "Secret", secret_volume["secretName"])
    assert key in example["stringData"], f"Secret {secret_volume['secretName']} has no key {key}"
    readme = (DEPLOY / "README.md").read_text()
    assert f"secret generic {secret_volume['secretName']} --from-file={key}=" in readme


def test_tenants_example_parses_with_the_tenants_schema(objects, settings):
    secret = get(objects, "Secret", "faasmoe-tenants")
    assert secret["type"] == "Opaque"
    tenants = TenantsFile.model_validate(yaml.safe_load(secret["stringData"]["tenants.yaml"]))
    assert len(tenants.tenants) >= 2
    for tenant in tenants.tenants:
        if tenant.models is not None:  # tenants may only name the model the control plane serves
            assert set(tenant.models) <= {settings.model_name}, tenant.name


# --- the functions' weights: the weights server serves the control plane's plan folder ---------------


def test_weights_uri_serves_the_plan_folder(objects, control_plane, container, settings):
    from faasmoe.function.weights import shard_uri
    from faasmoe.planning.stack import StackSettings, qwen15_shape, sized_plan, stack_document

    uri = readme_weights_uri()
    parsed = urlparse(uri)
    service = get(objects, "Service", "faasmoe-weights")
    server = get(objects, "Deployment", "faasmoe-weights")
    nginx = server["spec"]["template"]["spec"]["containers"][0]
    assert parsed.scheme == "http"
    assert parsed.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    (service_port,) = service["spec"]["ports"]
    assert parsed.port == service_port["port"]
    container_port(nginx, service_port["targetPort"])

    # The URL path is a mount of the weights volume's plan folder, as the control plane sees it.
    served = NGINX_ROOT / parsed.path.lstrip("/")
    nginx_mount = mount_for(nginx, served)
    assert PurePosixPath(nginx_mount["mountPath"]) == served
    assert nginx_mount.get("readOnly") is True
    assert volume(server, nginx_mount["name"])["persistentVolumeClaim"]["claimName"] == "faasmoe-weights"
    cp_mount = mount_for(container, PurePosixPath(settings.plan))
    assert nginx_mount.get("subPath", "") == str(PurePosixPath(settings.plan).relative_to(cp_mount["mountPath"]))
    readiness = nginx["readinessProbe"]["httpGet"]["path"]
    assert readiness == f"{parsed.path.rstrip('/')}/plan.json"

    # stack.yml gives every function that URI, and each shard URL is the plan's shard path under it.
    plan = sized_plan(qwen15_shape(), experts_per_function=20)
    document = stack_document(plan, StackSettings(weights_uri=uri))
    for function in plan.functions:
        environment = document["functions"][function.name]["environment"]
        assert environment["FAASMOE_WEIGHTS_URI"] == uri
        assert shard_uri(uri, function.name) == f"{uri.rstrip('/')}/{function.shard}"


def test_upload_pod_mounts_the_volume_where_the_control_plane_does(objects, container, settings):
    pod = get(objects, "Pod", "faasmoe-weights-upload")
    (upload,) = pod["spec"]["containers"]
    control_mount = mount_for(container, PurePosixPath(settings.plan))
    upload_mount = mount_for(upload, PurePosixPath(settings.plan))
    assert upload_mount["mountPath"] == control_mount["mountPath"]
    assert not upload_mount.get("readOnly", False)
    readme = (DEPLOY / "README.md").read_text()
    for path in (settings.model, settings.plan):
        assert f"faasmoe-weights-upload:{path}" in readme


# --- the image ----------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_control_plane_dockerfile(control_plane, settings):
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile.control-plane")
    cmds = [arg for op, arg in instructions if op == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["faasmoe", "serve"]
    assert [arg for op, arg in instructions if op == "EXPOSE"] == [str(settings.port)]
    runs = [arg for op, arg in instructions if op == "RUN"]
    torch_first = next(i for i, run in enumerate(runs) if "download.pytorch.org/whl/cpu" in run or "TORCH_INDEX" in run)
    install = next(i for i, run in enumerate(runs) if re.search(r"pip install /opt/faasmoe|pip install \.", run))
    assert torch_first < install, "CPU torch before `pip install .`"
    assert "slim" in dockerfile_text_arg(instructions, "PYTHON_IMAGE")
    # The image's user is the Deployment's runAsUser.
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(runs))
    assert uid is not None
    assert control_plane["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))
    known = serve_env_names()
    for op, arg in instructions:
        if op == "ENV":
            for name in re.findall(r"(\w+)=", arg):
                assert not name.startswith(PREFIX) or name.upper() in known, name


def dockerfile_text_arg(instructions, name: str) -> str:
    for op, arg in instructions:
        if op == "ARG" and arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}")


def test_control_plane_image_is_the_deployment_image(container):
    readme = (DEPLOY / "README.md").read_text()
    image_name = container["image"].rsplit(":", 1)[0]
    assert f"kustomize edit set image {image_name}=" in readme
    assert "deploy/Dockerfile.control-plane" in readme


# --- OpenFaaS helm values --------------------------------------------------------------------------------


def function_watchdog_timeouts() -> dict[str, float]:
    """of-watchdog's timeouts in the function image (functions/expert-group/Dockerfile)."""
    text = (ROOT / "functions" / "expert-group" / "Dockerfile").read_text()
    found = dict(re.findall(r'\b(exec_timeout|read_timeout|write_timeout|healthcheck_interval)="([^"]+)"', text))
    assert set(found) == {"exec_timeout", "read_timeout", "write_timeout", "healthcheck_interval"}
    return {name: go_duration_s(value) for name, value in found.items()}


# What Kubernetes gives a pod between SIGTERM and SIGKILL unless the pod says otherwise (OpenFaaS does not).
KUBERNETES_TERMINATION_GRACE_S = 30.0


def test_the_watchdog_stops_within_the_termination_grace():
    """On SIGTERM of-watchdog waits healthcheck_interval, which defaults to write_timeout (120 s here): longer
    than Kubernetes' grace, so the pod would be killed mid-drain. The image sets it well below."""
    timeouts = function_watchdog_timeouts()
    assert timeouts["healthcheck_interval"] < KUBERNETES_TERMINATION_GRACE_S / 2 < timeouts["write_timeout"]


def test_openfaas_values():
    values = load(DEPLOY / HELM_VALUES)[0]
    # Only keys of the openfaas/openfaas chart's values.yaml (faas-netes/chart/openfaas).
    chart_keys = {
        "functionNamespace": None,
        "basic_auth": None,
        "generateBasicAuth": None,
        "exposeServices": None,
        "serviceType": None,
        "gateway": {"upstreamTimeout", "readTimeout", "writeTimeout", "scaleFromZero", "replicas"},
        "faasnetes": {"readTimeout", "writeTimeout"},
        "queueWorker": {"ackWait", "replicas", "maxInflight"},
    }
    for key, value in values.items():
        assert key in chart_keys, f"{key} is not a value this file is meant to set"
        if isinstance(value, dict):
            assert set(value) <= chart_keys[key], f"{key}: {set(value) - chart_keys[key]}"
    assert values["basic_auth"] is True and values["generateBasicAuth"] is True
    gateway = {
        name: go_duration_s(values["gateway"][name]) for name in ("upstreamTimeout", "readTimeout", "writeTimeout")
    }
    assert gateway["upstreamTimeout"] < gateway["readTimeout"]
    assert gateway["upstreamTimeout"] < gateway["writeTimeout"]
    # A request that waits for a cold replica's weights must not be cut by the gateway first.
    assert gateway["upstreamTimeout"] >= max(function_watchdog_timeouts().values())
    for name in ("readTimeout", "writeTimeout"):
        assert go_duration_s(values["faasnetes"][name]) >= gateway["upstreamTimeout"]
    assert go_duration_s(values["queueWorker"]["ackWait"]) >= gateway["upstreamTimeout"]


def test_gateway_basic_auth_secret_is_the_charts():
    readme = (DEPLOY / "README.md").read_text()
    # The chart writes Secret openfaas/basic-auth when generateBasicAuth is on.
    assert "-n openfaas get secret basic-auth" in readme
    assert "basic-auth-password" in readme
    assert f"-f deploy/{HELM_VALUES}" in readme


@pytest.mark.parametrize("doc", ["deploy/README.md", "docs/openfaas.md"])
def test_the_docs_faasmoe_command_lines_are_accepted_by_the_cli(doc: str):
    # Parsed as the CLI parses them, not run: a renamed or dropped option, a missing argument fails here.
    import typer.main

    from faasmoe.cli import app

    group = typer.main.get_command(app)
    commands = shell_commands(ROOT / doc, "faasmoe")
    assert commands, f"{doc} shows no faasmoe command"
    for program, name, *args in commands:
        assert name in group.commands, f"{doc}: `{program} {name}` is no faasmoe command"
        group.commands[name].make_context(name, args)


def shell_commands(markdown: Path, program: str) -> list[list[str]]:
    """The ``program ...`` command lines of the file's bash blocks, continued lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown.read_text(), flags=re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith(program + " ")]
