"""Settings of the API gateway (env prefix ``AXL_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from axl_mesh.protocol import MAX_SAMPLES_PER_REQUEST
from axl_mesh.settings import ServiceSettings


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


class Settings(ServiceSettings):
    """The gateway binds :8880; ``AXL_API_KEYS`` (comma-separated) turns on bearer auth for ``/v1/*``.

    Without keys it is open: allowed on loopback (with a Host check against DNS rebinding), elsewhere only with
    ``AXL_ALLOW_OPEN=true`` / ``--allow-open``."""

    port: int = Field(default=8880, ge=0, le=65535)
    # Required: the gateway reads the registry and calls the workers with it (every internal hop carries it).
    registry_secret: SecretStr
    api_keys: SecretStr | None = Field(default=None, description="comma-separated bearer tokens; unset: open")
    # With no API keys the gateway serves anyone: it refuses to start so on a non-loopback address unless this
    # (or --allow-open) says the operator means it. See services/api_gateway/exposure.py.
    allow_open: bool = Field(default=False, description="serve without API keys on a non-loopback address")
    allowed_hosts: str = Field(
        default="", description="comma-separated Host names an open gateway also answers, besides localhost"
    )
    cors_origins: str = Field(default="", description="comma-separated origins ('*' for any); unset: no CORS")
    lookup_ttl_seconds: float = Field(default=2.0, gt=0, description="how long registry answers are reused")
    failed_instance_cooldown_seconds: float = Field(
        default=5.0, ge=0, description="a replica that refused a connection is skipped this long"
    )
    # A request for a stored model no worker holds asks a pool worker to load it (services/api_gateway/on_demand.py)
    # and waits this long at most; then 503 model_load_timeout with Retry-After.
    on_demand_load_timeout_seconds: float = Field(
        default=60.0, gt=0, description="how long the first request for a model waits for a pool to load it"
    )
    connect_timeout_seconds: float = Field(default=2.0, gt=0)
    # Bound on waiting for the next piece from a worker (long prefill, a stuck worker): never hang forever.
    read_timeout_seconds: float = Field(default=300.0, gt=0)
    keepalive_seconds: float = Field(default=5.0, gt=0, description="SSE comment interval while no token flows")
    default_chat_max_tokens: int = Field(default=1024, ge=1, description="max_tokens of a chat without one")
    max_upstream_connections: int = Field(default=256, ge=1)
    # Bounded work per request (README, "Limits"): prompts x n samples, and max_tokens clamped (finish_reason
    # "length") to a ceiling that defaults to a multiple of the model's window (axl_mesh.protocol.max_tokens_ceiling).
    max_samples_per_request: int = Field(
        default=MAX_SAMPLES_PER_REQUEST, ge=1, description="most samples (prompts x n) one request may ask for"
    )
    max_tokens_ceiling: int | None = Field(
        default=None, ge=1, description="max_tokens above this is clamped; unset: 4x the model's context window"
    )
    truncate_prompts: bool = Field(
        default=True,
        description="fit prompts longer than a model's window into it (false: 400 "
        "context_length_exceeded, as OpenAI); a request's `truncate` overrides it",
    )
    stalled_client_seconds: float = Field(
        default=30.0, gt=0, description="a stream whose client reads nothing this long is ended, freeing its rows"
    )
    # Shorter than the grace the launcher (15 s) and compose (30 s) give before SIGKILL: open streams end on the
    # gateway's terms, and a restart never waits on a stream that would outlive it (tests/faults).
    # Whole seconds: uvicorn's timeout_graceful_shutdown takes an int.
    drain_seconds: int = Field(
        default=8, ge=0, description="on SIGTERM, how long open requests and streams may finish before they are cut"
    )
    # The web console at /ui (services/api_gateway/console): its login lasts this long, then asks for the key again.
    console_session_seconds: int = Field(default=12 * 3600, ge=60, description="how long a console login lasts")
    console_results_file: str = Field(
        default="docs/results.md", description="the `axl eval` results table whose rows the console's Models page shows"
    )

    def api_key_list(self) -> list[str]:
        return _split(self.api_keys.get_secret_value() if self.api_keys else None)

    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)

    def allowed_host_list(self) -> list[str]:
        return [host.lower() for host in _split(self.allowed_hosts)]
