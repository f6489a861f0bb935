"""The evaluation suite: HumanEval scoring through the same path `axl eval` uses, bits per byte against a hand
computation, the fixer and docs checks, and `axl eval` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from axl_model import evaluate as E
from axl_model.checkpoint import load_checkpoint
from axl_model.cli import main
from axl_model.data import resolve_inputs, split_of
from axl_model.humaneval import load_problems
from axl_model.recipes.bugs import fixer as fixer_recipe
from axl_model.recipes.common import read_source
from axl_model.specialists import END_MARKER
from axl_model.tokenizer import BOS_ID, EOS_ID
from tests.checkpoints import make_tiny_checkpoint

STDLIB = sysconfig.get_paths()["stdlib"]
TASK_IDS = ("HumanEval/0", "HumanEval/2", "HumanEval/53")


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    every = load_problems()
    return {task_id: every[task_id] for task_id in TASK_IDS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "axl-tiny", seed=0, max_seq_len=512)


def signature(prompt: str) -> str:
    """The last `def` line of a HumanEval prompt: what every prompt keeps when it is cut to fit the window."""
    return next((line for line in reversed(prompt.splitlines()) if line.startswith("def ")), prompt)


def answering(answers: dict[str, list[str]]) -> E.GenerateFn:
    """A GenerateFn that returns fixed texts per prompt (found by substring or signature), as a model would."""

    def generate(prompts, n, spec):
        out = []
        for prompt in prompts:
            texts = next(v for k, v in answers.items() if signature(k) in prompt)
            assert len(texts) == n
            out.append(list(texts))
        return out

    return generate


# ---------------------------------------------------------------------------------------------- HumanEval
def test_humaneval_scores_correct_and_wrong_solutions(tiny: Path, problems: dict[str, dict]) -> None:
    wrong = "    return None\n"
    # problem 0: both samples right; problem 2: one of two; problem 53: none
    answers = {
        problems["HumanEval/0"]["prompt"]: [problems["HumanEval/0"]["canonical_solution"]] * 2,
        problems["HumanEval/2"]["prompt"]: [problems["HumanEval/2"]["canonical_solution"], wrong],
        problems["HumanEval/53"]["prompt"]: [wrong, "    return x - y\n"],
    }
    report = E.run_evaluation(tiny, bpb=False, humaneval=E.HumanEvalOptions(n=2, k=(1, 2), greedy=False),
                              generate_fn=answering(answers), humaneval_problems=problems, prompt_format="raw")
    he = report["humaneval"]
    by_task = {r["task_id"]: r["correct"] for r in he["results"]}
    assert by_task == {"HumanEval/0": 2, "HumanEval/2": 1, "HumanEval/53": 0}
    assert he["pass@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert he["pass@2"] == pytest.approx((1 + 1 + 0) / 3)
    assert he["problems"] == 3 and he["n"] == 2


def test_humaneval_specialist_layout_cuts_at_the_end_marker(tiny: Path, problems: dict[str, dict]) -> None:
    """A coder specialist is scored as it is served: its layout in the prompt, its stop strings on the output."""
    seen_prompts: list[str] = []
    canonical = {p["prompt"]: p["canonical_solution"] for p in problems.values()}

    def generate(prompts, n, spec):
        seen_prompts.extend(prompts)
        assert END_MARKER in spec.stop
        # without the cut, the junk after the marker would be a syntax error
        return [[next(v for k, v in canonical.items() if signature(k) in p) + f"{END_MARKER}\n)))junk"] * n
                for p in prompts]

    report = E.run_evaluation(tiny, bpb=False, humaneval=E.HumanEvalOptions(n=1, k=(1,), limit=2), generate_fn=generate,
                              humaneval_problems=problems, prompt_format="specialist")
    assert report["humaneval"]["pass@1"] == 1.0 and report["humaneval"]["problems"] == 2
    assert all(p.startswith("<|axl:coder|>") and p.endswith("### Output:\n") for p in seen_prompts)


# ---------------------------------------------------------------------------------------------- bits per byte
def test_bpb_equals_cross_entropy_over_ln2(tiny: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    y = x * {i}\n    return y + {i}\n")
    keys = dict((key, file) for file, key in resolve_inputs([corpus]))
    val = [key for key in keys if split_of(key, 0.2) == "val"]
    assert val, "the hash split put no file in val"
    for key in val[1:]:  # exactly one held-out file, so the hand computation is one document
        keys[key].unlink()
    text = keys[val[0]].read_bytes()

    result = E.held_out_bpb(tiny, [str(corpus)], seq_len=128, val_fraction=0.2)

    ids = torch.tensor([[BOS_ID, *text, EOS_ID]])
    with torch.no_grad():
        logits = load_checkpoint(tiny)(ids[:, :-1])
    nats = F.cross_entropy(logits[0], ids[0, 1:]).item()  # every target: the bytes and EOS, never BOS
    assert result["bytes"] == len(text) + 1 and result["tokens"] == len(text) + 2  # scored: bytes + EOS
    assert result["bpb"] == pytest.approx(nats / math.log(2), rel=1e-5)
    assert result["perplexity_per_byte"] == pytest.approx(2 ** result["bpb"])


def test_sliced_bpb_equals_one_pass(tiny: Path, tmp_path: Path) -> None:
    """The progress-bar slices score exactly the windows of train.evaluate_checkpoint's single pass."""
    from axl_model.train import evaluate_checkpoint

    corpus = tmp_path / "src"
    corpus.mkdir()
    for name in ("bisect.py", "keyword.py", "fnmatch.py"):
        (corpus / name).write_text(Path(STDLIB, name).read_text())
    sliced = E.held_out_bpb(tiny, [str(corpus)], seq_len=8, val_fraction=0.5)
    assert sliced["tokens"] > 3 * 8 * 8 * 16  # several slices, the last one partial
    one_pass = evaluate_checkpoint(tiny, [str(corpus)], seq_len=8, val_fraction=0.5)
    assert sliced["bpb"] == pytest.approx(one_pass["val_bpb"], rel=1e-5)
    assert sliced["tokens"] == one_pass["tokens"]


