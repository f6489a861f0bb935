"""deploy/mesh.yaml and the launcher's config handling (no processes started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.launcher import ConfigError, Mesh, MeshConfig
from tests.support import REPO_ROOT

MESH_YAML = REPO_ROOT / "deploy" / "mesh.yaml"


def test_mesh_yaml_parses_with_the_agreed_ports() -> None:
    config = MeshConfig.from_file(MESH_YAML)
    assert config.registry_port == 8900
    assert config.gateway_port == 8880
    ports = {w.specialist: w.port for w in config.workers}
    assert ports["coder"] == 8901
    assert ports["debugger"] == 8903
    assert min(ports.values()) >= 8901
    assert config.redis_url.startswith("redis://")
    assert config.trainer_workers >= 1 and config.quantizer_workers >= 1
    assert config.auto_serve_new_models is True
    assert config.bootstrap.max_time_seconds <= 300


def test_every_specialist_in_mesh_yaml_exists() -> None:
    from axl_model.specialists import SPECIALISTS

    for worker in MeshConfig.from_file(MESH_YAML).workers:
        assert worker.specialist in SPECIALISTS


def test_the_plan_lists_every_process() -> None:
    config = MeshConfig.from_file(MESH_YAML)
    mesh = Mesh(config)
    mesh.redis_url, mesh.secret = "redis://127.0.0.1:6379/0", "s" * 16
    specs = {s.name: s for s in mesh.child_specs()}
    assert specs["registry"].module == "services.mesh_registry"
    assert specs["gateway"].module == "services.api_gateway"
    assert specs["trainer"].module == "services.trainer_worker"
    assert specs["quantizer"].module == "services.quantizer"
    assert specs["coder"].env["AXL_PORT"] == "8901" and specs["debugger"].env["AXL_PORT"] == "8903"
    assert specs["coder"].health_url == "http://127.0.0.1:8901/readyz"
    for spec in specs.values():
        assert spec.env["AXL_REGISTRY_SECRET"] == "s" * 16
        assert spec.env["AXL_REGISTRY_URL"] == "http://127.0.0.1:8900"
    # Redis only for the services that use it (model workers do not); one shared URL for a Redis without the users
    assert {name for name, spec in specs.items() if "AXL_REDIS_URL" in spec.env} == {
        "registry", "gateway", "trainer", "quantizer"}
    assert {spec.env.get("AXL_REDIS_URL") for spec in specs.values()} - {None} == {"redis://127.0.0.1:6379/0"}


def test_advertise_host_reaches_every_service_and_is_absent_by_default() -> None:
    mesh = Mesh(MeshConfig.from_dict({"host": "0.0.0.0", "advertise_host": "box.lan",
                                      "workers": [{"specialist": "coder", "port": 8901}]}))
    mesh.redis_url, mesh.secret = "redis://127.0.0.1:6379/0", "s" * 16
    specs = mesh.child_specs()
    assert {spec.env["AXL_ADVERTISE_HOST"] for spec in specs} == {"box.lan"}
    assert {spec.env["AXL_HOST"] for spec in specs} == {"0.0.0.0"}
    assert all("AXL_ADVERTISE_HOST" not in spec.env for spec in Mesh(MeshConfig.from_file(MESH_YAML)).child_specs())


def test_each_service_logs_in_to_redis_as_its_own_user() -> None:
    mesh = Mesh(MeshConfig.from_file(MESH_YAML))
    mesh.secret = "s" * 16
    mesh.redis_urls = {"registry": "redis://registry:pw1@127.0.0.1:6379/0", "jobs": "redis://jobs:pw2@127.0.0.1:6379/0"}
    specs = {s.name: s for s in mesh.child_specs()}
    assert specs["registry"].env["AXL_REDIS_URL"] == mesh.redis_urls["registry"]
    for name in ("gateway", "trainer", "quantizer"):
        assert specs[name].env["AXL_REDIS_URL"] == mesh.redis_urls["jobs"], name
    assert "AXL_REDIS_URL" not in specs["coder"].env


def test_worker_checkpoint_resolution(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "axl-debugger").mkdir(parents=True)
    config = MeshConfig.from_dict({
        "bootstrap": {"checkpoint": "checkpoints/boot"},
        "workers": [{"specialist": "coder", "port": 9001}, {"specialist": "debugger", "port": 9003},
                    {"specialist": "chat", "port": 9004, "checkpoint": "/elsewhere/chat"}],
    }, root=tmp_path)
    coder, debugger, chat = config.workers
    assert config.worker_checkpoint(coder) == tmp_path / "checkpoints" / "boot"
    assert config.worker_checkpoint(debugger) == tmp_path / "checkpoints" / "axl-debugger"
    assert config.worker_checkpoint(chat) == Path("/elsewhere/chat")
    # With the shipped default model present, it replaces the bootstrap training for every worker without its own.
    shipped = tmp_path / "weights" / "axl-coder"
    shipped.mkdir(parents=True)
    (shipped / "config.json").write_text("{}")
    assert config.worker_checkpoint(coder) == shipped
    assert config.worker_checkpoint(debugger) == tmp_path / "checkpoints" / "axl-debugger"


@pytest.mark.parametrize(("raw", "message"), [
    ({"workers": [{"specialist": "coder", "port": 8900}]}, "already used by registry"),
    ({"workers": [{"specialist": "coder", "port": 8901, "replicas": 2}, {"specialist": "fixer", "port": 8902}]},
     "port 8902 is already used"),
    ({"workers": [{"specialist": "coder"}]}, "needs at least specialist and port"),
    ({"gateway": {"port": 70000}}, "port must be an integer"),
    ({"wrokers": []}, "unknown keys ['wrokers']"),
    ({"redis_url": "http://x"}, "redis_url must be a redis:// URL"),
    ({"advertise_host": "0.0.0.0"}, "advertise_host: AXL_ADVERTISE_HOST must be this host's name"),
    ({"advertise_host": "box.lan:8901"}, "without a port"),
])
def test_bad_configs_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        MeshConfig.from_dict(raw)
    assert message in str(info.value)


def _launcher(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.launcher", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_help_explains_itself() -> None:
    result = _launcher("--help")
    assert result.returncode == 0
    for word in ("--config", "REDIS_URL", "AXL_REGISTRY_SECRET", "bootstrap", "Ctrl-C"):
        assert word in result.stdout


def test_check_prints_the_plan_and_a_bad_file_exits_2(tmp_path: Path) -> None:
    result = _launcher("--config", str(MESH_YAML), "--check")
    assert result.returncode == 0, result.stderr
    assert "services.mesh_registry" in result.stdout and "port=8903" in result.stdout
    bad = tmp_path / "mesh.yaml"
    bad.write_text(yaml.safe_dump({"workers": [{"specialist": "coder", "port": 8880}]}))
    result = _launcher("--config", str(bad), "--check")
    assert result.returncode == 2
    assert "already used by gateway" in result.stderr
