"""The mesh's models as OpenAI model objects (plus specialist, context length, capabilities, replicas).

Served models come from the registry; fine-tuned models waiting in the model store for a worker are listed
too (with 0 instances), so `client.models.list()` shows a fine-tune as soon as its job succeeds.
"""

from __future__ import annotations

from fastapi import APIRouter

from axl_mesh.errors import ModelNotFoundError
from axl_mesh.protocol import ModelCard, ModelList
from axl_mesh.registry_schemas import ModelSummary
from services.api_gateway.deps import UpstreamDep
from services.api_gateway.routes.files import JobsDep

router = APIRouter(prefix="/v1/models", tags=["models"])


def _card(summary: ModelSummary) -> ModelCard:
    return ModelCard(
        id=summary.id,
        created=summary.created,
        specialist=summary.specialist,
        context_length=summary.context_length,
        capabilities=summary.capabilities,
        instances=summary.instances,
    )


def _stored_cards(jobs: JobsDep, served: set[str]) -> list[ModelCard]:
    cards = []
    for entry in jobs.models.models():
        if entry["id"] not in served:
            cards.append(
                ModelCard(
                    id=entry["id"],
                    created=entry["created"],
                    specialist=entry.get("specialist") or "coder",
                    context_length=entry.get("context_length") or 0,
                    capabilities=["completion", "chat"],
                    instances=0,
                )
            )
    return cards


async def _all_cards(upstream: UpstreamDep, jobs: JobsDep) -> list[ModelCard]:
    served = [_card(m) for m in await upstream.models()]
    return served + _stored_cards(jobs, {card.id for card in served})


@router.get("", response_model=ModelList)
async def list_models(upstream: UpstreamDep, jobs: JobsDep) -> ModelList:
    """Models with a healthy worker, then fine-tuned models in the store that no worker serves yet."""
    return ModelList(data=await _all_cards(upstream, jobs))


@router.get("/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, upstream: UpstreamDep, jobs: JobsDep) -> ModelCard:
    """One model by id (or by its specialist's name); 404 ``model_not_found`` when it is unknown."""
    cards = await _all_cards(upstream, jobs)
    for card in [c for c in cards if c.id == model_id] or [c for c in cards if c.specialist == model_id]:
        return card
    raise ModelNotFoundError(model_id)