def _checkpoint_with_split(tmp_path: Path, corpus: Path, val_fraction: float) -> Path:
    """A tiny model whose metadata records the split of `corpus`, as training records it."""
    from axl_model import save_checkpoint
    from axl_model.data import prepare_data

    prepared = prepare_data([corpus], tmp_path / "train-cache", val_fraction=val_fraction, progress=False)
    model = load_checkpoint(make_tiny_checkpoint(tmp_path / "random", seed=0, max_seq_len=512))
    return save_checkpoint(model, tmp_path / "ck", metadata={"data_split": prepared.split,
                                                             "train_config": {"data": [str(corpus)]}})


def _library_and_tests(root: Path) -> Path:
    (root / "tests").mkdir(parents=True)
    for i in range(16):
        (root / f"lib{i}.py").write_text(f"def lib{i}(x):\n    total = x * {i}\n    return total + {i * i}\n")
        (root / "tests" / f"test_lib{i}.py").write_text(f"from lib{i} import lib{i}\n\n\ndef test_lib{i}():\n"
                                                         f"    assert lib{i}(2) == {2 * i + i * i}\n")
    return root


def test_eval_scores_the_recorded_split_and_refuses_training_files(tmp_path: Path) -> None:
    corpus = _library_and_tests(tmp_path / "src")
    ck = _checkpoint_with_split(tmp_path, corpus, val_fraction=0.3)
    recorded = E.recorded_split(ck)

    default = E.held_out_bpb(ck, seq_len=64)  # no --data: exactly the recorded split
    assert default["split_source"] == "the checkpoint's split" and default["split_matches_checkpoint"] is True
    assert default["val_files_sha256"] == recorded["val_files_sha256"]
    assert default["val_fraction"] == 0.3 and default["files"] == len(recorded["val_files"])
    kinds = {e["kind"] for e in recorded["val_files"]}
    assert set(default["by_kind"]) == kinds == {"library", "test"}  # unit tests scored apart from library code
    assert sum(part["bytes"] for part in default["by_kind"].values()) == default["bytes"]
    assert sum(part["files"] for part in default["by_kind"].values()) == default["files"]

    # another split of the same corpus holds training files: refused, naming them
    with pytest.raises(ValueError, match="refusing to score .* held-out files are files .* trained on"):
        E.held_out_bpb(ck, [str(corpus)], seq_len=64, val_fraction=0.6)
    with pytest.raises(ValueError, match="trained on"):
        E.held_out_bpb(ck, seq_len=64, val_fraction=0.6)
    # a copy of a training file elsewhere is refused too (by content, not by path)
    other = tmp_path / "other"
    other.mkdir()
    trained_file = next(f for f, _ in resolve_inputs([corpus])
                        if f.name not in {e["path"].rsplit("/", 1)[-1] for e in recorded["val_files"]})
    (other / "renamed.py").write_text(trained_file.read_text())
    with pytest.raises(ValueError, match="renamed.py"):
        E.held_out_bpb(ck, [str(other)], seq_len=64, val_fraction=0.5)
    # a corpus it never saw is fine
    (other / "renamed.py").unlink()
    for i in range(8):
        (other / f"new{i}.py").write_text(f"def new{i}(y):\n    value = y - {i}\n    return value * {i + 3}\n")
    fresh = E.held_out_bpb(ck, [str(other)], seq_len=64, val_fraction=0.5)
    assert fresh["split_source"] == "the given data" and fresh["bytes"] > 0
    # task records avoid exactly the files whose contents it trained on
    trained, _ = E.training_exposure(ck)
    held_out = {e["path"] for e in recorded["val_files"]}
    assert trained == {str(f.resolve()) for f, key in resolve_inputs([corpus]) if key not in held_out}


