"""Fitting prompts into the window: what is kept, what is dropped, and that the result always fits."""

from __future__ import annotations

import pytest

from axl_model.prompt_fit import FIM_PREFIX_SHARE, cut_block, fit_chat, fit_fim, fit_text, generation_reserve
from axl_model.specialists import get_specialist
from axl_model.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer(fim=True)
CODER = get_specialist("coder")


def test_reserve_is_max_tokens_up_to_a_quarter_of_the_window() -> None:
    assert generation_reserve(16, 1024) == 16
    assert generation_reserve(4096, 1024) == 256
    assert generation_reserve(0, 1024) == 0


def test_a_prompt_that_fits_is_untouched() -> None:
    for budget in (None, 100):
        fitted = fit_text(TOKENIZER, "x = 1\n", budget)
        assert (fitted.ids, fitted.text, fitted.dropped) == (TOKENIZER.encode("x = 1\n"), "x = 1\n", 0)
    assert fit_text(TOKENIZER, "y" * 5000, None).dropped == 0  # no budget: the caller checks the window


def test_plain_prompt_keeps_its_end_on_a_character_boundary() -> None:
    text = "é" * 50 + "tail"  # 2 bytes per é
    fitted = fit_text(TOKENIZER, text, 20)
    assert len(fitted.ids) <= 20 and text.endswith(fitted.text) and fitted.text.endswith("tail")
    assert fitted.text.lstrip("é") == "tail" and "\ufffd" not in fitted.text
    assert fitted.dropped == len(TOKENIZER.encode(text)) - len(fitted.ids)


def test_fim_keeps_the_prefix_end_and_suffix_start_prefix_weighted() -> None:
    prefix, suffix = "p" * 3000 + "CURSOR_BEFORE", "CURSOR_AFTER" + "s" * 3000
    fitted = fit_fim(TOKENIZER, prefix, suffix, 1004)
    room = 1000  # budget less BOS and the three FIM tokens
    assert len(fitted.ids) == 1004  # the suffix takes what the prefix's whole-block cut leaves
    kept_prefix = bytes(fitted.ids[2:fitted.ids.index(259)]).decode()
    assert kept_prefix.endswith("CURSOR_BEFORE") and fitted.text == kept_prefix
    share, block = int(room * FIM_PREFIX_SHARE), cut_block(room)
    assert share - block < len(kept_prefix) <= share and (len(prefix) - len(kept_prefix)) % block == 0
    kept_suffix = TOKENIZER.decode(fitted.ids[fitted.ids.index(259) + 1:])
    assert kept_suffix.startswith("CURSOR_AFTER") and len(kept_suffix) == room - len(kept_prefix)
    assert fitted.dropped == len(prefix) + len(suffix) - room


@pytest.mark.parametrize("prefix_len, suffix_len", [(3000, 20), (20, 3000)])
def test_fim_gives_the_short_sides_room_to_the_long_one(prefix_len: int, suffix_len: int) -> None:
    fitted = fit_fim(TOKENIZER, "p" * prefix_len, "s" * suffix_len, 504)
    # Every byte of the room used, but for the part of a block the long prefix's whole-block cut leaves.
    assert 504 - cut_block(500) < len(fitted.ids) <= 504 and (suffix_len > prefix_len) == (len(fitted.ids) == 504)
    short = min(prefix_len, suffix_len)
    assert TOKENIZER.decode(fitted.ids).count("p" if prefix_len == short else "s") == short


def _kept_start(whole: str, kept: str) -> int:
    """Where the kept end of `whole` starts, in bytes."""
    assert whole.endswith(kept)
    return len(whole.encode()) - len(kept.encode())


def test_a_growing_prompt_keeps_its_start_until_it_outgrows_a_block() -> None:
    """An editor's file past the window, typed at its end: each request keeps the same start (the prefix cache
    restores it) until the text has grown by a block, and the prompt always fits and reports what it dropped."""
    file = "".join(f"line_{i} = compute({i}) + é\n" for i in range(200))  # multi-byte characters too
    budget, room = 300, 299
    starts = []
    for end in range(4000, 4400, 3):  # typed three bytes at a time
        text = file[:end]
        fitted = fit_text(TOKENIZER, text, budget)
        assert room - cut_block(room) - 2 < len(fitted.ids) - 1 <= room  # a character boundary moves it <= 1 byte
        assert fitted.dropped == len(TOKENIZER.encode(text)) - len(fitted.ids) and "\ufffd" not in fitted.text
        starts.append(_kept_start(text, fitted.text))
    assert starts == sorted(starts)
    moves = sum(a != b for a, b in zip(starts, starts[1:]))
    grown = len(file[:4397].encode()) - len(file[:4000].encode())
    assert moves <= grown // cut_block(room) + 1 and len(starts) > 10 * (moves + 1)  # most requests keep the start


