"""A worker request's sampling fields as the model library's ``SamplingParams``: the one place where a field left
unset (None) takes the specialist's default (``axl_model.specialists``) and a chat adds its template's stops."""

from __future__ import annotations

from axl_mesh.worker_protocol import GenerateRequest
from axl_model.generate import SamplingParams
from axl_model.specialists import Specialist


def to_sampling_params(body: GenerateRequest, specialist: Specialist) -> SamplingParams:
    """Raises ValueError for values the sampler cannot use (the caller answers 400)."""
    stop = list(body.stop)
    if body.messages is not None:  # the chat template's end markers end the answer too
        stop += [stop_string for stop_string in specialist.stop if stop_string not in stop]
    return SamplingParams(
        max_tokens=specialist.max_tokens if body.max_tokens is None else body.max_tokens,
        temperature=specialist.temperature if body.temperature is None else body.temperature,
        top_p=specialist.top_p if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        stop=stop,
        logprobs=body.logprobs,
        stop_at_eos=not body.ignore_eos,
    )
