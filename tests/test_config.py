"""Config files are strict: a typo is an error naming the key, never a silent default."""

from pathlib import Path

import pytest

from emixer_model.config import ConfigError, EmixerConfig, from_dict, load_config


def test_defaults_round_trip_through_flower_run_config():
    cfg = EmixerConfig()
    flat = cfg.to_run_config()
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert EmixerConfig.from_run_config(flat) == cfg


def test_yaml_sections_override_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  resolution: 32\nprivacy:\n  epsilon_budget: 3.5\n")
    cfg = load_config(path)
    assert cfg.model.resolution == 32
    assert cfg.privacy.epsilon_budget == 3.5
    assert cfg.train == EmixerConfig().train


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model:\n  resolutoin: 32\n", "'model.resolutoin'"),
        ("modle:\n  resolution: 32\n", "'modle'"),
        ("privacy:\n  accountant: gdp\n", "accountant"),
        ("federation:\n  strategy: krum\n", "fedavg"),
        ("model: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "mapping"),
        ("privacy:\n  epsilon_budget: -1\n", "positive"),
        ("train:\n  dp_trainable: heads\n", "all, top, labels, label-words"),
        ("train:\n  sgd_momentum: 1.0\n", "train.sgd_momentum must be in [0, 1)"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        load_config(path)
    assert needle in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_run_config_key_without_section_is_refused():
    with pytest.raises(ConfigError, match="section.key"):
        EmixerConfig.from_run_config({"rounds": 3})


def test_pyproject_run_config_is_every_key_at_its_default():
    """`flwr run` reads pyproject.toml; it must carry every key so --run-config can override any."""
    from flwr.common.config import get_fused_config_from_dir

    root = Path(__file__).resolve().parent.parent
    flat = get_fused_config_from_dir(root, {})
    assert flat == EmixerConfig().to_run_config()
    assert EmixerConfig.from_run_config(flat) == EmixerConfig()
    fused = get_fused_config_from_dir(root, {"privacy.noise_multiplier": 1.5})
    assert EmixerConfig.from_run_config(fused).privacy.noise_multiplier == 1.5


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"batch_size": "32"}, "train.batch_size must be an integer, not '32'"),
        ("federation", {"resume": 1}, "federation.resume must be true or false"),
        ("privacy", {"delta": "small"}, "privacy.delta must be a number"),
    ],
)
def test_wrongly_typed_values_are_refused_by_key(section, values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(EmixerConfig, {section: values})
