"""The launcher behind ``make up``, end to end: from a temporary mesh.yaml on free ports with a tiny pre-made
checkpoint it starts its own Redis and the whole mesh, answers through the gateway with the ``openai`` client,
serves a model that appears in the model store, restarts a crashed child, and stops on SIGINT with nothing left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from deploy.launcher import redis_answers, with_password
from tests.checkpoints import make_tiny_checkpoint
from tests.support import REPO_ROOT, free_port

API_KEY = "sk-launcher-test"


def _consecutive_free_ports(count: int) -> int:
    from deploy.launcher import port_is_free

    for _ in range(100):
        start = free_port()
        if start + count < 65536 and all(port_is_free(start + i) for i in range(count)):
            return start
    raise RuntimeError("no run of free ports")


def _descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (from /proc: children, their forks, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _wait(condition: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; launcher output:\n{tail}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("launcher")
    checkpoint = make_tiny_checkpoint(root / "checkpoints" / "boot")
    redis_port = free_port()  # nothing listens there: the launcher must start its own redis-server
    queue_ports = _consecutive_free_ports(2)
    config = {
        "host": "127.0.0.1",
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "registry": {"port": free_port()},
        "gateway": {"port": free_port(), "api_keys": [API_KEY]},
        "bootstrap": {"checkpoint": str(checkpoint)},
        "workers": [{"specialist": "coder", "port": free_port()}],
        "worker_max_batch": 4,
        "worker_num_threads": 1,
        "trainer_workers": 1,
        "quantizer_workers": 1,
        "queue_worker_port_start": queue_ports,
        "data_dir": str(root / "data"),
        "files_dir": str(root / "data" / "files"),
        "jobs_dir": str(root / "data" / "jobs"),
        "model_store": str(root / "data" / "models"),
        "state_dir": str(root / "state"),
        "auto_serve_new_models": True,
        "auto_serve_port_start": _consecutive_free_ports(3),
        "poll_seconds": 1,
        "restart_backoff_max_seconds": 2,
        "health_timeout_seconds": 120,
        "stop_grace_seconds": 15,
    }
    config_path = root / "mesh.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_") and k != "REDIS_URL"}
    env.update({"OMP_NUM_THREADS": "1", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
    log = root / "launcher.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.launcher", "--config", str(config_path),
                                 "--no-bootstrap"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    state = {"proc": proc, "log": log, "config": config, "root": root, "checkpoint": checkpoint,
             "gateway": f"http://127.0.0.1:{config['gateway']['port']}", "redis_port": redis_port}
    try:
        _wait(lambda: "AXL mesh is up" in log.read_text(errors="replace") or proc.poll() is not None, 180,
              "the mesh to come up", log)
        assert proc.poll() is None, log.read_text(errors="replace")
        yield state
    finally:
        if proc.poll() is None:  # a failed test must not leave a mesh running
            leftovers = _descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            for pid in leftovers:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _redis_urls(mesh: dict[str, Any]) -> dict[str, str]:
    """The Redis logins the launcher gave its children, by Redis user (every child of a kind gets the same)."""
    from urllib.parse import urlsplit

    urls = {_environ(pid).get("AXL_REDIS_URL") for pid in _descendants(mesh["proc"].pid)} - {None}
    by_user = {urlsplit(url).username: url for url in urls}
    assert len(by_user) == len(urls), f"one login per user: {sorted(by_user)}"
    return by_user


def _redis_url(mesh: dict[str, Any]) -> str:
    """The jobs user's login (gateway, trainer, quantizer) to the Redis the launcher started."""
    return _redis_urls(mesh)["jobs"]


