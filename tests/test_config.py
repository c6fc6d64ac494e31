import json
import math

import pytest

from hybrid_optimization import ConfigError, HybridTrainingConfig, config_errors
from hybrid_optimization.config import FIELD_RULES

from .guide import GUIDE, SHARED_GUIDE, config_reference


def test_repo_copy_of_guide_is_the_shared_guide():
    if not SHARED_GUIDE.exists():
        pytest.skip("../shared is not beside this checkout")
    assert GUIDE.read_text() == SHARED_GUIDE.read_text()


def test_every_guide_field_exists_with_the_guide_default():
    reference = config_reference()
    assert len(reference) == 19, reference
    config = HybridTrainingConfig()
    for name, default_text in reference.items():
        expected = eval(default_text)          # "True", "0.001", "1e-5", ...
        actual = getattr(config, name)
        assert type(actual) is type(expected) or isinstance(expected, int) and isinstance(actual, float), name
        assert actual == expected, f"{name}: {actual!r} != guide default {expected!r}"


def test_json_round_trip_is_exact():
    config = HybridTrainingConfig(target_bits=2, data_clusters=3, precision_budget=1.5, trust_region_mode="relative")
    again = HybridTrainingConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["target_bits"] == 2.0


INVALID = {
    "use_quantization": "yes", "quantizer_scale": 0, "target_bits": 3, "use_clustering": 1, "data_clusters": 0,
    "parameter_clusters": 2.5, "use_auxiliary_nn": None, "auxiliary_nn_hidden_size": 0,
    "auxiliary_nn_learning_rate": -1e-3, "use_trust_region": "true", "initial_trust_radius": 5.0,
    "trust_radius_adaptation": 0, "base_learning_rate": 0.0, "max_steps": -1, "batch_size": 0, "momentum": 1.0,
    "weight_decay": -1e-5, "log_interval": 0, "eval_interval": 1.5, "trust_region_mode": "global",
    "base_optimizer": "lion", "meta_horizon": 0, "projected_hypergradient": "no", "max_sample_repeats": 0,
    "precision_budget": 0.5, "seed": -3,
}


def test_every_field_has_an_invalid_example():
    assert set(INVALID) == set(FIELD_RULES)


@pytest.mark.parametrize("field,value", sorted(INVALID.items()))
def test_invalid_value_gives_one_clear_error(field, value):
    with pytest.raises(ConfigError) as excinfo:
        HybridTrainingConfig(**{field: value})
    message = str(excinfo.value)
    assert excinfo.value.field == field
    assert field in message and repr(value) in message and "must be" in message


def test_nan_learning_rate_is_rejected():
    with pytest.raises(ConfigError, match="base_learning_rate"):
        HybridTrainingConfig(base_learning_rate=math.nan)


def test_config_errors_reports_all_fields_at_once():
    errors = config_errors({"data_clusters": 0, "target_bits": 3, "batch_size": 32})
    assert set(errors) == {"data_clusters", "target_bits"}
    assert "one of 1, 1.58, 2, 4, 8" in errors["target_bits"]


def test_unknown_field_and_bad_json_are_clear():
    with pytest.raises(ConfigError, match="unknown config field.*learning_rate"):
        HybridTrainingConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="not valid JSON"):
        HybridTrainingConfig.from_json("{target_bits: 2")
