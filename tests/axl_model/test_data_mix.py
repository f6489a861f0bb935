"""The training mix (`axl train --mix stdlib,site-packages`): installed distributions as roots of the site-packages
part, held-out corpora and the project's own code left out, duplicates dropped across the whole mix, split keys
that do not move with the environment, the mix recorded by name and version, and `axl eval` on it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from axl_model import data as D
from axl_model import evaluate as E
from axl_model.checkpoint import load_checkpoint, load_metadata
from axl_model.cli import main
from axl_model.data import content_id, mix_inputs, prepare_data, resolve_inputs, split_of


def _module(seed: int, lines: int = 12) -> str:
    """A small distinct module (distinct lines, so near-duplicate search judges it)."""
    body = "".join(f"    value_{seed}_{i} = x * {seed + i} + {i * i}\n" for i in range(lines))
    return f"def f_{seed}(x):\n{body}    return value_{seed}_0\n"


def _dist(site: Path, name: str, version: str, files: dict[str, str], *, editable: bool = False,
          extra_record: tuple[str, ...] = ()) -> None:
    """An installed distribution: its files and a dist-info with METADATA and a RECORD, as pip writes them."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if editable:
        (info / "direct_url.json").write_text(json.dumps({"url": "file:///src", "dir_info": {"editable": True}}))
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    record = [*files, *extra_record, f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in record))


SHARED = _module(900)  # in the standard library and, copied, in a package
NEAR = _module(901, lines=30)
NEAR_EDIT = NEAR.replace("value_901_3 = x * 904 + 9", "value_901_3 = x * 904 + 10")  # Jaccard 30/32


def _environment(root: Path) -> tuple[Path, Path]:
    """(a standard library folder, a site-packages folder) of a fake environment."""
    stdlib = root / "lib" / "python3.11"
    for i in range(12):
        (stdlib / "json").mkdir(parents=True, exist_ok=True)
        (stdlib / "json" / f"mod{i}.py").write_text(_module(i))
    (stdlib / "urllib").mkdir()
    (stdlib / "urllib" / "shared.py").write_text(SHARED)  # sorts after site-packages/...: the stdlib copy still wins
    site = stdlib / "site-packages"  # inside the stdlib folder, as in a real installation: the walk skips it
    _dist(site, "alpha", "1.0", {"alpha/__init__.py": _module(100), "alpha/core.py": _module(101),
                                 "alpha/near.py": NEAR, "alpha/_vendor/six.py": _module(102),
                                 "alpha/tests/test_core.py": _module(103)},
          extra_record=("alpha/__pycache__/core.cpython-311.pyc", "../../../bin/alpha"))
    _dist(site, "Beta_Pkg", "2.0", {**{f"beta_pkg/m{i}.py": _module(200 + i) for i in range(10)},
                                    "beta_pkg/copy_of_shared.py": SHARED, "beta_pkg/near.py": NEAR_EDIT})
    _dist(site, "boltons", "26.2.0", {"boltons/iterutils.py": _module(300)})  # a PyPI held-out corpus package
    _dist(site, "axl-mesh", "0.1.0", {"__editable___axl_mesh_0_1_0_finder.py": _module(400)}, editable=True)
    _dist(site, "ownpkg", "0.1", {"axl_model/extra.py": _module(401)})  # ships a project package
    return stdlib, site


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.chdir(tmp_path)  # no fetched corpus of the working tree
    stdlib, site = _environment(tmp_path / "venv")
    monkeypatch.setattr(D, "stdlib_dir", lambda: stdlib)
    monkeypatch.setattr(D, "site_package_dirs", lambda: [site])
    return stdlib, site


