"""The specialist catalogue: what each AXL specialist is for, which preset it trains, how its prompts look.

Data only; no torch. One prompt layout serves every specialist so that training pairs and served requests
are rendered the same way (a model only ever sees the layout it was trained on)::

    <|axl:docs|>
    ### Instruction: Write the docstring for this function.
    ### Input:
    def add(a, b):
        return a + b
    ### Output:
    Return the sum of a and b.
    <|end|>

`render_pair(input, target)` gives the training pair (prompt up to and including "### Output:\\n", and the
target followed by the end marker); `render_prompt(input)` gives the same prompt for serving, and
`render_chat(messages)` turns OpenAI-style messages into it (earlier turns become earlier Input/Output
blocks). Generation stops at any of `stop` (the end marker, or the model starting a new block).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

__all__ = [
    "END_MARKER",
    "PRESETS",
    "SPECIALISTS",
    "Specialist",
    "get_specialist",
    "specialist_names",
]

PresetName = Literal["tiny", "comment", "docs", "micro", "testgen", "refactor", "reasoning", "code-1b"]
PRESETS: tuple[str, ...] = ("tiny", "comment", "docs", "micro", "testgen", "refactor", "reasoning", "code-1b")

END_MARKER = "<|end|>"
INPUT_HEADER = "### Input:\n"
OUTPUT_HEADER = "### Output:\n"
BASE_PORT = 8900  # the registry; worker ports are BASE_PORT + port_offset


@dataclasses.dataclass(frozen=True)
class Specialist:
    name: str
    preset: str
    description: str
    instruction: str  # one line telling the model what to do with the input
    port_offset: int  # default worker port = BASE_PORT + port_offset
    temperature: float = 0.2
    top_p: float = 0.95
    max_tokens: int = 512
    stop: tuple[str, ...] = (END_MARKER, "\n" + INPUT_HEADER.rstrip("\n"), "\n<|axl:")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"specialist {self.name!r}: unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        if not 0.0 <= self.temperature <= 2.0 or not 0.0 < self.top_p <= 1.0 or self.max_tokens < 1:
            raise ValueError(
                f"specialist {self.name!r}: bad sampling defaults temperature={self.temperature}, "
                f"top_p={self.top_p}, max_tokens={self.max_tokens}"
            )

    @property
    def default_port(self) -> int:
        return BASE_PORT + self.port_offset

    @property
    def header(self) -> str:
        return f"<|axl:{self.name}|>\n### Instruction: {self.instruction}\n"

    def render_prompt(self, input_text: str, instruction: str | None = None) -> str:
        """The prompt for one input; generation continues right after "### Output:\\n"."""
        header = self.header if instruction is None else f"<|axl:{self.name}|>\n### Instruction: {instruction}\n"
        return f"{header}{INPUT_HEADER}{_with_newline(input_text)}{OUTPUT_HEADER}"

    def render_pair(self, input_text: str, target_text: str) -> tuple[str, str]:
        """A training pair: (prompt_text, target_text); the loss goes on target_text only."""
        return self.render_prompt(input_text), f"{_with_newline(target_text)}{END_MARKER}\n"

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """OpenAI-style messages -> prompt. System text replaces the instruction; earlier turns come first."""
        if not messages:
            raise ValueError("messages must not be empty")
        system = [m["content"] for m in messages if m.get("role") in ("system", "developer")]
        turns = [m for m in messages if m.get("role") not in ("system", "developer")]
        for m in turns:
            if m.get("role") not in ("user", "assistant", "tool"):
                raise ValueError(f"unknown message role {m.get('role')!r}; expected system, user, assistant or tool")
        if not turns or turns[-1]["role"] == "assistant":
            raise ValueError("the last message must come from the user (or a tool)")
        instruction = " ".join(s.strip() for s in system if s.strip()) or self.instruction
        text = f"<|axl:{self.name}|>\n### Instruction: {instruction}\n"
        pending_user: list[str] = []
        for m in turns:
            if m["role"] == "assistant":
                text += f"{INPUT_HEADER}{_with_newline(chr(10).join(pending_user))}{OUTPUT_HEADER}"
                text += f"{_with_newline(m.get('content') or '')}{END_MARKER}\n"
                pending_user = []
            else:
                pending_user.append(m.get("content") or "")
        return f"{text}{INPUT_HEADER}{_with_newline(chr(10).join(pending_user))}{OUTPUT_HEADER}"

    def strip_output(self, generated: str) -> str:
        """Cut generated text at the first stop sequence and drop the trailing newline the layout adds."""
        cut = len(generated)
        for stop in self.stop:
            index = generated.find(stop)
            if index != -1:
                cut = min(cut, index)
        return generated[:cut].removesuffix("\n")

    def sampling(self) -> dict[str, object]:
        """Default sampling parameters, in the OpenAI request's names."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "stop": list(self.stop)}


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


SPECIALISTS: dict[str, Specialist] = {
    s.name: s
    for s in (
        Specialist("coder", "micro", "Writes Python code from a description or a signature with a docstring.",
                   "Write the Python code that does what is asked.", port_offset=1),
        Specialist("debugger", "micro", "Finds the bug in a piece of code, says what it is and gives the fixed code.",
                   "Find the bug, explain it in one line, then give the fixed code.", port_offset=3),
        Specialist("fixer", "micro", "Returns a corrected version of buggy code, code only.",
                   "Return the corrected code.", port_offset=2, temperature=0.1),
        Specialist("refactor", "refactor", "Rewrites code into a cleaner equivalent without changing behaviour.",
                   "Rewrite this code more cleanly without changing its behaviour.", port_offset=4),
        Specialist("testgen", "testgen", "Writes pytest tests for a function.",
                   "Write pytest tests for this code.", port_offset=5, max_tokens=768),
        Specialist("docs", "docs", "Writes the docstring for a function or class.",
                   "Write the docstring for this code.", port_offset=6, max_tokens=256),
        Specialist("comment", "comment", "Adds explanatory comments to code.",
                   "Add helpful comments to this code.", port_offset=7),
        Specialist("secure", "micro", "Rewrites unsafe code (shell injection, eval, unpickling, weak hashes, "
                   "path traversal, unsafe YAML) into the safe form and names the rule.",
                   "Make this code safe; name the rule you applied.", port_offset=8, temperature=0.1),
        Specialist("chat", "micro", "Answers questions about code and Python in prose.",
                   "Answer the question.", port_offset=9, temperature=0.7, top_p=0.9),
        Specialist("reasoning", "reasoning", "Explains code and answers step by step.",
                   "Think step by step, then answer.", port_offset=10, temperature=0.3, max_tokens=768),
        Specialist("translate", "micro", "Translates code between Python and another language.",
                   "Translate this code.", port_offset=11),
    )
}


def specialist_names() -> list[str]:
    return list(SPECIALISTS)


def get_specialist(name: str) -> Specialist:
    """The catalogue entry for `name`; ValueError naming the valid ones otherwise."""
    try:
        return SPECIALISTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown specialist {name!r}; valid specialists: {', '.join(SPECIALISTS)}") from None
