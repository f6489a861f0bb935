"""Dependencies of the registry's routes: the store, the settings and the bearer-secret checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from axl_mesh.mesh_auth import check_mesh_bearer
from services.mesh_registry.settings import Settings
from services.mesh_registry.store import RegistryStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> RegistryStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[RegistryStore, Depends(get_store)]


def _check_bearer(request: Request, settings: Settings) -> None:
    check_mesh_bearer(request.headers.get("authorization"), settings.registry_secret.get_secret_value())


def require_writer(request: Request, settings: SettingsDep) -> None:
    """Every write needs the registry secret, so no process without it can announce or take over an instance."""
    _check_bearer(request, settings)


def require_reader(request: Request, settings: SettingsDep) -> None:
    """Reads need the secret too unless AXL_REGISTRY_PROTECT_READS=false."""
    if settings.registry_protect_reads:
        _check_bearer(request, settings)


WriterAuth = Depends(require_writer)
ReaderAuth = Depends(require_reader)
