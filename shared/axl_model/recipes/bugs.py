"""debugger and fixer: real functions with one injected bug; the pair is buggy code -> fixed (the original).

Each mutation rewrites one expression or statement in place (the rest of the text is untouched), and is kept
only when the result still parses and its AST differs from the original's.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable, Iterator

from axl_model.recipes.common import Function, Pair, SourceFile, iter_functions, parses, replace_segment, same_ast

_FLIPPED_COMPARISON = {
    ast.Lt: (ast.LtE, "<", "<="), ast.LtE: (ast.Lt, "<=", "<"), ast.Gt: (ast.GtE, ">", ">="),
    ast.GtE: (ast.Gt, ">=", ">"), ast.Eq: (ast.NotEq, "==", "!="), ast.NotEq: (ast.Eq, "!=", "=="),
    ast.Is: (ast.IsNot, "is", "is not"), ast.IsNot: (ast.Is, "is not", "is"),
    ast.In: (ast.NotIn, "in", "not in"), ast.NotIn: (ast.In, "not in", "in"),
}

# A mutation: (function tree, rng) -> list of (node to replace, replacement text, description of the bug)
Mutation = Callable[[ast.AST, random.Random], list[tuple[ast.AST, str, str]]]


def _comparisons(tree: ast.AST, rng: random.Random) -> list[tuple[ast.AST, str, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _FLIPPED_COMPARISON:
            new_op, right, wrong = _FLIPPED_COMPARISON[type(node.ops[0])]
            mutated = ast.Compare(node.left, [new_op()], node.comparators)
            found.append((node, ast.unparse(mutated),
                          f"the comparison `{ast.unparse(node)}` uses `{wrong}` where `{right}` is needed"))
    return found


def _off_by_one(tree: ast.AST, rng: random.Random) -> list[tuple[ast.AST, str, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" \
                and 1 <= len(node.args) <= 2 and not node.keywords:
            stop = node.args[-1]
            delta = rng.choice((1, -1))
            new_stop = ast.BinOp(stop, ast.Add() if delta > 0 else ast.Sub(), ast.Constant(1))
            mutated = ast.Call(node.func, node.args[:-1] + [new_stop], [])
            found.append((node, ast.unparse(mutated),
                          f"off by one: `{ast.unparse(mutated)}` should be `{ast.unparse(node)}`"))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and type(node.slice.value) is int:
            index = node.slice.value
            new_index = index + 1 if index in (0, -1) or rng.random() < 0.5 else index - 1
            if new_index == 0 and index == -1:
                new_index = -2
            mutated = ast.Subscript(node.value, ast.Constant(new_index), node.ctx)
            found.append((node, ast.unparse(mutated),
                          f"off by one: index `{new_index}` should be `{index}` in `{ast.unparse(node)}`"))
    return found


def _swapped_arguments(tree: ast.AST, rng: random.Random) -> list[tuple[ast.AST, str, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2 \
                and not any(isinstance(a, ast.Starred) for a in node.args[:2]) \
                and ast.dump(node.args[0]) != ast.dump(node.args[1]):
            args = [node.args[1], node.args[0]] + node.args[2:]
            mutated = ast.Call(node.func, args, node.keywords)
            found.append((node, ast.unparse(mutated),
                          f"the first two arguments of `{ast.unparse(node.func)}` are swapped"))
    return found


def _missing_return(tree: ast.AST, rng: random.Random) -> list[tuple[ast.AST, str, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None \
                and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            found.append((node, ast.unparse(node.value),
                          f"the value `{ast.unparse(node.value)}` is computed but never returned"))
    return found


def _wrong_name(tree: ast.AST, rng: random.Random) -> list[tuple[ast.AST, str, str]]:
    assert isinstance(tree, (ast.FunctionDef, ast.AsyncFunctionDef))
    local = {a.arg for a in tree.args.posonlyargs + tree.args.args + tree.args.kwonlyargs}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            local.add(node.id)
    local.discard("self")
    local.discard("cls")
    names = sorted(local)
    if len(names) < 2:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in local:
            other = rng.choice([n for n in names if n != node.id])
            found.append((node, other, f"`{other}` is used where `{node.id}` is meant"))
    return found


MUTATIONS: dict[str, Mutation] = {
    "wrong-comparison": _comparisons,
    "off-by-one": _off_by_one,
    "swapped-arguments": _swapped_arguments,
    "missing-return": _missing_return,
    "wrong-name": _wrong_name,
}


def inject_bugs(function: Function, rng: random.Random, per_function: int = 2) -> Iterator[tuple[str, str, str]]:
    """(buggy source, rule, description with line number) for up to `per_function` distinct mutation kinds."""
    kinds = list(MUTATIONS)
    rng.shuffle(kinds)
    made = 0
    for kind in kinds:
        if made >= per_function:
            break
        candidates = MUTATIONS[kind](function.tree, rng)
        rng.shuffle(candidates)
        for node, replacement, description in candidates[:3]:
            buggy = replace_segment(function.source, node, replacement)
            if buggy != function.source and parses(buggy) and not same_ast(buggy, function.source):
                yield buggy, kind, f"line {node.lineno}: {description}"
                made += 1
                break


def _pairs(source: SourceFile, seed: int, describe: bool) -> Iterator[Pair]:
    for function in iter_functions(source):
        # "debugger"/"fixer" share the rng salt so both see the same bugs; the targets differ
        rng = source.rng(seed, f"bugs:{function.qualname}:{function.first_line}")
        for buggy, kind, description in inject_bugs(function, rng):
            if describe:
                yield Pair(buggy, f"Bug: {description}.\nFixed code:\n{function.source}", kind)
            else:
                yield Pair(buggy, function.source, kind)


def debugger(source: SourceFile, seed: int) -> Iterator[Pair]:
    return _pairs(source, seed, describe=True)


def fixer(source: SourceFile, seed: int) -> Iterator[Pair]:
    return _pairs(source, seed, describe=False)
