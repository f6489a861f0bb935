"""docker-compose.yml: validated by the real compose CLI and the compose-spec schema, and its shape as required."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    COMPOSE_FILE,
    REQUIRED_ENV,
    acl_redis,
    app_services,
    command_user_lines,
    env_of,
    run_compose,
)
from tests.support import REPO_ROOT

CHECK_JSONSCHEMA = REPO_ROOT / ".venv" / "bin" / "check-jsonschema"
# Each service's Redis login (axl_mesh.redis_acl.SERVICE_USERS): user and the variable holding its password.
REDIS_LOGINS = {"registry": "AXL_REDIS_REGISTRY_PASSWORD", "jobs": "AXL_REDIS_JOBS_PASSWORD"}
SERVICE_REDIS_USER = {"mesh-registry": "registry", "api-gateway": "jobs", "trainer-worker": "jobs",
                      "quantizer": "jobs", "coder-worker": None, "debugger-worker": None, "model-pool": None}


def _redis_url(user: str) -> str:
    variable = REDIS_LOGINS[user]
    return f"redis://{user}:${{{variable}:?set {variable} (random, URL-safe characters)}}@redis:6379/0"


def _check_jsonschema() -> str:
    import shutil

    found = shutil.which("check-jsonschema") or (str(CHECK_JSONSCHEMA) if CHECK_JSONSCHEMA.exists() else None)
    if found is None:
        pytest.fail("check-jsonschema is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def test_compose_cli_validates_the_file() -> None:
    result = run_compose(["config", "-q"], REQUIRED_ENV)
    assert result.returncode == 0, result.stderr


def test_compose_cli_refuses_to_run_without_the_required_secrets() -> None:
    for missing in REQUIRED_ENV:
        result = run_compose(["config", "-q"], {k: v for k, v in REQUIRED_ENV.items() if k != missing})
        assert result.returncode != 0, missing
        assert missing in result.stderr, missing


def test_compose_cli_interpolates_the_secrets_everywhere() -> None:
    result = run_compose(["config"], REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    for name, service in app_services(resolved).items():
        assert env_of(service)["AXL_REGISTRY_SECRET"] == REQUIRED_ENV["AXL_REGISTRY_SECRET"], name
        user = SERVICE_REDIS_USER[name]
        expected = f"redis://{user}:{REQUIRED_ENV[REDIS_LOGINS[user]]}@redis:6379/0" if user else None
        assert env_of(service).get("AXL_REDIS_URL") == expected, name
    redis = resolved["services"]["redis"]
    for user, variable in REDIS_LOGINS.items():
        assert f">{REQUIRED_ENV[variable]}" in redis["command"], user
    assert env_of(redis)["REDISCLI_AUTH"] == REQUIRED_ENV["AXL_REDIS_JOBS_PASSWORD"]  # its health check logs in
    assert env_of(resolved["services"]["api-gateway"])["AXL_API_KEYS"] == REQUIRED_ENV["AXL_API_KEYS"]
    grafana = env_of(resolved["services"]["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED_ENV["AXL_GRAFANA_ADMIN_PASSWORD"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    for name in ("grafana", "prometheus"):
        (port,) = resolved["services"][name]["ports"]  # v1 prints "ip:host:container", v2 the long form
        assert (port.split(":")[0] if isinstance(port, str) else port["host_ip"]) == "127.0.0.1", name


def test_compose_spec_schema_accepts_the_file() -> None:
    result = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_schema_rejects_a_broken_file(tmp_path: Path) -> None:
    """The schema check can fail: a misspelt depends_on condition and an unknown key are caught."""
    broken = COMPOSE_FILE.read_text().replace("condition: service_healthy}", "condition: healthy}", 1)
    broken = broken.replace("    restart: unless-stopped\n", "    restart: unless-stopped\n    restrat: always\n", 1)
    path = tmp_path / "docker-compose.yml"
    path.write_text(broken)
    result = subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout


def test_the_required_services_are_there(compose: dict[str, Any]) -> None:
    assert {"redis", "api-gateway", "mesh-registry", "coder-worker", "debugger-worker", "trainer-worker",
            "quantizer", "prometheus", "grafana"} <= set(compose["services"])


def test_only_the_gateway_prometheus_and_grafana_are_published(compose: dict[str, Any]) -> None:
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert set(published) == {"api-gateway", "prometheus", "grafana"}
    assert published["api-gateway"] == ["${AXL_GATEWAY_PORT:-8880}:8880"]
    assert published["prometheus"] == ["127.0.0.1:${AXL_PROMETHEUS_PORT:-9090}:9090"]  # it has no auth of its own
    assert published["grafana"] == ["127.0.0.1:${AXL_GRAFANA_PORT:-3000}:3000"]  # loopback: a tunnel or a proxy


@pytest.mark.parametrize(("service", "port", "module"), [
    ("api-gateway", "8880", "services.api_gateway"),
    ("mesh-registry", "8900", "services.mesh_registry"),
    ("coder-worker", "8901", "services.model_worker"),
    ("debugger-worker", "8903", "services.model_worker"),
    ("model-pool", "8910", "services.model_worker"),
    ("trainer-worker", "8960", "services.trainer_worker"),
    ("quantizer", "8961", "services.quantizer"),
])
def test_service_ports_and_commands(compose: dict[str, Any], service: str, port: str, module: str) -> None:
    spec = compose["services"][service]
    assert spec["command"] == ["python", "-m", module]
    assert env_of(spec)["AXL_PORT"] == port
    assert env_of(spec)["AXL_HOST"] == "0.0.0.0"
    user = SERVICE_REDIS_USER[service]
    assert env_of(spec).get("AXL_REDIS_URL") == (_redis_url(user) if user else None)
    assert env_of(spec)["AXL_REGISTRY_URL"] == "http://mesh-registry:8900"


def _model_workers(compose: dict[str, Any], *, pool: bool) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in app_services(compose).items() if s["command"][-1] == "services.model_worker"
            and (env_of(s).get("AXL_WORKER_MODE") == "pool") == pool}


def test_workers_announce_their_compose_address(compose: dict[str, Any]) -> None:
    workers = _model_workers(compose, pool=False)
    assert {"coder-worker", "debugger-worker"} <= set(workers)
    for name, spec in workers.items():
        env = env_of(spec)
        assert env["AXL_PUBLIC_URL"] == f"http://{name}:{env['AXL_PORT']}"
        assert name == f"{env['AXL_SPECIALIST']}-worker"
        assert env["AXL_CHECKPOINT"] == "${AXL_WORKER_CHECKPOINT:-/opt/axl/weights/axl-coder}"  # shipped in the image
        assert any(v.endswith(":/data/checkpoints:ro") for v in spec["volumes"])


def test_a_pool_serves_the_model_store_on_demand(compose: dict[str, Any]) -> None:
    """Fine-tuned models are served under compose too: a pool worker reads the model store the trainer writes
    (the same volume at the same path), announces its compose address, and has its budget and idle time set."""
    pools = _model_workers(compose, pool=True)
    assert set(pools) == {"model-pool"}
    spec, services = pools["model-pool"], compose["services"]
    env = env_of(spec)
    assert env["AXL_PUBLIC_URL"] == f"http://model-pool:{env['AXL_PORT']}"
    assert "AXL_CHECKPOINT" not in env and "AXL_SPECIALIST" not in env
    assert env["AXL_POOL_MEMORY_BUDGET_MB"].startswith("${AXL_POOL_MEMORY_BUDGET_MB:-")
    assert env["AXL_POOL_IDLE_UNLOAD_SECONDS"].startswith("${AXL_POOL_IDLE_UNLOAD_SECONDS:-")
    assert _mount(spec, env["AXL_MODEL_STORE_DIR"]) == ("model-store", True)
    assert _mount(services["trainer-worker"], env_of(services["trainer-worker"])["AXL_MODEL_STORE_DIR"]) == (
        "model-store", False)
    assert "model-pool" in services["api-gateway"]["depends_on"]


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        check = spec.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert check.get("interval") and check.get("retries"), name
    for name, spec in app_services(compose).items():
        path = "/readyz" if spec["command"][-1] == "services.model_worker" else "/healthz"
        assert spec["healthcheck"]["test"] == ["CMD", "axl-healthcheck", path], name


def test_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, spec in services.items():
        for dependency, rule in (spec.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            assert rule == {"condition": "service_healthy"}, (name, dependency, rule)
    assert set(services["mesh-registry"]["depends_on"]) == {"redis"}
    assert {"redis", "mesh-registry", "coder-worker", "debugger-worker"} <= set(services["api-gateway"]["depends_on"])
    for name in ("coder-worker", "debugger-worker"):
        assert "mesh-registry" in services[name]["depends_on"]
    for name in ("trainer-worker", "quantizer"):
        assert "redis" in services[name]["depends_on"]


def test_redis_has_the_mesh_acl_and_each_service_its_own_login(compose: dict[str, Any]) -> None:
    """Redis has no open door and no shared password: the ACL of axl_mesh.redis_acl from required variables (no
    default user), and each service logs in as its own user (the registry's keys are the registry user's alone)."""
    from axl_mesh.redis_acl import SERVICE_USERS, acl_directives

    redis = compose["services"]["redis"]
    placeholders = {user: f"${{{variable}:?set {variable} (random, URL-safe characters)}}"
                    for user, variable in REDIS_LOGINS.items()}
    assert command_user_lines(redis["command"]) == acl_directives(placeholders)
    assert "--requirepass" not in redis["command"]
    assert env_of(redis)["REDISCLI_AUTH"] == placeholders["jobs"]
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli --user jobs ping | grep -q PONG"]
    services = app_services(compose)
    assert set(SERVICE_REDIS_USER) == set(services)
    for name, spec in services.items():
        assert SERVICE_REDIS_USER[name] == SERVICE_USERS.get(spec["command"][-1]), name
        user = SERVICE_REDIS_USER[name]
        assert env_of(spec).get("AXL_REDIS_URL") == (_redis_url(user) if user else None), name


def test_the_compose_redis_command_runs_the_acl(compose: dict[str, Any], tmp_path: Path) -> None:
    """The redis service's command line, run by the local redis-server: the mesh's ACL holds (acl_redis), and the
    health check's redis-cli call answers PONG with the jobs password only."""
    command = [re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: REQUIRED_ENV[m.group(1)], arg)
               for arg in compose["services"]["redis"]["command"]]
    passwords = {"registry": REQUIRED_ENV["AXL_REDIS_REGISTRY_PASSWORD"],
                 "jobs": REQUIRED_ENV["AXL_REDIS_JOBS_PASSWORD"]}
    with acl_redis(command, tmp_path, passwords) as port:
        check = compose["services"]["redis"]["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {port}")
        env = {**os.environ, "REDISCLI_AUTH": REQUIRED_ENV["AXL_REDIS_JOBS_PASSWORD"]}
        assert subprocess.run(["sh", "-c", check], env=env, timeout=10).returncode == 0
        env["REDISCLI_AUTH"] = "wrong"
        assert subprocess.run(["sh", "-c", check], env=env, timeout=10, capture_output=True).returncode != 0