def test_the_recorded_split_read_back_scores_as_the_prepared_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the run's data folder, eval reads the checkpoint's held-out files back from what its split recorded:
    the same tokens, groups and bits/byte as preparing the whole corpus again (which a changed file falls back to)."""
    from axl_model import data as D

    corpus = _library_and_tests(tmp_path / "src")
    ck = _checkpoint_with_split(tmp_path, corpus, val_fraction=0.3)
    recorded = E.recorded_split(ck)
    prepared = D.prepare_data([corpus], tmp_path / "again", val_fraction=0.3, progress=False)
    files = D.recorded_val_files(recorded)
    assert [entry for entry, _ in files] == recorded["val_files"]
    written = D.write_val_split(tmp_path / "val", files)
    assert np.array_equal(np.asarray(written.tokens), np.asarray(prepared.val.tokens))
    assert np.array_equal(np.asarray(written.mask), np.asarray(prepared.val.mask))
    assert written.groups == prepared.val.groups and written.n_predicted == prepared.val.n_predicted

    calls = []
    monkeypatch.setattr(D, "prepare_data", lambda *a, **k: calls.append(a) or prepared)
    read_back = E.held_out_bpb(ck, seq_len=64, compressors=True)
    assert not calls and read_back["split_matches_checkpoint"] is True
    monkeypatch.setattr(D, "recorded_val_files", lambda split: None)  # as when a file changed since training
    rebuilt = E.held_out_bpb(ck, seq_len=64, compressors=True)
    assert len(calls) == 1
    for key in ("bpb", "bytes", "tokens", "by_kind", "files", "val_files_sha256"):
        assert read_back[key] == rebuilt[key], key
    for name, result in rebuilt["compressors"].items():  # the same bytes compressed (timings aside)
        if isinstance(result, dict) and "per_file_bpb" in result:
            assert read_back["compressors"][name]["per_file_bpb"] == result["per_file_bpb"], name


def test_axl_eval_defaults_to_the_recorded_split(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no data/ folder of the working tree (fetched corpora) joins the evaluation
    corpus = _library_and_tests(tmp_path / "src")
    ck = _checkpoint_with_split(tmp_path, corpus, val_fraction=0.3)
    assert main(["eval", str(ck), "--seq-len", "64", "--no-table", "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "split: the checkpoint's split, the same files it recorded" in printed
    assert "unit tests:" in printed and "library:" in printed
    assert main(["eval", str(ck), "--data", str(corpus), "--val-fraction", "0.6", "--no-table", "--no-progress"]) == 2
    assert "refusing to score" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- fixer
ORIGINAL = "def clamp(x, low, high):\n    if x < low:\n        return low\n    return min(x, high)\n"
BUGGY = "def clamp(x, low, high):\n    if x > low:\n        return low\n    return min(x, high)\n"
CHECKS = "assert clamp(5, 0, 10) == 5\nassert clamp(-1, 0, 10) == 0\nassert clamp(11, 0, 10) == 10\n"


def test_fixer_checks_in_the_sandbox() -> None:
    record = E.TaskRecord(BUGGY, ORIGINAL, "clamp.py", "wrong-comparison", checks=CHECKS)
    assert E.is_fixed(record, ORIGINAL) == (True, "checks")
    assert E.is_fixed(record, BUGGY) == (False, "checks")
    # a different but correct fix passes the checks
    other = "def clamp(x, low, high):\n    return max(low, min(x, high))\n"
    assert E.is_fixed(record, other) == (True, "checks")
    assert E.is_fixed(record, "") == (False, "empty")


def test_fixer_ast_equality_without_checks() -> None:
    record = E.TaskRecord(BUGGY, ORIGINAL, "clamp.py", "wrong-comparison")
    reformatted = "def clamp(x, low, high):\n    # the same code\n    if (x < low):\n        return low\n    return min(x,high)\n"
    assert E.is_fixed(record, reformatted) == (True, "ast")
    assert E.is_fixed(record, BUGGY) == (False, "ast")


def test_fixer_doctests_from_a_real_function_judge_fixes() -> None:
    """A stdlib function with doctests: the checks accept the original and reject the injected bug."""
    source = read_source(STDLIB, "heapq.py")
    records = [E.TaskRecord(p.source_code, p.target_code, "heapq.py", p.rule, STDLIB)
               for p in fixer_recipe(source, 0) if ">>>" in p.target_code]
    checked = [r for r in map(E.doctest_checks, records[:6]) if r.checks is not None]
    assert checked, "no heapq bug is caught by its doctests"
    record = checked[0]
    assert E.is_fixed(record, record.target_code) == (True, "checks")
    assert E.is_fixed(record, record.source_code) == (False, "checks")

    fixed = E.evaluate_fixer(answering({record.source_code.rstrip("\n"): [record.target_code + "\n\nprint(1)\n"]}),
                             [record], use_doctests=False)
    assert fixed["fixed"] == 1.0 and fixed["by_checks"] == 1 and fixed["parses"] == 1.0
    unchanged = E.evaluate_fixer(answering({record.source_code.rstrip("\n"): [record.source_code]}), [record])
    assert unchanged["fixed"] == 0.0 and unchanged["unchanged"] == 1.0


def test_extract_function_stops_at_the_next_top_level_statement() -> None:
    text = "@cache\ndef f(a,\n      b):\n    return a\n\n\nx = 1\ndef g(): pass\n"
    assert E.extract_function(text) == "@cache\ndef f(a,\n      b):\n    return a\n"


# ---------------------------------------------------------------------------------------------- docs
def test_docs_scores() -> None:
    assert E.token_f1("Return the sum of a and b.", "Return the sum of a and b.") == 1.0
    assert E.token_f1("nothing alike", "Return the sum") == 0.0
    # pred {return, the, sum} vs ref {return, the, sum, of, a, and, b}: p = 1, r = 3/7
    assert E.token_f1("return the sum", "Return the sum of a and b") == pytest.approx(2 * (3 / 7) / (1 + 3 / 7))
    assert E.docs_scores("Add two numbers.\n\nMore.", "  Add two numbers.\nOther")["first_line_exact"] == 1.0
    assert E.docs_scores("Add numbers.", "Add two numbers.")["first_line_exact"] == 0.0


@pytest.mark.parametrize("fmt", ["raw", "specialist"])
def test_docs_task_scores_the_right_docstring(fmt: str) -> None:
    function = "def add(a, b):\n    total = a + b\n    return total\n"
    reference = "Return the sum of a and b.\n\nBoth are numbers."
    record = E.TaskRecord(function, reference, "m.py")
    if fmt == "raw":
        assert E.docs_raw_prompt(function) == 'def add(a, b):\n    """'
        right, wrong = f"{reference}\n    \"\"\"\n    more code", 'Something else."""'
    else:
        right, wrong = f"{reference}\n{END_MARKER}\nmore", f"Something else.{END_MARKER}"
    good = E.evaluate_docs(answering({"def add": [right]}), [record], prompt_format=fmt)
    bad = E.evaluate_docs(answering({"def add": [wrong]}), [record], prompt_format=fmt)
    assert good["count"] == 1 and good["first_line_exact"] == 1.0 and good["f1"] == 1.0
    assert bad["first_line_exact"] == 0.0 and bad["f1"] == 0.0


