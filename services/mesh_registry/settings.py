"""Settings of the mesh registry (env prefix ``AXL_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from axl_mesh.settings import ServiceSettings


class Settings(ServiceSettings):
    """The registry binds :8900 and must be given ``AXL_REGISTRY_SECRET`` (it refuses to start without one)."""

    port: int = Field(default=8900, ge=0, le=65535)
    registry_secret: SecretStr  # required here: without it anyone could announce or hijack an instance
    instance_ttl_seconds: float = Field(default=15.0, gt=0, description="an instance not heard from for this long is gone")
    registry_key_prefix: str = Field(default="axl:registry", min_length=1)
    # Off by default: instance URLs and loads are not secret inside the mesh. On: reads need the bearer too.
    registry_protect_reads: bool = False
    max_body_bytes: int = Field(default=64 * 1024, ge=0)

    @field_validator("registry_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 8:
            raise ValueError("AXL_REGISTRY_SECRET must be at least 8 characters")
        return value
