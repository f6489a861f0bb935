"""The export choices, torch-free so the CLI can list them without importing the model."""
from __future__ import annotations

from typing import Literal, get_args

GGUFType = Literal["f32", "f16", "q8_0", "q4_k_m"]
ExportKind = Literal["llama", "multiscale"]  # llama: fine scale only, for llama.cpp/Ollama; multiscale: full model
GGUF_TYPES: tuple[str, ...] = get_args(GGUFType)
EXPORT_KINDS: tuple[str, ...] = get_args(ExportKind)