def test_required_secrets_use_the_error_form() -> None:
    text = COMPOSE_FILE.read_text()
    for variable in REQUIRED_ENV:
        assert re.search(r"\$\{" + variable + r":\?[^}]+\}", text), variable
        assert not re.search(r"\$\{" + variable + r"(:-|\})", text), f"{variable} must not have a default"


def test_redis_persists_to_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]


def test_model_store_and_checkpoints_are_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api-gateway", "trainer-worker", "quantizer"):
        assert "model-store:/data/models" in services[name]["volumes"], name
        assert env_of(services[name])["AXL_MODEL_STORE_DIR"] == "/data/models"
    assert "jobs:/data/jobs" in services["trainer-worker"]["volumes"]
    assert {"model-store", "jobs", "files", "prometheus-data"} <= set(compose["volumes"])


def test_app_services_share_one_image(compose: dict[str, Any]) -> None:
    images = {s["image"] for s in app_services(compose).values()}
    builds = {(s["build"]["context"], s["build"]["dockerfile"]) for s in app_services(compose).values()}
    assert images == {"axl-mesh:latest"}
    assert builds == {(".", "deploy/Dockerfile")}
    assert (REPO_ROOT / "deploy" / "Dockerfile").is_file()


def test_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    expected = {f"{name}:{env_of(s)['AXL_PORT']}" for name, s in app_services(compose).items()}
    assert targets - {"localhost:9090"} == expected
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"


