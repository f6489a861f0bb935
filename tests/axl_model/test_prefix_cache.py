"""The prompt prefix cache (axl_model.prefix_cache): a prompt that shares a kept prompt's beginning decodes exactly as
it does after a cold prefill, whatever the cut, the chunking, the local windows and the other rows of the batch."""

import pytest
import torch

from axl_model import BatchDecoder, ModelConfig, SamplingParams
from axl_model.prefix_cache import PrefixCache, StateRecord, _buffers, held
from tests.axl_model.test_model import mixed_config
from tests.checkpoints import perturbed_model

KINDS = {
    "uniform": lambda: ModelConfig.from_name("tiny"),
    "windows": lambda: mixed_config("windows", max_seq_len=128),  # fine ring 8 bytes, medium 16
    "both": lambda: mixed_config("both", max_seq_len=128),  # other widths, a windowed coarse stack
    "micro-long": lambda: ModelConfig.from_name("micro-long", max_seq_len=640),  # real shapes: 512-byte fine ring
}
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, stop_at_eos=False, logprobs=0)


@pytest.fixture(scope="module", params=list(KINDS))
def kind_model(request):
    return request.param, perturbed_model(KINDS[request.param]())


def _prompts(config: ModelConfig) -> tuple[list[list[int]], list[int]]:
    """A base prompt, then prompts sharing its first n bytes (n of every residue mod 4) with other endings, and the
    prefix each should reuse: the longest shared multiple of 4 that leaves 4 bytes to read."""
    generator = torch.Generator().manual_seed(5)
    T = config.max_seq_len
    base = torch.randint(0, 256, (T,), generator=generator).tolist()
    length = T - 24  # room for the batch's decoding
    prompts, reused = [base[:length]], [0]
    for shared, tail in ((length - 3, 9), (length - 6, 2), (length - 13, 7), (length - 20, 20), (9, 6), (length, 3)):
        ending = torch.randint(0, 256, (tail,), generator=generator).tolist()
        while ending[0] == base[shared]:  # share exactly `shared` bytes
            ending[0] = (ending[0] + 1) % 256
        prompts.append(base[:shared] + ending)
        reused.append(min(shared, shared + tail - 4) // 4 * 4)
    prompts.append(base[:length])  # the same prompt again: all but its last group
    reused.append((length - 4) // 4 * 4)
    return prompts, reused


def _decode(model, prompts, prefix_cache, chunk):
    """Each prompt decoded beside another row that joined first (the batch's rows at other lengths)."""
    decoder = BatchDecoder(model, max_batch=3, prefill_chunk=chunk, prefix_cache=prefix_cache)
    results = []
    for index, prompt in enumerate(prompts):
        decoder.add(list(range(40, 47 + index)), PARAMS)
        sequence, first = decoder.add(prompt, PARAMS)
        logprobs = [] if first is None else [first.logprob.logprob]
        while decoder.active or decoder.prefilling:
            for done, output in decoder.advance_prefill() + decoder.step():
                if done is sequence:
                    logprobs.append(output.logprob.logprob)
        results.append((sequence.generated, logprobs))
    return results


@pytest.mark.parametrize("chunk", [0, 12, 256])
def test_a_prompt_restored_from_the_cache_decodes_as_after_a_cold_prefill(kind_model, chunk):
    kind, model = kind_model
    prompts, reused = _prompts(model.config)
    cache = PrefixCache(1 << 30)
    seen = []
    cache.observer = lambda prompt_tokens, reused_tokens: seen.append((prompt_tokens, reused_tokens))
    warm, cold = _decode(model, prompts, cache, chunk), _decode(model, prompts, None, chunk)
    for (warm_tokens, warm_logprobs), (cold_tokens, cold_logprobs) in zip(warm, cold):
        assert warm_tokens == cold_tokens
        assert torch.allclose(torch.tensor(warm_logprobs), torch.tensor(cold_logprobs), atol=1e-4)
    found = [reused_tokens for _, reused_tokens in seen[1::2]]  # the prompts' lookups (each after its other row's)
    if (kind, chunk) in (("windows", 12), ("both", 12)):
        # 12-byte chunks outgrow a ring (the 8-byte fine ring; a 3-token coarse ring of a cross attention, which the
        # first chunk fills with 4, its start token included): a record keeps what the rings held after each chunk,
        # so cuts near the prompt's end are restorable, not a cut at 8 bytes, which needs the first tokens.
        assert found[:3] == reused[:3] and found[5] == 0
        assert all(f in (0, r) for f, r in zip(found, reused))
    else:
        assert found == reused


@torch.no_grad()
def test_a_restored_row_holds_the_caches_of_a_cold_prefill_of_the_prefix(kind_model):
    """State by state: every cache slot a row holds after a cut at P equals a cold prefill's of the first P bytes."""
    model = kind_model[1]
    config = model.config
    prompt = torch.randint(0, 256, (config.max_seq_len - 8,), generator=torch.Generator().manual_seed(6))
    decoder = BatchDecoder(model, max_batch=2, prefix_cache=PrefixCache(1 << 30))
    decoder.add(prompt.tolist(), SamplingParams(max_tokens=0))  # max_tokens 0: nothing read
    assert len(decoder.prefix_cache) == 0
    decoder._prefill(prompt.tolist(), 0, (None, 0))
    (entry,) = decoder.prefix_cache.entries
    for cut in (4, 20, 36, len(prompt) // 2 // 4 * 4, (len(prompt) - 4) // 4 * 4):
        assert entry.record.usable(cut, decoder.cache)
        restored, cold = decoder.cache, model.new_cache(1)
        entry.record.restore(cut, restored, 1)
        model.prefill(prompt[:cut], cold, 0)
        assert int(restored.lengths[1]) == cut
        for (mine, base, factor), (theirs, _, _) in zip(_buffers(restored), _buffers(cold)):
            ring = mine.shape[2] - base
            slots = base + torch.arange(max(0, held(cut, factor) - ring), held(cut, factor)) % ring
            slots = torch.cat([torch.arange(base), slots])
            assert torch.allclose(mine[1][:, slots], theirs[0][:, slots], atol=1e-5)


def test_entries_share_what_they_restored_and_stay_within_the_budget():
    model = perturbed_model(ModelConfig.from_name("tiny"))
    prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(7)).tolist()
    cache = PrefixCache(1 << 30)
    decoder = BatchDecoder(model, max_batch=1, prefix_cache=cache)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    decoder.add(prompt, params)
    one = cache.nbytes
    decoder.add(prompt[:-10] + [1, 2, 3, 4, 5], params)  # an editor's next request: the end changed
    assert len(cache) == 2 and cache.reused_tokens == 88
    assert one < cache.nbytes < one * 1.3  # the second entry holds views of the first's tensors for 88 bytes
    decoder.add(prompt[:-10] + [1, 2, 3, 4, 5, 6, 7, 8, 9], params)  # extends the second: it replaces it
    assert len(cache) == 2
    cache.max_bytes = one  # a budget for one prompt: the least recently used entries go
    decoder.add([9] * 80, params)
    assert len(cache) == 1 and cache.nbytes <= one and cache.entries[0].tokens.tolist() == [9] * 80
    cache.max_bytes = 0  # nothing fits: nothing kept
    decoder.add(prompt, params)
    assert len(cache) == 0 and cache.nbytes == 0


def test_a_record_that_lost_tokens_to_a_ring_refuses_cuts_it_cannot_restore():
    model = perturbed_model(mixed_config("windows", max_seq_len=128))  # fine ring: 8 bytes
    cache = model.new_cache(1)
    record = StateRecord.empty(cache)
    model.extend(torch.arange(40), cache, 0)  # 40 bytes in one call: the fine ring keeps the last 8
    record.after(cache, 0, 0, 40)
    assert record.usable(40, cache) and not record.usable(36, cache) and not record.usable(44, cache)
    model.extend(torch.arange(8), cache, 0)
    record.after(cache, 0, 40, 48)  # the tokens [32, 48) held: cuts whose last 8 bytes are among them
    assert record.usable(48, cache) and record.usable(44, cache) and record.usable(40, cache)
    assert not record.usable(36, cache) and not record.usable(52, cache) and not record.usable(46, cache)


@torch.inference_mode()  # the decoder's tensors (the record poisoned below) are inference tensors
@pytest.mark.parametrize("read", ["kept", "other"])
@pytest.mark.parametrize("decoded", [1, 24])
def test_a_restore_into_a_row_that_read_a_prompt_sharing_the_prefix_writes_only_what_differs(kind_model, decoded, read):
    """A row that read a prompt keeps the tokens of the bytes it shares with the one restored: a restore writes the
    rest (the bytes they do not share, the tokens its rings lost to later ones, here to `decoded` bytes) and the row
    then holds a cold prefill's state of the prefix. A record poisoned where the row holds its tokens shows they are
    not read. The row read the kept prompt itself (the editor's request before), or another one after it."""
    kind, model = kind_model
    config = model.config
    generator = torch.Generator().manual_seed(8)
    kept = torch.randint(0, 256, (config.max_seq_len - 40,), generator=generator).tolist()
    half = len(kept) // 2
    other = kept[:half] + [(kept[half] + 1) % 256] + kept[half + 1 :]  # shares the first `half` bytes
    new = kept[:-10] + [(kept[-10] + 1) % 256] * 6  # shares all but the last 10 with `kept`, `half` with `other`
    prompts, shared = ([kept], len(kept)) if read == "kept" else ([kept, other], half)
    params = SamplingParams(max_tokens=decoded, temperature=0.0, stop_at_eos=False)
    decoder = BatchDecoder(model, max_batch=1, prefix_cache=PrefixCache(1 << 30))
    for prompt in prompts:  # each in row 0, decoded after its prompt
        decoder.add(prompt, params)
        while decoder.active:
            decoder.step()
    assert int(decoder.cache.lengths[0]) == len(prompts[-1]) + decoded - 1
    entry, cut = decoder.prefix_cache.lookup(new, decoder.cache)
    assert entry.tokens.tolist() == kept and cut == (len(kept) - 10) // 4 * 4
    if kind == "uniform":  # no ring: the row still holds every token of the shared bytes
        for record, (_, _, factor) in zip(entry.record.buffers, _buffers(decoder.cache)):
            for first, values in record.runs:
                values[:, : max(0, held(shared, factor) - first)] = float("nan")
    decoder._restore((entry, cut), 0)
    cold = model.new_cache(1)
    model.prefill(torch.tensor(new[:cut]), cold, 0)
    for (mine, base, factor), (theirs, _, _) in zip(_buffers(decoder.cache), _buffers(cold)):
        ring = mine.shape[2] - base
        slots = base + torch.arange(max(0, held(cut, factor) - ring), held(cut, factor)) % ring
        slots = torch.cat([torch.arange(base), slots])
        assert torch.allclose(mine[0][:, slots], theirs[0][:, slots], atol=1e-5)
