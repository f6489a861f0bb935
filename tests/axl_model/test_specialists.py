"""The specialist catalogue: presets, prompt layout shared by training and serving, lookups."""

import pytest

from axl_model.specialists import END_MARKER, PRESETS, SPECIALISTS, get_specialist, specialist_names

EXPECTED = {"coder", "debugger", "fixer", "refactor", "testgen", "docs", "comment", "secure", "chat",
            "reasoning", "translate"}


def test_catalogue_has_every_specialist_with_its_preset():
    assert set(SPECIALISTS) == EXPECTED == set(specialist_names())
    assert get_specialist("comment").preset == "comment"
    assert get_specialist("docs").preset == "docs"
    assert get_specialist("coder").preset == "micro"
    assert get_specialist("testgen").preset == "testgen"
    assert get_specialist("refactor").preset == "refactor"
    assert get_specialist("reasoning").preset == "reasoning"
    assert all(s.preset in PRESETS for s in SPECIALISTS.values())


def test_ports_are_distinct_and_above_the_registry():
    ports = [s.default_port for s in SPECIALISTS.values()]
    assert len(set(ports)) == len(ports)
    assert min(ports) == 8901


def test_unknown_specialist_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid specialists: coder, debugger"):
        get_specialist("poet")


def test_pair_prompt_equals_serving_prompt_and_target_ends_with_the_marker():
    docs = get_specialist("docs")
    prompt, target = docs.render_pair("def add(a, b):\n    return a + b", "Return a + b.")
    assert prompt == docs.render_prompt("def add(a, b):\n    return a + b")
    assert prompt.startswith("<|axl:docs|>\n### Instruction: ")
    assert prompt.endswith("### Output:\n")
    assert target == f"Return a + b.\n{END_MARKER}\n"
    # what the model is trained to produce is exactly what strip_output recovers
    assert docs.strip_output(target) == "Return a + b."


def test_single_user_message_renders_like_the_training_prompt():
    coder = get_specialist("coder")
    assert coder.render_chat([{"role": "user", "content": "reverse a list"}]) == coder.render_prompt("reverse a list")


def test_chat_with_history_and_system():
    chat = get_specialist("chat")
    prompt = chat.render_chat([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
        {"role": "user", "content": "And a tuple?"},
    ])
    assert prompt.startswith("<|axl:chat|>\n### Instruction: Be brief.\n")
    assert "What is a list?\n### Output:\nA mutable sequence.\n<|end|>\n### Input:\nAnd a tuple?\n" in prompt
    assert prompt.endswith("### Output:\n")
    with pytest.raises(ValueError, match="last message"):
        chat.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(ValueError, match="unknown message role"):
        chat.render_chat([{"role": "wizard", "content": "hi"}])


def test_strip_output_stops_at_a_new_block():
    coder = get_specialist("coder")
    assert coder.strip_output("x = 1\n### Input:\nmore") == "x = 1"
    assert coder.sampling()["stop"] == list(coder.stop)


def test_bad_defaults_are_rejected():
    from axl_model.specialists import Specialist

    with pytest.raises(ValueError, match="unknown preset"):
        Specialist("x", "huge", "d", "i", port_offset=20)


def test_default_ports_follow_the_mesh_layout():
    assert get_specialist("coder").default_port == 8901
    assert get_specialist("debugger").default_port == 8903
