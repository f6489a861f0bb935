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
