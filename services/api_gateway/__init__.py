"""The API gateway: the OpenAI-compatible front door of AXL Mesh (the only service users talk to).

Run: ``python -m services.api_gateway [--allow-open]`` (binds :8880). Settings (env): ``AXL_REGISTRY_URL``,
``AXL_REGISTRY_SECRET`` (required: the mesh secret its registry reads and worker calls carry), ``AXL_API_KEYS``
(comma-separated bearer tokens; unset: open, which is allowed on loopback only, with a Host check, unless
``AXL_ALLOW_OPEN``/``--allow-open``; ``AXL_ALLOWED_HOSTS`` adds Host names; see ``exposure.py``),
``AXL_CORS_ORIGINS`` (comma-separated, ``*`` for any),
``AXL_LOOKUP_TTL_SECONDS`` (2), ``AXL_KEEPALIVE_SECONDS`` (5), ``AXL_MAX_BODY_BYTES`` (1 MiB),
``AXL_READ_TIMEOUT_SECONDS`` (300), ``AXL_DEFAULT_CHAT_MAX_TOKENS`` (1024).

API: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(OpenAI's shapes, SSE streaming; ``model`` is a registry model id, a specialist name, or ``auto``);
``/healthz``, ``/readyz``, ``/metrics`` need no key.

Flow: validate into ``axl_mesh.protocol`` -> resolve the model through the registry (``CachedLookup``) -> the
least-busy replica (``upstream.py``; failover before the first byte) -> the worker's ``/internal/v1/generate``
-> OpenAI objects or SSE chunks (``generation.py``, ``sse.py``). Closing the client connection closes the
worker request.
"""
