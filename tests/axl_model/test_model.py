"""The model's invariants: strict causality at every scale, and cached decoding equal to recomputation."""
import dataclasses

import pytest
import torch

from axl_model import BatchDecoder, ModelConfig, MultiScaleTransformer, SamplingParams
from axl_model.config import PRESETS
from tests.checkpoints import perturbed_model


# Every preset's shape family (width, heads, d_ff) at one layer per scale to keep the test fast.
SHAPE_FAMILIES = [name for name in PRESETS]

# Per-scale shapes and local windows on tiny's width (64-byte window): windows that the tests' sequences
# outgrow at every scale, medium/coarse narrower and wider than the fine stack, and both together.
MIXED_SHAPES = {
    "windows": dict(scales={"fine": {"local_window": 8}, "medium": {"local_window": 16}}),
    "widths": dict(scales={"medium": {"d_model": 32, "n_heads": 2, "d_ff": 96, "n_layers": 2},
                           "coarse": {"d_model": 96, "n_heads": 3, "d_ff": 256, "n_layers": 2}}),
    "both": dict(scales={"fine": {"n_layers": 2, "local_window": 12},
                         "coarse": {"d_model": 128, "n_heads": 4, "d_ff": 256, "n_layers": 2, "local_window": 32}}),
}


def mixed_config(kind: str, **overrides) -> ModelConfig:
    return ModelConfig.from_name("tiny", **{"max_seq_len": 64, **MIXED_SHAPES[kind], **overrides})


@pytest.mark.parametrize("name", SHAPE_FAMILIES)
def test_changing_the_future_never_changes_the_past(name):
    config = ModelConfig.from_name(name, n_layers=1, max_seq_len=64)
    model = perturbed_model(config)
    generator = torch.Generator().manual_seed(1)
    for length in (13, 16, 23, 32):  # multiples of 4 and not
        ids = torch.randint(0, 256, (2, length), generator=generator)
        reference = model(ids)
        for t in range(0, length - 1, 3 if config.d_model > 300 or config.scales else 1):  # big shapes: every 3rd
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, 256, (2, length - t - 1), generator=generator)
            logits = model(changed)
            assert torch.allclose(logits[:, : t + 1], reference[:, : t + 1], atol=1e-5), (name, length, t)
            assert not torch.allclose(logits[:, t + 1:], reference[:, t + 1:])  # the future does matter


@pytest.mark.parametrize("kind", MIXED_SHAPES)
def test_per_scale_shapes_and_windows_are_causal(kind):
    model = perturbed_model(mixed_config(kind))
    generator = torch.Generator().manual_seed(2)
    for length in (29, 64):
        ids = torch.randint(0, 256, (2, length), generator=generator)
        reference = model(ids)
        for t in range(0, length - 1):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, 256, (2, length - t - 1), generator=generator)
            logits = model(changed)
            assert torch.allclose(logits[:, : t + 1], reference[:, : t + 1], atol=1e-5), (kind, length, t)
            assert not torch.allclose(logits[:, t + 1:], reference[:, t + 1:])


def test_the_fine_window_bounds_what_the_fine_stack_sees():
    """With local_window W the fine stack at byte t reads bytes t-W+1..t only; the whole model still sees
    further back (through the medium and coarse scales)."""
    model = perturbed_model(mixed_config("windows"))
    ids = torch.randint(0, 256, (1, 48))
    changed = ids.clone()
    changed[0, 20] = (ids[0, 20] + 1) % 256
    fine, fine_changed = model.forward_fine_only(ids), model.forward_fine_only(changed)
    assert not torch.allclose(fine[:, 20 + 7], fine_changed[:, 20 + 7])  # byte 20 is inside the window of 27
    assert torch.allclose(fine[:, 20 + 8:], fine_changed[:, 20 + 8:], atol=1e-6)  # and outside it from 28 on
    assert not torch.allclose(model(ids)[:, 40:], model(changed)[:, 40:])


@pytest.mark.parametrize("window, length", [(1, 5), (4, 17), (8, 8), (8, 40), (6, 23)])
def test_sliding_window_attention_equals_masked_attention(window, length):
    from axl_model.model import sliding_window_attention

    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < window))
    assert torch.allclose(sliding_window_attention(q, k, v, window), dense, atol=1e-5)