def test_a_growing_fim_prefix_keeps_its_start_and_the_suffix_takes_the_rest() -> None:
    prefix, suffix = "".join(f"x{i} = {i}\n" for i in range(600)), "return x\n" * 200
    starts = []
    for end in range(3000, 3200, 2):
        fitted = fit_fim(TOKENIZER, prefix[:end], suffix, 516)
        assert len(fitted.ids) == 516  # the long suffix fills what the prefix leaves
        assert fitted.dropped == len(TOKENIZER.encode_fim(prefix[:end], suffix)) - 516
        starts.append(_kept_start(prefix[:end], fitted.text))
    assert len(set(starts)) <= 200 // cut_block(512) + 2 and len(set(starts)) < len(starts) // 10


def system_and_tools_conversation() -> list[dict[str, str]]:
    return [{"role": "system", "content": "START-OF-SYSTEM " + "Be careful with tools. " * 60 + "END-OF-SYSTEM"},
            {"role": "user", "content": "old question " * 10},
            {"role": "assistant", "content": "old answer " * 10},
            {"role": "user", "content": "recent question"},
            {"role": "assistant", "content": "recent answer"},
            {"role": "tool", "content": "tool output"},
            {"role": "user", "content": "LATEST: write fizzbuzz"}]


def test_chat_keeps_latest_message_recent_turns_and_system_end() -> None:
    messages = system_and_tools_conversation()
    whole = TOKENIZER.encode(CODER.render_chat(messages))
    fitted = fit_chat(CODER, TOKENIZER, messages, 768)
    assert len(whole) > 768 >= len(fitted.ids) > 600  # the room is used, not wasted
    assert fitted.dropped == len(whole) - len(fitted.ids)
    text = fitted.text
    assert text.endswith("### Input:\ntool output\nLATEST: write fizzbuzz\n### Output:\n")
    assert "recent question" in text and "recent answer" in text
    assert "old question" not in text and "old answer" not in text  # dropped from the oldest, whole exchanges
    assert "END-OF-SYSTEM" in text and "START-OF-SYSTEM" not in text  # the system prompt's end
    assert text.startswith("<|axl:coder|>\n### Instruction: ")


def test_chat_latest_message_alone_over_budget_keeps_its_end() -> None:
    messages = [{"role": "system", "content": "sys " * 100}, {"role": "user", "content": "a" * 2000 + "THE END"}]
    fitted = fit_chat(CODER, TOKENIZER, messages, 300)
    assert 295 <= len(fitted.ids) <= 300
    assert fitted.text.endswith("THE END\n### Output:\n")
    # The system prompt's end gets no more room than the specialist's instruction it replaces would take.
    instruction = fitted.text.split("\n")[1].removeprefix("### Instruction: ")
    assert len(instruction) <= len(CODER.instruction)


def test_chat_that_fits_is_rendered_as_is() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert fit_chat(CODER, TOKENIZER, messages, 768).text == CODER.render_chat(messages)
    with pytest.raises(ValueError):
        fit_chat(CODER, TOKENIZER, [{"role": "assistant", "content": "x"}], 768)


@pytest.mark.parametrize("budget", [40, 64, 96, 200, 500, 1000])
def test_chat_always_fits_its_budget(budget: int) -> None:
    fitted = fit_chat(CODER, TOKENIZER, system_and_tools_conversation(), budget)
    assert len(fitted.ids) <= budget


def test_chat_window_smaller_than_the_template_keeps_the_latest_turns_end() -> None:
    messages = [{"role": "user", "content": "EARLIER"}, {"role": "assistant", "content": "ANSWER"},
                {"role": "user", "content": "latest question"}]
    fitted = fit_chat(CODER, TOKENIZER, messages, 48)  # less than the coder's instruction line needs
    assert len(fitted.ids) <= 48 and fitted.text.endswith("latest question\n### Output:\n")
    assert "EARLIER" not in fitted.text and "ANSWER" not in fitted.text
