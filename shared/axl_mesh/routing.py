"""Pick a specialist for `model: "auto"` with transparent rules: keywords and code features, first match wins.

    name, reason = choose_specialist(messages, available={"coder", "chat", "debugger"})

The request text is the string given, or the last user message. Rules are tried in the
order of `RULES`; the first that matches names the wanted specialist. When it is not available, its
`FALLBACKS` chain is tried, then any available specialist (alphabetically). `reason` says which rule fired
and what fallback happened, so the gateway can log it or return it in a header. No torch, no model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence

__all__ = ["FALLBACKS", "RULES", "Rule", "choose_specialist", "looks_like_code"]

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
    return re.compile(pattern, re.IGNORECASE | re.MULTILINE)


RULES: tuple[Rule, ...] = (
    Rule("translate", "asks to translate/convert/port code to another language",
         _rx(rf"\b(translate|convert|port|rewrite)\b.{{0,80}}\b(to|into|in)\s+({_LANGUAGES})\b(?![\w+#])")),
    Rule("secure", "mentions security or vulnerabilities",
         _rx(r"\b(secur\w*|vulnerab\w*|exploit\w*|injection|sanitiz\w*|cve-\d+|unsafe|insecure|xss|csrf)\b")),
    Rule("testgen", "asks for tests",
         _rx(r"\b(write|generate|create|add)\b.{0,40}\b(unit\s*)?tests?\b|\bpytest\b|\bunittest\b|\btest cases?\b")),
    Rule("debugger", "contains a traceback or error",
         _rx(r"Traceback \(most recent call last\)|^\s*\w*(Error|Exception): |\b(segfault|stack trace)\b")),
    Rule("debugger", "asks to find a bug",
         _rx(r"\b(bug|debug\w*|doesn'?t work|does not work|crash\w*|wrong (output|result|answer))\b")),
    Rule("fixer", "asks to fix code", _rx(r"\bfix\w*\b|\brepair\b|\bcorrect (this|the|my)\b"), needs_code=True),
    Rule("docs", "asks for documentation", _rx(r"\bdocstrings?\b|\bdocument(ation)?\b|\bdocs\b")),
    Rule("comment", "asks for comments", _rx(r"\bcomment(s|ed|ing)?\b|\bannotate\b")),
    Rule("refactor", "asks to refactor or clean up",
         _rx(r"\brefactor\w*\b|\bclean\s*up\b|\bcleaner\b|\bsimplif(y|ied)\b|\brestructure\b|\bmore readable\b")),
    Rule("reasoning", "asks for step-by-step reasoning or why",
         _rx(r"\bstep[- ]by[- ]step\b|\bexplain\b.{0,40}\bwhy\b|^\s*why\b|\bwhy (does|is|do|did|would)\b|\breason(ing)? (about|through)\b")),
    Rule("coder", "asks for code to be written",
         _rx(r"\b(write|implement|create|generate|code|build|make)\b.{0,60}\b(function|class|script|program|"
             r"method|code|snippet|module|algorithm|regex|decorator|parser)\b")),
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

_CODE_LINE = _rx(
    r"^\s*(def |class |import |from \S+ import |return\b|if .+:$|for .+ in .+:$|while .+:$|@\w+|#include|"
    r"(public|private|static) |function\s*\w*\s*\(|(const|let|var) \w+ =|fn \w+\()"
)


def looks_like_code(text: str) -> bool:
    """Code features: a fenced block, or lines that read as Python/C-family code."""
    if "```" in text:
        return True
    lines = text.splitlines()
    code_lines = sum(1 for line in lines if _CODE_LINE.search(line))
    braces = sum(1 for line in lines if line.rstrip().endswith(("{", "}", ";")))
    return code_lines >= 1 and (code_lines + braces >= 2 or len(lines) <= 2) or braces >= 3


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


def choose_specialist(
    request: str | Sequence[Mapping[str, object]], available: Collection[str]
) -> tuple[str, str]:
    """The specialist for a request and the reason, restricted to `available` specialists."""
    if not available:
        raise ValueError("no specialist is available to route to")
    text = _request_text(request)
    has_code = looks_like_code(text)
    wanted, why = "chat", "plain prose"
    for rule in RULES:
        if rule.needs_code and not has_code:
            continue
        if rule.pattern is not None:
            match = rule.pattern.search(text)
            if not match:
                continue
            why = f"{rule.why} (matched {match.group(0).strip()[:40]!r})"
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
