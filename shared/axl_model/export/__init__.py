"""Exports of AXL models to other runtimes: GGUF (llama.cpp, Ollama, and our own full-model GGUF).

`register(subparsers)` adds `axl export gguf`; the rest is imported lazily (it needs torch and gguf).
"""
from importlib import import_module

from .formats import EXPORT_KINDS, GGUF_TYPES, ExportKind, GGUFType

_LAZY = ("MULTISCALE_ARCH", "QUALITY_WARNING", "ExportReport", "GGUFFileReport", "export_checkpoint",
         "export_llama_gguf", "export_multiscale_gguf", "load_gguf_model", "quantize_gguf", "read_gguf_config",
         "read_metadata", "read_tensor_types", "write_modelfile")
__all__ = sorted(("EXPORT_KINDS", "GGUF_TYPES", "ExportKind", "GGUFType", "register", *_LAZY))


def register(subparsers):
    """Add `axl export gguf` to the `axl` CLI: `export.register(parser.add_subparsers(...))`."""
    from .cli import register as register_export  # imported on use: `python -m axl_model.export.cli` stays clean

    return register_export(subparsers)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'axl_model.export' has no attribute {name!r}")
    value = getattr(import_module(".gguf", __name__), name)
    globals()[name] = value
    return value