def test_site_packages_part_is_one_root_per_distribution(env) -> None:
    keys = {key for _, key in resolve_inputs(["mix:site-packages"])}
    assert keys == {"site-packages/alpha/alpha/__init__.py", "site-packages/alpha/alpha/core.py",
                    "site-packages/alpha/alpha/near.py", "site-packages/alpha/alpha/tests/test_core.py",
                    *(f"site-packages/beta-pkg/beta_pkg/m{i}.py" for i in range(10)),
                    "site-packages/beta-pkg/beta_pkg/copy_of_shared.py", "site-packages/beta-pkg/beta_pkg/near.py"}
    excluded = {p.name: p.excluded for p in D.installed_packages() if p.excluded}
    assert set(excluded) == {"boltons", "axl-mesh", "ownpkg"}
    assert "held-out pypi corpus" in excluded["boltons"] and "own code" in excluded["ownpkg"]
    # the standard library part is keyed as --data <stdlib> is, without the site-packages folder inside it
    assert resolve_inputs(["mix:stdlib"]) == resolve_inputs([str(D.stdlib_dir())])
    assert mix_inputs("stdlib, site-packages,stdlib") == ["mix:stdlib", "mix:site-packages"]
    with pytest.raises(ValueError, match="unknown part 'pypi'"):
        mix_inputs("stdlib,pypi")


def test_a_package_of_a_fetched_eval_corpus_is_left_out(env, tmp_path: Path) -> None:
    """Installed and in an evaluation corpus's manifest: never trained on, even when not in the pinned list."""
    _, site = env
    _dist(site, "Fancy.Parser", "1.2", {"fancy_parser/__init__.py": _module(500)})
    assert any(k.startswith("site-packages/fancy-parser/") for _, k in resolve_inputs(["mix:site-packages"]))
    corpus = tmp_path / "data" / "corpora" / "pypi"
    corpus.mkdir(parents=True)
    (corpus / "manifest.json").write_text(json.dumps({"packages": [{"name": "fancy_parser", "version": "1.2"}]}))
    assert not any("fancy" in k for _, k in resolve_inputs(["mix:site-packages"]))
    prepared = prepare_data(["mix:site-packages"], tmp_path / "cache", val_fraction=0.2, progress=False)
    left = {r["name"]: r["excluded"] for r in prepared.split["mix"] if "excluded" in r}
    assert left["fancy-parser"] == "in the held-out pypi corpus" and "boltons" in left


def test_duplicates_are_dropped_across_the_whole_mix(env, tmp_path: Path) -> None:
    prepared = prepare_data(["mix:stdlib", "mix:site-packages"], tmp_path / "cache", val_fraction=0.2, progress=False)
    split, stats = prepared.split, prepared.stats
    assert stats.rejected["duplicate"] == 1  # beta_pkg's copy of the stdlib's shared.py: the stdlib's is kept
    keys = {e["path"] for e in split["val_files"]}
    shared_id = content_id(hashlib.sha1(SHARED.encode()).hexdigest())
    if split_of("urllib/shared.py", 0.2) == "val":  # the stdlib's key decides, not the copy's
        assert "urllib/shared.py" in keys and shared_id not in split["train_sha1"]
    else:
        assert shared_id in split["train_sha1"] and not {e["sha1"] for e in split["val_files"]} & {shared_id}
    # alpha's near.py and beta_pkg's edited copy are one cluster across two roots: one side, one scored file
    assert stats.near_duplicate_clusters == 1 and stats.near_duplicate_files == 2
    near_ids = {content_id(hashlib.sha1(t.encode()).hexdigest()) for t in (NEAR, NEAR_EDIT)}
    scored = {e["sha1"] for e in split["val_files"]} & near_ids
    trained = near_ids & set(split["train_sha1"])
    assert (not scored and trained == near_ids) or (len(scored) == 1 and not trained)
    # each part's contribution, and each root's
    assert set(stats.parts) == {"stdlib", "site-packages"}
    assert stats.parts["stdlib"]["documents"] == 13 and stats.parts["stdlib"]["files"] == 13
    assert stats.parts["site-packages"]["files"] == 16
    assert sum(p["documents"] for p in stats.parts.values()) == sum(stats.documents.values())
    assert sum(p["bytes"] for p in stats.parts.values()) == sum(r.get("bytes", 0) for r in split["mix"])


