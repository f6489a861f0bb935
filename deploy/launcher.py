"""Run the whole AXL mesh as local processes: ``python -m deploy.launcher --config deploy/mesh.yaml`` (``make up``).

What it does, in order:

1. Redis: uses the one at ``$REDIS_URL`` (or the config's ``redis_url``) if it answers PING, else starts a private
   ``redis-server`` (append-only file under ``state_dir``) and stops it again at the end. The Redis it starts
   has the mesh's ACL (``axl_mesh.redis_acl``): the default user off, a ``registry`` user for the registry's keys
   only and a ``jobs`` user for the job system's (gateway, trainer, quantizer), each with a password generated for
   the state folder and kept there (``<user>.password``, mode 0600). Each child gets its own user's login in
   ``AXL_REDIS_URL`` (model workers use no Redis and get none); logs show passwords as ``***``.
2. The registry secret: ``$AXL_REGISTRY_SECRET`` if set, else a fresh random one for this run; every child gets it.
3. The bootstrap checkpoint: if the config's ``bootstrap.checkpoint`` folder does not exist and some worker needs it,
   trains it first on the local standard library (``axl_model.train``, a few minutes, a progress bar). An
   interrupted bootstrap resumes next time (it trains in ``<checkpoint>.partial`` and is moved in place at the end).
4. Starts the registry, the model workers, the gateway, the trainer and quantizer workers as child processes, each
   in its own process group, their output prefixed with a colored name; waits until each is healthy; prints the
   endpoint and a curl example.
5. Supervises: a child that exits on its own is restarted with exponential backoff; with
   ``auto_serve_new_models`` a worker is started for each new model that appears in the model store's manifest.
6. Ctrl-C / SIGTERM / SIGHUP: SIGTERM to every child's process group, a grace period, SIGKILL for stragglers,
   then the Redis it started. Exit status 0 after a clean stop.
7. Killed outright (SIGKILL, an OOM kill): the kernel kills every child it started too (a parent-death signal set
   in each; Linux), so no orphan keeps a port and the next start finds them free. ``--exit-with-parent`` (what
   ``make up`` passes) makes the launcher itself stop, cleanly, when the process that started it dies.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml

from axl_mesh.advertise import check_advertise_host, is_loopback, is_wildcard, url_host
from axl_mesh.process import set_parent_death_signal

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "deploy" / "mesh.yaml"


class ConfigError(ValueError):
    """The mesh config file is missing something or holds a bad value (the message names it)."""


# --------------------------------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One line of ``workers:``: a specialist served from a checkpoint on a port (``replicas`` on the next ports)."""

    specialist: str
    port: int
    checkpoint: str | None = None
    model_id: str | None = None
    replicas: int = 1


