import pytest
import torch

from axl_model import BatchDecoder, Generator, ModelConfig, SamplingParams
from axl_model.generate import Sampler, StopMatcher, greedy_tokens
from axl_model.tokenizer import BOS_ID, EOS_ID
from tests.checkpoints import perturbed_model


@pytest.fixture(scope="module")
def generator():
    return Generator(perturbed_model(ModelConfig.from_name("tiny", max_seq_len=64)))


def test_same_seed_same_output_and_different_seed_differs(generator):
    params = lambda seed: SamplingParams(max_tokens=40, temperature=1.0, top_k=50, top_p=0.95, seed=seed)
    a, b, c = (generator.generate("def f(", params(s)) for s in (1, 1, 2))
    assert a.text == b.text and a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stream_pieces_join_to_the_full_text(generator):
    params = SamplingParams(max_tokens=120, temperature=0.9, seed=5)
    pieces = list(generator.stream("import os\n", params))
    assert "".join(p.text for p in pieces) == generator.generate("import os\n", params).text
    assert pieces[-1].finish_reason in ("stop", "length")
    assert all(p.finish_reason is None for p in pieces[:-1])


def test_stream_never_splits_a_utf8_character(generator):
    # High temperature over raw bytes produces invalid sequences: pieces must still be whole characters.
    for piece in generator.stream("é", SamplingParams(max_tokens=200, temperature=2.0, seed=3)):
        piece.text.encode("utf-8")  # no lone surrogates or halves


def test_max_tokens_beyond_the_window_slides(generator):
    completion = generator.generate("x", SamplingParams(max_tokens=200, temperature=0.0, stop_at_eos=False))
    assert completion.finish_reason == "length" and completion.completion_tokens == 200


def test_batch_generation_equals_one_at_a_time(generator):
    prompts = ["a", "def a_much_longer_prompt(x, y):", "class C:"]
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=11)
    batched = generator.generate_batch(prompts, params, max_batch=2)  # also exercises joining mid-batch
    for prompt, completion in zip(prompts, batched):
        single = generator.generate(prompt, params)
        assert completion.text == single.text and completion.finish_reason == single.finish_reason


def test_stop_sequences_cut_the_text():
    matcher = StopMatcher(["\n\n", "def "])
    emitted = []
    for piece in ["x = 1\n", "\n", "def g"]:
        text, stopped = matcher.push(piece)
        emitted.append(text)
        if stopped:
            break
    assert "".join(emitted) == "x = 1" and stopped


def test_stop_string_is_never_emitted(generator):
    free = generator.generate("q", SamplingParams(max_tokens=60, temperature=0.0, stop_at_eos=False)).text
    stop = free[10:12]
    stopped = generator.generate("q", SamplingParams(max_tokens=60, temperature=0.0, stop=[stop], stop_at_eos=False))
    assert stopped.finish_reason == "stop" and stop not in stopped.text and free.startswith(stopped.text)


def test_repetition_penalty_changes_greedy_output(generator):
    plain = generator.generate("aaaa", SamplingParams(max_tokens=30, temperature=0.0, stop_at_eos=False))
    penalised = generator.generate("aaaa", SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=3.0,
                                                          stop_at_eos=False))
    assert plain.token_ids != penalised.token_ids


def test_logprobs_are_reported(generator):
    completion = generator.generate("a", SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, stop_at_eos=False))
    assert len(completion.logprobs) == 5
    assert all(lp.logprob <= 0 and len(lp.top) == 3 for lp in completion.logprobs)


def test_special_tokens_other_than_eos_are_never_sampled(generator):
    completion = generator.generate("", SamplingParams(max_tokens=100, temperature=3.0, seed=0))
    assert all(t < 256 or t == EOS_ID for t in completion.token_ids)


def test_prompt_longer_than_the_window_is_a_clear_error(generator):
    decoder = BatchDecoder(generator.model, max_batch=1)
    with pytest.raises(ValueError, match="context window is 64"):
        decoder.add(list(range(100)), SamplingParams())


