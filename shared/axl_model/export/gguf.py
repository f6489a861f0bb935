"""GGUF export of AXL models, in two kinds, and their quantization.

* ``llama`` kind: the fine-scale path alone (`MultiScaleTransformer.forward_fine_only`) as a standard
  llama-architecture GGUF that llama.cpp and Ollama run unchanged. It drops the medium and coarse scales,
  the cross-scale attentions and the fusion gate, so it is *worse* than the model the mesh serves; the file
  says so in ``general.description`` and every report repeats it.
* ``multiscale`` kind: every tensor of the full model under its own architecture name (``axl-multiscale``),
  the ModelConfig as metadata keys. llama.cpp cannot run it; our model worker loads it (`load_gguf_model`,
  or `checkpoint.load_checkpoint("x.gguf")`) and dequantizes, so quantized files serve full quality; the
  worker loads a Q8_0 file's matrices as int8 instead (`load_gguf_model(path, int8=True)`, see `quantize`).

Vocabulary (both kinds): GPT-2 style byte vocabulary, i.e. the 256 bytes spelled with GPT-2's
bytes-to-unicode table, then BOS ``<s>`` / EOS ``</s>`` (and the FIM tokens) as control tokens, pre-tokenizer
``default`` and one dummy merge (llama.cpp refuses a GPT-2 vocabulary without merges). llama.cpp then
tokenizes a text exactly as BOS + its UTF-8 bytes, the same ids as `ByteTokenizer`.

RoPE: our attention rotates halves (dimension i pairs with i + D/2, the NEOX / Hugging Face layout) while
llama.cpp's llama architecture rotates interleaved pairs (2i, 2i+1), so the rows of W_q and W_k are permuted
per head, as llama.cpp's convert_hf_to_gguf.py does for Hugging Face checkpoints.

Per-scale shapes: the llama kind takes the fine stack's depth, heads and d_ff; a fine stack with a local
window W becomes a llama GGUF with a context of W bytes (llama.cpp's llama architecture has no sliding
window, and the fine stack never attended further back). The multiscale kind stores `scales` as a JSON string.

Quantization: llama-kind files go through llama.cpp's own `llama_model_quantize` (llama-cpp-python);
multiscale files are quantized tensor by tensor in Python: F16 with `gguf.quants`, Q8_0 with one scale per
row repeated in each block (so the worker's per-channel int8 kernel runs on exactly the stored values), K-quants with
ggml's `ggml_quantize_chunk` from the library llama-cpp-python ships. K-quants need rows (a weight's input
width) that are multiples of 256; other tensors fall back to another type (llama.cpp does the same silently):
every report lists the type each tensor got and warns about the fallbacks. The `*-q` presets have widths that
avoid them.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants

from ..config import ModelConfig
from ..model import MultiScaleTransformer
from ..quantize import Int8Linear, int8_targets, is_int8_scale, per_channel_int8, replace_module
from ..tokenizer import BOS_ID, EOS_ID, FIM_TOKENS
from .formats import EXPORT_KINDS, GGUF_TYPES, ExportKind, GGUFType

log = logging.getLogger(__name__)


MULTISCALE_ARCH = "axl-multiscale"
CONFIG_KEY_PREFIX = f"{MULTISCALE_ARCH}.config."
QUALITY_WARNING = (
    "This llama-architecture GGUF holds only the fine-scale (byte) path of the AXL multi-scale model: the "
    "medium and coarse scales, cross-scale attention and the fusion gate are dropped, so its quality is lower "
    "than the full model's. For full quality use the axl-multiscale GGUF with the AXL model worker."
)

_FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
}
# The tensor types each target is meant to produce for matrices; anything else is a fallback.
_INTENDED_TYPES: dict[str, set[str]] = {
    "f32": {"F32"}, "f16": {"F16"}, "q8_0": {"Q8_0"}, "q4_k_m": {"Q4_K", "Q5_K", "Q6_K"},
}
T = GGMLQuantizationType


# ---------------------------------------------------------------------------------------------- reports
@dataclass
class GGUFFileReport:
    """One produced GGUF file: what it holds and how each tensor was stored."""

    path: Path
    kind: ExportKind
    type: GGUFType
    size_bytes: int
    tensor_types: dict[str, str]  # tensor name -> GGML type name ("Q4_K", "F32", ...)
    fallbacks: dict[str, str] = field(default_factory=dict)  # matrices that did not get the intended type
    modelfile: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.tensor_types.values()).items()))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(path=str(self.path), modelfile=str(self.modelfile) if self.modelfile else None,
                    type_counts=self.type_counts())
        return data


@dataclass
class ExportReport:
    files: list[GGUFFileReport]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"files": [f.to_dict() for f in self.files], "warnings": list(self.warnings)}

    def render(self, verbose: bool = False) -> str:
        """Human-readable summary (the `axl export gguf` output)."""
        lines = []
        for f in self.files:
            counts = ", ".join(f"{n} {t}" for t, n in f.type_counts().items())
            lines.append(f"{f.path}  [{f.kind}, {f.type}]  {_human_size(f.size_bytes)}  tensors: {counts}")
            if f.modelfile:
                lines.append(f"  Ollama Modelfile: {f.modelfile}  (ollama create <name> -f {f.modelfile})")
            if verbose:
                lines.extend(f"    {name}: {ggml_type}" for name, ggml_type in f.tensor_types.items())
            lines.extend(f"  warning: {w}" for w in f.warnings if w not in self.warnings)
        lines.extend(f"WARNING: {w}" for w in self.warnings)
        return "\n".join(lines)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- vocabulary
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what llama.cpp's BPE vocab expects)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _add_vocabulary(writer: GGUFWriter, config: ModelConfig) -> None:
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + ["<s>", "</s>"]
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * 2
    if config.fim:
        tokens += list(FIM_TOKENS)
        types += [gguf.TokenType.CONTROL] * len(FIM_TOKENS)
    if len(tokens) != config.vocab_size:
        raise AssertionError(f"vocabulary of {len(tokens)} tokens for a model with {config.vocab_size}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # One merge of two printable ASCII characters: llama.cpp needs a non-empty merge list. Its result "zq"
    # is not a token, and llama.cpp then emits the two byte tokens again, so tokenization stays byte-exact.
    writer.add_token_merges(["z q"])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------- tensor storage
def _ggml_quantize_chunk() -> Callable[..., int] | None:
    """ggml's own quantizer (K-quants included) from the library llama-cpp-python ships, if installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    library = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not library.is_file():
        return None
    function = ctypes.CDLL(str(library)).ggml_quantize_chunk
    function.restype = ctypes.c_size_t
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p]
    return function


