"""Wire schemas of the mesh registry, shared by the registry service and :mod:`axl_mesh.registry_client`."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator

# Ids and names become Redis keys and log lines, never paths; still, keep them to a plain alphabet.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, examples=["axl-micro-python"])]

# A pool worker (services/model_worker with AXL_WORKER_MODE=pool) announces itself under this specialist: that
# record says "I load models of the model store when asked" and serves no model by its own name, so model listings
# leave it out. Each model the pool holds is registered on its own, as any worker's model is.
ON_DEMAND_SPECIALIST = "on-demand"


class Capability(StrEnum):
    """What an instance can serve beyond plain completions (the gateway checks these before routing)."""

    COMPLETION = "completion"
    CHAT = "chat"
    FIM = "fim"


class InstanceLoad(BaseModel):
    """Live load an instance reports with each heartbeat."""

    running: NonNegativeInt = 0
    waiting: NonNegativeInt = 0


class InstanceRegistration(BaseModel):
    """Everything the registry knows about an instance; a heartbeat re-asserts all of it (plus its load)."""

    model_config = ConfigDict(extra="ignore")

    instance_id: Name
    specialist: Name
    model_id: Name
    url: str = Field(description="base URL of the instance, e.g. http://127.0.0.1:8901")
    context_length: PositiveInt
    # Free-form so newer workers can announce more; the known ones are the values of Capability.
    capabilities: list[Annotated[str, Field(pattern=r"^[a-z0-9_.-]{1,32}$")]] = Field(default_factory=list)
    checkpoint_version: str = Field(default="", max_length=128)
    max_concurrency: PositiveInt = 1
    load: InstanceLoad = Field(default_factory=InstanceLoad)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
        return value.rstrip("/")


class InstanceRecord(InstanceRegistration):
    """A registered instance as the registry returns it (times are Unix seconds, from Redis's clock)."""

    registered_at: float
    last_heartbeat: float
    expires_at: float

    @property
    def busyness(self) -> float:
        """Requests in the instance per slot; lower is less busy (what the gateway balances on)."""
        return (self.load.running + self.load.waiting) / self.max_concurrency


class InstanceAck(BaseModel):
    """The registry's answer to a register or heartbeat."""

    instance_id: str
    created: bool = Field(description="true when the registry did not know this instance (first time or after loss)")
    ttl_seconds: float
    expires_at: float


class InstanceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InstanceRecord]


class ModelSummary(BaseModel):
    """One served model across its healthy instances (the smallest context and the shared capabilities)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "axl"
    specialist: str
    context_length: int
    capabilities: list[str]
    instances: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelSummary]