def test_task_records_come_from_held_out_files_only() -> None:
    from axl_model.recipes import split_of as recipe_split

    records = E.load_task_records("docs", limit=20)
    assert records and all(recipe_split(r.file, 0.05) == "val" for r in records)
    trained = {str(Path(r.path).resolve()) for r in records[:5]}
    others = E.load_task_records("docs", limit=20, trained_files=trained)
    assert others and not {str(Path(r.path).resolve()) for r in others} & trained


def test_training_exposure_follows_the_recorded_split(tmp_path: Path) -> None:
    """A raw-code model's trained files are its train split; data None means the default corpus."""
    from axl_model import ModelConfig, MultiScaleTransformer, save_checkpoint

    corpus = tmp_path / "src"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    y = x * {i}\n    return y + {i}\n")
    model = MultiScaleTransformer(ModelConfig.from_name("tiny"))
    ck = save_checkpoint(model, tmp_path / "ck", metadata={"train_config": {"data": [str(corpus)], "val_fraction": 0.5}})
    trained, on_recipes = E.training_exposure(ck)
    expected = {str(f.resolve()) for f, key in resolve_inputs([corpus]) if split_of(key, 0.5) == "train"}
    assert trained == expected and 0 < len(trained) < 12 and not on_recipes

    ck = save_checkpoint(model, tmp_path / "ck2", metadata={"train_config": {"data": None, "val_fraction": 0.05}})
    trained, _ = E.training_exposure(ck)
    assert str(Path(STDLIB, "heapq.py").resolve()) in trained or str(Path(STDLIB, "bisect.py").resolve()) in trained
    ck = save_checkpoint(model, tmp_path / "ck3", metadata={"train_config": {"data": ["data/docs/train.jsonl"]}})
    assert E.training_exposure(ck)[1] is True
    assert E.training_exposure(make_tiny_checkpoint(tmp_path / "ck4")) == (set(), False)


