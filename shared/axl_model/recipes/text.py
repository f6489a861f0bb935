"""Recipes read straight off real code: coder, docs, comment, chat, reasoning."""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator

from axl_model.recipes.common import Function, Pair, SourceFile, first_paragraph, iter_functions, without_docstring

MODULE_CHUNK_CHARS = 3000


def _signature_and_docstring(function: Function) -> str | None:
    """The function up to and including its docstring (HumanEval's prompt shape)."""
    body = function.tree.body
    if function.docstring is None or len(body) < 2:
        return None
    lines = function.source.splitlines(keepends=True)
    return "".join(lines[: body[0].end_lineno])


def coder(source: SourceFile, seed: int) -> Iterator[Pair]:
    for function in iter_functions(source):
        if function.docstring:
            summary = function.docstring.strip().splitlines()[0].strip()
            if len(summary) >= 12:
                yield Pair(f"{summary}\nName the function {function.name}.", function.source, "docline->function")
            head = _signature_and_docstring(function)
            if head is not None:
                # the function's body as the target, exactly the HumanEval completion shape
                yield Pair(head, function.source[len(head):], "signature+docstring->body")
    yield from _module_chunks(source)


def _module_chunks(source: SourceFile) -> Iterator[Pair]:
    """Raw code: the file in chunks of whole top-level statements, each continuing from the last lines before it."""
    tree = source.tree
    if tree is None or not tree.body:
        return
    lines = source.text.splitlines(keepends=True)
    chunk_start = 1
    for statement in tree.body + [None]:
        end = len(lines) + 1 if statement is None else min(
            [statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])
        size = sum(len(line) for line in lines[chunk_start - 1 : end - 1])
        if (size >= MODULE_CHUNK_CHARS or statement is None) and end > chunk_start:
            target = "".join(lines[chunk_start - 1 : end - 1])
            context = "".join(lines[max(0, chunk_start - 6) : chunk_start - 1])
            if target.strip() and len(target) <= 4 * MODULE_CHUNK_CHARS:
                yield Pair(f"Continue the Python module {source.relpath}.\n{context}", target, "module-chunk")
            chunk_start = end


def docs(source: SourceFile, seed: int) -> Iterator[Pair]:
    for function in iter_functions(source):
        if function.docstring and len(function.docstring.strip()) >= 12:
            stripped = without_docstring(function)
            if stripped is not None:
                yield Pair(stripped, function.docstring.strip(), "function->docstring")
    tree = source.tree
    if tree is not None:
        module_doc = ast.get_docstring(tree)
        if module_doc and len(source.text) < 6000:
            body = tree.body[1:]
            if body:
                lines = source.text.splitlines(keepends=True)
                rest = "".join(lines[body[0].lineno - 1 :])
                yield Pair(rest, module_doc.strip(), "module->docstring")


def strip_comments(code: str) -> str | None:
    """`code` without its comments (via tokenize); lines that held only a comment disappear."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    comments = [t for t in tokens if t.type == tokenize.COMMENT]
    if not comments:
        return code
    lines = code.splitlines(keepends=True)
    drop: set[int] = set()
    for token in reversed(comments):
        row, col = token.start
        line = lines[row - 1]
        before = line[:col].rstrip()
        if before:
            lines[row - 1] = before + "\n"
        else:
            drop.add(row - 1)
    return "".join(line for i, line in enumerate(lines) if i not in drop)


def comment(source: SourceFile, seed: int) -> Iterator[Pair]:
    for function in iter_functions(source):
        n_comments = sum(1 for line in function.source.splitlines() if "#" in line)
        if n_comments < 2:
            continue
        stripped = strip_comments(function.source)
        if stripped is None or stripped == function.source:
            continue
        try:
            if ast.dump(ast.parse(stripped)) != ast.dump(ast.parse(function.source)):
                continue  # a "#" inside a string was not a comment after all; keep only exact strips
        except SyntaxError:
            continue
        yield Pair(stripped, function.source, "strip-comments")


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return names


def chat(source: SourceFile, seed: int) -> Iterator[Pair]:
    module = source.module_name
    tree = source.tree
    if tree is not None:
        module_doc = ast.get_docstring(tree)
        if module_doc and len(first_paragraph(module_doc)) >= 20:
            yield Pair(f"What is the Python module `{module}` for?", first_paragraph(module_doc), "module-purpose")
    for function in iter_functions(source):
        if function.name.startswith("_") or not function.docstring:
            continue
        answer = first_paragraph(function.docstring)
        if len(answer) < 20:
            continue
        yield Pair(f"What does `{module}.{function.qualname}` do?", answer, "what-does")
        stripped = without_docstring(function)
        if stripped is not None:
            yield Pair(f"What does this function do?\n\n{stripped}", answer, "code->summary")
        params = _params(function.node)
        if params:
            listed = ", ".join(f"`{p}`" for p in params)
            yield Pair(f"Which arguments does `{module}.{function.qualname}` take?",
                       f"`{function.qualname}` takes {listed}. {answer}", "arguments")


def _describe(statement: ast.stmt) -> str | None:
    """One step of a structural walk-through, or None for statements not worth a step."""
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return None
    if isinstance(statement, (ast.For, ast.AsyncFor)):
        return f"It loops over `{ast.unparse(statement.iter)}`, taking each item as `{ast.unparse(statement.target)}`."
    if isinstance(statement, ast.While):
        return f"It repeats while `{ast.unparse(statement.test)}` holds."
    if isinstance(statement, ast.If):
        return f"It checks whether `{ast.unparse(statement.test)}`."
    if isinstance(statement, ast.Return):
        return "It returns `None`." if statement.value is None else f"It returns `{ast.unparse(statement.value)}`."
    if isinstance(statement, ast.Raise):
        return f"It raises `{ast.unparse(statement.exc)}`." if statement.exc else "It re-raises the current exception."
    if isinstance(statement, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        value = statement.value
        if value is None:
            return None
        op = " (updated in place)" if isinstance(statement, ast.AugAssign) else ""
        return f"It sets `{', '.join(ast.unparse(t) for t in targets)}` to `{ast.unparse(value)}`{op}."
    if isinstance(statement, ast.Try):
        handled = ", ".join(ast.unparse(h.type) for h in statement.handlers if h.type is not None) or "any exception"
        return f"It runs a block and handles {handled}."
    if isinstance(statement, (ast.With, ast.AsyncWith)):
        return f"It enters the context `{', '.join(ast.unparse(i.context_expr) for i in statement.items)}`."
    if isinstance(statement, ast.Expr):
        return f"It calls `{ast.unparse(statement.value)}`."
    return None


def reasoning(source: SourceFile, seed: int) -> Iterator[Pair]:
    for function in iter_functions(source):
        if not function.docstring:
            continue
        stripped = without_docstring(function)
        if stripped is None:
            continue
        steps = [s for s in (_describe(st) for st in function.tree.body) if s and len(s) <= 200]
        if len(steps) < 2 or len(steps) > 10:
            continue
        params = _params(function.node)
        intro = f"`{function.name}` takes {', '.join(f'`{p}`' for p in params)}." if params else \
            f"`{function.name}` takes no arguments."
        lines = [f"Step 1: {intro}"] + [f"Step {i}: {s}" for i, s in enumerate(steps, start=2)]
        lines.append(f"So: {function.docstring.strip().splitlines()[0].strip()}")
        yield Pair(f"Explain step by step what this function does.\n\n{stripped}", "\n".join(lines), "step-by-step")
