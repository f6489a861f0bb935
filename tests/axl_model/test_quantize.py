"""Weight-only int8 (axl_model.quantize): decoding close to float32, and Q8_0 GGUF files served as int8."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from axl_model import ModelConfig, MultiScaleTransformer, save_checkpoint
from axl_model.export.gguf import _q8_0_int8_linear, export_multiscale_gguf, load_gguf_model, read_tensor_types
from axl_model.generate import BatchDecoder, SamplingParams
from axl_model.model import Linear
from axl_model.quantize import Int8Linear, int8_targets, int8_weight_bytes, load_serving_model, quantize_int8

TEXT = (b"def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\n"
        b"for i in range(10):\n    print(add(i, i), mul(i, i))\n") * 4


@pytest.fixture(scope="module")
def trained() -> MultiScaleTransformer:
    """A tiny model trained for a few seconds on repetitive code: confident, structured logits like a real one."""
    torch.manual_seed(0)
    model = MultiScaleTransformer(ModelConfig.from_name("tiny"))
    data = torch.tensor(list(TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):
        starts = torch.randint(0, len(data) - 97, (4,))
        window = torch.stack([data[s:s + 97] for s in starts])
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 3.0  # it learned some of the text (chance: 5.55 nats; measured 2.3)
    return model.eval()


def greedy_run(model, prompt: list[int], steps: int, forced: list[int] | None = None):
    """Greedy decode (or teacher-forced along `forced`): the tokens and the logits of every step."""
    decoder = BatchDecoder(model, max_batch=1)
    with torch.inference_mode():
        logits = [model.prefill(torch.tensor(prompt), decoder.cache, 0)]
        tokens = []
        for i in range(steps):
            token = forced[i] if forced is not None else int(logits[-1].argmax())
            tokens.append(token)
            logits.append(model.decode_step(torch.tensor([token]), decoder.cache)[0])
    return tokens, torch.stack(logits)


def test_quantize_int8_replaces_the_linear_layers_with_int8_storage(trained):
    model = quantize_int8(copy.deepcopy(trained))
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == len(int8_targets(trained)) > 10
    assert all(m.weight_int8.dtype == torch.int8 and m.per_channel for m in layers)
    assert not any(isinstance(m, Linear) and m.out_features >= 32 for m in model.modules())
    assert int8_weight_bytes(model) == sum(m.weight.numel() for m in int8_targets(trained).values())
    assert model.fusion.gate.weight.dtype == torch.float32  # 3 rows: stays float


def test_int8_decode_logits_track_float32_and_greedy_tokens_mostly_agree(trained):
    prompt = list(TEXT[:40])
    float_tokens, float_logits = greedy_run(trained, prompt, 80)
    model = quantize_int8(copy.deepcopy(trained))
    _, int8_logits = greedy_run(model, prompt, 80, forced=float_tokens)  # same inputs: compare logits step by step
    relative = ((int8_logits - float_logits).norm(dim=-1) / float_logits.norm(dim=-1)).max().item()
    assert relative < 0.05, relative
    assert (int8_logits.argmax(-1) == float_logits.argmax(-1)).float().mean() >= 0.95
    int8_tokens, _ = greedy_run(model, prompt, 80)  # free-running: a near tie may flip a token and diverge
    assert sum(a == b for a, b in zip(int8_tokens, float_tokens)) >= 0.8 * len(float_tokens)


def test_int8_prefill_matches_its_own_decode_and_uses_the_stored_weights_exactly(trained):
    model = quantize_int8(copy.deepcopy(trained))
    layer = model.lm_head
    x = torch.randn(40, layer.in_features)
    with torch.no_grad():  # more rows than FAST_ROWS: float32 on the dequantized int8 values
        assert torch.equal(layer(x), F.linear(x, layer.weight_int8.float() * layer.weight_scale))
    ids = torch.tensor([list(TEXT[:60])])
    prompt_logits = model(ids)[0, -1]
    _, decoded = greedy_run(model, list(TEXT[:30]), 30, forced=list(TEXT[30:60]))
    assert torch.allclose(decoded[-1], prompt_logits, rtol=0, atol=0.05 * prompt_logits.abs().max().item())


def test_a_q8_0_gguf_loads_its_matrices_as_int8_without_a_float_copy(trained, tmp_path):
    path = export_multiscale_gguf(trained, tmp_path / "tiny-q8_0.gguf", qtype="q8_0")
    assert read_tensor_types(path)["stacks.fine.blocks.0.attn.qkv.weight"] == "Q8_0"
    loaded = load_gguf_model(path, int8=True)
    reference = quantize_int8(copy.deepcopy(trained))
    for name in int8_targets(trained):
        layer = loaded.get_submodule(name)
        assert isinstance(layer, Int8Linear) and layer.per_channel, name
        assert layer.weight_int8.dtype == torch.int8  # the stored values, in memory as int8
        # our writer's Q8_0 blocks carry the row's scale: the very weights quantize_int8 makes
        assert torch.equal(layer.weight_int8, reference.get_submodule(name).weight_int8), name
        assert torch.equal(layer.weight_scale, reference.get_submodule(name).weight_scale), name
    state = loaded.state_dict()
    floats = [n for n, t in state.items() if n.endswith(".weight") and t.dim() == 2 and t.shape[0] >= 32]
    assert floats == ["embed.weight"], floats  # the embedding is a lookup: float; no other matrix is
    prompt = list(TEXT[:40])
    float_tokens, float_logits = greedy_run(trained, prompt, 40)
    _, gguf_logits = greedy_run(loaded, prompt, 40, forced=float_tokens)
    assert (gguf_logits.argmax(-1) == float_logits.argmax(-1)).float().mean() >= 0.95
    # the default load still dequantizes (training, export and evaluation want float)
    assert isinstance(load_gguf_model(path).lm_head, Linear)


def test_q8_0_blocks_with_their_own_scales_serve_exactly_per_block():
    """A Q8_0 file from another writer (a scale per 32-value block) is served on exactly its stored values."""
    weight = torch.randn(64, 96) * torch.linspace(0.1, 3.0, 96)  # columns of very different sizes
    raw = gguf_quants.quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    layer = _q8_0_int8_linear(raw, (64, 96))
    assert not layer.per_channel and layer.weight_scale.shape == (64, 3)
    stored = torch.from_numpy(np.array(gguf_quants.dequantize(raw, GGMLQuantizationType.Q8_0), dtype=np.float32))
    assert torch.equal(layer.weight, stored.view(64, 96))
    x = torch.randn(1, 96)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, stored.view(64, 96)))


def test_load_serving_model_int8_from_a_checkpoint_folder(trained, tmp_path):
    folder = save_checkpoint(trained, tmp_path / "ckpt")
    model = load_serving_model(folder, "int8")
    assert isinstance(model.lm_head, Int8Linear) and not model.training
    assert model.embed.weight.dtype == torch.float32
    exact = load_serving_model(folder, "float32")  # the default stays float and exact
    assert isinstance(exact.lm_head, Linear)
    ids = torch.tensor([list(TEXT[:50])])
    with torch.no_grad():
        assert torch.equal(exact(ids), trained(ids))