def test_the_future_leak_is_real_without_the_shift():
    """Sanity check of the test itself: naive grouping (no shift) would fail it."""
    model = perturbed_model(ModelConfig.from_name("tiny"))
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 256
    with torch.no_grad():
        groups = model.embed(ids)[:, :16].reshape(1, 4, -1)
        changed_groups = model.embed(changed)[:, :16].reshape(1, 4, -1)
    # byte 5 is inside coarse group 1, which a naive model would show to positions 4..7
    assert not torch.allclose(groups[:, 1], changed_groups[:, 1])
    assert torch.allclose(model(ids)[:, 4], model(changed)[:, 4], atol=1e-5)


def test_fine_only_path_is_causal():
    model = perturbed_model(ModelConfig.from_name("tiny"))
    ids = torch.randint(0, 256, (1, 20))
    changed = ids.clone()
    changed[0, 10:] = 7
    assert torch.allclose(model.forward_fine_only(ids)[:, :10], model.forward_fine_only(changed)[:, :10], atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", *MIXED_SHAPES])
def test_cached_decoding_equals_recomputation_across_groups_and_the_window(kind):
    config = ModelConfig.from_name("tiny", max_seq_len=64) if kind == "uniform" else mixed_config(kind)
    model = perturbed_model(config)
    decoder = BatchDecoder(model, max_batch=1)
    params = SamplingParams(max_tokens=300, temperature=0.0, stop_at_eos=False)
    prompt = list(b"\x00def parity(x):")
    prompt[0] = 256
    sequence, _ = decoder.add(prompt, params)
    observed = []
    original_step = model.decode_step

    def recording_step(tokens, cache):
        logits = original_step(tokens, cache)
        observed.append(logits[0].clone())
        return logits

    model.decode_step = recording_step
    while not sequence.finished:
        decoder.step()
    model.decode_step = original_step
    assert len(sequence.generated) == 300

    # Recompute: the window policy keeps the newest 3/4 of a full window, then grows again.
    window, expected = list(prompt), []
    tokens = sequence.generated
    for i in range(1, len(tokens)):
        if len(window) >= config.max_seq_len:
            window = decoder.window_after_slide(window)
        window.append(tokens[i - 1])
        expected.append(model(torch.tensor([window]))[0, -1])
    assert len(expected) == len(observed)
    worst = max((a - b).abs().max().item() for a, b in zip(observed, expected))
    assert worst < 1e-4, worst


@pytest.mark.parametrize("kind", ["uniform", *MIXED_SHAPES])
def test_ragged_batch_decoding_matches_single_sequences(kind):
    # The windowed kinds' rings wrap (fine 8-12 bytes, medium 16) while rows sit at different offsets.
    config = ModelConfig.from_name("tiny") if kind == "uniform" else mixed_config(kind, max_seq_len=128)
    model = perturbed_model(config)
    cache = model.new_cache(3)
    sequences = [torch.randint(0, 256, (60,)) for _ in range(3)]
    starts = [3, 6, 21]
    for row, start in enumerate(starts):
        model.prefill(sequences[row][:start], cache, row)
    for step in range(37):
        tokens = torch.stack([s[start + step] for s, start in zip(sequences, starts)])
        logits = model.decode_step(tokens, cache)
        for row, start in enumerate(starts):
            reference = model(sequences[row][: start + step + 1][None])[0, -1]
            assert torch.allclose(logits[row], reference, atol=1e-4)


def test_a_uniform_config_builds_the_original_tensors():
    """Per-scale overrides equal to the uniform shape change nothing: same names, shapes and parameter count."""
    plain = MultiScaleTransformer(ModelConfig.from_name("tiny"))
    spelled = ModelConfig.from_name("tiny", scales={"fine": {"n_layers": 1}, "coarse": {"d_model": 64, "local_window": 0}})
    assert spelled.uniform and ModelConfig.from_name("tiny").uniform and not mixed_config("windows").uniform
    shapes = {k: v.shape for k, v in MultiScaleTransformer(spelled).state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items()}
    assert "fusion.inputs.coarse.weight" in MultiScaleTransformer(mixed_config("widths")).state_dict()


def test_windowed_caches_hold_only_the_window():
    model = MultiScaleTransformer(mixed_config("both", max_seq_len=256))
    cache = model.new_cache(2)
    assert cache.self_k["fine"][0].shape[2] == 12  # the fine window in bytes
    assert cache.self_k["medium"][0].shape[2] == 1 + 256 // 2  # no window: start token + every pair
    assert cache.self_k["coarse"][0].shape[2] == 32 // 4
    assert cache.cross_k["coarse_from_fine"].shape[2] == 1 + 12  # null + the tighter window (fine's)
    assert cache.cross_k["medium_from_coarse"].shape[2] == 1 + 32 // 4
    assert cache.cross_k["coarse_from_medium"].shape[1:] == (4, 1 + 32 // 2, 32)  # the query's heads and width


def test_sequence_longer_than_the_window_is_refused_with_the_numbers():
    model = MultiScaleTransformer(ModelConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="129.*128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = MultiScaleTransformer(ModelConfig.from_name("tiny")).train()
    ids = torch.randint(0, 256, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_decoding_linear_uses_a_fresh_transposed_copy():
    """The decode fast path multiplies by a cached (in, out) copy; an in-place weight update invalidates it."""
    from axl_model.model import Linear

    layer = Linear(8, 4)
    x = torch.randn(1, 8)
    with torch.inference_mode():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # what an optimizer step does
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
    y = layer(x)  # with autograd: the standard path, gradients flow
    y.sum().backward()
    assert layer.weight.grad is not None


CHUNKED_KINDS = ["uniform", *MIXED_SHAPES, "micro-long"]


def chunked_config(kind: str) -> ModelConfig:
    if kind == "uniform":
        return ModelConfig.from_name("tiny")
    if kind == "micro-long":  # its real shapes; a 640-byte window still wraps the fine stack's 512-byte ring
        return ModelConfig.from_name("micro-long", max_seq_len=640)
    return mixed_config(kind, max_seq_len=128)


@pytest.mark.parametrize("kind", CHUNKED_KINDS)
@torch.no_grad()
def test_a_prompt_read_in_chunks_equals_the_one_shot_prefill(kind):
    """extend() chunk by chunk gives the logits of a full forward pass after every chunk, and the cache it leaves
    decodes as the one-shot prefill's does (same logits, same greedy tokens): chunks that end mid-group (the
    last one), cross coarse groups, and outgrow the ring buffers of the local windows."""
    config = chunked_config(kind)
    model = perturbed_model(config)
    T = config.max_seq_len
    # 12 bytes: three coarse groups, not a power of 2; micro-long (slow full passes) checks its last chunk only.
    prompt_length, chunk = T - 27, (128 if kind == "micro-long" else 12)
    sequence = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(3))
    chunked, one_shot = model.new_cache(2), model.new_cache(1)
    model.prefill(sequence[:5], chunked, 0)  # another row with other content must not be disturbed
    done = 0
    while done < prompt_length:
        end = min(prompt_length, done + chunk)
        logits = model.extend(sequence[done:end], chunked, 1)
        if kind != "micro-long":
            reference = model(sequence[:end][None])[0, -1]
            assert torch.allclose(logits, reference, atol=1e-4), (end, (logits - reference).abs().max())
        done = end
    expected = model.prefill(sequence[:prompt_length], one_shot, 0)
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    assert int(chunked.lengths[0]) == 5 and int(chunked.lengths[1]) == prompt_length
    for step in range(T - prompt_length):  # past the window's end at every scale's group boundary
        token = sequence[prompt_length + step].view(1)
        from_chunks, from_one_shot = model.decode_step(token, _row(chunked, 1)), model.decode_step(token, one_shot)
        assert torch.allclose(from_chunks, from_one_shot, atol=1e-4), (step, (from_chunks - from_one_shot).abs().max())
        assert from_chunks.argmax() == from_one_shot.argmax()


def _row(cache, row: int):
    """A one-row view of a cache (lengths included: decoding it advances the original)."""
    rows = slice(row, row + 1)
    return dataclasses.replace(
        cache, lengths=cache.lengths[rows], recent_embeddings=cache.recent_embeddings[rows],
        fused_medium=cache.fused_medium[rows], fused_coarse=cache.fused_coarse[rows],
        self_k={s: [t[rows] for t in ts] for s, ts in cache.self_k.items()},
        self_v={s: [t[rows] for t in ts] for s, ts in cache.self_v.items()},
        cross_k={k: t[rows] for k, t in cache.cross_k.items()}, cross_v={k: t[rows] for k, t in cache.cross_v.items()})


def test_extend_refuses_a_chunk_after_a_partial_group_or_past_the_capacity():
    model = perturbed_model(ModelConfig.from_name("tiny"))
    cache = model.new_cache(1)
    model.extend(torch.arange(6), cache, 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.extend(torch.arange(4), cache, 0)
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="capacity"):
        model.extend(torch.zeros(model.config.max_seq_len + 4, dtype=torch.long), cache, 0)
