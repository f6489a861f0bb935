"""Checkpoints are folders: model.safetensors + config.json (+ training state), written atomically.

Nothing here unpickles. Non-tensor training state (step, RNG of Python, data position, optimizer hyper-
parameters) is JSON; tensors (optimizer moments, torch RNG) live in training_state.safetensors, referenced
from the JSON by key.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import MultiScaleTransformer

FORMAT_VERSION = 1
MODEL_FILE, CONFIG_FILE, STATE_JSON, STATE_TENSORS = (
    "model.safetensors", "config.json", "training_state.json", "training_state.safetensors")
METADATA_FILE = "metadata.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names the file."""


def save_checkpoint(model: MultiScaleTransformer, path: str | Path, *, training_state: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` (and optionally its training state) to folder `path`, replacing it atomically.

    The folder is assembled beside its destination and swapped in with renames, so a reader (or a crash)
    sees either the old checkpoint or the new one, never half of each.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            weights.pop("lm_head.weight", None)  # the same tensor as embed.weight
        save_file(weights, str(staging / MODEL_FILE), metadata={"format": "pt", "axl_format_version": str(FORMAT_VERSION)})
        config = {**model.config.to_dict(), "format_version": FORMAT_VERSION}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if metadata is not None:
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        if training_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            skeleton = _extract_tensors(training_state, "state", tensors)
            save_file(tensors, str(staging / STATE_TENSORS))
            (staging / STATE_JSON).write_text(json.dumps(skeleton))
        # mkdtemp makes the folder 0700 and safetensors writes 0600: a checkpoint holds no secret, and the services
        # that read it (a worker in another container, the image's non-root user) need not be its writer.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
            _fsync(file)
        _swap_in(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> MultiScaleTransformer:
    """The model stored in checkpoint folder `path` (architecture from its config.json), in eval mode.

    `path` may also be an axl-multiscale .gguf file (`axl export gguf --kind multiscale`), dequantized on load.
    """
    if Path(path).suffix.lower() == ".gguf":
        from .export.gguf import load_gguf_model  # imported here: it needs gguf, and imports this package

        try:
            return load_gguf_model(path).to(map_location).eval()
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    path = _resolve(Path(path))
    config = load_config(path)
    weights_file = path / MODEL_FILE
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file} is missing: the checkpoint has a config but no weights")
    check_tensor_shapes(_safetensors_shapes(weights_file), config, weights_file, path / CONFIG_FILE)
    model = MultiScaleTransformer(config)  # only now: the file holds exactly the tensors this config allocates
    try:
        weights = load_file(str(weights_file), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_file} is not a readable safetensors file: {exc}") from None
    if config.tie_embeddings:
        weights.setdefault("lm_head.weight", weights.get("embed.weight"))
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{weights_file} does not match {path / CONFIG_FILE}: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_file} does not match {path / CONFIG_FILE}: {exc}") from None
    return model.to(map_location).eval()


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each tensor of MultiScaleTransformer(config), found without allocating it (meta device)."""
    with torch.device("meta"):
        model = MultiScaleTransformer(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_tensor_shapes(found: dict[str, tuple[int, ...]], config: ModelConfig, source: str | Path,
                        config_source: str | Path) -> None:
    """Raise CheckpointError naming the file and the tensor unless ``found`` (tensor name -> shape, as a file's
    header states it) is exactly what ``config`` builds. Called before the model is allocated, so a config whose
    dimensions disagree with its weights is a clear error rather than a large allocation that fails later."""
    expected = expected_tensor_shapes(config)
    optional = {"lm_head.weight"} if config.tie_embeddings else set()  # the same tensor as embed.weight
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match {config_source}: {len(found)} tensors, "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if name in found and tuple(found[name]) != shape:
            raise CheckpointError(f"{source} does not match {config_source}: tensor {name!r} has shape "
                                  f"{list(found[name])}, the config needs {list(shape)}")


def _safetensors_shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header; no tensor data is read."""
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_file} is not a readable safetensors file: {exc}") from None


def load_config(path: str | Path) -> ModelConfig:
    if Path(path).suffix.lower() == ".gguf":  # an axl-multiscale GGUF carries its config as metadata
        from .export.gguf import read_gguf_config

        try:
            return read_gguf_config(path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    path = _resolve(Path(path))
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: {path} is not an AXL checkpoint folder")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from None
    version = data.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{config_file} has format_version {version}; this AXL reads up to {FORMAT_VERSION}")
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None


RELEASE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_release(source: str | Path, out: str | Path, dtype: str = "float16") -> Path:
    """A serving copy of checkpoint `source` in folder `out`: its weights cast to `dtype`, its config and metadata.

    No optimizer state (it is 2-3x the weights and only training needs it), so the shipped default model stays small
    enough for git. The metadata keeps the training split (what `axl eval` scores and refuses to score) and records
    where the copy came from; loading casts the weights back to the model's float32, so a release serves and
    evaluates like any checkpoint.
    """
    if dtype not in RELEASE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(RELEASE_DTYPES)}")
    model = load_checkpoint(source)
    metadata = load_metadata(source)
    metadata["release"] = {"source": str(source), "source_step": metadata.get("step"), "dtype": dtype}
    return save_checkpoint(model.to(RELEASE_DTYPES[dtype]), out, metadata=metadata)


def load_training_state(path: str | Path) -> dict[str, Any] | None:
    """The training state saved with the checkpoint, or None if it was saved without one."""
    path = _resolve(Path(path))
    state_json, state_tensors = path / STATE_JSON, path / STATE_TENSORS
    if not state_json.is_file():
        return None
    try:
        skeleton = json.loads(state_json.read_text())
        tensors = load_file(str(state_tensors))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_json} is not valid JSON: {exc}") from None
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise CheckpointError(f"{state_tensors} is missing or unreadable: {exc}") from None
    return _restore_tensors(skeleton, tensors)


def load_metadata(path: str | Path) -> dict[str, Any]:
    meta_file = _resolve(Path(path)) / METADATA_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def training_history(metadata: dict[str, Any]) -> dict[str, Any]:
    """What every training run behind a checkpoint added up to: its own run plus the chain of checkpoints it was
    initialised from (`axl train --init-from`), as metadata["initialised_from"] records them.

    {"steps", "elapsed_s", "tokens_seen", "runs"}: a continued model's row then says all the training it had, not only
    its last run's (the source folder may be gone, or replaced by this very model, as the shipped default is).
    """
    earlier = metadata.get("initialised_from") or {}
    return {"steps": (metadata.get("step") or 0) + (earlier.get("steps") or 0),
            "elapsed_s": round((metadata.get("elapsed_s") or 0.0) + (earlier.get("elapsed_s") or 0.0), 2),
            "tokens_seen": (metadata.get("tokens_seen") or 0) + (earlier.get("tokens_seen") or 0),
            "runs": 1 + (earlier.get("runs") or 0)}


def initialised_from(source: str | Path) -> dict[str, Any]:
    """The metadata["initialised_from"] record of a run started from checkpoint `source`: where, and its history."""
    return {"checkpoint": str(source), **training_history(load_metadata(source))}


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return path.is_file()
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


# ---------------------------------------------------------------------------------------------- internals
def _extract_tensors(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}, collecting them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"training state keys must be str or int at {key}")
        # JSON keys are strings: remember which were ints (optimizer state is keyed by parameter index).
        return {"__dict__": [[k, _extract_tensors(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_extract_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state (at {key})")


def _restore_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _restore_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_restore_tensors(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def _swap_in(staging: Path, path: Path) -> None:
    backup = path.with_name(f".{path.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    if path.exists():
        os.rename(path, backup)
    os.rename(staging, path)
    _fsync(path.parent)
    shutil.rmtree(backup, ignore_errors=True)


def _resolve(path: Path) -> Path:
    """A crash between the two renames of _swap_in leaves only the backup: use it."""
    backup = path.with_name(f".{path.name}.old")
    if not path.exists() and backup.exists():
        return backup
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist (train one with `axl train --out {path}`)")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