def test_split_keys_do_not_move_with_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two environments at other paths and Python versions split their packages the same way."""
    monkeypatch.chdir(tmp_path)
    splits = []
    for where in ("venv-a/lib/python3.11", "other/place/lib/python3.12"):
        site = tmp_path / where / "site-packages"
        _dist(site, "alpha", "1.0", {f"alpha/m{i}.py": _module(i) for i in range(40)})
        monkeypatch.setattr(D, "site_package_dirs", lambda site=site: [site])
        prepared = prepare_data(["mix:site-packages"], tmp_path / "cache", val_fraction=0.2, progress=False)
        splits.append(prepared.split)
    assert splits[0]["val_files"] and splits[0]["val_files"] == splits[1]["val_files"]
    assert splits[0]["data"] == splits[1]["data"] == ["mix:site-packages=alpha==1.0"]


def test_the_checkpoint_records_the_mix_and_eval_scores_exactly_it(env, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    _, site = env
    assert main(["train", "--preset", "tiny", "--mix", "stdlib,site-packages", "--max-steps", "1", "--batch-size", "2",
                 "--seq-len", "32", "--threads", "1", "--val-fraction", "0.2", "--out", str(tmp_path / "ck"),
                 "--eval-interval", "0", "--no-progress"]) == 0
    ck = tmp_path / "ck"
    metadata = load_metadata(ck)
    recorded = E.recorded_split(ck)
    assert metadata["train_config"]["data"] == ["mix:stdlib", "mix:site-packages"]
    assert recorded["data"] == ["mix:stdlib", "mix:site-packages=alpha==1.0,beta-pkg==2.0"]
    roots = {(r["part"], r["name"], r["version"]) for r in recorded["mix"] if "excluded" not in r}
    assert ("site-packages", "alpha", "1.0") in roots and ("site-packages", "beta-pkg", "2.0") in roots
    assert {r["part"] for r in recorded["mix"]} == {"stdlib", "site-packages"}
    assert str(tmp_path) not in json.dumps(recorded)  # roots by name and version, never by folder
    assert set(metadata["data"]["parts"]) == {"stdlib", "site-packages"}
    printed = capsys.readouterr().out  # axl train's data summary: what each part contributed
    assert printed.index("data stdlib: 13 of 13 files kept") < printed.index("data site-packages: ")

    # a package installed after training does not join the recorded split: eval scores exactly its files
    _dist(site, "gamma", "3.0", {f"gamma/g{i}.py": _module(600 + i) for i in range(30)})
    scored = E.held_out_bpb(ck, seq_len=32)
    assert scored["split_matches_checkpoint"] is True and scored["files"] == len(recorded["val_files"])
    # another split of the mix holds training files: refused
    with pytest.raises(ValueError, match="trained on"):
        E.held_out_bpb(ck, ["mix:site-packages"], seq_len=32, val_fraction=0.6)
    # a held-out corpus whose file it trained on (a copy installed under another name) is refused by content
    trained_text = next(f.read_text() for f, k in resolve_inputs(["mix:site-packages"]) if k.startswith(
        "site-packages/beta-pkg/") and content_id(hashlib.sha1(f.read_bytes()).hexdigest()) in recorded["train_sha1"])
    with pytest.raises(ValueError, match="trained on"):
        E.refuse_corpus_overlap("pypi", [("pkg/copied.py", trained_text.encode())], ck)
    E.refuse_corpus_overlap("pypi", [("pkg/new.py", _module(700).encode())], ck)  # an unseen file is fine


def test_axl_data_mix_says_what_each_part_holds(env, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "mix", "stdlib,site-packages", "--packages"]) == 0
    out = capsys.readouterr().out
    assert "data stdlib: 13 of 13 files kept" in out and "data site-packages: " in out
    assert "alpha 1.0 (" in out and "beta-pkg 2.0 (" in out
    assert "boltons 26.2.0 (in the held-out pypi corpus)" in out and "axl-mesh 0.1.0 (the project's own code" in out
    assert main(["data", "mix", "stdlib,nope"]) == 2
    assert "unknown part 'nope'" in capsys.readouterr().err


def test_the_mix_checkpoint_loads(env, tmp_path: Path) -> None:
    """--mix with --data reads both; the checkpoint is an ordinary one."""
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(6):
        (extra / f"e{i}.py").write_text(_module(800 + i))
    assert main(["train", "--preset", "tiny", "--mix", "site-packages", "--data", str(extra), "--max-steps", "1",
                 "--batch-size", "2", "--seq-len", "32", "--threads", "1", "--val-fraction", "0.2",
                 "--out", str(tmp_path / "ck2"), "--eval-interval", "0", "--no-progress"]) == 0
    assert set(load_metadata(tmp_path / "ck2")["data"]["parts"]) == {"site-packages", "data"}
    assert load_checkpoint(tmp_path / "ck2").config.name == "tiny"


# ---------------------------------------------------------------------------------------------- weights
def test_mix_weights_parse() -> None:
    assert mix_inputs("stdlib:3,site-packages:1") == ["mix:stdlib:3", "mix:site-packages:1"]
    assert mix_inputs("stdlib:3, site-packages") == ["mix:stdlib:3", "mix:site-packages:1"]  # unweighted: 1
    assert mix_inputs("stdlib:1,site-packages:1") == ["mix:stdlib", "mix:site-packages"]  # all 1: no weights
    assert mix_inputs("stdlib:3") == ["mix:stdlib:3"]  # beside --data (at 1)
    assert mix_inputs("stdlib:0.5,site-packages:1") == ["mix:stdlib:0.5", "mix:site-packages:1"]
    for bad, message in (("stdlib:0,site-packages", "positive number"), ("stdlib:x", "positive number"),
                         ("stdlib:inf", "positive number"), ("stdlib:2,stdlib:3", "two weights"),
                         ("pypi:2", "unknown part 'pypi'")):
        with pytest.raises(ValueError, match=message):
            mix_inputs(bad)
    assert D.mix_weights(["mix:stdlib:3", "mix:site-packages=a==1"]) == {"stdlib": 3.0, "site-packages": 1.0}
    assert D.mix_weights(["mix:stdlib:3", "src/"]) == {"stdlib": 3.0, "data": 1.0}
    assert D.mix_weights(["mix:stdlib", "mix:site-packages"]) is None and D.mix_weights(None) is None


def test_a_weighted_mix_splits_as_the_unweighted_one_and_records_its_weights(env, tmp_path: Path) -> None:
    plain = prepare_data(mix_inputs("stdlib,site-packages"), tmp_path / "cache", val_fraction=0.2, progress=False)
    weighted = prepare_data(mix_inputs("stdlib:3,site-packages:1"), tmp_path / "cache", val_fraction=0.2,
                            progress=False)
    assert weighted.folder != plain.folder  # the weights are in the data folder's key
    assert weighted.split["val_files"] == plain.split["val_files"]  # the same held-out files
    assert weighted.split["train_sha1"] == plain.split["train_sha1"]
    assert weighted.split["data"] == ["mix:stdlib:3", "mix:site-packages:1=alpha==1.0,beta-pkg==2.0"]
    assert weighted.split["mix_weights"] == {"stdlib": 3.0, "site-packages": 1.0} and "mix_weights" not in plain.split
    assert weighted.stats.weights == {"stdlib": 3.0, "site-packages": 1.0} and plain.stats.weights == {}
    train = weighted.train
    assert train.part_weights == {"stdlib": 3.0, "site-packages": 1.0} and plain.train.part_weights == {}
    (s0, s1), (p0, p1) = train.groups["stdlib"], train.groups["site-packages"]
    assert s0 == 0 and s1 == p0 and p1 == len(train) == len(plain.train)  # part by part, the same tokens
    assert s1 - s0 == weighted.stats.parts["stdlib"]["train_bytes"] + 2 * weighted.stats.parts["stdlib"]["train"]
    # the recorded inputs rebuild exactly it (what `axl eval` does with a checkpoint's split)
    assert prepare_data(weighted.split["data"], tmp_path / "cache", val_fraction=0.2, progress=False).folder \
        == weighted.folder
    shares = D.mix_shares(weighted.stats.parts, weighted.stats.weights)
    stdlib_bytes, site_bytes = (weighted.stats.parts[p]["train_bytes"] for p in ("stdlib", "site-packages"))
    assert shares["stdlib"] == pytest.approx(3 * stdlib_bytes / (3 * stdlib_bytes + site_bytes))


def test_the_sampler_draws_parts_by_weight(env, tmp_path: Path) -> None:
    weighted = prepare_data(mix_inputs("stdlib:3,site-packages:1"), tmp_path / "cache", val_fraction=0.2,
                            progress=False)
    stop = weighted.train.groups["stdlib"][1]  # the stdlib's tokens come first
    sampler = D.WindowSampler(weighted.train, seq_len=16, batch_size=4, seed=1)
    starts = sampler.starts(np.random.default_rng(0), 20_000)
    assert starts.min() >= 0 and starts.max() < len(weighted.train) - 16
    expected = 3 * stop / (3 * stop + len(weighted.train) - stop)  # each stdlib token 3x as likely
    assert abs((starts < stop).mean() - expected) < 0.02
    assert abs(expected - stop / len(weighted.train)) > 0.1  # far from what a uniform draw gives
    assert len(np.unique(starts[starts >= stop])) > 100  # spread over the other part too
    # no weights: the same uniform draw as always (batch n of seed s unchanged by the weighted path)
    plain = prepare_data(mix_inputs("stdlib,site-packages"), tmp_path / "cache", val_fraction=0.2, progress=False)
    sampler = D.WindowSampler(plain.train, seq_len=16, batch_size=4, seed=1)
    starts = np.random.default_rng([1, 0]).integers(0, len(plain.train) - 16, size=4)
    assert np.array_equal(sampler.batch(0)[0].numpy(), np.stack([plain.train.tokens[s:s + 16] for s in starts]))


def test_train_with_a_weighted_mix_records_it_and_eval_rebuilds_it(env, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--preset", "tiny", "--mix", "stdlib:3,site-packages:1", "--max-steps", "1",
                 "--batch-size", "2", "--seq-len", "32", "--threads", "1", "--val-fraction", "0.2",
                 "--out", str(tmp_path / "ck"), "--eval-interval", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "data stdlib: 13 of 13 files kept" in printed and "weight 3: " in printed and "% unweighted)" in printed
    ck = tmp_path / "ck"
    recorded = E.recorded_split(ck)
    assert recorded["data"] == ["mix:stdlib:3", "mix:site-packages:1=alpha==1.0,beta-pkg==2.0"]
    assert recorded["mix_weights"] == {"stdlib": 3.0, "site-packages": 1.0}
    settings = E.split_to_score(ck)
    assert E.prepared_data_cache(ck, settings) is not None  # eval reuses training's folder: the same inputs
    scored = E.held_out_bpb(ck, seq_len=32)
    assert scored["split_matches_checkpoint"] is True and scored["files"] == len(recorded["val_files"])


def test_axl_data_mix_shows_the_shares(env, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "mix", "stdlib:3,site-packages:1"]) == 0
    out = capsys.readouterr().out
    assert "mix stdlib:3,site-packages:1:" in out
    stdlib_line = next(line for line in out.splitlines() if "data stdlib:" in line)
    assert "weight 3: " in stdlib_line and "% of training windows" in stdlib_line
    assert main(["data", "mix", "stdlib,site-packages"]) == 0
    out = capsys.readouterr().out
    assert "% of training windows" in out and "weight" not in out


# ---------------------------------------------------------------------------------------------- generated code
PROTOBUF = ("# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.  DO NOT EDIT!\n"
            "# source: thing.proto\n" + _module(950))
STAINLESS = "# File generated from our OpenAPI spec by Stainless. See CONTRIBUTING.md for details.\n\n" + _module(951)
CODEC = ('""" Python Character Mapping Codec cp037 generated from \'MAPPINGS/CP037.TXT\' with gencodec.py.\n\n"""\n'
         + _module(952))


