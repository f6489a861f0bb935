"""Next-line completion (seeded sample, exact match, edit similarity, previous-line baseline) and the second held-out
corpus in `axl eval`: bits/byte on both corpora, next-line on both, the results table's columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from axl_model import nextline as N
from axl_model.checkpoint import load_checkpoint
from axl_model.cli import main
from axl_model.corpora import CorpusSplit, corpus_bpb, corpora_to_score, fetch_pypi_corpus, load_corpus
from axl_model.evaluate import model_generate_fn, recorded_split, write_results_table
from axl_model.train import evaluate_bpb
from tests.axl_model.test_corpora import make_wheel
from tests.checkpoints import make_tiny_checkpoint

DOCS = [("a.py", "import os\n\n\ndef f(x):\n    return x\n\n\ndef g(x):\n    return x\n"),
        ("b.py", "x = 1\ny = 2\n   \nz = 3\n")]


def test_sample_is_seeded_uniform_and_skips_blank_lines() -> None:
    cases = N.sample_lines(DOCS, 100)
    assert len(cases) == 8 and all(c.target.strip() for c in cases)  # every non-blank line once
    assert N.sample_lines(DOCS, 3, seed=1) == N.sample_lines(DOCS, 3, seed=1) != N.sample_lines(DOCS, 3, seed=2)
    g_return = next(c for c in cases if c.file == "a.py" and c.line == 8)
    assert g_return.prompt == "import os\n\n\ndef f(x):\n    return x\n\n\ndef g(x):\n"
    assert g_return.target == "    return x" and g_return.previous == "def g(x):"
    z = next(c for c in cases if c.target == "z = 3")
    assert z.previous == "y = 2"  # the whitespace-only line is skipped
    assert next(c for c in cases if c.line == 0 and c.file == "a.py").previous == ""


def test_edit_similarity() -> None:
    assert N.edit_similarity("return x", "return x") == 1.0
    assert N.edit_similarity("", "") == 1.0 and N.edit_similarity("abc", "") == 0.0
    assert N.edit_similarity("return y", "return x") == pytest.approx(14 / 16)


def test_scores_against_the_previous_line_baseline() -> None:
    seen = []

    def oracle(prompts, n, spec):  # answers every line right except the first line of each file
        seen.append(spec)
        out = []
        for prompt in prompts:
            text = next(t for _, t in DOCS if t.startswith(prompt)) if prompt else ""
            out.append([text[len(prompt):].split("\n", 1)[0] + "\nmore" if prompt else "nope"])
        return out

    report = N.evaluate_nextline(oracle, DOCS, 100)
    assert seen[0].temperature == 0.0 and seen[0].stop == ("\n",) and seen[0].max_tokens == N.NEXTLINE_MAX_TOKENS
    assert report["lines"] == 8 and report["exact"] == pytest.approx(6 / 8)
    # baseline: "return x" after "def g(x):" no; "    return x" repeated never; nothing equal to its previous line
    assert report["baseline"]["exact"] == 0.0 and 0 < report["baseline"]["similarity"] < report["similarity"]
    assert {r["prediction"] for r in report["results"]} >= {"    return x", "nope"}


def test_real_model_uses_the_kv_cache_generator(tmp_path: Path) -> None:
    model = load_checkpoint(make_tiny_checkpoint(tmp_path / "ck", max_seq_len=256))
    report = N.evaluate_nextline(model_generate_fn(model), DOCS, 4, max_tokens=8)
    assert report["lines"] == 4 and all("\n" not in r["prediction"] for r in report["results"])
    assert 0.0 <= report["similarity"] <= 1.0


def test_corpus_split_scores_every_byte(tmp_path: Path) -> None:
    folder, package = tmp_path / "wheels", make_wheel(tmp_path / "wheels")
    fetch_pypi_corpus(tmp_path / "pypi", packages=[package], source=str(folder))
    documents = load_corpus("pypi", tmp_path)
    assert sorted(name for name, _ in documents) == ["tiny-pkg-1.0/tiny_pkg/__init__.py", "tiny-pkg-1.0/tiny_pkg/core.py"]
    assert len(load_corpus("pypi", tmp_path, max_bytes=1)) == 1  # whole files, in a fixed hashed order
    model = load_checkpoint(make_tiny_checkpoint(tmp_path / "ck", max_seq_len=256))
    result = corpus_bpb(model, "pypi", root=tmp_path, seq_len=64)
    split = CorpusSplit(documents)
    assert result["bytes"] == sum(len(d) + 1 for _, d in documents)  # bytes and each end-of-file
    assert result["bpb"] == pytest.approx(evaluate_bpb(model, split, 64)) and result["packages"] == ["tiny-pkg==1.0"]
    assert corpora_to_score("auto", tmp_path) == (True, ["pypi"])
    assert corpora_to_score("split", tmp_path) == (True, [])
    assert corpora_to_score("auto", tmp_path / "none") == (True, [])
    with pytest.raises(ValueError, match="axl data corpus pypi"):
        corpora_to_score("both", tmp_path / "none")


def test_axl_eval_reports_both_corpora_and_next_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    folder, package = tmp_path / "wheels", make_wheel(tmp_path / "wheels")
    fetch_pypi_corpus(Path("data/corpora/pypi"), packages=[package], source=str(folder))
    source = tmp_path / "src"
    source.mkdir()
    for i in range(6):
        (source / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j}\n\n" for j in range(i + 3)))
    tiny = make_tiny_checkpoint(tmp_path / "axl-tiny", max_seq_len=256)
    table, report_file = tmp_path / "results.md", tmp_path / "report.json"
    assert main(["eval", str(tiny), "--data", str(source), "--val-fraction", "0.5", "--seq-len", "64",
                 "--nextline", "3", "--out", str(table), "--json", str(report_file), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "pypi corpus bits/byte" in printed and "next line (pypi, 3 lines)" in printed
    report = json.loads(report_file.read_text())
    assert report["held_out"]["bpb"] > 0 and report["held_out_pypi"]["files"] == 2
    assert set(report["nextline"]) == {"held_out", "pypi"} and report["nextline"]["pypi"]["lines"] == 3
    text = table.read_text()
    assert "| PyPI bits/byte | Next-line completion |" in text and "prev line" in text
    assert "--nextline 3" in text and '"results"' not in text  # the sampled lines stay in the JSON report

    assert main(["eval", str(tiny), "--corpus", "pypi", "--no-table", "--no-progress", "--seq-len", "64"]) == 0
    assert "pypi corpus bits/byte" in capsys.readouterr().out
    assert main(["eval", str(tiny), "--nextline", "0", "--no-table"]) == 2
    monkeypatch.chdir(source)
    assert main(["eval", str(tiny), "--corpus", "pypi", "--no-table"]) == 2
    assert "axl data corpus pypi" in capsys.readouterr().err


def test_table_without_the_new_measures_shows_dashes(tmp_path: Path) -> None:
    report = {"model": "m", "checkpoint": "c", "preset": "tiny", "params": 1000, "prompt_format": "raw",
              "date": "today", "machine": "here"}
    text = write_results_table(report, tmp_path / "r.md").read_text()
    assert "| `m` (tiny, raw prompts) | 1K | – | – | – | – | – | – | today |" in text


def test_next_line_reads_the_recorded_split_without_preparing_data(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's own held-out files come straight from the paths and hashes it recorded: the same texts, in
    the same order, as the prepared split gives; a file changed since training sends it back to preparing."""
    from axl_model import data as D
    from axl_model.data import prepare_data
    from tests.axl_model.test_evaluate import _checkpoint_with_split, _library_and_tests

    corpus = _library_and_tests(tmp_path / "src")
    ck = _checkpoint_with_split(tmp_path, corpus, val_fraction=0.3)
    split = recorded_split(ck)
    prepared = prepare_data([corpus], tmp_path / "again", val_fraction=0.3, progress=False)
    expected = [text for _, text in N.split_documents(prepared.val)]
    documents = N.recorded_split_documents(split)
    assert [text for _, text in documents] == expected and len(expected) == len(split["val_files"]) > 1
    assert [name for name, _ in documents] == [e["path"] for e in split["val_files"]]

    calls = []
    monkeypatch.setattr(D, "prepare_data", lambda *a, **k: calls.append(a) or prepare_data(*a, **k))
    assert N.held_out_split_documents(ck) == documents and not calls  # no data prepared
    changed = corpus / split["val_files"][0]["path"]
    changed.write_text(changed.read_text() + "# edited after training\n")
    assert N.recorded_split_documents(split) is None
    assert [t for _, t in N.held_out_split_documents(ck)] != expected and len(calls) == 1  # prepared again
    assert N.recorded_split_documents({**split, "val_files": [{"path": "x.jsonl::3", "sha1": "0"}]}) is None


