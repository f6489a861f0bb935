"""Register, heartbeat, deregister and look up model-worker instances."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Request

from axl_mesh.errors import InvalidRequestError, NotFoundError
from axl_mesh.registry_schemas import NAME_PATTERN, InstanceAck, InstanceList, InstanceRegistration
from services.mesh_registry.deps import ReaderAuth, StoreDep, WriterAuth

router = APIRouter(prefix="/v1/instances", tags=["instances"])

InstanceIdPath = Path(pattern=NAME_PATTERN)


@router.post("", response_model=InstanceAck, dependencies=[WriterAuth])
async def register_instance(registration: InstanceRegistration, store: StoreDep, request: Request) -> InstanceAck:
    """Register an instance (or re-assert it); it stays listed while it heartbeats within the TTL."""
    ack = await store.upsert(registration)
    request.app.state.counters.writes.labels(kind="register", created=str(ack.created).lower()).inc()
    return ack


@router.put("/{instance_id}/heartbeat", response_model=InstanceAck, dependencies=[WriterAuth])
async def heartbeat(
    registration: InstanceRegistration, store: StoreDep, request: Request, instance_id: str = InstanceIdPath
) -> InstanceAck:
    """Re-assert the whole registration with live load; re-creates an instance the registry lost."""
    if registration.instance_id != instance_id:
        raise InvalidRequestError(
            f"Body instance_id '{registration.instance_id}' does not match the URL's '{instance_id}'.",
            param="instance_id",
        )
    ack = await store.upsert(registration)
    request.app.state.counters.writes.labels(kind="heartbeat", created=str(ack.created).lower()).inc()
    return ack


@router.delete("/{instance_id}", status_code=204, dependencies=[WriterAuth])
async def deregister_instance(store: StoreDep, request: Request, instance_id: str = InstanceIdPath) -> None:
    """Remove an instance now (a worker shutting down cleanly)."""
    if not await store.delete(instance_id):
        raise NotFoundError(f"No instance '{instance_id}' is registered.", param="instance_id")
    request.app.state.counters.writes.labels(kind="deregister", created="false").inc()


@router.get("", response_model=InstanceList, dependencies=[ReaderAuth])
async def list_instances(
    store: StoreDep,
    model: str | None = Query(default=None, pattern=NAME_PATTERN),
    specialist: str | None = Query(default=None, pattern=NAME_PATTERN),
) -> InstanceList:
    """Healthy instances, optionally of one model and/or specialist, least busy first."""
    return InstanceList(data=await store.instances(model=model, specialist=specialist))