def test_removing_a_sequence_keeps_the_others_exact(generator):
    decoder = BatchDecoder(generator.model, max_batch=3)
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_at_eos=False)
    sequences = [decoder.add(generator.encode(p), params)[0] for p in ("one", "two", "three")]
    decoder.step()
    decoder.remove(sequences[0])  # client went away
    while decoder.active:
        decoder.step()
    for prompt, sequence in zip(("two", "three"), sequences[1:]):
        assert sequence.generated == generator.generate(prompt, params).token_ids


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=-1),
                                 dict(repetition_penalty=0), dict(stop=[""])])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_rows_sliding_their_windows_at_different_steps_match_single_sequences():
    """A batch where each row's window fills (and slides) at a different step still decodes each row exactly."""
    generator = Generator(perturbed_model(ModelConfig.from_name("tiny", max_seq_len=32), seed=1))
    prompts = ["a", "def slide(x):", "class Window:\n    pass\n"]  # 2, 14 and 24 tokens with BOS
    params = SamplingParams(max_tokens=90, temperature=0.0, stop_at_eos=False)
    batched = generator.generate_batch(prompts, params)
    for prompt, completion in zip(prompts, batched):
        assert completion.token_ids == generator.generate(prompt, params).token_ids


def test_a_tiny_repetition_penalty_samples_instead_of_failing(generator):
    # Found by schemathesis (tests/services/api_gateway/test_fuzz.py): repetition_penalty 5e-324 made the
    # penalised logits inf, softmax NaN, and torch.multinomial raised (a 500 from the worker).
    for temperature in (1.0, 0.2):
        params = SamplingParams(max_tokens=4, temperature=temperature, top_p=5e-324, repetition_penalty=5e-324,
                                seed=16)
        assert len(generator.generate("abcabc", params).token_ids) >= 1


