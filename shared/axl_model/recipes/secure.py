"""secure: unsafe -> safe, with the rule named in the target's first line.

Two sources of pairs:
- real call sites mined from the code (`os.system`, `subprocess.*(..., shell=True)`, `eval`, `pickle.load(s)`,
  `hashlib.md5/sha1`, `yaml.load`): the function as written -> the function with the call rewritten;
- templates put onto real function bodies: an unsafe line using one of the function's parameters is inserted
  at the top of the body, and the target has the safe line instead.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator

from axl_model.recipes.common import Function, Pair, SourceFile, iter_functions, parses, replace_segment


@dataclasses.dataclass(frozen=True)
class SecurityRule:
    name: str
    why: str
    unsafe: str  # template lines, {arg} = a parameter of the function
    safe: str
    imports_unsafe: str
    imports_safe: str


RULES: tuple[SecurityRule, ...] = (
    SecurityRule("no-shell-injection", "pass an argument list to subprocess instead of a shell string",
                 'os.system("ls -l " + {arg})', 'subprocess.run(["ls", "-l", {arg}], check=True)',
                 "import os", "import subprocess"),
    SecurityRule("no-shell-injection", "pass an argument list to subprocess instead of shell=True",
                 'subprocess.run(f"grep -r {{{arg}}} .", shell=True, check=True)',
                 'subprocess.run(["grep", "-r", {arg}, "."], check=True)',
                 "import subprocess", "import subprocess"),
    SecurityRule("no-eval", "parse literals with ast.literal_eval instead of eval",
                 "value = eval({arg})", "value = ast.literal_eval({arg})", "", "import ast"),
    SecurityRule("no-pickle-untrusted", "decode untrusted data as JSON instead of unpickling it",
                 "obj = pickle.loads({arg})", "obj = json.loads({arg})", "import pickle", "import json"),
    SecurityRule("strong-password-hash", "hash passwords with a salted key-derivation function, not md5/sha1",
                 "digest = hashlib.md5({arg}.encode()).hexdigest()",
                 "salt = os.urandom(16)\ndigest = salt.hex() + hashlib.scrypt({arg}.encode(), salt=salt, n=2**14, r=8, p=1).hex()",
                 "import hashlib", "import hashlib\nimport os"),
    SecurityRule("no-path-traversal", "resolve the joined path and check it stays inside the base directory",
                 "path = os.path.join(BASE_DIR, {arg})",
                 "base = os.path.realpath(BASE_DIR)\npath = os.path.realpath(os.path.join(base, {arg}))\n"
                 "if os.path.commonpath([base, path]) != base:\n    raise ValueError(f\"path escapes {{base}}: {{{arg}!r}}\")",
                 "import os", "import os"),
    SecurityRule("yaml-safe-load", "use yaml.safe_load, which builds only plain data",
                 "config = yaml.load({arg}, Loader=yaml.Loader)", "config = yaml.safe_load({arg})",
                 "import yaml", "import yaml"),
)


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def _rewrite_call(node: ast.Call) -> tuple[str, str, str] | None:
    """(replacement text, rule, why) for an unsafe call, or None."""
    name = _call_name(node)
    keywords = {k.arg: k for k in node.keywords}
    if name == "os.system" and len(node.args) == 1:
        return (f"subprocess.run(shlex.split({ast.unparse(node.args[0])})).returncode", "no-shell-injection",
                "run the command without a shell")
    if name.startswith("subprocess.") and "shell" in keywords and isinstance(keywords["shell"].value, ast.Constant) \
            and keywords["shell"].value.value is True and node.args:
        rest = [k for k in node.keywords if k.arg != "shell"]
        new = ast.Call(node.func, [ast.Call(ast.parse("shlex.split", mode="eval").body, [node.args[0]], [])]
                       + node.args[1:], rest)
        return ast.unparse(new), "no-shell-injection", "split the command into a list and drop shell=True"
    if name == "eval" and len(node.args) == 1 and not node.keywords:
        return f"ast.literal_eval({ast.unparse(node.args[0])})", "no-eval", "parse literals with ast.literal_eval"
    if name in ("pickle.loads", "pickle.load", "cPickle.loads") and len(node.args) == 1:
        target = "json.loads" if name.endswith("loads") else "json.load"
        return f"{target}({ast.unparse(node.args[0])})", "no-pickle-untrusted", "decode JSON instead of unpickling"
    if name in ("hashlib.md5", "hashlib.sha1") and node.args and not keywords.get("usedforsecurity"):
        return (f"hashlib.sha256({ast.unparse(node.args[0])})", "strong-hash",
                "use sha256 (and a salted KDF such as hashlib.scrypt for passwords)")
    if name == "yaml.load" and node.args:
        return f"yaml.safe_load({ast.unparse(node.args[0])})", "yaml-safe-load", "use yaml.safe_load"
    return None


def _mined(function: Function) -> Iterator[Pair]:
    for node in ast.walk(function.tree):
        if isinstance(node, ast.Call):
            rewrite = _rewrite_call(node)
            if rewrite is None:
                continue
            replacement, rule, why = rewrite
            safe = replace_segment(function.source, node, replacement)
            if parses(safe) and safe != function.source:
                yield Pair(function.source, f"# Rule: {rule}: {why}.\n{safe}", f"mined:{rule}")


def _templated(function: Function, rule: SecurityRule) -> Pair | None:
    tree = function.tree
    params = [a.arg for a in tree.args.posonlyargs + tree.args.args if a.arg not in ("self", "cls")]
    if not params or not tree.body:
        return None
    arg = params[0]
    body = tree.body
    insert_at = body[1] if ast.get_docstring(tree) is not None and len(body) > 1 else body[0]
    if insert_at.lineno == tree.lineno:
        return None  # a one-line function
    lines = function.source.splitlines(keepends=True)
    first = lines[insert_at.lineno - 1]
    indent = first[: len(first) - len(first.lstrip())]

    def build(template: str, imports: str) -> str:
        block = "".join(indent + line + "\n" for line in template.format(arg=arg).splitlines())
        code = "".join(lines[: insert_at.lineno - 1]) + block + "".join(lines[insert_at.lineno - 1 :])
        return (imports + "\n\n\n" if imports else "") + code

    unsafe, safe = build(rule.unsafe, rule.imports_unsafe), build(rule.safe, rule.imports_safe)
    if not (parses(unsafe) and parses(safe)):
        return None
    return Pair(unsafe, f"# Rule: {rule.name}: {rule.why}.\n{safe}", f"template:{rule.name}")


def secure(source: SourceFile, seed: int) -> Iterator[Pair]:
    for function in iter_functions(source):
        yield from _mined(function)
        rng = source.rng(seed, f"secure:{function.qualname}:{function.first_line}")
        if rng.random() < 0.3:  # template onto about a third of the functions, one rule each
            pair = _templated(function, rng.choice(RULES))
            if pair is not None:
                yield pair