# The data folders of the job system (axl_mesh.jobs.JobsSettings): the env variable naming each, and its default
# under AXL_DATA_DIR. A service uses a folder when its code calls ``settings.resolved_<kind>_dir``.
DATA_DIRS = {"files": ("AXL_FILES_DIR", "files"), "jobs": ("AXL_JOBS_DIR", "jobs"),
             "model_store": ("AXL_MODEL_STORE_DIR", "models")}


def _data_dirs_used(service: dict[str, Any]) -> set[str]:
    """The data folders a service's package reads or writes, from its source (``resolved_<kind>_dir``)."""
    package = REPO_ROOT / Path(*service["command"][-1].split("."))
    source = "\n".join(p.read_text() for p in package.rglob("*.py"))
    return {kind for kind in DATA_DIRS if f"resolved_{kind}_dir" in source}


def _data_dir(service: dict[str, Any], kind: str) -> str:
    """Where a service's settings put a data folder: its own variable, else under AXL_DATA_DIR (the default)."""
    env = env_of(service)
    variable, default = DATA_DIRS[kind]
    return env.get(variable) or f"{env.get('AXL_DATA_DIR', 'data').rstrip('/')}/{default}"


def _mount(service: dict[str, Any], path: str) -> tuple[str, bool] | None:
    """(volume source, read-only) of the deepest mount holding ``path`` in the container, or None."""
    best: tuple[int, str, bool] | None = None
    for volume in service.get("volumes") or ():
        source, target, *mode = volume.split(":") if isinstance(volume, str) else (
            volume["source"], volume["target"], *(["ro"] if volume.get("read_only") else []))
        target = target.rstrip("/")
        if (path == target or path.startswith(target + "/")) and (best is None or len(target) > best[0]):
            best = (len(target), source, "ro" in mode)
    return None if best is None else best[1:]


