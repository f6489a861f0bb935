import json

import pytest

from axl_model import ModelConfig, MultiScaleTransformer, suggest_models
from axl_model.config import MAX_DIMENSIONS, MAX_PARAMS, PRESETS


@pytest.mark.parametrize("name", ["tiny", "comment", "docs", "micro", "micro-q", "testgen", "refactor", "micro-long"])
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


@pytest.mark.parametrize("field", sorted(MAX_DIMENSIONS))
def test_dimensions_past_their_limit_are_refused_naming_the_field(field):
    """A config.json is untrusted input: a huge dimension is a clear error, not an allocation."""
    with pytest.raises(ValueError, match=f"{field} must be at most {MAX_DIMENSIONS[field]}"):
        ModelConfig.from_dict({**PRESETS["micro"], field: MAX_DIMENSIONS[field] * 4})
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**PRESETS["micro"], field: 10**12})


PER_SCALE = {"fine": {"n_layers": 1, "local_window": 512},
             "coarse": {"d_model": 512, "n_heads": 8, "d_ff": 1376, "n_layers": 4}}


def test_per_scale_param_count_matches_the_model():
    config = ModelConfig.from_name("micro", max_seq_len=4096, scales=PER_SCALE)
    assert config.param_count() == MultiScaleTransformer(config).num_parameters()
    assert config.shape("coarse").d_model == 512 and config.shape("medium").d_model == 256
    assert config.shape("fine").local_window == 512 and config.shape("coarse").local_window == 0


@pytest.mark.parametrize("field", ["d_model", "n_heads", "d_ff", "n_layers"])
def test_per_scale_dimensions_past_their_limit_are_refused(field):
    with pytest.raises(ValueError, match=f"scales.coarse.{field} must be at most {MAX_DIMENSIONS[field]}"):
        ModelConfig.from_dict({**PRESETS["micro"], "scales": {"coarse": {field: MAX_DIMENSIONS[field] * 4}}})


def test_per_scale_parameter_count_past_the_limit_is_refused():
    huge = {"d_model": MAX_DIMENSIONS["d_model"], "n_heads": 128, "d_ff": MAX_DIMENSIONS["d_ff"], "n_layers": 96}
    with pytest.raises(ValueError, match="param_count"):
        ModelConfig.from_dict({**PRESETS["micro"], "scales": {"coarse": huge}})


@pytest.mark.parametrize("scales, message", [
    ({"fine": {"d_model": 128}}, "the fine width is d_model"),
    ({"huge": {}}, "unknown scale"),
    ({"coarse": {"dropout": 0.1}}, "not a per-scale field"),
    ({"medium": {"local_window": 6}}, "multiple of 4"),
    ({"medium": {"local_window": -4}}, "non-negative"),
    ({"coarse": {"d_model": 100, "n_heads": 3}}, "coarse d_model .100. must be divisible"),
    ({"coarse": "wide"}, "mapping"),
    ([], "mapping"),
])
def test_invalid_scales_name_the_problem(scales, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("micro", scales=scales)


def test_limits_are_generous_for_every_preset():
    for name, preset in PRESETS.items():
        config = ModelConfig.from_name(name)
        for field, limit in MAX_DIMENSIONS.items():
            assert getattr(config, field) * 16 <= limit, (name, field)
            for shape in config.shapes():  # each scale's own shape too
                assert getattr(shape, field, 0) * 16 <= limit, (name, shape.name, field)
        assert config.param_count() * 16 <= MAX_PARAMS, name


def test_a_parameter_count_past_the_limit_is_refused():
    """Each dimension within bounds, their product (d_model 16384, 96 layers: ~280 billion parameters) not."""
    big = dict(d_model=MAX_DIMENSIONS["d_model"], n_heads=128, d_ff=MAX_DIMENSIONS["d_ff"],
               n_layers=MAX_DIMENSIONS["n_layers"])
    with pytest.raises(ValueError, match="param_count"):
        ModelConfig.from_dict(big)


@pytest.mark.parametrize("overrides, field", [
    (dict(rope_theta=float("nan")), "rope_theta"), (dict(norm_eps=0.0), "norm_eps"),
    (dict(init_std=float("inf")), "init_std"), (dict(d_model="256"), "d_model"),
])
def test_bad_numbers_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**PRESETS["micro"], **overrides})


def test_stored_vocab_size_is_derived_not_trusted():
    data = ModelConfig.from_name("micro").to_dict()
    config = ModelConfig.from_dict({**data, "vocab_size": 10**12, "head_dim": 10**9})
    assert config == ModelConfig.from_name("micro") and config.vocab_size == 258 and config.head_dim == 64


def test_served_long_presets_have_a_long_window():
    config = ModelConfig.from_name("micro-long")
    assert config.max_seq_len >= 4096 and config.shape("fine").local_window < config.max_seq_len
    assert config.shape("coarse").local_window == 0  # the coarse stack sees the whole window


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="micro"):
        ModelConfig.from_name("nope")


def test_suggest_models_fits_the_budget():
    small = suggest_models(2.0)
    assert small and all(c.training_ram_bytes() <= 2.0 * 2**30 for c in small)
    assert "micro" not in [c.name for c in small] and "micro" in [c.name for c in suggest_models(4)]
    assert len(suggest_models(64)) == len(PRESETS) - 1  # everything but the test preset
    assert suggest_models(0.1) == []
