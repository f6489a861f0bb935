import json

import pytest
import torch

from axl_model import (CheckpointError, ModelConfig, MultiScaleTransformer, load_checkpoint, load_training_state,
                       save_checkpoint)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MultiScaleTransformer(ModelConfig.from_name("tiny", fim=True))


def test_save_load_round_trip(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "ck", metadata={"specialist": "coder"})
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "config.json", "metadata.json"}
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    ids = torch.randint(0, 256, (2, 30))
    assert torch.equal(model.eval()(ids), loaded(ids))


def test_per_scale_shapes_round_trip_and_a_uniform_config_json_is_unchanged(tmp_path):
    config = ModelConfig.from_name("tiny", scales={"fine": {"local_window": 16}, "medium": {"d_model": 32, "n_heads": 2}})
    model = MultiScaleTransformer(config).eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ck"))
    assert loaded.config == config and loaded.config.shape("medium").d_model == 32
    ids = torch.randint(0, 256, (1, 40))
    assert torch.equal(model(ids), loaded(ids))
    assert "scales" not in json.loads(ModelConfig.from_name("tiny").to_json())  # older readers still load it


def test_training_state_round_trip(model, tmp_path):
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = {"step": 7, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "pos": (1, 2)}
    save_checkpoint(model, tmp_path / "ck", training_state=state)
    restored = load_training_state(tmp_path / "ck")
    assert restored["step"] == 7 and restored["pos"] == (1, 2)
    assert torch.equal(restored["rng"], state["rng"])
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(restored["optimizer"])  # int parameter keys survive JSON
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_overwrite_is_atomic_and_leaves_no_temp_files(model, tmp_path):
    save_checkpoint(model, tmp_path / "ck")
    save_checkpoint(model, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_weights_names_the_file(model, tmp_path):
    save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_corrupt_weights_name_the_file(model, tmp_path):
    save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_corrupt_config_names_the_file(model, tmp_path):
    save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "ck")


def test_mismatched_config_is_reported(model, tmp_path):
    save_checkpoint(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["d_model"] = 128
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "ck")


def test_pickle_files_are_never_loaded(model, tmp_path):
    """A checkpoint is safetensors + JSON: a planted pickle is ignored, not executed."""
    save_checkpoint(model, tmp_path / "ck")
    (tmp_path / "ck" / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    load_checkpoint(tmp_path / "ck")


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail a test that builds a real model: only the meta device (shapes, no memory) is allowed."""
    import axl_model.checkpoint

    real = axl_model.checkpoint.MultiScaleTransformer

    def meta_only(config):
        assert torch.get_default_device().type == "meta", "the model was allocated before its weights were checked"
        return real(config)

    monkeypatch.setattr(axl_model.checkpoint, "MultiScaleTransformer", meta_only)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_a_huge_dimension_in_config_json_is_a_clear_error(model, tmp_path, no_allocation):
    save_checkpoint(model, tmp_path / "ck")
    _edit_config(tmp_path / "ck", d_model=1 << 30)
    with pytest.raises(CheckpointError, match=r"config.json.*d_model must be at most"):
        load_checkpoint(tmp_path / "ck")


def test_config_larger_than_its_weights_fails_before_allocating(model, tmp_path, no_allocation):
    """A config within the limits that would allocate ~5 GB (~14 GB with 4 layers), next to the tiny model's
    weights: the safetensors header disagrees, and the error names the file and a tensor before any memory is taken."""
    save_checkpoint(model, tmp_path / "ck")
    _edit_config(tmp_path / "ck", d_model=4096, n_heads=32, d_ff=16384)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match .*config.json: tensor "
                                              r"'embed.weight' has shape \[261, 64\], the config needs \[261, 4096\]"):
        load_checkpoint(tmp_path / "ck")
    _edit_config(tmp_path / "ck", n_layers=4)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match .*config.json: 65 tensors, "
                                              r"missing \['stacks.coarse.blocks.1.attn.out.weight'"):
        load_checkpoint(tmp_path / "ck")


def test_weights_with_a_tensor_missing_or_extra_name_it(model, tmp_path, no_allocation):
    from safetensors.torch import load_file, save_file

    save_checkpoint(model, tmp_path / "ck")
    weights_file = tmp_path / "ck" / "model.safetensors"
    weights = load_file(str(weights_file))
    weights["extra.weight"] = torch.zeros(2)
    del weights["final_norm.weight"]
    save_file(weights, str(weights_file))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match .*"
                                              r"missing \['final_norm.weight'\], unexpected \['extra.weight'\]"):
        load_checkpoint(tmp_path / "ck")


def test_an_untied_head_must_be_stored(tmp_path):
    untied = MultiScaleTransformer(ModelConfig.from_name("tiny", tie_embeddings=False))
    save_checkpoint(untied, tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck").config.tie_embeddings is False
    _edit_config(tmp_path / "ck", tie_embeddings=True)  # then lm_head.weight is optional, and must still fit
    load_checkpoint(tmp_path / "ck")


def test_release_export_is_half_the_weights_without_optimizer_state_and_serves_alike(model, tmp_path):
    from safetensors import safe_open

    from axl_model.export.cli import main as export_main

    optimizer = torch.optim.AdamW(model.parameters())
    split = {"val_files": ["json/decoder.py"], "val_fraction": 0.05}
    source = save_checkpoint(model, tmp_path / "ck", training_state={"step": 3, "optimizer": optimizer.state_dict()},
                             metadata={"step": 3, "split": split})
    assert export_main(["release", str(source), "--out", str(tmp_path / "rel")]) == 0
    release = tmp_path / "rel"
    assert {p.name for p in release.iterdir()} == {"model.safetensors", "config.json", "metadata.json"}
    assert release.stat().st_mode & 0o777 == 0o755  # readable by a worker running as another user
    assert {p.stat().st_mode & 0o777 for p in release.iterdir()} == {0o644}
    with safe_open(str(release / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    metadata = json.loads((release / "metadata.json").read_text())
    assert metadata["split"] == split  # axl eval still scores (and refuses) by the training split
    assert metadata["release"] == {"source": str(source), "source_step": 3, "dtype": "float16"}
    loaded = load_checkpoint(release)
    assert next(loaded.parameters()).dtype == torch.float32  # cast back on load: serves like any checkpoint
    ids = torch.randint(0, 256, (1, 40))
    assert torch.allclose(model.eval()(ids), loaded(ids), atol=5e-2)
    assert export_main(["release", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