def test_hand_written_notes_survive_a_rewrite(tmp_path: Path) -> None:
    """docs/results.md is regenerated whole; what sits between the notes markers is kept verbatim."""
    def report(name: str) -> dict:
        return {"model": name, "checkpoint": name, "preset": "tiny", "params": 1000, "prompt_format": "raw",
                "date": "today", "machine": "here"}

    table = write_results_table(report("m"), tmp_path / "r.md")
    text = table.read_text()
    begin, end = "<!-- axl-notes: kept verbatim when axl eval rewrites this file -->", "<!-- /axl-notes -->"
    assert "## Notes" in text and f"{begin}\n{end}" in text  # an empty block to write into
    note = "### A/B\n\n| run | bits/byte |\n|---|---|\n| a | 2.727 |\n"
    table.write_text(text.replace(f"{begin}\n", f"{begin}\n{note}"))
    text = write_results_table(report("n"), table).read_text()
    assert "| `n` (tiny" in text and "| `m` (tiny" in text  # the rows: rewritten from the data block
    assert f"{begin}\n{note}{end}" in text and text.count("### A/B") == 1
    assert text.index("## Notes") < text.index("## Reference")
    assert write_results_table(report("n"), table).read_text() == text  # a rewrite of the same row changes nothing


def test_next_line_refuses_files_the_checkpoint_trained_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """As bits/byte does: a split holding a training file, or a corpus holding a copy of one, is not held out."""
    from tests.axl_model.test_evaluate import _checkpoint_with_split, _library_and_tests

    monkeypatch.chdir(tmp_path)
    corpus = _library_and_tests(tmp_path / "src")
    ck = _checkpoint_with_split(tmp_path, corpus, val_fraction=0.3)
    assert N.held_out_split_documents(ck)  # its own split is fine
    with pytest.raises(ValueError, match="refusing to score next-line completion .* trained on"):
        N.held_out_split_documents(ck, [str(corpus)], 0.6)
    assert main(["eval", str(ck), "--no-bpb", "--nextline", "2", "--corpus", "split", "--data", str(corpus),
                 "--val-fraction", "0.6", "--no-table", "--no-progress", "--threads", "1"]) == 2
    assert "refusing to score next-line completion" in capsys.readouterr().err

    # a held-out corpus with a copy of a training file: refused for next-line and bits/byte alike
    folder, package = tmp_path / "wheels", make_wheel(tmp_path / "wheels")
    fetch_pypi_corpus(Path("data/corpora/pypi"), packages=[package], source=str(folder))
    held_out = {e["path"] for e in recorded_split(ck)["val_files"]}
    trained = next(f for f in sorted(corpus.rglob("*.py")) if f.relative_to(corpus).as_posix() not in held_out)
    copy = Path("data/corpora/pypi/tiny-pkg-1.0/tiny_pkg/copied.py")
    copy.write_bytes(trained.read_bytes())
    for extra in (["--no-bpb", "--nextline", "2"], []):
        assert main(["eval", str(ck), "--corpus", "pypi", "--no-table", "--no-progress", "--threads", "1", *extra]) == 2
        assert "refusing to score the pypi corpus" in capsys.readouterr().err
    copy.unlink()
    assert main(["eval", str(ck), "--corpus", "pypi", "--no-bpb", "--nextline", "2", "--no-table",
                 "--no-progress", "--threads", "1"]) == 0
