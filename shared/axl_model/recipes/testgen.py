"""testgen: function -> tests.

- doctests: the `>>>` examples of a function's docstring become a pytest function of asserts (only examples
  whose source is one expression and whose expected output is one Python literal);
- the standard library's own tests: where `test/test_<module>.py` (or the `test/test_<package>/` folder)
  exists, a top-level function of the module is paired with the test methods that call it.
"""

from __future__ import annotations

import ast
import doctest
import functools
import os
import textwrap
from collections.abc import Iterator

from axl_model.recipes.common import Pair, SourceFile, iter_functions, parses, without_docstring

MAX_TESTS_PER_FUNCTION = 3
MAX_TEST_LINES = 40


def _doctest_asserts(docstring: str) -> list[str]:
    asserts = []
    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:
        return []
    for example in examples:
        source, want = example.source.strip(), example.want.strip()
        if not want or "\n" in source or "\n" in want:
            continue
        try:
            expression = ast.parse(source, mode="eval")
            ast.literal_eval(want)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(expression.body, ast.Constant):
            continue
        asserts.append(f"assert {source} == {want}")
    return asserts


def _doctest_pairs(source: SourceFile) -> Iterator[Pair]:
    for function in iter_functions(source):
        if not function.docstring or ">>>" not in function.docstring or "." in function.qualname:
            continue
        asserts = _doctest_asserts(function.docstring)
        if not asserts:
            continue
        body = textwrap.indent("\n".join(asserts), "    ")
        test = f"from {source.module_name} import {function.name}\n\n\ndef test_{function.name}():\n{body}\n"
        if not parses(test):
            continue
        shown = without_docstring(function) or function.source
        yield Pair(shown, test, "doctest->pytest")


@functools.lru_cache(maxsize=64)
def _test_methods(root: str, module: str) -> tuple[tuple[str, frozenset[str]], ...]:
    """(dedented source, names it calls) of each test_* function in the stdlib tests for `module`."""
    top, leaf = module.split(".")[0], module.split(".")[-1]
    candidates = [f"test/test_{top}.py", f"test/test_{leaf}.py"]
    package_dir = os.path.join(root, "test", f"test_{top}")
    if os.path.isdir(package_dir):
        candidates += [f"test/test_{top}/{name}" for name in sorted(os.listdir(package_dir)) if name.endswith(".py")]
    found = []
    for relpath in dict.fromkeys(candidates):
        path = os.path.join(root, relpath)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test") \
                    and node.end_lineno - node.lineno < MAX_TEST_LINES:
                called = frozenset(
                    (n.func.id if isinstance(n.func, ast.Name) else n.func.attr)
                    for n in ast.walk(node)
                    if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
                )
                found.append((textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])), called))
    return tuple(found)


def _stdlib_test_pairs(source: SourceFile) -> Iterator[Pair]:
    tests = _test_methods(source.root, source.module_name)
    if not tests:
        return
    for function in iter_functions(source):
        if "." in function.qualname or function.name.startswith("_"):
            continue
        matching = [text for text, called in tests if function.name in called]
        for text in matching[:MAX_TESTS_PER_FUNCTION]:
            yield Pair(function.source, text, "stdlib-test")


def testgen(source: SourceFile, seed: int) -> Iterator[Pair]:
    yield from _doctest_pairs(source)
    yield from _stdlib_test_pairs(source)
