"""The gateway's /v1 routers. ``main.py`` includes each one behind the API-key check; add a router with one line.

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
