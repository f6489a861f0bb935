"""Editors' fill-in-the-middle templates sent as plain prompts are split back into prefix and suffix."""

from __future__ import annotations

import pytest

from axl_mesh.fim_templates import split_fim_template
from axl_mesh.protocol import CompletionRequest

PREFIX, SUFFIX = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"

# What Continue's templates (AutocompleteTemplate.ts) make of PREFIX and SUFFIX.
CONTINUE_TEMPLATES = {
    "starcoder": f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>",
    "qwen": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
    "codellama": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>",
    "deepseek": f"<｜fim▁begin｜>{PREFIX}<｜fim▁hole｜>{SUFFIX}<｜fim▁end｜>",
    "codestral": f"[SUFFIX]{SUFFIX}[PREFIX]{PREFIX}",
}


@pytest.mark.parametrize("name", CONTINUE_TEMPLATES)
def test_each_template_gives_back_prefix_and_suffix(name: str) -> None:
    assert split_fim_template(CONTINUE_TEMPLATES[name]) == (PREFIX, SUFFIX)


def test_empty_sides_and_markers_inside_the_code() -> None:
    assert split_fim_template("<fim_prefix><fim_suffix><fim_middle>") == ("", "")
    code_about_fim = 'MARK = "<fim_suffix>"\n'  # the prefix quotes the marker: the split is at the last one
    assert split_fim_template(f"<fim_prefix>{code_about_fim}<fim_suffix>x<fim_middle>") == (code_about_fim, "x")


@pytest.mark.parametrize("prompt", [
    "def f():\n    ", "<fim_prefix>no suffix marker<fim_middle>", "<fim_prefix>a<fim_suffix>b",  # not closed
    "x <fim_prefix>a<fim_suffix>b<fim_middle>",  # does not start with the marker
    "<fim_prefix>a<|fim_suffix|>b<fim_middle>",  # mixed families
])
def test_other_prompts_are_not_templates(prompt: str) -> None:
    assert split_fim_template(prompt) is None


def test_completion_request_infill() -> None:
    templated = CompletionRequest(model="m", prompt=CONTINUE_TEMPLATES["starcoder"])
    assert templated.infill(templated.prompts()[0], fim=True) == (PREFIX, SUFFIX)
    assert templated.infill(templated.prompts()[0], fim=False) == (CONTINUE_TEMPLATES["starcoder"], None)
    explicit = CompletionRequest(model="m", prompt="<fim_prefix>a<fim_suffix>b<fim_middle>", suffix="s")
    assert explicit.infill(explicit.prompts()[0], fim=True) == (explicit.prompts()[0], "s")  # suffix given: as sent
