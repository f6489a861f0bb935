"""The gateway's /v1 routers. ``main.py`` includes each one; add a router with one line.
All live under ``/v1``, which ``auth.ApiKeyMiddleware`` guards before any body is read.

Health and metrics routes are not in this list: they stay open.
"""

from __future__ import annotations

from services.api_gateway.routes import agent, chat, completions, files, fine_tuning, models, quantization, specialists

ROUTERS = [
    models.router,
    completions.router,
    chat.router,
    files.router,
    fine_tuning.router,
    quantization.router,
    agent.router,
    specialists.router,
]
