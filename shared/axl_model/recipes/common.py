"""Shared pieces of the data recipes: source files, functions pulled out of them, pairs. No torch."""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import io
import os
import random
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterator

MAX_FUNCTION_LINES = 80
MAX_FUNCTION_CHARS = 4000
MIN_FUNCTION_LINES = 3


@dataclasses.dataclass(frozen=True)
class Pair:
    source_code: str
    target_code: str
    rule: str


@dataclasses.dataclass
class SourceFile:
    root: str  # the source root the file was found under
    relpath: str  # relative to root, "/"-separated
    text: str

    @functools.cached_property
    def tree(self) -> ast.Module | None:
        try:
            return ast.parse(self.text)
        except (SyntaxError, ValueError):
            return None

    @property
    def module_name(self) -> str:
        name = self.relpath.removesuffix(".py").replace("/", ".")
        return name.removesuffix(".__init__")

    def rng(self, seed: int, salt: str = "") -> random.Random:
        """A generator seeded by (seed, file, salt): a file's pairs do not depend on which other files are read."""
        digest = hashlib.sha256(f"{seed}:{self.relpath}:{salt}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))


@dataclasses.dataclass
class Function:
    node: ast.FunctionDef | ast.AsyncFunctionDef
    source: str  # dedented, decorators included
    first_line: int  # 1-based line of `source`'s first line in the file
    indent: int  # columns removed by the dedent
    qualname: str
    docstring: str | None

    @functools.cached_property
    def tree(self) -> ast.FunctionDef | ast.AsyncFunctionDef:
        return ast.parse(self.source).body[0]  # positions relative to `source`

    @property
    def name(self) -> str:
        return self.node.name


def default_source_root() -> str:
    return sysconfig.get_paths()["stdlib"]


_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3", "ensurepip"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def is_test_path(relpath: str) -> bool:
    parts = relpath.split("/")
    return any(p in _TEST_DIRS for p in parts[:-1]) or parts[-1].startswith("test_")


def iter_source_paths(roots: list[str], include_tests: bool = False) -> list[tuple[str, str]]:
    """(root, relpath) of every .py file under the roots, sorted; site-packages and test dirs skipped."""
    found = []
    for root in roots:
        root = os.path.abspath(root)
        if os.path.isfile(root):
            found.append((os.path.dirname(root), os.path.basename(root)))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            dirnames[:] = sorted(
                d for d in dirnames
                if d not in _SKIPPED_DIRS and not d.startswith(".")
                and (include_tests or d not in _TEST_DIRS)
            )
            for name in sorted(filenames):
                if name.endswith(".py"):
                    relpath = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if include_tests or not is_test_path(relpath):
                        found.append((root, relpath))
    return sorted(found, key=lambda item: (item[0], item[1]))


def read_source(root: str, relpath: str) -> SourceFile | None:
    try:
        with open(os.path.join(root, relpath), "rb") as f:
            raw = f.read()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return SourceFile(root, relpath, raw.decode(encoding))
    except (OSError, UnicodeDecodeError, SyntaxError, LookupError):
        return None


def iter_functions(source: SourceFile) -> Iterator[Function]:
    """Functions and methods of reasonable size, dedented, with their qualified names."""
    if source.tree is None:
        return
    lines = source.text.splitlines(keepends=True)

    def visit(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                chunk = lines[start - 1 : child.end_lineno]
                n_lines = len(chunk)
                text = "".join(chunk)
                if MIN_FUNCTION_LINES <= n_lines <= MAX_FUNCTION_LINES and len(text) <= MAX_FUNCTION_CHARS:
                    dedented = textwrap.dedent(text)
                    indent = len(chunk[0]) - len(chunk[0].lstrip())
                    try:
                        ast.parse(dedented)
                    except SyntaxError:
                        pass
                    else:
                        yield Function(child, dedented if dedented.endswith("\n") else dedented + "\n", start,
                                       indent, prefix + child.name, ast.get_docstring(child))
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")

    yield from visit(source.tree, "")


def replace_segment(text: str, node: ast.AST, replacement: str) -> str:
    """`text` with the source of `node` (positions relative to `text`) replaced."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode("utf-8")))
    data = text.encode("utf-8")
    start = offsets[node.lineno - 1] + node.col_offset
    end = offsets[node.end_lineno - 1] + node.end_col_offset
    return (data[:start] + replacement.encode("utf-8") + data[end:]).decode("utf-8")


def without_docstring(function: Function) -> str | None:
    """The function's source with its docstring statement removed (None if that leaves no body)."""
    body = function.tree.body
    if not body or not isinstance(body[0], ast.Expr) or not isinstance(getattr(body[0], "value", None), ast.Constant) \
            or not isinstance(body[0].value.value, str):
        return None
    if len(body) == 1:
        return None
    lines = function.source.splitlines(keepends=True)
    doc = body[0]
    after = lines[doc.end_lineno :]
    if after and not after[0].strip():
        after = after[1:]  # the blank line that separated the docstring from the code
    kept = lines[: doc.lineno - 1] + after
    # a docstring sharing its line with the def (def f(): "doc") cannot be cut by lines
    if doc.lineno == function.tree.lineno:
        return None
    result = "".join(kept)
    try:
        ast.parse(result)
    except SyntaxError:
        return None
    return result


def first_paragraph(doc: str) -> str:
    return doc.strip().split("\n\n")[0].strip()


def same_ast(a: str, b: str) -> bool:
    try:
        return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))
    except SyntaxError:
        return False


def parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False
