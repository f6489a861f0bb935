"""HumanEval prompts cut to fit the window keep the signature and imports (the docstring's middle goes), and the
default protocol reports greedy pass@1 beside pass@1/pass@10 from n = 20 samples."""

from __future__ import annotations

import ast
import math

import pytest

from axl_model import evaluate as E
from axl_model.humaneval import fit_prompt, load_problems


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return load_problems()


@pytest.mark.parametrize("budget", [200, 300, 500])
def test_every_cut_prompt_keeps_imports_and_signature(problems, budget: int) -> None:
    for problem in problems.values():
        prompt, fitted = problem["prompt"], fit_prompt(problem["prompt"], budget, problem["entry_point"])
        if len(prompt.encode()) <= budget:
            assert fitted == prompt
            continue
        tree = ast.parse(prompt)
        entry = next(n for n in tree.body if getattr(n, "name", None) == problem["entry_point"])
        def_line = prompt.splitlines()[entry.lineno - 1]
        assert def_line in fitted.splitlines(), problem["task_id"]
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert ast.get_source_segment(prompt, node) in fitted
        ast.parse(fitted)  # still a function with a docstring: the model continues a valid prefix
        assert fitted.rstrip().endswith(('"""', "'''")) and len(fitted.encode()) < len(prompt.encode())


def test_the_middle_of_the_docstring_goes_first(problems) -> None:
    prompt = problems["HumanEval/0"]["prompt"]
    fitted = fit_prompt(prompt, 300, "has_close_elements")
    lines = fitted.splitlines()
    assert len(fitted.encode()) <= 300 and "    ..." in lines
    assert lines[0] == "from typing import List" and "def has_close_elements" in fitted
    assert 'Check if in given list of numbers' in fitted  # the docstring's first line stays
    assert lines[-1] == '    """' and lines[-2] == "    True"  # and its last line
    assert "0.3)" not in fitted and "False" not in fitted  # the middle went


def test_helpers_go_before_the_signature(problems) -> None:
    problem = problems["HumanEval/10"]  # is_palindrome before make_palindrome
    fitted = fit_prompt(problem["prompt"], 120, problem["entry_point"])
    assert "def is_palindrome" not in fitted and fitted.startswith("def make_palindrome(string: str) -> str:")


def test_greedy_pass_at_1_beside_pass_at_10_of_20_samples_and_cut_prompts(problems) -> None:
    chosen = {k: problems[k] for k in ("HumanEval/0", "HumanEval/2")}
    calls = []

    def generate(prompts, n, spec):
        calls.append((n, spec.temperature, prompts))
        # greedy: right on problem 0 only; samples: problem 0 right 5 times in 20, problem 2 never
        right = [p["canonical_solution"] for p in chosen.values()]
        if spec.temperature == 0.0:
            return [[right[0]], ["    return None\n"]]
        return [[right[0]] * 5 + ["    return None\n"] * 15, ["    return None\n"] * 20]

    report = E.evaluate_humaneval(generate, E.HumanEvalOptions(), problems=chosen, window=512)
    assert [(n, t) for n, t, _ in calls] == [(20, 0.8), (1, 0.0)]
    assert report["greedy_pass@1"] == 0.5 and report["pass@1"] == pytest.approx(5 / 20 / 2)
    assert report["pass@10"] == pytest.approx((1 - math.comb(15, 10) / math.comb(20, 10)) / 2)
    room = E.prompt_room(512, 384)
    for _, _, prompts in calls:
        assert all(len(p.encode()) <= room for p in prompts)
        assert all("def has_close_elements(numbers: List[float], threshold: float) -> bool:" in p
                   for p in prompts[:1])

    greedy_only = E.evaluate_humaneval(generate, E.HumanEvalOptions(n=1, k=(1,)), problems=chosen)
    assert greedy_only["greedy_pass@1"] == greedy_only["pass@1"] == 0.5 and len(calls) == 3
