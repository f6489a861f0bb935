"""Tiny checkpoints for tests that serve a model: random weights, real files, made in milliseconds.

    path = make_tiny_checkpoint(tmp_path / "ckpt", seed=0, fim=False)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from axl_model import ModelConfig, MultiScaleTransformer, save_checkpoint


def make_tiny_checkpoint(path: str | Path, seed: int = 0, fim: bool = False, preset: str = "tiny",
                         **overrides: Any) -> Path:
    """A randomly initialised ``preset`` model (``tiny``: 128-byte window) saved as a checkpoint folder."""
    torch.manual_seed(seed)
    model = MultiScaleTransformer(ModelConfig.from_name(preset, fim=fim, **overrides))
    return save_checkpoint(model.eval(), path, metadata={"made_by": "tests.checkpoints", "seed": seed})


def perturbed_model(config: ModelConfig, seed: int = 0, scale: float = 0.05) -> MultiScaleTransformer:
    """A random model with weights large enough that every path (null slots, gates, start tokens) matters."""
    torch.manual_seed(seed)
    model = MultiScaleTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model
