"""Redis helpers every service uses: one way to open a client, reconnecting after a Redis restart, a readiness
ping, and outage -> 503. (No FastAPI at import: the job workers use ``reconnect_policy`` too.)"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)

# A Redis that restarted has closed every pooled connection, and clients made by ``from_url`` never retry: each
# stale connection failed its next command (a 503 per pooled connection after every Redis restart, or a failed job
# call). Reconnect and resend on a connection error; a Redis that stops answering is not retried, so the socket
# timeout stays the bound. (A command whose reply alone was lost runs twice: at worst a job event logged twice.)
RECONNECT_RETRIES = 2
RECONNECT_BACKOFF_SECONDS = (0.05, 0.5)  # first wait, longest wait


def reconnect_policy(*, asyncio: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` (or, with ``asyncio``, ``redis.asyncio.Redis``) and their
    ``from_url``: retry a command whose connection was lost, on a fresh connection."""
    base, cap = RECONNECT_BACKOFF_SECONDS
    retry_class = AsyncRetry if asyncio else Retry
    return {
        "retry": retry_class(
            ExponentialBackoff(cap=cap, base=base), RECONNECT_RETRIES, supported_errors=(RedisConnectionError,)
        )
    }


def create_redis(url: str, *, timeout_seconds: float = 2.0) -> aioredis.Redis:
    """An asyncio Redis client that decodes to str, fails fast (bounded connect and command time) and reconnects
    after a Redis restart."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout_seconds,
        socket_timeout=timeout_seconds,
        health_check_interval=30,
        **reconnect_policy(asyncio=True),
    )


async def redis_is_up(client: aioredis.Redis) -> bool:
    """True when Redis answers PING now."""
    try:
        return bool(await client.ping())
    except (RedisConnectionError, RedisTimeoutError, OSError):
        return False


async def _on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    from axl_mesh.errors import ServiceUnavailableError

    logger.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return ServiceUnavailableError("The service's store (Redis) is unavailable; retry shortly.").to_response()


def install_redis_error_handler(app: FastAPI) -> None:
    """Answer 503 + Retry-After (OpenAI shape) instead of 500 when Redis cannot be reached."""
    app.add_exception_handler(RedisConnectionError, _on_redis_down)
    app.add_exception_handler(RedisTimeoutError, _on_redis_down)
