"""Who may touch which Redis keys: one Redis ACL user per kind of service, so a password leaked by one service
(the trainer runs user-supplied jobs) cannot change what another owns (the registry's instance records, which
decide where a model's traffic goes).

- ``registry`` (services.mesh_registry): only the registry's keys (``axl:registry:*``), no pubsub channels.
- ``jobs`` (the gateway's job routes, the trainer and the quantizer): the job records (``axl:jobs:*``), RQ's keys
  and channels (``rq:*``; a worker's command channel is ``rq:pubsub:<worker>``) and the model store's channel.
  No registry key, read or write.
- ``default`` (a client that does not log in): off.
- Model workers use no Redis, so they get no user.

Both users get every command but the ``@dangerous`` ones (FLUSHALL, KEYS, MONITOR, CONFIG, ACL changes, DEBUG,
CLIENT LIST/KILL, SHUTDOWN, ...), which would let them wipe, watch or reconfigure what they cannot address by key;
``jobs`` gets INFO back because RQ reads the server's version with it. Redis (7+) checks the key patterns inside
Lua scripts too. The rules are built here and nowhere else: the launcher feeds them to the redis-server it starts,
docker-compose.yml spells the same directives on its command line (a test compares the two), and tests start a
Redis with them (``tests.support.RedisServer``).

The key patterns follow the key prefixes' defaults (``AXL_REGISTRY_KEY_PREFIX``, ``AXL_JOBS_KEY_PREFIX``); a mesh
that changes a prefix must build its ACL with the same one.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from axl_mesh.model_store import MODEL_STORE_CHANNEL

REGISTRY_USER = "registry"
JOBS_USER = "jobs"
USERS = (REGISTRY_USER, JOBS_USER)

DEFAULT_REGISTRY_PREFIX = "axl:registry"  # services.mesh_registry.settings.Settings.registry_key_prefix
DEFAULT_JOBS_PREFIX = "axl:jobs"  # axl_mesh.jobs.JobsSettings.jobs_key_prefix
RQ_PREFIX = "rq"  # RQ's RQ_KEY_PREFIX: its queues, jobs, registries, workers and pubsub channels

# The Redis user of each service that connects to Redis (by the module it runs as); a service not listed has none.
SERVICE_USERS = {
    "services.mesh_registry": REGISTRY_USER,
    "services.api_gateway": JOBS_USER,
    "services.trainer_worker": JOBS_USER,
    "services.quantizer": JOBS_USER,
}

_COMMANDS = ("+@all", "-@dangerous")
_EXTRA_COMMANDS = {JOBS_USER: ("+info",)}  # RQ: INFO server, for the Redis version


def user_rules(
    user: str, *, registry_prefix: str = DEFAULT_REGISTRY_PREFIX, jobs_prefix: str = DEFAULT_JOBS_PREFIX
) -> list[str]:
    """The ACL rules of ``user`` without its password (``ACL SETUSER``/``user`` directive syntax)."""
    if user == REGISTRY_USER:
        keys, channels = [f"{registry_prefix}:*"], []
    elif user == JOBS_USER:
        keys, channels = [f"{jobs_prefix}:*", f"{RQ_PREFIX}:*"], [f"{RQ_PREFIX}:*", MODEL_STORE_CHANNEL]
    else:
        raise ValueError(f"unknown Redis user {user!r}; the mesh's are {', '.join(USERS)}")
    return [
        "resetkeys",
        "resetchannels",
        *(f"~{k}" for k in keys),
        *(f"&{c}" for c in channels),
        "-@all",
        *_COMMANDS,
        *_EXTRA_COMMANDS.get(user, ()),
    ]


def default_user_rules() -> list[str]:
    """The ``default`` user: off (a connection that does not log in can run nothing), no keys, no commands."""
    return ["off", "resetkeys", "resetchannels", "-@all"]


def acl_directives(passwords: Mapping[str, str], **prefixes: str) -> list[str]:
    """``user ...`` lines for a redis-server config (its stdin or a file): the default user off, then each of
    :data:`USERS` on with its password from ``passwords``."""
    missing = [user for user in USERS if not passwords.get(user)]
    if missing:
        raise ValueError(f"no Redis password for user(s) {', '.join(missing)}")
    lines = ["user default " + " ".join(default_user_rules())]
    for user in USERS:
        lines.append(" ".join(["user", user, "on", f">{passwords[user]}", *user_rules(user, **prefixes)]))
    return lines


def url_for_user(url: str, user: str, password: str) -> str:
    """``url`` logging in as ``user`` with ``password`` (``redis://user:password@host:port/db``)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
