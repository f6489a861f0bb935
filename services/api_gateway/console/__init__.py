"""The gateway's web console at ``/ui``: Mesh, Jobs (live loss and held-out bits/byte curves), Models, Playground.

Server-rendered (Jinja2) with two vendored scripts (htmx for the self-refreshing parts, uPlot for the curves;
``static/VENDORED.md``): no Node build, nothing loaded from elsewhere at run time. Behind the same API keys as
``/v1`` through a login form (``session.py``); open when the gateway is open, under the same Host check.

    install_console(app, settings)   # in main.create_app, next to the API key middleware
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from services.api_gateway.console.mesh_view import TokenRates
from services.api_gateway.console.session import CONSOLE_PREFIX, ConsoleAuth, ConsoleAuthMiddleware, console_secret
from services.api_gateway.settings import Settings


def install_console(app: FastAPI, settings: Settings) -> None:
    """Mount the console's pages and static files and guard them with the login session (keys from app.state)."""
    from services.api_gateway.console.routes import STATIC_DIR, router

    auth = ConsoleAuth(
        console_secret(settings.registry_secret_value() or ""), app.state.api_keys, settings.console_session_seconds
    )
    app.state.console_auth = auth
    app.state.console_rates = TokenRates()
    app.add_middleware(ConsoleAuthMiddleware, auth=auth)
    app.include_router(router)
    app.mount(CONSOLE_PREFIX + "/static", StaticFiles(directory=STATIC_DIR), name="console-static")
