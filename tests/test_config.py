import pytest

from selfreplay.config import RunConfig, load_config, parse_overrides, save_config
from selfreplay.errors import SelfReplayError


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  D: 64\nreplay:\n  method: kl\n  coeff: 3\noptim:\n  lr: 1.0e-4\n")
    config = load_config(path, ["replay.coeff=10", "model.L=2", "stop.target_loss=2.5", "log.progress=false"])
    assert config.model.D == 64 and config.model.L == 2 and config.model.H == 64
    assert config.replay.method == "kl" and config.replay.coeff == 10.0
    assert config.optim.lr == 1e-4 and config.stop.target_loss == 2.5 and config.log.progress is False


def test_override_values_are_typed():
    config = load_config(None, ["optim.lr=3e-4", "stop.tokens=1e6", "optim.grad_clip=null"])
    assert config.optim.lr == 3e-4 and config.stop.tokens == 1_000_000 and config.optim.grad_clip is None


@pytest.mark.parametrize("override, message", [
    ("replay.coef=1", "did you mean 'replay.coeff'"),
    ("modle.D=1", "did you mean 'model'"),
    ("optim.batchsize=4", "did you mean 'optim.batch_size'"),
    ("model.D=1.5", "must be int"),
    ("log.progress=maybe", "must be bool"),
    ("replay=3", "is a section"),
])
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(SelfReplayError, match=message) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_override_must_be_key_value():
    with pytest.raises(SelfReplayError, match="KEY=VALUE"):
        parse_overrides(["replay.coeff"])


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(None, ["model.D=96", "model.H=32", "replay.method=ntp", "out=x"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert isinstance(config, RunConfig)


def test_readme_documents_every_config_key():
    from pathlib import Path

    from selfreplay.config import all_keys

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [key for key in all_keys(RunConfig) if f"`{key}`" not in readme]
    assert not missing, f"README lacks config keys: {missing}"


def test_every_numeric_key_has_a_range_and_the_readme_states_it():
    import re
    import typing
    from pathlib import Path

    from selfreplay.config import CHOICES, RANGES, all_keys

    def annotation(key):
        cls = RunConfig
        *sections, leaf = key.split(".")
        for part in sections:
            cls = typing.get_type_hints(cls)[part]
        return typing.get_type_hints(cls)[leaf]

    numeric = [k for k in all_keys(RunConfig) if {int, float} & {annotation(k), *typing.get_args(annotation(k))}]
    assert sorted(numeric) == sorted(RANGES)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for key, allowed in {**RANGES, **CHOICES}.items():
        row = next(line for line in readme.splitlines() if re.match(rf"^\| [^|]*`{re.escape(key)}`", line))
        expected = str(allowed) if key in RANGES else " \\| ".join(allowed)
        assert row.split(" | ")[2].startswith(expected), (key, row)