def _client(mesh: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh["gateway"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_it_started_its_own_redis_and_every_service(mesh: dict[str, Any]) -> None:
    text = mesh["log"].read_text(errors="replace")
    assert "starting a local redis-server" in text
    assert redis_answers(_redis_url(mesh))
    for name in ("registry", "coder", "gateway", "trainer", "quantizer"):
        assert f"{name} is healthy" in text, name
    assert "generated one for this run" in text  # no AXL_REGISTRY_SECRET was given
    assert f"curl {mesh['gateway']}/v1/completions" in text
    first, second = mesh["config"]["queue_worker_port_start"], mesh["config"]["queue_worker_port_start"] + 1
    for port in (first, second):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


def test_its_redis_has_a_user_per_service_with_generated_passwords_never_shown(mesh: dict[str, Any]) -> None:
    """The Redis it started has the mesh's ACL users (axl_mesh.redis_acl), each with a generated password kept 0600
    in the state folder; the registry logs in as ``registry``, the gateway and queue workers as ``jobs``, model
    workers not at all; ``jobs`` cannot read or write the registry's keys; the default user is off."""
    from urllib.parse import urlsplit

    import redis

    from axl_mesh.redis_acl import url_for_user

    urls = _redis_urls(mesh)
    assert set(urls) == {"registry", "jobs"}
    base = f"redis://127.0.0.1:{mesh['redis_port']}/0"
    log = mesh["log"].read_text(errors="replace")
    passwords = {}
    for user, url in urls.items():
        password = urlsplit(url).password
        assert password and len(password) >= 32, user
        assert url == url_for_user(base, user, password)
        assert redis.Redis.from_url(url, decode_responses=True).acl_whoami() == user  # the user exists, logs in
        assert not redis_answers(url_for_user(base, user, "wrong-password"))
        stored = mesh["root"] / "state" / "redis" / f"{user}.password"
        assert stored.read_text().strip() == password and stored.stat().st_mode & 0o077 == 0
        assert password not in log
        passwords[user] = password
    assert passwords["registry"] != passwords["jobs"]
    assert not redis_answers(base)  # no login: refused (the default user is off)
    assert not redis_answers(with_password(base, passwords["jobs"]))  # nor a password alone

    ports = {str(mesh["config"]["registry"]["port"]): "registry", str(mesh["config"]["gateway"]["port"]): "jobs",
             str(mesh["config"]["queue_worker_port_start"]): "jobs",
             str(mesh["config"]["queue_worker_port_start"] + 1): "jobs",
             str(mesh["config"]["workers"][0]["port"]): None}
    seen = set()
    for pid in _descendants(mesh["proc"].pid):
        env = _environ(pid)
        if env.get("AXL_PORT") in ports:
            login = env.get("AXL_REDIS_URL")
            assert (urlsplit(login).username if login else None) == ports[env["AXL_PORT"]], env["AXL_PORT"]
            seen.add(env["AXL_PORT"])
        try:  # not on any command line (every local user can read those)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert not any(password.encode() in cmdline for password in passwords.values()), pid
    assert seen == set(ports)

    registry = redis.Redis.from_url(urls["registry"], decode_responses=True)
    assert registry.zcard("axl:registry:instances") >= 1  # the coder worker's registration
    jobs = redis.Redis.from_url(urls["jobs"])
    for attempt in (lambda: jobs.zrange("axl:registry:instances", 0, -1),
                    lambda: jobs.zadd("axl:registry:instances", {"evil": 1e15}), jobs.flushall):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_a_completion_through_the_gateway(mesh: dict[str, Any]) -> None:
    client = _client(mesh)
    assert "axl-coder" in {m.id for m in client.models.list()}
    completion = client.completions.create(model="axl-coder", prompt="def add(a, b):", max_tokens=8, seed=1,
                                           temperature=0)
    assert isinstance(completion.choices[0].text, str)
    assert completion.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=mesh["gateway"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_new_model_in_the_store_gets_a_worker(mesh: dict[str, Any]) -> None:
    from axl_mesh.model_store import ModelStore

    name = "ft:tiny:launcher:0a1b2c3d"
    source = make_tiny_checkpoint(mesh["root"] / "incoming", seed=3)
    ModelStore(mesh["config"]["model_store"]).add(name, source, specialist="coder", base="tiny", job_id="ftjob-test")
    client = _client(mesh)
    def served() -> bool:  # listed at once (0 instances), then served once the launcher's worker is up
        return any(m.id == name and (m.model_extra or {}).get("instances", 0) >= 1 for m in client.models.list())

    _wait(served, 90, f"{name} served (GET /v1/models)", mesh["log"])
    completion = client.completions.create(model=name, prompt="import ", max_tokens=4)
    assert completion.model == name
    assert completion.usage.completion_tokens >= 1


def _coder_worker(mesh: dict[str, Any]) -> int | None:
    port = str(mesh["config"]["workers"][0]["port"])
    for pid in _descendants(mesh["proc"].pid):
        if _environ(pid).get("AXL_PORT") == port and _environ(pid).get("AXL_SPECIALIST") == "coder":
            return pid
    return None


def test_a_crashed_child_is_restarted(mesh: dict[str, Any]) -> None:
    old = _coder_worker(mesh)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    _wait(lambda: "restarting coder" in mesh["log"].read_text(errors="replace"), 30, "the restart", mesh["log"])
    ready = f"http://127.0.0.1:{mesh['config']['workers'][0]['port']}/readyz"

    def back() -> bool:
        try:
            return httpx.get(ready, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(back, 90, "the restarted coder worker", mesh["log"])
    assert _coder_worker(mesh) not in (None, old)


def test_a_second_launcher_on_the_same_ports_fails_fast(mesh: dict[str, Any]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_") and k != "REDIS_URL"}
    result = subprocess.run([sys.executable, "-m", "deploy.launcher", "--config", str(mesh["root"] / "mesh.yaml"),
                             "--no-bootstrap"], cwd=REPO_ROOT, env={**env, "NO_COLOR": "1"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "already in use" in result.stdout and "(gateway)" in result.stdout
    assert "using the Redis at" in result.stdout  # the first one's: found, used, and left running
    assert httpx.get(mesh["gateway"] + "/healthz", timeout=5).status_code == 200
    assert redis_answers(_redis_url(mesh))


def test_sigint_stops_everything(mesh: dict[str, Any]) -> None:
    proc = mesh["proc"]
    redis_url = _redis_url(mesh)
    children = _descendants(proc.pid)
    assert len(children) >= 7  # redis, registry, 2 workers, gateway, trainer, quantizer (+ their forks)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0, mesh["log"].read_text(errors="replace")[-3000:]
    _wait(lambda: not any(_alive(pid) for pid in children), 10, "every child to be gone", mesh["log"])
    assert not redis_answers(redis_url, timeout=0.5)
    assert "stopped" in mesh["log"].read_text(errors="replace").splitlines()[-1]


def test_an_open_gateway_on_a_routable_address_is_refused_before_anything_starts(tmp_path: Path) -> None:
    config = {"host": "0.0.0.0", "redis_url": f"redis://127.0.0.1:{free_port()}/0", "state_dir": str(tmp_path / "s"),
              "data_dir": str(tmp_path / "data"), "registry": {"port": free_port()},
              "gateway": {"port": free_port(), "api_keys": []},
              "workers": [{"specialist": "coder", "port": free_port()}]}
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXL_") and k != "REDIS_URL"}
    result = subprocess.run([sys.executable, "-m", "deploy.launcher", "--config", str(tmp_path / "mesh.yaml"),
                             "--no-bootstrap"], cwd=REPO_ROOT, env={**env, "NO_COLOR": "1"}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    assert "open to anyone on '0.0.0.0'" in result.stdout and "AXL_API_KEYS" in result.stdout
    assert "redis" not in result.stdout.lower().split("error:")[0], "nothing was started first"
