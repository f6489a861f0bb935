import json

import pytest

from axl_model import ModelConfig, MultiScaleTransformer, suggest_models
from axl_model.config import PRESETS


@pytest.mark.parametrize("name", ["tiny", "comment", "docs", "micro", "micro-q", "testgen", "refactor"])
def test_param_count_matches_the_model(name):
    config = ModelConfig.from_name(name)
    assert config.param_count() == MultiScaleTransformer(config).num_parameters()


def test_published_shapes():
    expected = {"comment": (192, 3, 512, 3), "docs": (224, 4, 608, 3), "micro": (256, 4, 688, 3),
                "testgen": (256, 4, 688, 4), "refactor": (288, 4, 768, 4), "code-1b": (1024, 16, 2752, 6)}
    for name, shape in expected.items():
        c = ModelConfig.from_name(name)
        assert (c.d_model, c.n_heads, c.d_ff, c.n_layers) == shape
    assert ModelConfig.from_name("reasoning").d_model == 512 and ModelConfig.from_name("reasoning").n_layers == 5


def test_json_round_trip_and_overrides():
    config = ModelConfig.from_name("micro", max_seq_len=512, fim=True)
    again = ModelConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.vocab_size == 261 and again.max_seq_len == 512


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=250), "divisible"),
    (dict(max_seq_len=30), "multiple of 4"),
    (dict(n_layers=0), "positive"),
    (dict(dropout=1.5), "dropout"),
])
def test_invalid_configs_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("micro", **overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="micro"):
        ModelConfig.from_name("nope")


def test_suggest_models_fits_the_budget():
    small = suggest_models(2.0)
    assert small and all(c.training_ram_bytes() <= 2.0 * 2**30 for c in small)
    assert "micro" not in [c.name for c in small] and "micro" in [c.name for c in suggest_models(4)]
    assert len(suggest_models(64)) == len(PRESETS) - 1  # everything but the test preset
    assert suggest_models(0.1) == []
