"""Copy a model of the mesh's model store from the gateway into this worker's own store (``AXL_MODEL_STORE_URL``).

A pool worker on a host that does not share the store's volume asks the gateway for the model's file listing
(``GET /internal/v1/model-store/{model}``: names, sizes, SHA-256), downloads each file with the mesh secret as
bearer into a staging folder, and checks every size and digest before the folder enters the local store
(``ModelStore.add``: an atomic rename, then the manifest). A failed or corrupted download leaves nothing behind.
Runs in a thread (blocking httpx): the pool calls it under its load lock.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from axl_mesh.mesh_auth import bearer_header
from axl_mesh.model_store import ModelStore

logger = logging.getLogger(__name__)

LISTING_PATH = "/internal/v1/model-store/"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(Exception):
    """The model could not be copied (unreachable, refused, a size or checksum that does not match)."""


class NotInStore(FetchError):
    """The gateway's store has no such model (404)."""


def fetch_model(
    base_url: str, secret: str | None, name: str, store: ModelStore, *, timeout_seconds: float, max_bytes: int
) -> dict[str, Any]:
    """Copy ``name`` from the gateway at ``base_url`` into ``store``; returns the new manifest entry."""
    started = time.perf_counter()
    with httpx.Client(base_url=base_url.rstrip("/"), headers=bearer_header(secret), timeout=timeout_seconds) as http:
        listing = _listing(http, name)
        files = listing["files"]
        total = sum(f["size"] for f in files)
        if total > max_bytes:
            raise FetchError(f"the model '{name}' is {total} bytes, more than this pool may hold ({max_bytes})")
        store.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=store.root))  # same filesystem: add() renames it
        try:
            for item in files:
                _download(http, name, item, staging / item["name"])
            entry = store.add(
                name,
                staging,
                move=True,
                specialist=listing.get("specialist"),
                base=listing.get("base"),
                context_length=listing.get("context_length"),
                fetched_from=base_url,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "fetched %s from %s: %d files, %.1f MB in %.2fs, checksums verified",
        name,
        base_url,
        len(files),
        total / (1 << 20),
        time.perf_counter() - started,
    )
    return entry


def _listing(http: httpx.Client, name: str) -> dict[str, Any]:
    try:
        response = http.get(LISTING_PATH + quote(name, safe=":"))
    except httpx.HTTPError as exc:
        raise FetchError(f"the model store at {http.base_url} is unreachable: {exc!r}") from exc
    if response.status_code == 404:
        raise NotInStore(name)
    if response.status_code != 200:
        raise FetchError(f"the model store at {http.base_url} answered {response.status_code}: {response.text[:200]}")
    listing = response.json()
    files = listing.get("files")
    # The listing names what lands on disk here: plain names, sizes and digests only.
    if (
        not isinstance(files, list)
        or not files
        or not all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and _FILE_NAME.match(f["name"])
            and isinstance(f.get("size"), int)
            and f["size"] >= 0
            and isinstance(f.get("sha256"), str)
            and _HEX64.match(f["sha256"])
            for f in files
        )
    ):
        raise FetchError(f"the model store's listing of '{name}' is malformed")
    return listing


def _download(http: httpx.Client, name: str, item: dict[str, Any], target: Path) -> None:
    digest = hashlib.sha256()
    size = 0
    url = LISTING_PATH + quote(name, safe=":") + "/" + item["name"]
    try:
        with http.stream("GET", url) as response, target.open("wb") as out:
            if response.status_code != 200:
                raise FetchError(f"downloading {item['name']} of '{name}' answered {response.status_code}")
            for chunk in response.iter_bytes(1 << 20):
                size += len(chunk)
                if size > item["size"]:
                    break
                digest.update(chunk)
                out.write(chunk)
    except httpx.HTTPError as exc:
        raise FetchError(f"downloading {item['name']} of '{name}' failed: {exc!r}") from exc
    if size != item["size"] or digest.hexdigest() != item["sha256"]:
        raise FetchError(
            f"{item['name']} of '{name}' does not match its checksum (got {size} bytes, sha256 "
            f"{digest.hexdigest()[:16]}...; the listing says {item['size']} bytes, "
            f"{item['sha256'][:16]}...): refused"
        )
