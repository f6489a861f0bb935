"""Data recipes: each specialist's pairs are real, verified rewrites; datasets are deterministic and split by file."""

import ast
import json
import os
import textwrap
from pathlib import Path

import pytest

from axl_model.recipes import MissingTranslationSources, RECIPES, build_all, build_dataset, iter_pairs, split_of
from axl_model.recipes.common import is_test_path
from axl_model.sandbox import run_untrusted

MODULE = textwrap.dedent('''
    """Small helpers used to test the data recipes."""
    import os


    def clamp(value, low, high):
        """Clamp value into the closed range [low, high].

        >>> clamp(5, 0, 3)
        3
        >>> clamp(-1, 0, 3)
        0
        """
        if value < low:
            return low
        if value > high:
            return high
        return value


    def squares(numbers):
        """Return the squares of the even numbers."""
        result = [n * n for n in numbers if n % 2 == 0]
        return result


    def total(items, start=0):
        """Add up the items, starting from start."""
        # running sum, kept separate for clarity
        acc = start
        for item in items:
            # each item is added once
            acc += item
        return acc


    def run(command):
        """Run a shell command."""
        status = os.system(command)
        return status


    def report(lines):
        """Print the lines."""
        if not lines:
            return
        header = "report"
        print(header)
        for line in lines:
            print(line)
''')


@pytest.fixture()
def source_tree(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "helpers.py").write_text(MODULE)
    (root / "pkg" / "copy_of_helpers.py").write_text(MODULE)  # exact duplicate pairs must be dropped
    (root / "tests").mkdir()
    (root / "tests" / "test_helpers.py").write_text("def test_x():\n    '''Docstring long enough.'''\n    assert 1\n")
    return root


def _pairs(specialist, root):
    return [pair for _, pair in iter_pairs(specialist, [root])]


def test_docs_pairs_are_function_without_docstring_to_docstring(source_tree):
    pairs = {p.target_code: p for p in _pairs("docs", source_tree)}
    pair = pairs["Add up the items, starting from start."]
    assert pair.source_code.startswith("def total(items, start=0):\n")
    assert '"""' not in pair.source_code
    ast.parse(pair.source_code)


def test_comment_pairs_strip_only_comments(source_tree):
    pair = next(p for p in _pairs("comment", source_tree) if "def total" in p.target_code)
    assert "#" not in pair.source_code and "#" in pair.target_code
    assert ast.dump(ast.parse(pair.source_code)) == ast.dump(ast.parse(pair.target_code))


def test_debugger_and_fixer_pairs_hold_real_bugs(source_tree):
    fixer = _pairs("fixer", source_tree)
    debugger = _pairs("debugger", source_tree)
    assert fixer and len(fixer) == len(debugger)
    assert {p.rule for p in fixer} >= {"wrong-comparison", "missing-return"} & {p.rule for p in fixer}
    for bug, explained in zip(fixer, debugger):
        assert ast.dump(ast.parse(bug.source_code)) != ast.dump(ast.parse(bug.target_code))
        assert bug.source_code == explained.source_code
        assert explained.target_code.startswith("Bug: line ")
        assert explained.target_code.endswith(bug.target_code)


def test_fixed_code_passes_and_a_buggy_clamp_fails(source_tree):
    clamp_bugs = [p for p in _pairs("fixer", source_tree) if p.target_code.startswith("def clamp")]
    assert clamp_bugs
    check = "\nassert clamp(5, 0, 3) == 3\nassert clamp(-1, 0, 3) == 0\nassert clamp(2, 0, 3) == 2\n"
    assert run_untrusted(clamp_bugs[0].target_code + check).passed
    assert any(not run_untrusted(p.source_code + check).passed for p in clamp_bugs)


def test_refactor_pairs_are_verified_rewrites(source_tree):
    pairs = _pairs("refactor", source_tree)
    by_rule = {p.rule: p for p in pairs}
    loop = by_rule["loop->comprehension"]
    assert "result.append(n * n)" in loop.source_code and "[n * n for n in numbers" in loop.target_code
    guard = by_rule["nested-if->guard-clause"]
    assert "if lines:" in guard.source_code and "if not lines:\n        return" in guard.target_code
    for pair in pairs:
        ast.parse(pair.source_code)


