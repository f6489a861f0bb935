"""The gateway's /v1 routers. ``main.py`` includes each one behind the API-key check; add a router with one line.

Health and metrics routes are not in this list: they stay open.
"""

from __future__ import annotations

from services.api_gateway.routes import chat, completions, models

ROUTERS = [
    models.router,
    completions.router,
    chat.router,
]
