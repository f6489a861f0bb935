"""refactor: semantics-preserving rewrites, checked with `ast`. The target is always the real code; the input
is a clumsier equivalent made from it, so the model learns to write what people actually wrote.

- list comprehension -> for-append loop (input), verified by turning the loop back into the same AST;
- meaningful local names -> v1, v2, ... (input), verified by renaming back to the same AST;
- guard clause (`if not x: return` + rest) -> nested if (input), verified to parse and keep every statement.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator

from axl_model.recipes.common import Function, Pair, SourceFile, iter_functions, parses, replace_segment, same_ast


def _comprehension_to_loop(function: Function) -> Iterator[str]:
    """Each `name = [expr for v in it (if c)]` statement written as an append loop."""
    for statement in ast.walk(function.tree):
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name) and isinstance(statement.value, ast.ListComp)):
            continue
        comp = statement.value
        if len(comp.generators) != 1 or comp.generators[0].is_async or len(comp.generators[0].ifs) > 1:
            continue
        gen = comp.generators[0]
        name = statement.targets[0].id
        append = f"{name}.append({ast.unparse(comp.elt)})"
        body = f"for {ast.unparse(gen.target)} in {ast.unparse(gen.iter)}:\n"
        if gen.ifs:
            body += f"    if {ast.unparse(gen.ifs[0])}:\n        {append}"
        else:
            body += f"    {append}"
        line = function.source.splitlines()[statement.lineno - 1]
        indent = line[: len(line) - len(line.lstrip())]
        loop = f"{name} = []\n" + textwrap.indent(body, indent)
        rewritten = replace_segment(function.source, statement, loop)
        if parses(rewritten) and same_ast(_loops_to_comprehensions(rewritten), function.source):
            yield rewritten


class _LoopToComprehension(ast.NodeTransformer):
    """The inverse rewrite, on the AST: `x = []` followed by `for v in it: [if c:] x.append(e)`."""

    def _rewrite_body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        i = 0
        while i < len(body):
            first = body[i]
            nxt = body[i + 1] if i + 1 < len(body) else None
            comp = self._match(first, nxt)
            if comp is not None:
                out.append(comp)
                i += 2
            else:
                out.append(first)
                i += 1
        return out

    @staticmethod
    def _match(first: ast.stmt, loop: ast.stmt | None) -> ast.Assign | None:
        if not (isinstance(first, ast.Assign) and len(first.targets) == 1 and isinstance(first.targets[0], ast.Name)
                and isinstance(first.value, ast.List) and not first.value.elts and isinstance(loop, ast.For)
                and not loop.orelse and len(loop.body) == 1):
            return None
        name = first.targets[0].id
        inner, ifs = loop.body[0], []
        if isinstance(inner, ast.If) and not inner.orelse and len(inner.body) == 1:
            ifs, inner = [inner.test], inner.body[0]
        if not (isinstance(inner, ast.Expr) and isinstance(inner.value, ast.Call)
                and isinstance(inner.value.func, ast.Attribute) and inner.value.func.attr == "append"
                and isinstance(inner.value.func.value, ast.Name) and inner.value.func.value.id == name
                and len(inner.value.args) == 1 and not inner.value.keywords):
            return None
        comp = ast.ListComp(inner.value.args[0], [ast.comprehension(loop.target, loop.iter, ifs, 0)])
        return ast.Assign([ast.Name(name, ast.Store())], comp)

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            value = getattr(node, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, field, self._rewrite_body(value))
        return node


def _loops_to_comprehensions(code: str) -> str:
    tree = _LoopToComprehension().visit(ast.parse(code))
    return ast.unparse(ast.fix_missing_locations(tree))


def _obscure_names(function: Function) -> str | None:
    """Local variables (not parameters) renamed v1, v2, ...; None when there are none to rename."""
    tree = function.tree
    params = {a.arg for a in tree.args.posonlyargs + tree.args.args + tree.args.kwonlyargs}
    if tree.args.vararg:
        params.add(tree.args.vararg.arg)
    if tree.args.kwarg:
        params.add(tree.args.kwarg.arg)
    declared = set()
    stored = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        if node is not tree and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return None  # nested scopes make renaming by text unsafe
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in stored:
            stored.append(node.id)
    local = [n for n in stored if n not in params and n not in declared and len(n) >= 3 and not re.fullmatch(r"v\d+", n)]
    all_names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    if not local or any(f"v{i}" in all_names for i in range(1, len(local) + 1)):
        return None
    mapping = {name: f"v{i}" for i, name in enumerate(local, start=1)}
    # rename by position so strings, attributes and comments that spell the same word stay untouched
    renamed = function.source
    names = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in mapping),
                   key=lambda n: (n.lineno, n.col_offset), reverse=True)
    for node in names:
        renamed = replace_segment(renamed, node, mapping[node.id])
    inverse = {v: k for k, v in mapping.items()}

    class Back(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.Name:
            return ast.copy_location(ast.Name(inverse.get(node.id, node.id), node.ctx), node)

    if not parses(renamed):
        return None
    restored = ast.dump(Back().visit(ast.parse(renamed)))
    return renamed if restored == ast.dump(ast.parse(function.source)) else None


def _guard_to_nested(function: Function) -> str | None:
    """A function whose body is `if <c>: return` then more code, written as one nested `if not <c>:` block."""
    body = function.tree.body
    for i, statement in enumerate(body[:-1]):
        if isinstance(statement, ast.If) and not statement.orelse and len(statement.body) == 1 \
                and isinstance(statement.body[0], ast.Return) and statement.body[0].value is None:
            rest = body[i + 1 :]
            if len(rest) < 2 or any(isinstance(s, ast.Return) and s.value is not None for s in ast.walk(function.tree)):
                return None
            lines = function.source.splitlines(keepends=True)
            test = statement.test
            negated = ast.unparse(test.operand) if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) \
                else f"not ({ast.unparse(test)})" if isinstance(test, (ast.BoolOp, ast.Compare, ast.IfExp)) \
                else f"not {ast.unparse(test)}"
            guard_line = lines[statement.lineno - 1]
            indent = guard_line[: len(guard_line) - len(guard_line.lstrip())]
            tail = "".join(lines[rest[0].lineno - 1 :])
            nested = "".join(lines[: statement.lineno - 1]) + f"{indent}if {negated}:\n" + textwrap.indent(tail, "    ")
            if not parses(nested):
                return None
            # verify: the nested block holds exactly the statements that followed the guard (multi-line
            # strings re-indented by the rewrite would show up here as different constants)
            new_body = ast.parse(nested).body[0].body
            block = new_body[i] if len(new_body) == i + 1 else None
            if isinstance(block, ast.If) and [ast.dump(s) for s in block.body] == [ast.dump(s) for s in rest] \
                    and [ast.dump(s) for s in new_body[:i]] == [ast.dump(s) for s in body[:i]]:
                return nested
            return None
    return None


def refactor(source: SourceFile, seed: int) -> Iterator[Pair]:
    for function in iter_functions(source):
        for loop_version in _comprehension_to_loop(function):
            yield Pair(loop_version, function.source, "loop->comprehension")
        # renames are plentiful; keep a quarter of them so they do not drown the other rewrites
        obscured = _obscure_names(function) if source.rng(seed, f"rename:{function.qualname}").random() < 0.25 else None
        if obscured is not None and obscured != function.source:
            yield Pair(obscured, function.source, "rename-locals")
        nested = _guard_to_nested(function)
        if nested is not None:
            yield Pair(nested, function.source, "nested-if->guard-clause")