def test_testgen_doctest_pairs_run_green(source_tree):
    pair = next(p for p in _pairs("testgen", source_tree) if p.rule == "doctest->pytest")
    assert "assert clamp(5, 0, 3) == 3" in pair.target_code
    test_body = pair.target_code.split("\n", 1)[1]  # drop the import: the function is defined inline below
    program = MODULE + test_body + "\ntest_clamp()\n"
    assert run_untrusted(program).passed


def test_secure_rewrites_a_real_call_site_and_names_the_rule(source_tree):
    mined = [p for p in _pairs("secure", source_tree) if p.rule.startswith("mined:")]
    assert mined
    assert "os.system(command)" in mined[0].source_code
    assert mined[0].target_code.startswith("# Rule: no-shell-injection")
    assert "subprocess.run(shlex.split(command))" in mined[0].target_code


def test_chat_and_reasoning_pairs(source_tree):
    chat = _pairs("chat", source_tree)
    assert any(p.source_code == "What does `pkg.helpers.clamp` do?" for p in chat)
    reasoning = _pairs("reasoning", source_tree)
    assert any(p.target_code.startswith("Step 1: `total` takes `items`, `start`.") for p in reasoning)


def test_translate_needs_parallel_sources(source_tree, tmp_path):
    with pytest.raises(MissingTranslationSources, match="parallel source"):
        build_dataset("translate", [source_tree], tmp_path / "out", progress=False)
    (source_tree / "pkg" / "helpers.rs").write_text("fn clamp(v: i64, lo: i64, hi: i64) -> i64 { v.max(lo).min(hi) }\n")
    pairs = _pairs("translate", source_tree)
    assert {p.rule for p in pairs} == {"python->Rust", "Rust->python"}


def test_build_dataset_writes_deduplicated_jsonl_split_by_file(source_tree, tmp_path):
    summary = build_dataset("coder", [source_tree], tmp_path / "a", val_fraction=0.5, seed=1, progress=False)
    out = tmp_path / "a"
    assert sorted(os.listdir(out)) == ["summary.json", "train.jsonl", "val.jsonl"]
    records = [json.loads(line) for split in ("train", "val") for line in (out / f"{split}.jsonl").open()]
    assert len(records) == summary.pairs > 0
    assert summary.duplicates_removed > 0  # copy_of_helpers.py repeats every function
    assert len({(r["source_code"], r["target_code"]) for r in records}) == len(records)
    assert set(records[0]) == {"source_code", "target_code", "specialist", "file", "rule"}
    assert all(r["specialist"] == "coder" and not is_test_path(r["file"]) for r in records)
    for split in ("train", "val"):
        for line in (out / f"{split}.jsonl").open():
            assert split_of(json.loads(line)["file"], 0.5) == split
    saved = json.loads((out / "summary.json").read_text())
    assert saved["pairs"] == summary.pairs and len(saved["examples"]) == min(3, len(summary.rules))
    assert saved["train_bytes"] == (out / "train.jsonl").stat().st_size


def test_build_dataset_is_deterministic(source_tree, tmp_path):
    for name in ("a", "b"):
        build_dataset("debugger", [source_tree], tmp_path / name, seed=7, progress=False)
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()


def test_build_dataset_from_the_standard_library(tmp_path):
    summary = build_dataset("docs", out_dir=tmp_path / "docs", max_files=25, progress=False)
    assert summary.files == 25 and summary.pairs > 20
    assert "site-packages" not in json.dumps(summary.examples)


def test_build_all_reports_missing_translate_sources(source_tree, tmp_path):
    results = build_all(tmp_path / "all", [source_tree], progress=False)
    assert set(results) == set(RECIPES)
    assert isinstance(results["translate"], str) and "parallel source" in results["translate"]
    assert all(results[name].pairs > 0 for name in RECIPES if name != "translate")


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="recipes exist for: coder"):
        build_dataset("poet", out_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        build_dataset("docs", out_dir=tmp_path, val_fraction=1.5)
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset("docs", sources=[tmp_path / "nowhere"], out_dir=tmp_path)


def test_recipes_do_not_import_torch():
    recipes_dir = Path(__file__).resolve().parents[2] / "shared" / "axl_model" / "recipes"
    for path in recipes_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] == "torch" for n in names), path
