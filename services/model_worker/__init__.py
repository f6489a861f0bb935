"""The model worker: serves one checkpoint as one specialist, with KV-cached continuous batching.

Run: ``AXL_CHECKPOINT=<dir> AXL_SPECIALIST=coder python -m services.model_worker`` (binds :8901). Settings
(``AXL_``): ``CHECKPOINT``, ``SPECIALIST``, ``MODEL_ID`` (``axl-<specialist>``), ``HOST``, ``PORT``,
``ADVERTISE_HOST`` / ``ADVERTISE_URL`` (what it registers: see ``axl_mesh.advertise``), ``REGISTRY_URL`` (empty:
standalone), ``REGISTRY_SECRET`` (required), ``MAX_BATCH`` (8), ``MAX_QUEUE`` (64), ``NUM_THREADS`` (CPU count),
``DRAIN_SECONDS`` (30).

API (internal: only the gateway calls it; errors in the OpenAI shape). Every ``/internal/v1`` call must carry
``Authorization: Bearer <AXL_REGISTRY_SECRET>`` (the mesh secret), else 401; health and metrics stay open:
  POST /internal/v1/generate  {request_id, prompt | messages, suffix, max_tokens, temperature, top_p, top_k,
                              repetition_penalty, seed, stop, logprobs, echo, stream, truncate}; unset sampling
                              fields take the specialist's defaults. JSON {text, finish_reason, usage, logprobs,
                              model, prompt_truncated}, or with stream: NDJSON lines {text, logprob} ... then
                              {finish_reason, usage, model} (a failure mid-stream ends with an {"error": {...}} line).
                              With truncate, a prompt too long for the window is fitted into it
                              (axl_model.prompt_fit; the bytes left out in prompt_truncated, or for a stream in
                              the x-axl-prompt-truncated header); without, it is a 400 context_length_exceeded.
                              400 fim_not_supported; 503 + Retry-After: queue_full, model_loading, shutting_down.
  GET  /internal/v1/info      {model_id, specialist, context_length, capabilities, running, waiting, max_batch, ...}
  GET  /healthz, /readyz (503 until the checkpoint is loaded), /metrics

A client that disconnects has its sequence dropped from the batch before the next decode step.
"""
