"""translate: Python <-> another language, from real parallel source only (files with the same stem, one .py and
one in another language, in the same folder). The standard library ships no such pairs (its C sources are not
installed), so with the default sources the recipe raises `MissingTranslationSources` saying what it needs."""

from __future__ import annotations

import os
from collections.abc import Iterator

from axl_model.recipes.common import Pair, SourceFile

OTHER_LANGUAGES = {".js": "JavaScript", ".ts": "TypeScript", ".rs": "Rust", ".go": "Go", ".c": "C", ".cpp": "C++",
                   ".java": "Java", ".rb": "Ruby", ".kt": "Kotlin", ".swift": "Swift"}
MAX_CHARS = 6000


class MissingTranslationSources(ValueError):
    """No parallel Python / other-language source files were found."""


def counterparts(source: SourceFile) -> list[tuple[str, str]]:
    """(language, text) of each same-stem file in another language next to this .py file."""
    stem = os.path.join(source.root, source.relpath)[: -len(".py")]
    found = []
    for ext, language in sorted(OTHER_LANGUAGES.items()):
        path = stem + ext
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    found.append((language, f.read()))
            except (OSError, UnicodeDecodeError):
                pass
    return found


def translate(source: SourceFile, seed: int) -> Iterator[Pair]:
    if len(source.text) > MAX_CHARS:
        return
    for language, text in counterparts(source):
        if len(text) <= MAX_CHARS:
            yield Pair(f"Translate this Python to {language}:\n{source.text}", text, f"python->{language}")
            yield Pair(f"Translate this {language} to Python:\n{text}", source.text, f"{language}->python")


def check_sources(paths: list[tuple[str, str]]) -> None:
    """Raise MissingTranslationSources unless at least one .py file has a counterpart in another language."""
    for root, relpath in paths:
        stem = os.path.join(root, relpath)[: -len(".py")]
        if any(os.path.isfile(stem + ext) for ext in OTHER_LANGUAGES):
            return
    raise MissingTranslationSources(
        "the translate recipe needs real parallel source: a .py file and a file with the same name in another "
        f"language ({', '.join(sorted(OTHER_LANGUAGES))}) in the same folder; none was found among "
        f"{len(paths)} Python files. Pass sources= folders that hold such pairs."
    )
