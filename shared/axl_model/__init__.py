"""AXL: byte-level multi-scale transformers for code, trained and served on the CPU."""
from .checkpoint import CheckpointError, load_checkpoint, load_config, load_training_state, save_checkpoint
from .config import PRESETS, ModelConfig, suggest_models
from .generate import BatchDecoder, Completion, Generator, SamplingParams, StepOutput
from .model import KVCache, MultiScaleTransformer
from .tokenizer import BOS_ID, EOS_ID, ByteTokenizer, StreamDecoder

__all__ = [
    "BOS_ID", "EOS_ID", "PRESETS", "BatchDecoder", "ByteTokenizer", "CheckpointError", "Completion", "Generator",
    "KVCache", "ModelConfig", "MultiScaleTransformer", "SamplingParams", "StepOutput", "StreamDecoder",
    "load_checkpoint", "load_config", "load_training_state", "save_checkpoint", "suggest_models",
]
