"""The model store over HTTP, for pool workers on hosts that do not share its volume (``AXL_MODEL_STORE_URL``).

Internal: only callers with the mesh secret (``Authorization: Bearer <AXL_REGISTRY_SECRET>``), checked by
``MeshSecretMiddleware`` on ``/internal`` before any route runs. A model is its checkpoint folder's files:
  GET /internal/v1/model-store/{model}           {model, specialist, base, context_length, files: [{name, size,
                                                  sha256}]}; 404 model_not_found
  GET /internal/v1/model-store/{model}/{file}    the file's bytes (a name the listing gave; anything else is a 404)
The worker checks every file's size and SHA-256 against the listing before the model enters its own store
(``services.model_worker.store_fetch``). Digests are computed once per file version (size, mtime) and cached.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from axl_mesh.errors import ModelNotFoundError, NotFoundError
from axl_mesh.model_store import ModelStore, ModelStoreError

router = APIRouter(prefix="/internal/v1/model-store", tags=["internal"])

# Plain file names only: never a path, never a dotfile (a staging leftover).
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_digests: dict[tuple[str, int, int], str] = {}


def _store(request: Request) -> ModelStore:
    return request.app.state.model_store


def _folder(store: ModelStore, model: str) -> tuple[Path, dict[str, Any]]:
    try:
        entry = store.get(model)
        if entry is None:
            raise ModelNotFoundError(model)
        folder = store.path(model)
    except ModelStoreError:
        raise ModelNotFoundError(model) from None
    if not folder.is_dir():
        raise ModelNotFoundError(model)
    return folder, entry


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and _FILE_NAME.match(p.name))


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _digests.get(key)
    if digest is None:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if len(_digests) > 4096:
            _digests.clear()
        _digests[key] = digest
    return digest


@router.get("/{model}")
def model_listing(model: str, request: Request) -> dict[str, Any]:
    """The model's store entry and its files with size and SHA-256 (a plain ``def``: hashing runs in a thread)."""
    folder, entry = _folder(_store(request), model)
    return {
        "model": model,
        "specialist": entry.get("specialist"),
        "base": entry.get("base"),
        "context_length": entry.get("context_length"),
        "files": [{"name": p.name, "size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)],
    }


@router.get("/{model}/{file_name}")
def model_file(model: str, file_name: str, request: Request) -> FileResponse:
    """One file of the model's checkpoint folder."""
    folder, _ = _folder(_store(request), model)
    path = folder / file_name
    if not _FILE_NAME.match(file_name) or path not in _files(folder):
        raise NotFoundError(f"The model '{model}' has no file '{file_name}'.", param="file_name")
    return FileResponse(path, media_type="application/octet-stream")
