"""Held-out bits/byte of the llama-architecture GGUF export through llama.cpp (evaluate.llama_export_scorers)."""
from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from axl_model import ModelConfig, MultiScaleTransformer, save_checkpoint
from axl_model import evaluate as E
from axl_model.data import prepare_data

from .test_gguf import needs_llama, spread_weights

STDLIB = sysconfig.get_paths()["stdlib"]
LOCAL = 32  # the fine stack's local window: the llama export's context


def test_context_pieces_predict_every_target_once() -> None:
    tokens = np.arange(11, dtype=np.uint16)
    mask = np.array([1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1], dtype=np.uint8)
    pieces = next(E.context_pieces([(tokens, mask)], 4))
    assert [list(t) for t, _ in pieces] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10]]
    targets = [int(t) for piece, _ in pieces for t in piece[1:]]
    assert targets == list(range(1, 11))  # each target once, in order
    assert [int(m) for _, piece_mask in pieces for m in piece_mask[1:]] == list(mask[1:])


@pytest.fixture(scope="module")
def checkpoint_and_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model whose fine stack looks back 32 bytes, with the split of a small corpus recorded."""
    root = tmp_path_factory.mktemp("llama-quality")
    corpus = root / "src"
    corpus.mkdir()
    for name in ("bisect.py", "keyword.py", "fnmatch.py", "colorsys.py", "glob.py", "shlex.py"):
        (corpus / name).write_text(Path(STDLIB, name).read_text())
    prepared = prepare_data([corpus], root / "cache", val_fraction=0.5, progress=False)
    torch.manual_seed(0)
    model = spread_weights(MultiScaleTransformer(ModelConfig.from_name(
        "tiny", fim=True, scales={"fine": {"local_window": LOCAL}})))
    return save_checkpoint(model, root / "ck", metadata={"data_split": prepared.split}), corpus


@needs_llama
def test_llama_cpp_bits_per_byte_equal_the_fine_path_in_pieces(checkpoint_and_corpus, tmp_path: Path) -> None:
    from axl_model.checkpoint import load_checkpoint

    checkpoint, _ = checkpoint_and_corpus
    model = load_checkpoint(checkpoint)
    torch.set_num_threads(1)
    scorers = E.llama_export_scorers(model, tmp_path, types=("f32", "q8_0"), threads=1)
    result = E.held_out_bpb(checkpoint, seq_len=128, max_bytes=2048, model=model, scorers=scorers)
    figures = result["scorers"]
    assert set(figures) == {"fine path, PyTorch", f"fine path, PyTorch, {LOCAL}-token pieces",
                            f"llama.cpp F32, {LOCAL}-token pieces", f"llama.cpp Q8_0, {LOCAL}-token pieces"}
    assert all(f["bytes"] == result["bytes"] > 1000 for f in figures.values())  # the same bytes for each
    pieces = figures[f"fine path, PyTorch, {LOCAL}-token pieces"]["bpb"]
    llama_f32 = figures[f"llama.cpp F32, {LOCAL}-token pieces"]["bpb"]
    assert math.isfinite(llama_f32) and llama_f32 == pytest.approx(pieces, rel=2e-3)  # F16 KV cache: not bit-exact
    assert figures[f"llama.cpp Q8_0, {LOCAL}-token pieces"]["bpb"] == pytest.approx(pieces, rel=3e-2)
    # the fine path is not the model, and cutting it into pieces loses the context each piece starts without
    assert abs(figures["fine path, PyTorch"]["bpb"] - result["bpb"]) > 1e-3
    assert abs(figures["fine path, PyTorch"]["bpb"] - pieces) > 1e-4


def test_fine_path_scorer_equals_forward_fine_only(checkpoint_and_corpus) -> None:
    from axl_model.checkpoint import load_checkpoint

    checkpoint, _ = checkpoint_and_corpus
    model = load_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(3, 65)).astype(np.uint16)
    masks = np.ones_like(tokens, dtype=np.uint8)
    masks[1, 10:20] = 0
    nats, count = E.model_scorer(model, fine_only=True)(list(zip(tokens, masks, strict=True)), None)
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model.forward_fine_only(ids[:, :-1])
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    weights = torch.from_numpy(masks[:, 1:].astype(np.float32)).flatten()
    assert count == float(weights.sum())
    assert nats == pytest.approx(float((losses * weights).sum()), rel=1e-5)
