"""AXL: byte-level multi-scale transformers for code, trained and served on the CPU.

Public names are imported lazily, so torch-free parts (tokenizer, config, specialists, recipes, sandbox) can be
used without paying for `import torch`.
"""
from importlib import import_module

_EXPORTS = {
    "ByteTokenizer": "tokenizer", "StreamDecoder": "tokenizer", "BOS_ID": "tokenizer", "EOS_ID": "tokenizer",
    "ModelConfig": "config", "PRESETS": "config", "suggest_models": "config",
    "MultiScaleTransformer": "model", "KVCache": "model",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "load_config": "checkpoint",
    "load_training_state": "checkpoint", "CheckpointError": "checkpoint",
    "Generator": "generate", "BatchDecoder": "generate", "SamplingParams": "generate", "Completion": "generate",
    "StepOutput": "generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'axl_model' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
