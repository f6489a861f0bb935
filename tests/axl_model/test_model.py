"""The model's invariants: strict causality at every scale, and cached decoding equal to recomputation."""
import pytest
import torch

from axl_model import BatchDecoder, ModelConfig, MultiScaleTransformer, SamplingParams
from axl_model.config import PRESETS
from tests.checkpoints import perturbed_model


# Every preset's shape family (width, heads, d_ff) at one layer per scale to keep the test fast.
SHAPE_FAMILIES = [name for name in PRESETS]


@pytest.mark.parametrize("name", SHAPE_FAMILIES)
def test_changing_the_future_never_changes_the_past(name):
    config = ModelConfig.from_name(name, n_layers=1, max_seq_len=64)
    model = perturbed_model(config)
    generator = torch.Generator().manual_seed(1)
    for length in (13, 16, 23, 32):  # multiples of 4 and not
        ids = torch.randint(0, 256, (2, length), generator=generator)
        reference = model(ids)
        for t in range(0, length - 1, 3 if config.d_model > 300 else 1):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, 256, (2, length - t - 1), generator=generator)
            logits = model(changed)
            assert torch.allclose(logits[:, : t + 1], reference[:, : t + 1], atol=1e-5), (name, length, t)
            assert not torch.allclose(logits[:, t + 1:], reference[:, t + 1:])  # the future does matter


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


def test_cached_decoding_equals_recomputation_across_groups_and_the_window():
    config = ModelConfig.from_name("tiny", max_seq_len=64)
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


def test_ragged_batch_decoding_matches_single_sequences():
    model = perturbed_model(ModelConfig.from_name("tiny"))
    cache = model.new_cache(3)
    sequences = [torch.randint(0, 256, (40,)) for _ in range(3)]
    starts = [3, 6, 9]
    for row, start in enumerate(starts):
        model.prefill(sequences[row][:start], cache, row)
    for step in range(25):
        tokens = torch.stack([s[start + step] for s, start in zip(sequences, starts)])
        logits = model.decode_step(tokens, cache)
        for row, start in enumerate(starts):
            reference = model(sequences[row][: start + step + 1][None])[0, -1]
            assert torch.allclose(logits[row], reference, atol=1e-4)


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