@dataclasses.dataclass(frozen=True)
class BootstrapSpec:
    checkpoint: str = "checkpoints/axl-micro"
    preset: str = "micro"
    max_time_seconds: float = 180.0
    batch_size: int = 8
    seq_len: int = 256
    eval_tokens: int = 16_384  # the final validation: enough for a bits-per-byte figure, quick on two cores
    data: tuple[str, ...] | None = None  # files/folders/globs; None: the running Python's standard library

    def __post_init__(self) -> None:
        if self.data is not None:  # YAML gives a list; keep the spec hashable
            object.__setattr__(self, "data", tuple(str(d) for d in self.data))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``deploy/mesh.yaml`` parsed and checked; relative paths resolved against ``root``."""

    root: Path
    host: str = "127.0.0.1"
    advertise_host: str | None = None  # AXL_ADVERTISE_HOST of every service: the name other hosts reach this one by
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The address the redis-server the launcher starts listens on: loopback by default; 0.0.0.0 or this host's LAN
    # address lets a trainer, quantizer or registry on another machine log in (README "Across machines").
    redis_bind: str = "127.0.0.1"
    registry_port: int = 8900
    gateway_port: int = 8880
    api_keys: tuple[str, ...] = ()
    # The trained model shipped in the repository (float16 weights, `axl export release`): what every worker
    # without a checkpoint of its own serves. Only where it is missing does the bootstrap training run.
    default_checkpoint: str = "weights/axl-coder"
    bootstrap: BootstrapSpec = BootstrapSpec()
    workers: tuple[WorkerSpec, ...] = ()
    worker_max_batch: int = 8
    worker_num_threads: int | None = None
    worker_dtype: str | None = None  # AXL_DTYPE of every worker: float32 (exact), float16 (faster), bfloat16
    trainer_workers: int = 1
    quantizer_workers: int = 1
    queue_worker_port_start: int = 8960
    data_dir: str = "data"
    model_store: str = "data/models"
    files_dir: str = "data/files"
    jobs_dir: str = "data/jobs"
    state_dir: str = "data/mesh"
    auto_serve_new_models: bool = True
    auto_serve_port_start: int = 8920
    poll_seconds: float = 3.0
    restart_backoff_max_seconds: float = 30.0
    health_timeout_seconds: float = 120.0
    stop_grace_seconds: float = 15.0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], root: Path = REPO_ROOT) -> MeshConfig:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"mesh config {path} does not exist (see deploy/mesh.yaml for an example)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"mesh config {path} is not valid YAML: {exc}") from None
        return cls.from_dict(raw or {}, root=root, source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], root: Path = REPO_ROOT, source: str = "mesh config") -> MeshConfig:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
        data = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)} - {"root"} | {"registry", "gateway"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k not in ("registry", "gateway", "bootstrap", "workers")}
        kwargs["registry_port"] = _section(data, "registry", source).get("port", 8900)
        gateway = _section(data, "gateway", source)
        kwargs["gateway_port"] = gateway.get("port", 8880)
        kwargs["api_keys"] = tuple(str(k) for k in gateway.get("api_keys") or ())
        try:
            kwargs["bootstrap"] = BootstrapSpec(**_section(data, "bootstrap", source))
        except TypeError as exc:
            raise ConfigError(f"{source}: bootstrap: {exc}") from None
        workers = []
        for index, item in enumerate(data.get("workers") or ()):
            if not isinstance(item, Mapping) or "specialist" not in item or "port" not in item:
                raise ConfigError(f"{source}: workers[{index}] needs at least specialist and port, got {item!r}")
            try:
                workers.append(WorkerSpec(**item))
            except TypeError as exc:
                raise ConfigError(f"{source}: workers[{index}]: {exc}") from None
        kwargs["workers"] = tuple(workers)
        config = cls(root=root, **kwargs)
        config.validate(source)
        return config

    def validate(self, source: str = "mesh config") -> None:
        problems = []
        ports: dict[int, str] = {}

        def claim(port: Any, owner: str) -> None:
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                problems.append(f"{owner}: port must be an integer in 1..65535, got {port!r}")
            elif port in ports:
                problems.append(f"{owner}: port {port} is already used by {ports[port]}")
            else:
                ports[port] = owner

        claim(self.registry_port, "registry")
        claim(self.gateway_port, "gateway")
        for worker in self.workers:
            if not isinstance(worker.replicas, int) or worker.replicas < 1:
                problems.append(f"worker {worker.specialist}: replicas must be >= 1, got {worker.replicas!r}")
                continue
            for replica in range(worker.replicas):
                claim(worker.port + replica if isinstance(worker.port, int) else worker.port,
                      f"worker {worker.specialist}#{replica}")
        for name in ("trainer_workers", "quantizer_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        if not problems:
            for port in self.queue_worker_ports():
                claim(port, "queue worker (queue_worker_port_start)")
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            problems.append(f"redis_url must be a redis:// URL, got {_redact(self.redis_url)!r}")
        try:  # redis-server binds addresses, not names; IPv4 only, as the Redis URLs the launcher builds are
            if ipaddress.ip_address(str(self.redis_bind)).version != 4:
                raise ValueError
        except ValueError:
            problems.append(f"redis_bind must be an IPv4 address (127.0.0.1, 0.0.0.0, this host's LAN address), "
                            f"got {self.redis_bind!r}")
        if self.advertise_host is not None:
            try:
                check_advertise_host(str(self.advertise_host))
            except ValueError as exc:
                problems.append(f"advertise_host: {exc}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))

    def path(self, value: str) -> Path:
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else self.root / candidate

    def queue_worker_ports(self) -> list[int]:
        return [self.queue_worker_port_start + i for i in range(self.trainer_workers + self.quantizer_workers)]

    def worker_checkpoint(self, worker: WorkerSpec) -> Path:
        """Explicit checkpoint, else checkpoints/axl-<specialist> when it exists, else the shipped default model,
        else (a checkout without it) the bootstrap checkpoint."""
        if worker.checkpoint:
            return self.path(worker.checkpoint)
        own = self.path(f"checkpoints/axl-{worker.specialist}")
        if own.is_dir():
            return own
        shipped = self.path(self.default_checkpoint)
        return shipped if (shipped / "config.json").is_file() else self.path(self.bootstrap.checkpoint)


def _section(data: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
    return dict(value)


# --------------------------------------------------------------------------------------------------- terminal output
_COLORS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91")


class Console:
    """Serialises output lines of all children; colors when writing to a terminal (NO_COLOR turns it off)."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        force = os.environ.get("FORCE_COLOR")
        self.color = bool(force) or (stream.isatty() and "NO_COLOR" not in os.environ)
        self._palette = itertools.cycle(_COLORS)
        self._assigned: dict[str, str] = {}
        self.width = 12

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def line(self, name: str, text: str) -> None:
        code = self._assigned.setdefault(name.split("#")[0], next(self._palette))
        prefix = self._paint(code, f"{name:<{self.width}} |")
        with self.lock:
            self.stream.write(f"{prefix} {text}\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        self.line("launcher", text)

    def banner(self, text: str) -> None:
        with self.lock:
            self.stream.write(self._paint("1", text) + "\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------- redis
def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server at ``url`` answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False
    finally:
        client.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in it (``redis://:password@host:port/db``)."""
    parts = urlsplit(url)
    netloc = f"{parts.username or ''}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_password_file(data_dir: Path, user: str) -> Path:
    return data_dir / f"{user}.password"


def stored_redis_passwords(data_dir: Path) -> dict[str, str]:
    """The passwords of the Redis users (``axl_mesh.redis_acl.USERS``) the launcher made for this state folder:
    all of them, or {} when any is missing."""
    from axl_mesh.redis_acl import USERS

    passwords = {}
    for user in USERS:
        try:
            passwords[user] = redis_password_file(data_dir, user).read_text().strip()
        except FileNotFoundError:
            return {}
    return passwords if all(passwords.values()) else {}


def redis_passwords(data_dir: Path) -> dict[str, str]:
    """The stored passwords, else new random ones stored (0600) beside the Redis data: kept, not regenerated per
    run, so a second ``make up`` finds (and refuses to duplicate) a Redis left running on this folder's data."""
    from axl_mesh.redis_acl import USERS

    existing = stored_redis_passwords(data_dir)
    if existing:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    passwords = {}
    for user in USERS:
        passwords[user] = secrets.token_urlsafe(32)  # URL-safe: it goes in redis:// URLs as is
        fd = os.open(redis_password_file(data_dir, user), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(passwords[user] + "\n")
    return passwords


def redis_user_urls(url: str, passwords: Mapping[str, str]) -> dict[str, str]:
    """Each Redis user's login to the Redis at ``url``."""
    from axl_mesh.redis_acl import url_for_user

    return {user: url_for_user(url, user, password) for user, password in passwords.items()}


class LocalRedis:
    """A ``redis-server`` the launcher started (append-only persistence in ``data_dir``) and will stop.

    It runs the mesh's ACL (``axl_mesh.redis_acl``) with the passwords of :func:`redis_passwords` (a password in
    the wanted URL is not used: each user has its own). The ACL reaches redis-server on its stdin (not its command
    line, which every local user can read); ``urls`` holds each user's login, ``url`` the jobs user's.
    """

    def __init__(self, wanted_url: str, data_dir: Path, console: Console, bind: str = "127.0.0.1") -> None:
        from axl_mesh.redis_acl import JOBS_USER

        parts = urlsplit(wanted_url)
        wanted_port = parts.port or 6379
        self.bind = bind
        host = _connect_host(bind)  # the services on this machine connect here
        self.port = wanted_port if port_is_free(wanted_port, host) else free_port(host)
        db = parts.path or "/0"
        self.passwords = redis_passwords(data_dir)
        self.urls = redis_user_urls(urlunsplit(("redis", f"{host}:{self.port}", db, "", "")), self.passwords)
        self.url = self.urls[JOBS_USER]
        self.data_dir = data_dir
        self.console = console
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "no Redis answers and redis-server is not installed: install Redis (apt-get install redis-server) "
                "or point REDIS_URL at a running one"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "-", "--port", str(self.port), "--bind", self.bind, "--dir", str(self.data_dir),
             "--appendonly", "yes", "--save", "", "--loglevel", "warning"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_launcher(signal.SIGTERM),  # redis-server flushes its append-only file and exits
        )
        from axl_mesh.redis_acl import acl_directives

        assert self.proc.stdin is not None
        acl = "".join(line + "\n" for line in acl_directives(self.passwords))
        self.proc.stdin.write(acl.encode())  # "-": config read from stdin to EOF
        self.proc.stdin.close()
        threading.Thread(target=_pump, args=(self.proc, "redis", self.console), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.proc.returncode} (see the redis lines above)")
            if redis_answers(self.url, timeout=0.5):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------------------------------- dying together
def die_with_launcher(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """A Popen ``preexec_fn``: the child gets ``sig`` when the launcher dies.

    SIGKILL for services: a SIGKILLed launcher cannot escalate, and a child that lingers (a trainer finishing its
    job before a warm shutdown) keeps its port, so the next ``make up`` refuses to start. Every service already
    survives being SIGKILLed (the registry forgets it, the reaper requeues its job, checkpoints are atomic).
    """
    launcher_pid = os.getpid()
    return lambda: set_parent_death_signal(sig, launcher_pid)


def _pump(proc: subprocess.Popen[bytes], name: str, console: Console) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        console.line(name, raw.decode("utf-8", "replace").rstrip("\r\n"))
    proc.stdout.close()


# --------------------------------------------------------------------------------------------------- child processes
@dataclasses.dataclass
class ChildSpec:
    """How to run one service: ``python -m <module>`` with ``env``; healthy when GET ``health_url`` is 200."""

    name: str
    module: str
    env: dict[str, str]
    health_url: str | None  # None: healthy once it has stayed up for a moment


class Child:
    """A supervised child process (its own process group), restarted with backoff when it dies on its own."""

    STABLE_SECONDS = 60.0  # a child that ran this long before dying starts again from the shortest backoff

    def __init__(self, spec: ChildSpec, console: Console, backoff_max: float) -> None:
        self.spec = spec
        self.console = console
        self.backoff_max = backoff_max
        self.backoff = 1.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.restarts = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> None:
        env = {**os.environ, **self.spec.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", self.spec.module], cwd=REPO_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_launcher(),
        )
        self.started_at = time.monotonic()
        self.restart_at = None
        threading.Thread(target=_pump, args=(self.proc, self.name, self.console), daemon=True).start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        if not self.running():
            return False
        if self.spec.health_url is None:
            return time.monotonic() - self.started_at > 2.0
        try:
            return httpx.get(self.spec.health_url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def supervise(self, now: float) -> None:
        """Called every tick: notice an exit, schedule and perform the restart."""
        if self.proc is None:
            return
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.restarts += 1
                self.console.say(f"restarting {self.name} (restart #{self.restarts})")
                self.start()
            return
        code = self.proc.poll()
        if code is None:
            return
        if now - self.started_at >= self.STABLE_SECONDS:
            self.backoff = 1.0
        self.console.say(f"{self.name} exited with status {code}; restarting in {self.backoff:.0f}s")
        self.restart_at = now + self.backoff
        self.backoff = min(self.backoff * 2, self.backoff_max)

    def signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group holds its forks too (RQ work horses, uvicorn workers)
        except ProcessLookupError:
            pass


def stop_children(children: list[Child], grace: float, console: Console) -> None:
    """SIGTERM every child's group, wait up to ``grace`` seconds, SIGKILL what is left."""
    for child in children:
        child.restart_at = None
        if child.running():
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.say(f"{child.name} did not stop within {grace:.0f}s; killing it")
        # Kill the group even when the leader exited: a fork it left behind must not outlive the mesh.
        child.signal_group(signal.SIGKILL)
        if child.proc.poll() is None:
            child.proc.wait(5)


# --------------------------------------------------------------------------------------------------- the mesh
class Mesh:
    """Everything ``make up`` runs, built from a :class:`MeshConfig`."""

    def __init__(self, config: MeshConfig, console: Console | None = None, *, bootstrap: bool = True) -> None:
        self.config = config
        self.console = console or Console()
        self.allow_bootstrap = bootstrap
        self.stop_event = threading.Event()
        self.children: list[Child] = []
        self.redis: LocalRedis | None = None
        self.redis_url = ""  # the Redis every service uses when it has no login of its own in redis_urls
        self.redis_urls: dict[str, str] = {}  # Redis user -> its login (axl_mesh.redis_acl), for a Redis we know
        self.secret = ""
        self.served_store_models: set[str] = set()
        self._announced_healthy: set[Child] = set()
        self._next_auto_port = config.auto_serve_port_start

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        cfg = self.config
        wanted = os.environ.get("REDIS_URL") or os.environ.get("AXL_REDIS_URL") or cfg.redis_url
        redis_dir = cfg.path(cfg.state_dir) / "redis"
        stored = stored_redis_passwords(redis_dir)
        ours = redis_user_urls(wanted, stored) if stored and not urlsplit(wanted).password else {}
        if redis_answers(wanted):
            self.redis_url = wanted
            self.console.say(f"using the Redis at {_redact(wanted)}")
            if not urlsplit(wanted).password:
                self.console.say("warning: that Redis needs no password, so anything that reaches it can change the "
                                 "mesh's jobs; give it one (requirepass) and put it in REDIS_URL")
            self.console.say("warning: every service logs in to that Redis the same way, so any of them (the trainer "
                             "included) can rewrite the registry's records; let the launcher start its own Redis, "
                             "which has a user per service (axl_mesh.redis_acl)")
        elif ours and all(redis_answers(url) for url in ours.values()):  # one a launcher started here, still running
            self.redis_urls = ours
            self.console.say(f"using the Redis at {_redact(wanted)} (this state folder's users)")
        else:
            self.console.say(f"no Redis answers at {_redact(wanted)}; starting a local redis-server")
            self.redis = LocalRedis(wanted, redis_dir, self.console, bind=cfg.redis_bind).start()
            self.redis_urls = self.redis.urls
            self.console.say(f"redis-server is up at {_redact(self.redis.url)} with a user per service "
                             f"({', '.join(self.redis_urls)}; append-only file in {self.redis.data_dir})")
            if not is_loopback(cfg.redis_bind):
                self.console.say(f"redis-server listens on {cfg.redis_bind}:{self.redis.port} (redis_bind) for "
                                 f"services on other hosts: each logs in as its user with the password in "
                                 f"{redis_dir}/<user>.password; RESP is plain text, so keep it on a trusted LAN "
                                 f"or VPN")
        self.secret = os.environ.get("AXL_REGISTRY_SECRET", "")
        if not self.secret:
            self.secret = secrets.token_urlsafe(24)
            self.console.say("AXL_REGISTRY_SECRET is not set; generated one for this run")
        for folder in (cfg.model_store, cfg.files_dir, cfg.jobs_dir):
            cfg.path(folder).mkdir(parents=True, exist_ok=True)

    def ensure_bootstrap_checkpoint(self) -> None:
        """Train the bootstrap checkpoint if a worker needs it and it does not exist yet."""
        cfg = self.config
        target = cfg.path(cfg.bootstrap.checkpoint)
        needed = any(cfg.worker_checkpoint(w) == target for w in cfg.workers)
        if not needed or (target / "config.json").is_file():
            return
        if not self.allow_bootstrap:
            raise RuntimeError(f"checkpoint {target} does not exist and --no-bootstrap was given")
        bootstrap_train(cfg.bootstrap, target, self.console, should_stop=self.stop_event.is_set)

    # ------------------------------------------------------------------ process specs
    def common_env(self) -> dict[str, str]:
        cfg = self.config
        shared = [str(REPO_ROOT / "shared"), str(REPO_ROOT)]
        if os.environ.get("PYTHONPATH"):
            shared.append(os.environ["PYTHONPATH"])
        return {
            "PYTHONPATH": os.pathsep.join(shared),
            "PYTHONUNBUFFERED": "1",
            "AXL_HOST": cfg.host,
            **({"AXL_ADVERTISE_HOST": str(cfg.advertise_host)} if cfg.advertise_host else {}),
            "AXL_REGISTRY_URL": f"http://{_connect_host(cfg.host)}:{cfg.registry_port}",
            "AXL_REGISTRY_SECRET": self.secret,
            "AXL_DATA_DIR": str(cfg.path(cfg.data_dir)),
            "AXL_MODEL_STORE_DIR": str(cfg.path(cfg.model_store)),
            "AXL_FILES_DIR": str(cfg.path(cfg.files_dir)),
            "AXL_JOBS_DIR": str(cfg.path(cfg.jobs_dir)),
        }

    def redis_env(self, module: str) -> dict[str, str]:
        """``AXL_REDIS_URL`` of the service run as ``module``: its own user's login (``axl_mesh.redis_acl``) where
        the Redis has the mesh's users, else the one shared URL; nothing for a service that uses no Redis."""
        from axl_mesh.redis_acl import SERVICE_USERS

        user = SERVICE_USERS.get(module)
        if user is None:
            return {}
        return {"AXL_REDIS_URL": self.redis_urls.get(user) or self.redis_url}

    def _url(self, port: int, path: str) -> str:
        return f"http://{_connect_host(self.config.host)}:{port}{path}"

    def worker_spec(self, name: str, specialist: str, port: int, checkpoint: Path, model_id: str | None) -> ChildSpec:
        cfg = self.config
        env = {**self.common_env(), "AXL_PORT": str(port), "AXL_SPECIALIST": specialist,
               "AXL_CHECKPOINT": str(checkpoint), "AXL_MAX_BATCH": str(cfg.worker_max_batch)}
        if model_id:
            env["AXL_MODEL_ID"] = model_id
        if cfg.worker_num_threads:
            env["AXL_NUM_THREADS"] = str(cfg.worker_num_threads)
        if cfg.worker_dtype:
            env["AXL_DTYPE"] = cfg.worker_dtype
        return ChildSpec(name, "services.model_worker", env, self._url(port, "/readyz"))

    def child_specs(self) -> list[ChildSpec]:
        """Registry first, then workers, gateway, queue workers (the order they start in)."""
        cfg = self.config
        common = self.common_env()
        specs = [ChildSpec("registry", "services.mesh_registry",
                           {**common, **self.redis_env("services.mesh_registry"), "AXL_PORT": str(cfg.registry_port)},
                           self._url(cfg.registry_port, "/healthz"))]
        for worker in cfg.workers:
            checkpoint = cfg.worker_checkpoint(worker)
            for replica in range(worker.replicas):
                name = worker.specialist if worker.replicas == 1 else f"{worker.specialist}#{replica}"
                specs.append(self.worker_spec(name, worker.specialist, worker.port + replica, checkpoint,
                                              worker.model_id))
        gateway_env = {**common, **self.redis_env("services.api_gateway"), "AXL_PORT": str(cfg.gateway_port)}
        api_keys = os.environ.get("AXL_API_KEYS") or ",".join(cfg.api_keys)
        if api_keys:
            gateway_env["AXL_API_KEYS"] = api_keys
        specs.append(ChildSpec("gateway", "services.api_gateway", gateway_env, self._url(cfg.gateway_port, "/healthz")))
        ports = iter(cfg.queue_worker_ports())
        for kind, module, count in (("trainer", "services.trainer_worker", cfg.trainer_workers),
                                    ("quantizer", "services.quantizer", cfg.quantizer_workers)):
            for index in range(count):
                port = next(ports)
                name = kind if count == 1 else f"{kind}#{index}"
                specs.append(ChildSpec(name, module, {**common, **self.redis_env(module), "AXL_PORT": str(port)},
                                       self._url(port, "/healthz")))
        return specs

    # ------------------------------------------------------------------ run
    def check_ports(self, specs: list[ChildSpec]) -> None:
        """Fail before starting anything when a port is taken (another mesh running, or another program)."""
        host = _connect_host(self.config.host)
        busy = [f"{spec.env['AXL_PORT']} ({spec.name})" for spec in specs
                if not port_is_free(int(spec.env["AXL_PORT"]), host)]
        if busy:
            raise RuntimeError(f"port(s) already in use: {', '.join(busy)}; is a mesh already running? "
                               "Stop it, or change the ports in the mesh config")

    def check_exposure(self) -> None:
        """Fail before starting anything when the gateway would refuse to start (open on a routable address),
        instead of restarting it with backoff forever."""
        if (self.config.api_keys or os.environ.get("AXL_API_KEYS") or is_loopback(self.config.host)
                or os.environ.get("AXL_ALLOW_OPEN", "").strip().lower() in {"1", "true", "yes", "on"}):
            return
        raise RuntimeError(
            f"the gateway would be open to anyone on {self.config.host!r}: set gateway.api_keys in the mesh config "
            "or AXL_API_KEYS, bind host: 127.0.0.1, or set AXL_ALLOW_OPEN=true if an open gateway is what you want")

    def start(self) -> None:
        specs = self.child_specs()
        self.check_ports(specs)
        for spec in specs:
            child = Child(spec, self.console, self.config.restart_backoff_max_seconds)
            self.children.append(child)
            child.start()
            if spec.name == "registry":  # everyone else registers with it: let it come up first
                self.wait_healthy([child])
        self.wait_healthy(self.children)

    def wait_healthy(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.config.health_timeout_seconds
        pending = [c for c in children if c not in self._announced_healthy]
        while pending and not self.stop_event.is_set():
            for child in list(pending):
                child.supervise(time.monotonic())
                if child.healthy():
                    self.console.say(f"{child.name} is healthy")
                    self._announced_healthy.add(child)
                    pending.remove(child)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise RuntimeError(f"not healthy within {self.config.health_timeout_seconds:.0f}s: {names}")
            self.stop_event.wait(0.25)

    def gateway_urls(self) -> tuple[str, str | None]:
        """The gateway's base URL for the banner, the one other hosts should call (the advertised host:
        ``advertise_host``, else ``AXL_ADVERTISE_HOST``, which the services inherit too; else the bind address when
        it is one), and, for a wildcard bind, the loopback URL that works on this machine too (None if the same)."""
        cfg = self.config
        advertised = cfg.advertise_host or os.environ.get("AXL_ADVERTISE_HOST", "").strip() or None
        local = f"http://{url_host(_connect_host(cfg.host))}:{cfg.gateway_port}/v1"
        if advertised is None or is_loopback(cfg.host):  # a loopback bind is reachable here only, whatever it says
            return local, None
        return f"http://{url_host(str(advertised))}:{cfg.gateway_port}/v1", local if is_wildcard(cfg.host) else None

    def announce(self) -> None:
        cfg = self.config
        base, local = self.gateway_urls()
        model = f"axl-{cfg.workers[0].specialist}" if cfg.workers else "axl-coder"
        if cfg.workers and cfg.workers[0].model_id:
            model = cfg.workers[0].model_id
        auth = " -H 'Authorization: Bearer $AXL_API_KEY'" if (cfg.api_keys or os.environ.get("AXL_API_KEYS")) else ""
        self.console.banner(f"\nAXL mesh is up: {base}  (OpenAI-compatible; Ctrl-C stops everything)")
        if local is not None:
            self.console.banner(f"  on this machine also: {local}")
        self.console.banner(
            f"  curl {base}/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"       -d '{{\"model\": \"{model}\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 64}}'\n"
        )

    def poll_model_store(self) -> None:
        """Start a worker for each model-store entry that no worker serves yet."""
        for entry in read_model_store(self.config.path(self.config.model_store)):
            model_id = entry["model_id"]
            if model_id in self.served_store_models:
                continue
            self.served_store_models.add(model_id)
            port = self._allocate_port()
            self.console.say(f"new model {model_id} in the model store; starting a worker for it on :{port}")
            spec = self.worker_spec(_child_name(model_id), entry["specialist"], port, Path(entry["path"]), model_id)
            child = Child(spec, self.console, self.config.restart_backoff_max_seconds)
            self.children.append(child)
            child.start()

    def _allocate_port(self) -> int:
        taken = {int(c.spec.env["AXL_PORT"]) for c in self.children if "AXL_PORT" in c.spec.env}
        port = self._next_auto_port
        while port in taken or not port_is_free(port, _connect_host(self.config.host)):
            port += 1
        self._next_auto_port = port + 1
        return port

    def supervise_forever(self) -> None:
        next_poll = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            for child in list(self.children):
                child.supervise(now)
            if self.config.auto_serve_new_models and now >= next_poll:
                next_poll = now + self.config.poll_seconds
                try:
                    self.poll_model_store()
                except (OSError, ValueError) as exc:  # a half-written manifest: try again next poll
                    self.console.say(f"could not read the model store: {exc}")
            self.stop_event.wait(0.5)

    def shutdown(self) -> None:
        self.stop_event.set()
        if self.children:
            self.console.say("stopping the mesh")
            # The registry last: stopping workers deregister themselves from it.
            registry = [c for c in self.children if c.spec.module == "services.mesh_registry"]
            others = [c for c in reversed(self.children) if c not in registry]
            stop_children(others, self.config.stop_grace_seconds, self.console)
            stop_children(registry, self.config.stop_grace_seconds, self.console)
        if self.redis is not None:
            self.console.say("stopping the local redis-server")
            self.redis.stop()
        self.console.say("stopped")

    def run(self) -> int:
        try:
            self.check_exposure()  # before Redis or a bootstrap training start
            self.prepare()
            self.ensure_bootstrap_checkpoint()
            if self.stop_event.is_set():
                return 0
            if self.config.auto_serve_new_models:  # entries already there at start get a worker right away
                self.poll_model_store()
            self.start()
            if not self.stop_event.is_set():
                self.announce()
                self.supervise_forever()
            return 0
        except RuntimeError as exc:
            self.console.say(f"error: {exc}")
            return 1
        finally:
            self.shutdown()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if is_wildcard(host) else host


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def _child_name(model_id: str) -> str:
    """A short log prefix for a model-store model: ``ft:base:suffix:1a2b3c4d`` -> ``ft-1a2b3c4d``."""
    if model_id.startswith("ft:"):
        return "ft-" + model_id.rsplit(":", 1)[-1][:8]
    return model_id[:12]


# --------------------------------------------------------------------------------------------------- model store
def read_model_store(store: Path) -> Iterator[dict[str, str]]:
    """The model store's entries as {model_id, specialist, path}, read through ``axl_mesh.model_store``.

    An entry whose specialist is not in the catalogue (or is unset) is served as a ``coder``: every worker needs a
    prompt layout, and the coder's is the general one.
    """
    from axl_mesh.model_store import ModelStore
    from axl_model.specialists import SPECIALISTS

    models = ModelStore(store)
    for name, entry in models.entries().items():
        specialist = entry.get("specialist")
        yield {"model_id": name, "specialist": specialist if specialist in SPECIALISTS else "coder",
               "path": str(models.path(name))}


# --------------------------------------------------------------------------------------------------- bootstrap
def bootstrap_train(spec: BootstrapSpec, target: Path, console: Console, should_stop: Callable[[], bool]) -> None:
    """Train a small model on the local standard library into ``target`` (resumable through ``<target>.partial``)."""
    import sysconfig

    try:
        from axl_model.train import TrainCallbacks, TrainConfig, train
    except ImportError as exc:
        raise RuntimeError(f"cannot train the bootstrap checkpoint: axl_model.train is unavailable ({exc})") from None
    partial = target.with_name(target.name + ".partial")
    data = list(spec.data) if spec.data else [sysconfig.get_paths()["stdlib"]]
    corpus = ", ".join(data) if spec.data else f"the standard library ({data[0]})"
    console.say(
        f"no checkpoint at {target}: training a {spec.preset} bootstrap model on {corpus} "
        f"for about {spec.max_time_seconds:.0f}s, once; Ctrl-C pauses it (it resumes next time)"
    )
    try:
        config = TrainConfig(out_dir=str(partial), preset=spec.preset, data=data, max_time=spec.max_time_seconds,
                             batch_size=spec.batch_size, seq_len=spec.seq_len, eval_tokens=spec.eval_tokens,
                             resume=True, progress=True,
                             run_dir=str(target.with_name(target.name + ".run")))
        result = train(config, callbacks=TrainCallbacks(should_stop=should_stop))
    except ValueError as exc:  # user-fixable (too little RAM, no data, a bad preset): say so and stop
        raise RuntimeError(f"bootstrap training failed: {exc}") from None
    if result.status != "completed":
        console.say(f"bootstrap training {result.status} at step {result.steps}; run again to continue it")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)
    score = f"{result.val_bpb:.3f}" if result.val_bpb is not None else "-"
    console.say(f"bootstrap checkpoint ready at {target} ({result.steps} steps, validation bits/byte {score})")


# --------------------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.launcher",
        description=(
            "Run the AXL mesh as local processes: Redis (existing or a private one), the mesh registry, one model "
            "worker per line of `workers:`, the OpenAI-compatible gateway, trainer and quantizer workers. Trains a "
            "small bootstrap model first if its checkpoint is missing. Ctrl-C stops everything."
        ),
        epilog=(
            "environment: REDIS_URL (Redis to use; default: the config's redis_url, started locally when nothing "
            "answers), AXL_REGISTRY_SECRET (shared by registry and services; generated per run when unset), "
            "AXL_API_KEYS (comma-separated bearer tokens the gateway requires), NO_COLOR / FORCE_COLOR."
        ),
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="mesh config file (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print the processes it would start, and exit")
    parser.add_argument("--no-bootstrap", action="store_true",
                        help="fail instead of training when the bootstrap checkpoint is missing")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop the mesh when the process that started this one dies (make up passes it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = MeshConfig.from_file(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mesh = Mesh(config, bootstrap=not args.no_bootstrap)
    if args.check:
        mesh.redis_url = os.environ.get("REDIS_URL") or config.redis_url
        mesh.secret = "<generated>"
        for spec in mesh.child_specs():
            port = spec.env.get("AXL_PORT", "")
            extra = f" checkpoint={spec.env['AXL_CHECKPOINT']}" if "AXL_CHECKPOINT" in spec.env else ""
            print(f"{spec.name:<12} python -m {spec.module:<24} port={port}{extra}")
        return 0

    def on_signal(signum: int, _frame: object) -> None:
        if not mesh.stop_event.is_set():
            mesh.console.say(f"got {signal.Signals(signum).name}; stopping")
        mesh.stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # its terminal closed
    if args.exit_with_parent:  # `make up`: killing make must stop the mesh, not leave it running without a terminal
        set_parent_death_signal(signal.SIGTERM, os.getppid())
    return mesh.run()


if __name__ == "__main__":
    sys.exit(main())
