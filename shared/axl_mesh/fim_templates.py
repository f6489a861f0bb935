"""Fill-in-the-middle templates that editors apply on their side and send as a plain ``prompt``.

Continue's autocomplete with provider ``openai`` (and other editors) does not send ``suffix``: it writes the prefix
and suffix into the FIM template of the model family it guesses from the model's name and posts the result as
``prompt``. For an AXL model with FIM tokens the gateway undoes that, so the model gets its own FIM tokens around
the real prefix and suffix instead of the template's markers as text (which it was never trained on).

A prompt is taken for a template only when it has that template's exact shape: it starts with the first marker,
ends with the last one (prefix-first layouts) and holds the middle one. Where a marker also occurs inside the code
(a file about FIM templates), the split is at the last occurrence of the suffix marker for prefix-first templates,
the first occurrence of the prefix marker for suffix-first ones.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FIM_TEMPLATES", "FimTemplate", "split_fim_template"]


@dataclass(frozen=True)
class FimTemplate:
    """``{start}{first}{middle}{second}{end}``: ``first`` is the prefix (``suffix_first`` False) or the suffix."""

    name: str
    start: str
    middle: str
    end: str = ""
    suffix_first: bool = False

    def split(self, prompt: str) -> tuple[str, str] | None:
        """``(prefix, suffix)`` when ``prompt`` has this template's shape, else None."""
        if not prompt.startswith(self.start) or not prompt.endswith(self.end):
            return None
        body = prompt[len(self.start) : len(prompt) - len(self.end)]
        # Prefix-first: the suffix (after the cursor) is usually the shorter side, so its marker is searched from
        # the end; suffix-first: the same side comes first, so the marker is searched from the start.
        cut = body.find(self.middle) if self.suffix_first else body.rfind(self.middle)
        if cut < 0:
            return None
        first, second = body[:cut], body[cut + len(self.middle) :]
        return (second, first) if self.suffix_first else (first, second)


# Continue's templates (core/autocomplete/templating/AutocompleteTemplate.ts), chosen there by the model's name;
# an AXL model name matches none of its rules, so Continue sends the StarCoder one by default.
FIM_TEMPLATES: tuple[FimTemplate, ...] = (
    FimTemplate("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StableCode, default
    FimTemplate("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    FimTemplate("codellama", "<PRE> ", " <SUF>", " <MID>"),
    FimTemplate("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    FimTemplate("codestral", "[SUFFIX]", "[PREFIX]", suffix_first=True),
)


def split_fim_template(prompt: str) -> tuple[str, str] | None:
    """``(prefix, suffix)`` of a prompt written in one of :data:`FIM_TEMPLATES`; None for any other prompt."""
    for template in FIM_TEMPLATES:
        parts = template.split(prompt)
        if parts is not None:
            return parts
    return None
