"""What a training job needs to fit: this machine's RAM and model configurations by preset or checkpoint (the
model library's config module is data, no torch)."""

from __future__ import annotations

from pathlib import Path

from axl_model.config import PRESETS, ModelConfig, memory_bytes


def machine_memory_bytes() -> int | None:
    """MemTotal of this machine (None where it cannot be read)."""
    return memory_bytes("MemTotal")


def model_config(preset: str | None = None, config_file: Path | None = None) -> ModelConfig:
    """A ``ModelConfig`` from a preset name or a checkpoint's config.json (raises ValueError when unknown)."""
    if config_file is not None:
        return ModelConfig.from_file(config_file)
    assert preset is not None
    return ModelConfig.from_name(preset)


def preset_names() -> list[str]:
    return list(PRESETS)
