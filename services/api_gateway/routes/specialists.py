"""The specialist catalogue (our extension): what each specialist is for, its preset, prompt format and sampling."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from axl_mesh.errors import NotFoundError
from axl_model.specialists import SPECIALISTS, Specialist
from services.api_gateway.deps import UpstreamDep

router = APIRouter(prefix="/v1/specialists", tags=["specialists"])


def _describe(specialist: Specialist, served: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "id": specialist.name,
        "object": "specialist",
        "description": specialist.description,
        "preset": specialist.preset,
        "instruction": specialist.instruction,
        "prompt_format": specialist.render_prompt("{input}"),
        "default_sampling": specialist.sampling(),
        "models": served.get(specialist.name, []),
    }


async def _served(upstream: UpstreamDep) -> dict[str, list[str]]:
    served: dict[str, list[str]] = {}
    for model in await upstream.models():
        served.setdefault(model.specialist, []).append(model.id)
    return served


@router.get("")
async def list_specialists(upstream: UpstreamDep) -> dict[str, Any]:
    """Every specialist, with the models that serve it now."""
    served = await _served(upstream)
    return {"object": "list", "data": [_describe(s, served) for s in SPECIALISTS.values()]}


@router.get("/{name}")
async def retrieve_specialist(name: str, upstream: UpstreamDep) -> dict[str, Any]:
    """One specialist by name; 404 when there is no such specialist."""
    if name not in SPECIALISTS:
        raise NotFoundError(
            f"no specialist {name!r}; specialists: {', '.join(SPECIALISTS)}", param="name", code="specialist_not_found"
        )
    return _describe(SPECIALISTS[name], await _served(upstream))
