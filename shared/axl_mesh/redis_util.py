"""Redis helpers every service uses: one way to open a client, a readiness ping, and outage -> 503."""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from axl_mesh.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)


def create_redis(url: str, *, timeout_seconds: float = 2.0) -> aioredis.Redis:
    """An asyncio Redis client that decodes to str and fails fast (bounded connect and command time)."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout_seconds,
        socket_timeout=timeout_seconds,
        health_check_interval=30,
    )


async def redis_is_up(client: aioredis.Redis) -> bool:
    """True when Redis answers PING now."""
    try:
        return bool(await client.ping())
    except (RedisConnectionError, RedisTimeoutError, OSError):
        return False


async def _on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return ServiceUnavailableError("The service's store (Redis) is unavailable; retry shortly.").to_response()


def install_redis_error_handler(app: FastAPI) -> None:
    """Answer 503 + Retry-After (OpenAI shape) instead of 500 when Redis cannot be reached."""
    app.add_exception_handler(RedisConnectionError, _on_redis_down)
    app.add_exception_handler(RedisTimeoutError, _on_redis_down)
