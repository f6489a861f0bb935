"""Pick a specialist for `model: "auto"` with transparent rules: keywords and code features, first match wins.

    name, reason = choose_specialist(messages, available={"coder", "chat", "debugger"})

The request text is the string given, or the last user message. Rules are tried in the
order of `RULES`; the first that matches names the wanted specialist. When it is not available, its
`FALLBACKS` chain is tried, then any available specialist (alphabetically). `reason` says which rule fired
and what fallback happened, so the gateway can log it or return it in a header. No torch, no model.

Routing runs on the gateway's event loop, so it must take linear time whatever the text: only the first and last
``ROUTING_WINDOW_CHARS`` characters are read (the ask is at the start of a message, the code or traceback at its
end), no pattern lets an unbounded quantifier overlap another (after ``^``, whitespace but not newlines,
so a line start never scans past its own line), and the ``for … in …:`` shapes are string checks, not regexes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence

__all__ = ["FALLBACKS", "ROUTING_WINDOW_CHARS", "RULES", "Rule", "choose_specialist", "looks_like_code"]

# How much of the request the rules read, from each end: enough for an ask and a traceback, small enough that
# routing a megabyte costs what routing a page does.
ROUTING_WINDOW_CHARS = 4 * 1024

_LANGUAGES = (
    r"rust|go|golang|javascript|js|typescript|ts|java|kotlin|c\+\+|cpp|c#|csharp|c|ruby|php|swift|scala|"
    r"haskell|lua|perl|r|julia|bash|shell|python|dart|elixir|zig"
)


@dataclasses.dataclass(frozen=True)
class Rule:
    specialist: str
    why: str
    pattern: re.Pattern[str] | None = None  # searched in the request text
    needs_code: bool = False  # the request must also contain code


def _rx(pattern: str) -> re.Pattern[str]:
    # Lower-case patterns searched in lower-cased text: IGNORECASE would disable the engine's first-letter skip of
    # alternatives, several times slower on text full of trigger words.
    return re.compile(pattern, re.MULTILINE)


RULES: tuple[Rule, ...] = (
    Rule(
        "translate",
        "asks to translate/convert/port code to another language",
        _rx(rf"\b(translate|convert|port|rewrite)\b.{{0,80}}\b(to|into|in)\s+({_LANGUAGES})\b(?![\w+#])"),
    ),
    Rule(
        "secure",
        "mentions security or vulnerabilities",
        _rx(r"\b(secur\w*|vulnerab\w*|exploit\w*|injection|sanitiz\w*|cve-\d+|unsafe|insecure|xss|csrf)\b"),
    ),
    Rule(
        "testgen",
        "asks for tests",
        _rx(r"\b(write|generate|create|add)\b.{0,40}\b(unit\s*)?tests?\b|\bpytest\b|\bunittest\b|\btest cases?\b"),
    ),
    Rule(
        "debugger",
        "contains a traceback or error",
        _rx(r"traceback \(most recent call last\)|^[^\S\n]*\w*(error|exception): |\b(segfault|stack trace)\b"),
    ),
    Rule(
        "debugger",
        "asks to find a bug",
        _rx(r"\b(bug|debug\w*|doesn'?t work|does not work|crash\w*|wrong (output|result|answer))\b"),
    ),
    Rule("fixer", "asks to fix code", _rx(r"\bfix\w*\b|\brepair\b|\bcorrect (this|the|my)\b"), needs_code=True),
    Rule("docs", "asks for documentation", _rx(r"\bdocstrings?\b|\bdocument(ation)?\b|\bdocs\b")),
    Rule("comment", "asks for comments", _rx(r"\bcomment(s|ed|ing)?\b|\bannotate\b")),
    Rule(
        "refactor",
        "asks to refactor or clean up",
        _rx(r"\brefactor\w*\b|\bclean\s*up\b|\bcleaner\b|\bsimplif(y|ied)\b|\brestructure\b|\bmore readable\b"),
    ),
    Rule(
        "reasoning",
        "asks for step-by-step reasoning or why",
        _rx(
            r"\bstep[- ]by[- ]step\b|\bexplain\b.{0,40}\bwhy\b|^[^\S\n]*why\b|\bwhy (does|is|do|did|would)\b|"
            r"\breason(ing)? (about|through)\b"
        ),
    ),
    Rule(
        "coder",
        "asks for code to be written",
        _rx(
            r"\b(write|implement|create|generate|code|build|make)\b.{0,60}\b(function|class|script|program|"
            r"method|code|snippet|module|algorithm|regex|decorator|parser)\b"
        ),
    ),
    Rule("coder", "contains code", None, needs_code=True),
    Rule("chat", "plain prose"),
)

FALLBACKS: dict[str, tuple[str, ...]] = {
    "debugger": ("fixer", "coder", "reasoning", "chat"),
    "fixer": ("debugger", "coder", "chat"),
    "testgen": ("coder", "chat"),
    "docs": ("comment", "coder", "chat"),
    "comment": ("docs", "coder", "chat"),
    "refactor": ("coder", "fixer", "chat"),
    "secure": ("fixer", "debugger", "coder", "chat"),
    "translate": ("coder", "chat"),
    "reasoning": ("chat", "coder"),
    "chat": ("reasoning", "coder"),
    "coder": ("fixer", "chat", "reasoning"),
}

# Matched at the start of a stripped line (one anchored attempt per line, no overlapping quantifiers).
_CODE_LINE_START = re.compile(
    r"(def |class |import |from \S+ import |return\b|@\w+|#include|(public|private|static) |"
    r"function\s*\w*\s*\(|(const|let|var) \w+ =|fn \w+\()",
    re.IGNORECASE,
)
_IN = re.compile(" in ", re.IGNORECASE)


def _is_block_header(line: str) -> bool:
    """``if …:``, ``while …:`` or ``for … in …:`` (the old ``for .+ in .+:$`` regex, in one linear pass)."""
    if not line.endswith(":"):
        return False
    head = line[:6].lower()
    if head.startswith(("if ", "while ")):
        return len(line) > (3 if head.startswith("if ") else 6) + 1  # something between keyword and colon
    if head.startswith("for "):
        # "for X in Y:" with X and Y non-empty: an " in " that starts after X's first character and ends
        # before the last character preceding the colon.
        found = _IN.search(line, 5)
        return found is not None and found.end() < len(line) - 1
    return False


def _is_code_line(line: str) -> bool:
    stripped = line.lstrip()
    return bool(stripped) and (bool(_CODE_LINE_START.match(stripped)) or _is_block_header(stripped))


def looks_like_code(text: str) -> bool:
    """Code features: a fenced block, or lines that read as Python/C-family code."""
    if "```" in text:
        return True
    lines = text.splitlines()
    code_lines = sum(1 for line in lines if _is_code_line(line))
    braces = sum(1 for line in lines if line.rstrip().endswith(("{", "}", ";")))
    return code_lines >= 1 and (code_lines + braces >= 2 or len(lines) <= 2) or braces >= 3


def routing_window(text: str) -> str:
    """What the rules read: the text itself, or its first and last ROUTING_WINDOW_CHARS characters."""
    if len(text) <= 2 * ROUTING_WINDOW_CHARS:
        return text
    return text[:ROUTING_WINDOW_CHARS] + "\n" + text[-ROUTING_WINDOW_CHARS:]


def _request_text(request: str | Sequence[Mapping[str, object]]) -> str:
    """The text the rules read: the request itself, or the last user message."""
    if isinstance(request, str):
        return request
    user = [m for m in request if m.get("role") == "user"]
    return _content(user[-1]) if user else (_content(request[-1]) if request else "")


def _content(message: Mapping[str, object]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return str(content)


def choose_specialist(request: str | Sequence[Mapping[str, object]], available: Collection[str]) -> tuple[str, str]:
    """The specialist for a request and the reason, restricted to `available` specialists."""
    if not available:
        raise ValueError("no specialist is available to route to")
    text = routing_window(_request_text(request))
    has_code = looks_like_code(text)
    lowered = text.lower()
    wanted, why = "chat", "plain prose"
    for rule in RULES:
        if rule.needs_code and not has_code:
            continue
        if rule.pattern is not None:
            match = rule.pattern.search(lowered)
            if not match:
                continue
            # The words as written, unless lower-casing changed the text's length (a few non-ASCII letters).
            matched = text[match.start() : match.end()] if len(lowered) == len(text) else match.group(0)
            why = f"{rule.why} (matched {matched.strip()[:40]!r})"
        else:
            why = rule.why
        wanted = rule.specialist
        break
    if wanted in available:
        return wanted, f"{wanted}: {why}"
    for alternative in FALLBACKS.get(wanted, ()):
        if alternative in available:
            return alternative, f"{alternative}: {why}; {wanted} is not available"
    fallback = sorted(available)[0]
    return fallback, f"{fallback}: {why}; {wanted} and its fallbacks are not available"
