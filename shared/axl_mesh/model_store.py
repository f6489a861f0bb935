"""The model store: a folder of checkpoint folders plus ``manifest.json``, updated atomically.

    store = ModelStore("data/models")
    entry = store.add("ft:tiny:demo:1a2b3c", checkpoint_dir, base="tiny", specialist="complete", job_id=...)
    store.path("ft:tiny:demo:1a2b3c")      # data/models/<entry folder>, never built from the name itself
    store.models()                         # OpenAI model objects for GET /v1/models

A model's folder name is chosen by the store (``m-<hex>``); a user-given name is only ever a manifest key, checked
against :data:`MODEL_NAME_PATTERN`, and never becomes a path. The manifest is rewritten through a temporary file
and ``os.replace`` under an ``flock``, so readers see the old or the new manifest, never half of one, and two
writers never lose each other's entries. Adding a model publishes ``{"event": "added", "model": name}`` on the Redis
channel :data:`MODEL_STORE_CHANNEL` (when given a client) for launchers that start workers on demand.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"
MODEL_STORE_CHANNEL = "axl:model_store:events"
_FOLDER_PATTERN = re.compile(r"^m-[0-9a-f]{16}$")


class ModelStoreError(ValueError):
    """A bad name, a missing model or a clash; the message says which."""


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or re.fullmatch(MODEL_NAME_PATTERN, name) is None or ".." in name:
        raise ModelStoreError(f"invalid model name {name!r}: use letters, digits and . _ : - (at most 200)")
    return name


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's ``ft:<base>:<suffix>:<id>`` (the id is the job's random part, shortened)."""
    short = job_id.rsplit("-", 1)[-1][:8]
    return validate_model_name(f"ft:{base}:{suffix or 'custom'}:{short}")


class ModelStore:
    def __init__(self, root: str | os.PathLike[str], *, redis_client: Any = None) -> None:
        self.root = Path(root)
        self.redis = redis_client

    # --- reading
    def manifest(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / MANIFEST).read_text())
        except FileNotFoundError:
            return {"format_version": MANIFEST_VERSION, "models": {}}
        except json.JSONDecodeError as exc:
            raise ModelStoreError(f"{self.root / MANIFEST} is not valid JSON: {exc}") from None
        data.setdefault("models", {})
        return data

    def entries(self) -> dict[str, dict[str, Any]]:
        return self.manifest()["models"]

    def get(self, name: str) -> dict[str, Any] | None:
        validate_model_name(name)
        return self.entries().get(name)

    def path(self, name: str) -> Path:
        """The checkpoint folder of ``name`` (raises ModelStoreError when the store has no such model)."""
        entry = self.get(name)
        if entry is None:
            raise ModelStoreError(f"the model store has no model {name!r}")
        return self._folder(entry["folder"])

    def _folder(self, folder: str) -> Path:
        if _FOLDER_PATTERN.fullmatch(folder) is None:  # the manifest was edited by hand: refuse odd paths
            raise ModelStoreError(f"manifest entry names an invalid folder {folder!r}")
        return self.root / folder

    def models(self) -> list[dict[str, Any]]:
        """Every stored model as an OpenAI model object (plus our fields), oldest first."""
        out = []
        for name, entry in sorted(self.entries().items(), key=lambda kv: kv[1].get("created", 0)):
            out.append(
                {
                    "id": name,
                    "object": "model",
                    "created": int(entry.get("created", 0)),
                    "owned_by": "axl",
                    "specialist": entry.get("specialist"),
                    "context_length": entry.get("context_length"),
                    "base": entry.get("base"),
                    "fine_tuning_job_id": entry.get("job_id"),
                    "gguf": sorted(entry.get("gguf", {})),
                }
            )
        return out

    # --- writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The manifest under an exclusive lock; written back atomically when the block ends without error."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = self.manifest()
            yield manifest
            tmp = self.root / f".{MANIFEST}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(tmp, self.root / MANIFEST)

    def add(
        self, name: str, checkpoint_dir: str | os.PathLike[str], *, move: bool = True, **info: Any
    ) -> dict[str, Any]:
        """Put a checkpoint folder in the store under ``name`` (moved by default, else copied) and record it.

        ``info`` lands in the manifest entry (base, specialist, job_id, context_length, ...). Adding a name that
        exists raises; the same job adding its own model again (after a crash between move and manifest) returns
        the existing entry.
        """
        validate_model_name(name)
        source = Path(checkpoint_dir)
        if not source.is_dir():
            raise ModelStoreError(f"checkpoint folder {source} does not exist")
        existing = self.get(name)
        if existing is not None:
            if info.get("job_id") and existing.get("job_id") == info.get("job_id"):
                return existing
            raise ModelStoreError(f"the model store already has a model named {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        folder = f"m-{secrets.token_hex(8)}"
        staging = self.root / f".{folder}.incoming"
        if move:
            shutil.move(str(source), staging)
        else:
            shutil.copytree(source, staging)
        os.replace(staging, self.root / folder)
        entry = {"folder": folder, "created": int(time.time()), **info}
        with self._locked() as manifest:
            manifest["format_version"] = MANIFEST_VERSION
            manifest["models"][name] = entry
        self._publish("added", name)
        return entry

    def set_field(self, name: str, field: str, value: Any) -> None:
        """Update one field of an entry (e.g. the GGUF files the quantizer wrote)."""
        with self._locked() as manifest:
            if name not in manifest["models"]:
                raise ModelStoreError(f"the model store has no model {name!r}")
            manifest["models"][name][field] = value

    def remove(self, name: str) -> bool:
        validate_model_name(name)
        with self._locked() as manifest:
            entry = manifest["models"].pop(name, None)
        if entry is None:
            return False
        shutil.rmtree(self._folder(entry["folder"]), ignore_errors=True)
        self._publish("removed", name)
        return True

    def _publish(self, event: str, name: str) -> None:
        if self.redis is None:
            return
        try:
            self.redis.publish(MODEL_STORE_CHANNEL, json.dumps({"event": event, "model": name}))
        except Exception:  # noqa: BLE001 - the manifest is the truth; the channel is a hint
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m axl_mesh.model_store {list | add NAME CHECKPOINT [--specialist S] | remove NAME} --root DIR``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m axl_mesh.model_store", description=main.__doc__)
    parser.add_argument("--root", default=os.environ.get("AXL_MODEL_STORE_DIR", "data/models"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    add = sub.add_parser("add", help="copy a checkpoint folder into the store (e.g. a base model to fine-tune)")
    add.add_argument("name")
    add.add_argument("checkpoint")
    add.add_argument("--specialist", default=None)
    remove = sub.add_parser("remove")
    remove.add_argument("name")
    args = parser.parse_args(argv)
    store = ModelStore(args.root)
    if args.command == "list":
        print(json.dumps(store.models(), indent=2))
    elif args.command == "add":
        config = json.loads((Path(args.checkpoint) / "config.json").read_text())
        store.add(
            args.name,
            args.checkpoint,
            move=False,
            base=config.get("name", args.name),
            specialist=args.specialist,
            context_length=config.get("max_seq_len"),
        )
    else:
        return 0 if store.remove(args.name) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