def test_is_function() -> None:
    assert E.is_function(ORIGINAL) and not E.is_function("\n") and not E.is_function("def f(:\n")


# ---------------------------------------------------------------------------------------------- the CLI
def test_axl_eval_end_to_end_writes_the_table(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no held-out corpus in data/corpora/ here: the split only
    corpus = tmp_path / "src"
    corpus.mkdir()
    for name in ("bisect.py", "heapq.py", "keyword.py", "fnmatch.py", "glob.py", "numbers.py"):
        (corpus / name).write_text(Path(STDLIB, name).read_text())
    table, report_file = tmp_path / "results.md", tmp_path / "report.json"
    args = ["eval", str(tiny), "--data", str(corpus), "--val-fraction", "0.5", "--seq-len", "64",
            "--humaneval", "--limit", "2", "--max-tokens", "16", "--tasks", "docs,fixer", "--task-limit", "2",
            "--out", str(table), "--json", str(report_file), "--threads", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out bits/byte" in printed and "HumanEval: greedy pass@1" in printed

    report = json.loads(report_file.read_text())
    assert 0 < report["held_out"]["bpb"] < 12  # a random model: near log2(258) = 8.01
    assert report["humaneval"]["problems"] == 2 and len(report["humaneval"]["results"]) == 2
    assert report["humaneval"]["n"] == 20 and {"pass@1", "pass@10", "greedy_pass@1"} <= set(report["humaneval"])
    assert report["docs"]["count"] == 2 and report["fixer"]["count"] == 2
    assert report["prompt_format"] == "raw" and report["params"] > 0

    text = table.read_text()
    assert "| `axl-tiny` (tiny, raw prompts) |" in text
    assert f"`axl eval {tiny} --data {corpus} --val-fraction 0.5 --seq-len 64 --humaneval --limit 2 --max-tokens 16" in text
    assert "2/164 problems" in text and "(2 functions)" in text and "(2 bugs;" in text
    assert "| Codex-12M | 12M | 2.00% |" in text and "| CodeGen-350M-mono | 350M | 12.76% |" in text

    # the same checkpoint again replaces its row; another checkpoint adds one
    other = make_tiny_checkpoint(tmp_path / "axl-other", seed=1, max_seq_len=512)
    assert main(["eval", str(tiny), "--data", str(corpus), "--val-fraction", "0.5", "--out", str(table),
                 "--no-progress"]) == 0
    assert main(["eval", str(other), "--data", str(corpus), "--val-fraction", "0.5", "--out", str(table),
                 "--no-progress"]) == 0
    text = table.read_text()
    assert text.count("| `axl-tiny`") == 1 and text.count("| `axl-other`") == 1
    assert "2/164 problems" not in text  # the replaced row ran no HumanEval


def test_axl_eval_errors_in_one_line(tiny: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tiny), "--humaneval", "--n", "1", "--k", "1,10", "--no-table"]) == 2
    assert "every k in 1..n" in capsys.readouterr().err
    assert main(["eval", str(tiny), "--tasks", "poetry", "--no-bpb", "--no-table"]) == 2
    assert "unknown task" in capsys.readouterr().err