def _quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 (..., n_per_row) -> the stored array for `qtype` (uint8 blocks for quantized types)."""
    if qtype == T.F32:
        return data
    if qtype == T.Q8_0:
        return _q8_0_per_row(data)
    if qtype in (T.F16, T.Q4_0):
        return gguf_quants.quantize(data, qtype)
    function = _ggml_quantize_chunk()
    if function is None:
        raise RuntimeError(f"{qtype.name} needs ggml's quantizer: install llama-cpp-python (`pip install -e .[llama]`)")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = data.reshape(-1, data.shape[-1])
    source = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.zeros((rows.shape[0], rows.shape[1] // block * type_size), dtype=np.uint8)
    written = function(int(qtype), source.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out.reshape(*data.shape[:-1], out.shape[-1])


Q8_0_BLOCK_BYTES = 2 + 32  # a float16 scale, then 32 int8 values


def _q8_0_per_row(data: np.ndarray) -> np.ndarray:
    """Q8_0 blocks in which every block of a row carries the row's scale (`quantize.per_channel_int8`).

    Any GGUF reader dequantizes them as usual; the model worker serves them with its per-channel int8 kernel,
    on exactly the stored values (a per-block scale would need a per-block kernel, which torch lacks on CPU).
    """
    rows = data.reshape(-1, data.shape[-1])
    values, scale = per_channel_int8(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
    n_rows, n_blocks = values.shape[0], values.shape[1] // 32
    blocks = np.empty((n_rows, n_blocks, Q8_0_BLOCK_BYTES), dtype=np.uint8)
    blocks[:, :, :2] = scale.numpy().astype(np.float16).view(np.uint8).reshape(n_rows, 1, 2)
    blocks[:, :, 2:] = values.numpy().view(np.uint8).reshape(n_rows, n_blocks, 32)
    return blocks.reshape(*data.shape[:-1], n_blocks * Q8_0_BLOCK_BYTES)


def _q8_0_int8_linear(raw: np.ndarray, shape: tuple[int, int]) -> Int8Linear:
    """Q8_0 bytes of an (out, in) matrix -> an Int8Linear on exactly the stored values: per channel when every
    block of a row has the row's scale (our writer's files), else per block."""
    out, n_in = shape
    blocks = np.asarray(raw, dtype=np.uint8).reshape(out, n_in // 32, Q8_0_BLOCK_BYTES)
    scales = torch.from_numpy(np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(out, -1).astype(np.float32))
    values = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(out, n_in))
    if bool((scales == scales[:, :1]).all()) and bool(is_int8_scale(scales[:, 0]).all()):
        scales = scales[:, :1]
    return Int8Linear(values, scales)


def _fits(data: np.ndarray, qtype: GGMLQuantizationType) -> bool:
    return data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def _multiscale_tensor_type(name: str, data: np.ndarray, target: GGUFType, n_layers: int) -> GGMLQuantizationType:
    """The type a full-model tensor gets, mirroring llama.cpp's choices (norms and small tensors stay F32)."""
    is_matrix = data.ndim == 2 and data.shape[0] >= 32 and name.endswith(".weight") and "norm" not in name
    if target == "f32" or not is_matrix:
        return T.F32
    if target == "f16":
        return T.F16
    if target == "q8_0":
        wanted = T.Q8_0
    else:  # q4_k_m: Q6_K for the embedding/head and for the down projection of some layers, like llama.cpp
        wanted = T.Q4_K
        if name in ("embed.weight", "lm_head.weight"):
            wanted = T.Q6_K
        elif name.endswith("mlp.down.weight"):
            layer = int(name.split(".")[3])
            if layer < n_layers / 8 or layer >= 7 * n_layers / 8 or (layer - n_layers // 8) % 3 == 2:
                wanted = T.Q6_K
    for candidate in (wanted, T.Q8_0, T.F16):
        if _fits(data, candidate):
            return candidate
    return T.F32


# ---------------------------------------------------------------------------------------------- export 1: llama
def _permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of W_q / W_k from rotate-half order to llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    out_features = weight.shape[0]
    return (weight.reshape(n_heads, 2, out_features // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_tensors(model: MultiScaleTransformer) -> dict[str, np.ndarray]:
    """The fine-scale path under llama.cpp's tensor names, float32, numpy (out_features, in_features) order."""
    cfg = model.config
    shape = cfg.shape("fine")
    d, f = shape.d_model, shape.d_ff
    fine = model.stacks["fine"]
    tensors: dict[str, torch.Tensor] = {"token_embd.weight": model.embed.weight}
    for i, block in enumerate(fine.blocks):
        qkv = block.attn.qkv.weight  # (3d, d): q, k, v rows, each (H, D) head-major
        gate_up = block.mlp.gate_up.weight  # (2 d_ff, d): gate rows then up rows
        tensors.update({
            f"blk.{i}.attn_norm.weight": block.attn_norm.weight,
            f"blk.{i}.attn_q.weight": _permute_rope_rows(qkv[:d], shape.n_heads),
            f"blk.{i}.attn_k.weight": _permute_rope_rows(qkv[d:2 * d], shape.n_heads),
            f"blk.{i}.attn_v.weight": qkv[2 * d:],
            f"blk.{i}.attn_output.weight": block.attn.out.weight,
            f"blk.{i}.ffn_norm.weight": block.mlp_norm.weight,
            f"blk.{i}.ffn_gate.weight": gate_up[:f],
            f"blk.{i}.ffn_up.weight": gate_up[f:],
            f"blk.{i}.ffn_down.weight": block.mlp.down.weight,
        })
    tensors["output_norm.weight"] = fine.norm.weight  # forward_fine_only ends with this norm
    if not cfg.tie_embeddings:
        tensors["output.weight"] = model.lm_head.weight
    return {k: v.detach().float().cpu().contiguous().numpy() for k, v in tensors.items()}


def llama_context_length(config: ModelConfig) -> int:
    """The window of the llama kind: the fine stack's local window if it has one, else the model's."""
    return config.shape("fine").local_window or config.max_seq_len


def _add_common_metadata(writer: GGUFWriter, config: ModelConfig, name: str, description: str,
                         file_type: LlamaFileType, context_length: int | None = None) -> None:
    """General and llama.* keys, describing the fine stack (what the llama kind holds)."""
    fine = config.shape("fine")
    writer.add_name(name)
    writer.add_description(description)
    writer.add_file_type(int(file_type))
    writer.add_context_length(context_length or config.max_seq_len)
    writer.add_embedding_length(fine.d_model)
    writer.add_block_count(fine.n_layers)
    writer.add_feed_forward_length(fine.d_ff)
    writer.add_head_count(fine.n_heads)
    writer.add_head_count_kv(fine.n_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(fine.head_dim)
    writer.add_vocab_size(config.vocab_size)
    _add_vocabulary(writer, config)


def _write(writer: GGUFWriter) -> None:
    """Header, metadata, tensors. Writers target a staging name that the caller renames into place."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _new_writer(path: Path, arch: str) -> tuple[GGUFWriter, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    return GGUFWriter(str(staging), arch), staging


def export_llama_gguf(model: MultiScaleTransformer, path: str | Path, *, name: str | None = None) -> Path:
    """Write the fine-scale path of `model` as an F32 llama-architecture GGUF (llama.cpp, Ollama).

    Quantize the result with `quantize_gguf`. The file drops the medium/coarse scales: see QUALITY_WARNING.
    """
    path, config = Path(path), model.config
    log.warning(QUALITY_WARNING)
    writer, staging = _new_writer(path, "llama")
    try:
        _add_common_metadata(writer, config, name or f"axl-{config.name}-fine", QUALITY_WARNING, LlamaFileType.ALL_F32,
                             context_length=llama_context_length(config))
        for tensor_name, data in llama_tensors(model).items():
            writer.add_tensor(tensor_name, data)
        _write(writer)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- export 2: full model
def export_multiscale_gguf(model: MultiScaleTransformer, path: str | Path, *, qtype: GGUFType = "f32",
                           name: str | None = None, progress: bool = False) -> Path:
    """Write every tensor of `model` as an `axl-multiscale` GGUF, quantized to `qtype` (see module docstring)."""
    from tqdm.auto import tqdm

    if qtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; choose one of: {', '.join(GGUF_TYPES)}")
    path, config = Path(path), model.config
    weights = {k: v.detach().float().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    too_long = [k for k in weights if len(k) >= 64]
    if too_long:
        raise ValueError(f"tensor names longer than GGUF's 63 characters: {too_long}")
    writer, staging = _new_writer(path, MULTISCALE_ARCH)
    try:
        description = (f"AXL multi-scale byte transformer ({config.name}), all three scales; load it with "
                       "axl_model.checkpoint.load_checkpoint. llama.cpp cannot run this architecture.")
        _add_common_metadata(writer, config, name or f"axl-{config.name}", description, _FILE_TYPES[qtype])
        for key, value in config.to_dict().items():
            if key == "scales":  # a nested mapping: GGUF metadata holds scalars, so it travels as JSON text
                value = json.dumps(value, sort_keys=True)
            _add_typed(writer, CONFIG_KEY_PREFIX + key, value)
        for tensor_name, data in tqdm(weights.items(), desc=f"quantize {qtype}", unit="tensor", disable=not progress):
            parts = tensor_name.split(".")
            n_layers = config.shape(parts[1]).n_layers if parts[0] == "stacks" else config.n_layers
            ggml_type = _multiscale_tensor_type(tensor_name, data, qtype, n_layers)
            stored = _quantize(data, ggml_type)
            writer.add_tensor(tensor_name, stored, raw_dtype=None if ggml_type in (T.F32, T.F16) else ggml_type)
        _write(writer)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def _add_typed(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)  # float64: the config round-trips exactly (norm_eps, rope_theta)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        raise TypeError(f"cannot store config field {key} of type {type(value).__name__} in GGUF")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata key/values of a GGUF file (arrays as lists; the token list included)."""
    reader = GGUFReader(str(path))
    return {key: reader_field.contents() for key, reader_field in reader.fields.items()}


def read_tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> GGML type name ("F32", "Q8_0", "Q4_K", ...), in file order."""
    return {t.name: GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(str(path)).tensors}


def _open_multiscale(path: str | Path) -> tuple[GGUFReader, ModelConfig]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field else None
    if arch != MULTISCALE_ARCH:
        hint = " (the llama kind holds only the fine scale; run it with llama.cpp)" if arch == "llama" else ""
        raise ValueError(f"{path} has architecture {arch!r}; only {MULTISCALE_ARCH!r} GGUF files load as AXL models{hint}")
    config_values = {key[len(CONFIG_KEY_PREFIX):]: f.contents() for key, f in reader.fields.items()
                     if key.startswith(CONFIG_KEY_PREFIX)}
    try:
        if isinstance(config_values.get("scales"), str):
            config_values["scales"] = json.loads(config_values["scales"])
        return reader, ModelConfig.from_dict(config_values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad model config in metadata: {exc}") from None


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in an `axl-multiscale` GGUF's metadata (no tensor is read)."""
    return _open_multiscale(path)[1]


def load_gguf_model(path: str | Path, int8: bool = False) -> MultiScaleTransformer:
    """The full model stored in an `axl-multiscale` GGUF, in eval mode.

    By default every weight is dequantized to float32 (a model to train, export or evaluate in float). With
    `int8`, each Q8_0 matrix of a linear layer loads as an `Int8Linear` holding the stored int8 values and
    scales (never a float32 copy): what the model worker serves. Other tensors load as float32 either way.
    """
    from ..checkpoint import check_tensor_shapes  # imported here: checkpoint imports this module lazily too

    reader, config = _open_multiscale(path)
    # GGUF lists dimensions innermost first (ggml's order); torch's shapes are the reverse.
    found = {tensor.name: tuple(int(n) for n in reversed(tensor.shape)) for tensor in reader.tensors}
    if len(found) != len(reader.tensors):
        raise ValueError(f"{path}: a tensor name appears twice")
    check_tensor_shapes(found, config, path, f"the config in its metadata ({CONFIG_KEY_PREFIX}*)")
    model = MultiScaleTransformer(config)  # only now: the file holds exactly the tensors this config allocates
    expected = model.state_dict()
    targets = int8_targets(model) if int8 else {}
    weights, int8_layers = {}, {}
    for tensor in reader.tensors:
        if tensor.name not in expected:
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r}")
        qtype, shape = GGMLQuantizationType(tensor.tensor_type), tuple(expected[tensor.name].shape)
        module = tensor.name.removesuffix(".weight")
        tied_head = config.tie_embeddings and tensor.name == "embed.weight" and "lm_head" in targets
        if qtype == T.Q8_0 and (module in targets or tied_head):
            layer = _q8_0_int8_linear(tensor.data, shape)
            int8_layers["lm_head" if tied_head else module] = layer
            if not tied_head:
                continue  # the embedding itself is a lookup: it also loads as float below
        data = gguf_quants.dequantize(np.asarray(tensor.data), qtype)
        weights[tensor.name] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a writable copy
    if config.tie_embeddings:
        weights.setdefault("lm_head.weight", weights.get("embed.weight"))
    replaced = {f"{name}.weight" for name in int8_layers}
    missing = sorted(set(expected) - set(weights) - replaced)
    if missing:
        raise ValueError(f"{path}: tensors missing: {missing[:5]}")
    model.load_state_dict(weights, strict=False)
    for name, layer in int8_layers.items():
        layer.bias = targets[name].bias  # loaded above (no Q8_0 linear layer has one today)
        replace_module(model, name, layer)
    per_block = [name for name, layer in int8_layers.items() if not layer.per_channel]
    if per_block:
        log.warning("%s: %d Q8_0 matrices have a scale per block (not this exporter's per-row scales): they serve "
                    "exactly but dequantize at every matmul, slower than float32; re-export the model with "
                    "`axl export gguf` for the int8 kernel (e.g. %s)", path, len(per_block), per_block[0])
    return model.eval()


# ---------------------------------------------------------------------------------------------- quantization
def gguf_architecture(path: str | Path) -> str:
    reader_field = GGUFReader(str(path)).fields.get("general.architecture")
    if reader_field is None:
        raise ValueError(f"{path} has no general.architecture key")
    return reader_field.contents()


def _fallbacks(path: Path, target: GGUFType) -> dict[str, str]:
    """Matrices whose stored type is not one the target intends (llama.cpp falls back silently)."""
    out = {}
    for tensor in GGUFReader(str(path)).tensors:
        shape = [int(n) for n in tensor.shape]  # ggml order: (row length, rows)
        is_matrix = len(shape) == 2 and shape[1] >= 32 and "norm" not in tensor.name
        type_name = GGMLQuantizationType(tensor.tensor_type).name
        if is_matrix and type_name not in _INTENDED_TYPES[target]:
            out[tensor.name] = type_name
    return out


def _file_report(path: Path, kind: ExportKind, target: GGUFType) -> GGUFFileReport:
    report = GGUFFileReport(path=path, kind=kind, type=target, size_bytes=path.stat().st_size,
                            tensor_types=read_tensor_types(path), fallbacks=_fallbacks(path, target))
    if report.fallbacks:
        by_type = Counter(report.fallbacks.values())
        report.warnings.append(
            f"{len(report.fallbacks)} matrices did not get {target} ({', '.join(f'{n} as {t}' for t, n in by_type.items())}): "
            f"their rows are not a multiple of the block size (256 for K-quants). Use a *-q preset "
            f"(micro-q, reasoning-q) for widths that quantize fully; e.g. {next(iter(report.fallbacks))}")
    for warning in report.warnings:
        log.warning("%s: %s", path.name, warning)
    if kind == "llama":
        report.warnings.append(QUALITY_WARNING)
    return report


def quantize_gguf(source: str | Path, destination: str | Path, qtype: GGUFType) -> GGUFFileReport:
    """Quantize a GGUF written by this module (an F32 or F16 one) to `qtype`.

    llama-kind files go through llama.cpp's `llama_model_quantize`; axl-multiscale files (an architecture
    llama.cpp does not know) are dequantized and written again with per-tensor quantization in Python.
    """
    source, destination = Path(source), Path(destination)
    if qtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; choose one of: {', '.join(GGUF_TYPES)}")
    if source.resolve() == destination.resolve():
        raise ValueError(f"quantize_gguf needs a destination other than its source ({source})")
    arch = gguf_architecture(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if arch == MULTISCALE_ARCH:
        source_types = set(read_tensor_types(source).values()) - {"F32", "F16"}
        if source_types:
            log.warning("%s is already quantized (%s): quantizing it again compounds the error",
                        source, ", ".join(sorted(source_types)))
        model = load_gguf_model(source)
        name = GGUFReader(str(source)).fields["general.name"].contents()
        export_multiscale_gguf(model, destination, qtype=qtype, name=name)
        return _file_report(destination, "multiscale", qtype)
    if arch != "llama":
        raise ValueError(f"{source} has architecture {arch!r}; expected 'llama' or {MULTISCALE_ARCH!r}")
    _llama_cpp_quantize(source, destination, qtype)
    return _file_report(destination, "llama", qtype)


def _llama_cpp_quantize(source: Path, destination: Path, qtype: GGUFType) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError("quantizing a llama GGUF needs llama-cpp-python: `pip install -e .[llama]` "
                           "(it builds llama.cpp from source, about 15 minutes)") from None
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(_FILE_TYPES[qtype])
    params.nthread = 0  # llama.cpp picks the hardware concurrency
    staging = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    try:
        with suppress_stdout_stderr(disable=log.isEnabledFor(logging.DEBUG)):  # llama.cpp logs every tensor
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(staging).encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama_model_quantize({source} -> {qtype}) failed with status {status}")
        os.replace(staging, destination)
    finally:
        staging.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- Ollama
def write_modelfile(gguf_path: str | Path, config: ModelConfig, specialist: str | None = None) -> Path:
    """An Ollama Modelfile beside `gguf_path` (named <stem>.Modelfile): `ollama create NAME -f that-file`.

    With a specialist, the template renders the specialist's prompt layout (axl_model.specialists) and its
    stop strings and sampling defaults apply; without one the prompt goes to the model as is.
    """
    gguf_path = Path(gguf_path)
    temperature, top_p, stops = 0.2, 0.95, []
    template = "{{ .Prompt }}"
    if specialist is not None:
        from ..specialists import END_MARKER, get_specialist

        spec = get_specialist(specialist)
        temperature, top_p = spec.temperature, spec.top_p
        template = (f"<|axl:{spec.name}|>\n### Instruction: {{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}"
                    f"{spec.instruction}{{{{ end }}}}\n### Input:\n{{{{ .Prompt }}}}\n### Output:\n")
        # Modelfile values are one-line strings: stops that begin with a newline are kept without it.
        stops = list(dict.fromkeys(s.strip("\n") for s in (END_MARKER, *spec.stop) if s.strip("\n")))
    lines = [
        f"# AXL {config.name}{f' ({specialist})' if specialist else ''}: {gguf_path.name}",
        "# " + QUALITY_WARNING,
        f"FROM ./{gguf_path.name}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER stop {_quote(s)}" for s in stops),
        f"PARAMETER temperature {temperature}",
        f"PARAMETER top_p {top_p}",
        f"PARAMETER num_ctx {llama_context_length(config)}",
    ]
    path = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------- one call for all
def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, types: Iterable[GGUFType] = ("f32",),
                      kinds: Iterable[ExportKind] = EXPORT_KINDS, *, specialist: str | None = None,
                      name: str | None = None, progress: bool = True) -> ExportReport:
    """Export a checkpoint folder (or an axl-multiscale .gguf) to GGUF files of every kind and type asked.

    Files are named <name>-<kind>-<type>.gguf in `out_dir`; llama-kind files get an Ollama Modelfile. The
    specialist (for the Modelfile's template) defaults to the checkpoint metadata's "specialist".
    """
    from tqdm.auto import tqdm

    from ..checkpoint import load_checkpoint, load_metadata

    types, kinds = list(dict.fromkeys(types)), list(dict.fromkeys(kinds))
    for t in types:
        if t not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {t!r}; choose from: {', '.join(GGUF_TYPES)}")
    for k in kinds:
        if k not in EXPORT_KINDS:
            raise ValueError(f"unknown export kind {k!r}; choose from: {', '.join(EXPORT_KINDS)}")
    if not types or not kinds:
        raise ValueError("export needs at least one type and one kind")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model = load_checkpoint(checkpoint)
    config = model.config
    if specialist is None and checkpoint.is_dir():
        try:
            specialist = load_metadata(checkpoint).get("specialist")
        except (ValueError, OSError):
            specialist = None
    name = name or f"axl-{config.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[GGUFFileReport] = []
    warnings: list[str] = []
    steps = [(k, t) for k in kinds for t in types]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as scratch:
        bar = tqdm(steps, desc="export gguf", unit="file", disable=not progress)
        for kind, qtype in bar:
            destination = out_dir / f"{name}-{kind}-{qtype}.gguf"
            bar.set_postfix_str(destination.name)
            if kind == "multiscale":
                export_multiscale_gguf(model, destination, qtype=qtype, name=name)
                files.append(_file_report(destination, kind, qtype))
                continue
            if qtype == "f32":
                export_llama_gguf(model, destination, name=f"{name}-fine")
                report = _file_report(destination, kind, qtype)
            else:
                full_precision = Path(scratch) / f"{name}-llama-f32.gguf"
                if not full_precision.exists():
                    export_llama_gguf(model, full_precision, name=f"{name}-fine")
                report = quantize_gguf(full_precision, destination, qtype)
            report.modelfile = write_modelfile(destination, config, specialist)
            files.append(report)
    if "llama" in kinds:
        warnings.append(QUALITY_WARNING)
    return ExportReport(files=files, warnings=warnings)
