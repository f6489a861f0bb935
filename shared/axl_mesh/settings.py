"""The settings every service shares; each service subclasses :class:`ServiceSettings` in its ``settings.py``.

Values come from environment variables with the ``AXL_`` prefix (``AXL_PORT``, ``AXL_REDIS_URL``, ...), read when
a ``Settings()`` is built, never at import time.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from axl_mesh import advertise

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
MIN_SECRET_CHARS = 8  # the mesh secret (AXL_REGISTRY_SECRET), wherever it is set


class ServiceSettings(BaseSettings):
    """Host/port to bind and the URL to advertise, where Redis and the registry are, the registry secret, logging
    and body limit."""

    model_config = SettingsConfigDict(env_prefix="AXL_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # What other hosts should call this service at, when not http://host:port (axl_mesh.advertise says the order).
    advertise_host: str | None = Field(default=None, description="host name/IP others reach this service at")
    advertise_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("advertise_url", "AXL_ADVERTISE_URL", "AXL_PUBLIC_URL"),
        description="base URL others reach this service at (AXL_PUBLIC_URL is its older name)",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    registry_url: str = "http://127.0.0.1:8900"
    # The mesh secret: every internal hop carries it as a bearer (see axl_mesh.mesh_auth); None: not configured.
    # The registry, the model workers and the gateway require it; the job workers need none.
    registry_secret: SecretStr | None = None
    log_level: LogLevel = "info"
    max_body_bytes: int = Field(default=1 << 20, ge=0, description="requests with a larger body get a 413")

    @field_validator("registry_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"AXL_REGISTRY_SECRET must be at least {MIN_SECRET_CHARS} characters")
        return value

    @field_validator("advertise_host")
    @classmethod
    def _callable_host(cls, value: str | None) -> str | None:
        return advertise.check_advertise_host(value) if value else None

    @field_validator("advertise_url")
    @classmethod
    def _callable_url(cls, value: str | None) -> str | None:
        return advertise.check_advertise_url(value) if value else None

    def advertised_url(self) -> str:
        """The base URL other hosts should call this service at; AdvertiseError when none can be given (a wildcard
        bind with no route to the registry, port 0)."""
        return advertise.advertised_url(
            bind_host=self.host,
            port=self.port,
            advertise_url=self.advertise_url,
            advertise_host=self.advertise_host,
            registry_url=self.registry_url,
        )

    def registry_secret_value(self) -> str | None:
        """The secret as a plain string (or None), for building an Authorization header."""
        return self.registry_secret.get_secret_value() if self.registry_secret else None

    def configure_logging(self) -> None:
        """Root logging at ``log_level`` with one readable line format for every service.

        Routine traffic stays out of the log: httpx's line per outgoing request (heartbeats every few seconds)
        and uvicorn's access lines for successful probes and heartbeats.
        """
        logging.basicConfig(
            level=self.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
        access = logging.getLogger("uvicorn.access")
        if not any(isinstance(f, RoutineRequestFilter) for f in access.filters):
            access.addFilter(RoutineRequestFilter())


class RoutineRequestFilter(logging.Filter):
    """Drops uvicorn access lines of successful health probes, metrics scrapes and registry heartbeats."""

    ROUTINE_PATHS = ("/healthz", "/readyz", "/metrics")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) < 5:
            return True
        path, status = str(args[2]).split("?", 1)[0], args[4]
        routine = path in self.ROUTINE_PATHS or path.endswith("/heartbeat")
        return not (routine and isinstance(status, int) and status < 400)