def test_generated_header() -> None:
    assert D.generated_header(PROTOBUF.encode()) and D.generated_header(STAINLESS.encode())
    assert D.generated_header(CODEC.encode())
    assert D.generated_header(b"#!/usr/bin/env python\n# @generated\nx = 1\n")
    assert D.generated_header(b"'''\nThis file is auto-generated; do not modify.\n'''\nx = 1\n")
    assert not D.generated_header(_module(953).encode())
    # talking about generating, in code or after the header, is not a header
    assert not D.generated_header(b'"""Parse values."""\nx = "generated by hand"\n')
    assert not D.generated_header(b"import os\n# generated by the tool below\nx = 1\n")
    assert not D.generated_header(b"\n" * 10 + b"# Generated by the protocol buffer compiler.\n")


def test_the_mix_drops_generated_files_and_says_how_many(env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, site = env
    _dist(site, "apiclient", "1.0", {"apiclient/types.py": STAINLESS, "apiclient/thing_pb2.py": PROTOBUF,
                                     "apiclient/core.py": _module(954)})
    assert main(["data", "mix", "site-packages", "--packages"]) == 0
    out = capsys.readouterr().out
    assert "generated 2" in out.splitlines()[0]  # a rejection reason beside the others
    assert "generated files dropped: apiclient 2" in out
    assert main(["data", "mix", "site-packages", "--keep-generated"]) == 0
    out = capsys.readouterr().out
    assert "generated" not in out.splitlines()[0] and "generated files dropped" not in out
    # off unless asked for (the filter a split recorded before it existed), and part of the folder's key when on
    plain = prepare_data(["mix:site-packages"], tmp_path / "cache", val_fraction=0.2, progress=False)
    dropping = prepare_data(["mix:site-packages"], tmp_path / "cache", val_fraction=0.2, progress=False,
                            filters=D.FilterConfig(generated=True))
    assert plain.folder != dropping.folder and dropping.stats.rejected["generated"] == 2
    assert plain.stats.rejected["generated"] == 0 and plain.split["filters"]["generated"] is False
    old = {k: v for k, v in plain.split["filters"].items() if k != "generated"}
    assert D.FilterConfig(**old) == D.FilterConfig()


def test_train_on_the_mix_records_the_generated_filter(env, tmp_path: Path) -> None:
    _, site = env
    _dist(site, "apiclient", "1.0", {"apiclient/types.py": STAINLESS, "apiclient/core.py": _module(954)})
    common = ["--preset", "tiny", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--threads", "1",
              "--val-fraction", "0.2", "--eval-interval", "0", "--no-progress"]
    assert main(["train", "--mix", "stdlib,site-packages", "--out", str(tmp_path / "a"), *common]) == 0
    recorded = E.recorded_split(tmp_path / "a")
    assert recorded["filters"]["generated"] is True
    assert load_metadata(tmp_path / "a")["data"]["rejected"]["generated"] == 1
    assert main(["train", "--mix", "stdlib,site-packages", "--keep-generated", "--out", str(tmp_path / "b"),
                 *common]) == 0
    assert E.recorded_split(tmp_path / "b")["filters"]["generated"] is False
    # a resumed run keeps the filter its split was made with
    assert main(["train", "--mix", "stdlib,site-packages", "--out", str(tmp_path / "b"), "--resume",
                 *common[:2], "--max-steps", "2", *common[4:]]) == 0
    assert load_metadata(tmp_path / "b")["step"] == 2
    assert E.recorded_split(tmp_path / "b")["filters"]["generated"] is False
