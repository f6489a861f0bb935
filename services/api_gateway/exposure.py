"""Who can reach a gateway that has no API keys: the start-up refusal and the Host check against DNS rebinding.

With ``AXL_API_KEYS`` set every /v1 call needs a key and nothing here applies. Without keys the gateway is open:

- bound to a loopback address it serves the local machine, but a web page the user visits could still reach it
  through DNS rebinding (a name of the attacker's that resolves to 127.0.0.1): the browser then sends the
  attacker's name as ``Host``. :class:`HostCheckMiddleware` answers 403 to any Host but localhost, 127.0.0.1 and
  [::1] (any port) plus ``AXL_ALLOWED_HOSTS``;
- bound to any other address (0.0.0.0 included) anyone who can reach the port could use it, so
  :func:`check_exposure` refuses to start unless the operator says so with ``--allow-open`` / ``AXL_ALLOW_OPEN``,
  and then logs it loudly.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from axl_mesh.advertise import is_loopback as is_loopback_bind  # binding it serves this machine only
from axl_mesh.errors import APIError, ErrorType
from services.api_gateway.settings import Settings

logger = logging.getLogger("services.api_gateway")

LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")


class ExposureRefused(RuntimeError):
    """The gateway would serve anyone on a non-loopback address without having been told to."""


def host_check_needed(settings: Settings) -> bool:
    """An open gateway on loopback checks Host; so does an open one elsewhere that was given AXL_ALLOWED_HOSTS."""
    return not settings.api_key_list() and (is_loopback_bind(settings.host) or bool(settings.allowed_host_list()))


def check_exposure(settings: Settings) -> None:
    """Refuse an open gateway on a non-loopback address unless allowed; log every open start loudly."""
    if settings.api_key_list():
        return
    if is_loopback_bind(settings.host):
        logger.warning(
            "AXL_API_KEYS is not set: the gateway on %s:%d answers every local process without a key "
            "(requests whose Host is not localhost/127.0.0.1/[::1]%s get 403)",
            settings.host,
            settings.port,
            "".join(f"/{h}" for h in settings.allowed_host_list()),
        )
        return
    if not settings.allow_open:
        raise ExposureRefused(
            f"refusing to start: no API keys and bound to {settings.host!r}, so anyone who can reach port "
            f"{settings.port} could use this gateway. Set AXL_API_KEYS (comma-separated bearer tokens), or bind "
            "to 127.0.0.1 (AXL_HOST), or start with --allow-open (AXL_ALLOW_OPEN=true) if an open gateway is "
            "really what you want."
        )
    banner = "!" * 78
    logger.warning(
        "\n%s\nOPEN GATEWAY: no API keys, bound to %s:%d, started with --allow-open / AXL_ALLOW_OPEN.\n"
        "Anyone who can reach this port can run completions and fine-tuning jobs. Set AXL_API_KEYS to close it.\n%s",
        banner,
        settings.host,
        settings.port,
        banner,
    )


def host_name(header: str) -> str:
    """The name part of a Host header, lower-cased: ``LocalHost:8880`` -> ``localhost``, ``[::1]:80`` -> ``[::1]``."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end != -1 else header
    return header.partition(":")[0]


class HostCheckMiddleware:
    """403 (OpenAI shape) for any HTTP request whose Host is not an allowed name (see the module docstring)."""

    def __init__(self, app: ASGIApp, extra_hosts: list[str] | None = None) -> None:
        self.app = app
        self.allowed = frozenset(LOOPBACK_HOST_NAMES) | {host_name(h) for h in extra_hosts or []}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            if host_name(host) not in self.allowed:
                error = APIError(
                    403,
                    f"Host {host[:100]!r} is not allowed: this gateway has no API keys and answers only "
                    "localhost, 127.0.0.1 and [::1] (add names with AXL_ALLOWED_HOSTS, or set AXL_API_KEYS).",
                    type=ErrorType.PERMISSION,
                    code="host_not_allowed",
                )
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