def test_a_failed_prefill_frees_its_row(generator, monkeypatch):
    # Found by schemathesis: every failed prefill kept its row, until the batch was full and every later request
    # failed with "no free rows in this batch".
    decoder = BatchDecoder(generator.model, max_batch=1)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    monkeypatch.setattr(generator.model, "prefill", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        decoder.add(generator.encode("x"), params)
    monkeypatch.undo()
    assert decoder.free_rows == 1
    decoder.add(generator.encode("x"), params)


def _drive(decoder, sequences, outputs):
    """What the worker's scheduler does each turn: one prefill chunk, then one decode step; returns who spoke."""
    spoke = []
    for sequence, output in decoder.advance_prefill() + decoder.step():
        outputs[id(sequence)].append(output)
        spoke.append(sequence)
    return spoke


def test_a_chunked_prefill_keeps_the_other_rows_streaming_and_decodes_exactly(generator):
    """A long prompt read 12 tokens per step while two rows decode: they get a token every step, and every row (the
    long one's window slides in chunks too) gives the tokens it gives alone with a one-shot prefill."""
    decoder = BatchDecoder(generator.model, max_batch=3, prefill_chunk=12)
    params = SamplingParams(max_tokens=60, temperature=0.0, stop_at_eos=False)
    prompts = [generator.encode("ab"), generator.encode("def f(x):\n"), list(range(60, 110))]  # 3, 11, 50 tokens
    outputs, sequences = {}, []
    for prompt in prompts[:2]:
        sequence, first = decoder.add(prompt, params)
        outputs[id(sequence)], _ = [first], sequences.append(sequence)
    long_sequence, first = decoder.add(prompts[2], params)
    assert first is None and decoder.free_rows == 0 and len(decoder.active) == 2
    outputs[id(long_sequence)] = []
    sequences.append(long_sequence)
    turns = 0
    while not outputs[id(long_sequence)]:
        spoke = _drive(decoder, sequences, outputs)
        turns += 1
        assert sequences[0] in spoke and sequences[1] in spoke  # the short rows never wait for the prompt
    assert turns == 5  # ceil(50 / 12) chunks, the first token sampled with the last one
    while decoder.active or decoder.prefilling:
        _drive(decoder, sequences, outputs)
    for prompt, sequence in zip(prompts, sequences):
        assert outputs[id(sequence)][-1].finish_reason == "length"
        assert sequence.generated == generator.generate(prompt, params).token_ids


def test_removing_a_sequence_while_its_prompt_is_read_frees_its_row(generator):
    decoder = BatchDecoder(generator.model, max_batch=2, prefill_chunk=4)
    params = SamplingParams(max_tokens=5, temperature=0.0, stop_at_eos=False)
    long_sequence, _ = decoder.add(list(range(60, 90)), params)
    decoder.advance_prefill()
    decoder.remove(long_sequence)
    assert decoder.free_rows == 2 and not decoder.prefilling
    prompt = list(range(70, 80))
    sequence, _ = decoder.add(prompt, params)  # starts from an empty staging row
    while decoder.prefilling or decoder.active:
        decoder.advance_prefill()
        decoder.step()
    assert sequence.generated == generator.generate(prompt, params).token_ids


def test_prefill_chunk_must_be_a_multiple_of_4(generator):
    with pytest.raises(ValueError, match="multiple of 4"):
        BatchDecoder(generator.model, prefill_chunk=6)


def test_ragged_rows_stay_in_phase_order_and_decode_exactly_as_they_join_and_leave(generator):
    """Rows are kept ordered by length mod 4 (so a step's medium/coarse work covers consecutive rows only) through
    joins (direct and chunked) and departures, and every sequence decodes as it does alone."""
    decoder = BatchDecoder(generator.model, max_batch=5, prefill_chunk=8)
    prompts = [list(range(40, 40 + n)) for n in (3, 14, 6, 9, 1, 20, 11, 4, 17, 7)]
    budgets = [5, 31, 12, 40, 8, 22, 3, 27, 15, 33]
    pending = list(zip(prompts, budgets))
    sequences = []
    while pending or decoder.active or decoder.prefilling:
        while pending and decoder.free_rows:
            prompt, budget = pending.pop(0)
            sequence, _ = decoder.add(prompt, SamplingParams(max_tokens=budget, temperature=0.0, stop_at_eos=False))
            sequences.append((prompt, budget, sequence))
        decoder.advance_prefill()
        decoder.step()
        assert decoder._in_phase_order()
        assert [s.row for s in decoder.active] == list(range(len(decoder.active)))
    for prompt, budget, sequence in sequences:
        params = SamplingParams(max_tokens=budget, temperature=0.0, stop_at_eos=False)
        assert sequence.generated == generator.generate(prompt, params).token_ids


def test_batched_greedy_picks_each_rows_sampler_token():
    """`greedy_tokens` (one argmax over the batch) gives a plain greedy row the token its own sampler gives: banned
    ids never win even when largest, EOS wins only where it may, ties go to the first maximum; rows that sample,
    penalise or want logprobs are left to their samplers."""
    vocab = ModelConfig.from_name("tiny", fim=True).vocab_size  # fill-in-the-middle ids after EOS
    logits = torch.randn(7, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, BOS_ID] = 100.0  # banned: never chosen
    logits[1, EOS_ID] = logits[2, EOS_ID] = 100.0  # row 1 ignores EOS, row 2 stops at it
    logits[3, 40] = logits[3, 90] = 50.0  # a tie
    logits[4, vocab - 1] = 100.0  # a fill-in-the-middle id: banned

    def greedy(**extra):
        return SamplingParams(temperature=0.0, **extra)

    params = [greedy(stop_at_eos=True), greedy(stop_at_eos=False), greedy(stop_at_eos=True), greedy(),
              SamplingParams(temperature=0.01), SamplingParams(temperature=0.8, seed=1), greedy(logprobs=2)]
    params[4].temperature = 1e-6  # under GREEDY_BELOW: greedy too
    params.append(greedy(repetition_penalty=1.3))
    logits = torch.cat([logits, logits[:1]])
    samplers = [Sampler(p, vocab) for p in params]
    chosen = greedy_tokens(logits, samplers)
    assert chosen[5:] == [None, None, None]
    for row in range(5):
        assert chosen[row] == samplers[row](logits[row], [])[0]
    assert chosen[0] != BOS_ID and chosen[1] != EOS_ID and chosen[2:4] == [EOS_ID, 40] and chosen[4] <= EOS_ID
    assert greedy_tokens(logits[5:7], samplers[5:7]) == [None, None]