def test_data_shared_between_services_is_on_shared_volumes(compose: dict[str, Any]) -> None:
    """A folder one service writes and another reads (uploads, job folders with their GGUFs, the model store) is
    one named volume mounted at the path each service's settings resolve to; otherwise a download is a 404."""
    services = app_services(compose)
    users: dict[str, list[str]] = {kind: [] for kind in DATA_DIRS}
    for name, service in services.items():
        for kind in _data_dirs_used(service):
            users[kind].append(name)
    assert {"api-gateway", "trainer-worker", "quantizer"} <= set(users["jobs"]), users  # the scan found the code
    problems = []
    for kind, names in users.items():
        mounts = {}
        for name in names:
            path = _data_dir(services[name], kind)
            mount = _mount(services[name], path)
            if mount is None:
                problems.append(f"{name} uses {kind} at {path} but mounts no volume there")
            else:
                mounts[name] = mount
        sources = {source for source, _ in mounts.values()}
        if len(sources) > 1:
            problems.append(f"{kind} is on different volumes: {mounts}")
        for source in sources:
            if not source.startswith((".", "/", "$")) and source not in (compose.get("volumes") or {}):
                problems.append(f"{kind}: volume {source!r} is not declared under volumes:")
        if mounts and all(read_only for _, read_only in mounts.values()):
            problems.append(f"{kind}: every service mounts it read-only, so nobody can write it: {mounts}")
    assert not problems, "\n".join(problems)
