"""Config: YAML + --set overrides into typed dataclasses, one-line errors for unknown keys and wrong types."""
import pytest

from fastdiff.config import load_config, named_configs, parse_override
from fastdiff.errors import FastdiffError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 7\nobjective:\n  name: dmd2\n")
    cfg = load_config(str(f), ["train.batch_size=3", "train.lr_generator=1e-4", "teacher.path=/x",
                               "train.adam_betas=[0.5, 0.9]", "student.sigma_init=null", "objective.gan=true",
                               "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == 3 and cfg.train.lr_generator == 1e-4
    assert cfg.teacher.path == "/x" and cfg.train.adam_betas == [0.5, 0.9] and cfg.objective.gan is True
    assert parse_override("a.b=2") == {"a": {"b": 2}}


def test_named_configs_load():
    assert "quickstart" in named_configs()
    for name in named_configs():
        load_config(name)


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.batch_size=abc", "train.batch_size: expected int"),
    ("train.batch_size=2.5", "train.batch_size: expected int"),
    ("objective.gan=maybe", "objective.gan: expected bool"),
    ("train.batch_size=0", "train.batch_size must be a positive integer"),
    ("objective.name=magic", "unknown objective 'magic'"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be"),
    ("train", "expected key=value"),
    ("train=3", "train: expected a section"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(FastdiffError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FastdiffError, match="config file no-such-config.yaml not found"):
        load_config("no-such-config.yaml")
    with pytest.raises(FastdiffError, match="neither a file nor a named config"):
        load_config("no-such-config")
    with pytest.raises(FastdiffError, match=r"config file quickstart.yaml not found \(the named config is --config "
                                            r"quickstart, without .yaml\)"):
        load_config("quickstart.yaml")
    # A path is a file or nothing: "dir/foo" is not read as dir/foo.yaml through the named-config lookup.
    (tmp_path / "foo.yaml").write_text("train:\n  max_steps: 3\n")
    with pytest.raises(FastdiffError, match=f"config file {tmp_path / 'foo'} not found"):
        load_config(str(tmp_path / "foo"))
    assert load_config(str(tmp_path / "foo.yaml")).train.max_steps == 3


def test_learning_rate_schedule_warms_up_then_decays():
    from fastdiff.training.optim import lr_factor

    cfg = load_config(None, ["train.max_steps=110", "train.lr_warmup_steps=10", "train.lr_schedule=cosine"])
    factors = [lr_factor(step, cfg.train) for step in (0, 9, 10, 60, 110)]
    assert factors[:3] == [0.1, 1.0, 1.0] and abs(factors[3] - 0.5) < 1e-12 and factors[4] == 0.0
    constant = load_config(None, [])
    assert lr_factor(500, constant.train) == 1.0
    with pytest.raises(FastdiffError, match="train.lr_schedule must be constant or cosine"):
        load_config(None, ["train.lr_schedule=linear"])
