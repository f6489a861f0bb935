"""Settings of the mesh registry (env prefix ``AXL_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from axl_mesh.settings import ServiceSettings


class Settings(ServiceSettings):
    """The registry binds :8900 and must be given ``AXL_REGISTRY_SECRET`` (it refuses to start without one)."""

    port: int = Field(default=8900, ge=0, le=65535)
    # Required here (8+ characters, checked by ServiceSettings): without it anyone could announce or hijack an
    # instance, or list where the workers are.
    registry_secret: SecretStr
    instance_ttl_seconds: float = Field(
        default=15.0, gt=0, description="an instance not heard from for this long is gone"
    )
    registry_key_prefix: str = Field(default="axl:registry", min_length=1)
    # On by default: every internal hop carries the mesh secret, reads included (instance URLs tell a caller
    # where the workers are). Off only for a closed network whose tools read the registry without the secret.
    registry_protect_reads: bool = True
    max_body_bytes: int = Field(default=64 * 1024, ge=0)
