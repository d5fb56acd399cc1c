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


def configuration_rows() -> dict[str, str]:
    """The key table of docs/configuration.md: each row's first cell's keys -> the row."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            for key in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                rows.setdefault(key, line)
    return rows


def test_configuration_doc_documents_every_config_key():
    from selfreplay.config import all_keys

    rows = configuration_rows()
    missing = [key for key in all_keys(RunConfig) if key not in rows]
    assert not missing, f"docs/configuration.md has no table row for config keys: {missing}"


def test_every_numeric_key_has_a_range_and_the_configuration_doc_states_it():
    import typing

    from selfreplay.config import CHOICES, RANGES, all_keys

    def annotation(key):
        cls = RunConfig
        *sections, leaf = key.split(".")
        for part in sections:
            cls = typing.get_type_hints(cls)[part]
        return typing.get_type_hints(cls)[leaf]

    numeric = [k for k in all_keys(RunConfig) if {int, float} & {annotation(k), *typing.get_args(annotation(k))}]
    assert sorted(numeric) == sorted(RANGES)
    rows = configuration_rows()
    for key, allowed in {**RANGES, **CHOICES}.items():
        assert key in rows, f"docs/configuration.md has no table row for {key}"
        expected = str(allowed) if key in RANGES else " \\| ".join(allowed)
        assert rows[key].split(" | ")[2].startswith(expected), (key, rows[key])


VALID = ["out=runs/x", "data.train=x.bin", "data.tokenizer=tok", "stop.tokens=1000"]


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.lr=nan", "optim.lr must be > 0, got nan"),
    ("optim.lr=inf", "optim.lr must be > 0, got inf"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("optim.batch_size=0", "optim.batch_size must be >= 1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.beta1=1.5", "optim.beta1 must be in [0, 1), got 1.5"),
    ("optim.beta2=1", "optim.beta2 must be in [0, 1)"),
    ("optim.beta1=-0.1", "optim.beta1 must be in [0, 1)"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be > 0"),
    ("optim.grad_clip=0", "optim.grad_clip must be > 0"),
    ("optim.schedule=linear", "unknown optim.schedule 'linear'"),
    ("stop.tokens=0", "stop.tokens must be >= 1"),
    ("stop.tokens=-5", "stop.tokens must be >= 1"),
    ("stop.tokens=1e400", "'stop.tokens' must be int"),
    ("stop.tokens_per_param=0", "stop.tokens_per_param must be > 0"),
    ("stop.epochs=-1", "stop.epochs must be > 0"),
    ("stop.target_loss=-1", "stop.target_loss must be >= 0"),
    ("stop.wall_seconds=0", "stop.wall_seconds must be > 0"),
    ("stop.patience=0", "stop.patience must be >= 1"),
    ("log.every_tokens=0", "log.every_tokens must be >= 1"),
    ("log.checkpoint_every=-1", "log.checkpoint_every must be >= 0"),
    ("log.checkpoint_seconds=-1", "log.checkpoint_seconds must be >= 0"),
    ("data.mix_fraction=1.5", "data.mix_fraction must be in [0, 1]"),
    ("data.mix_fraction=0.5", "needs a second token file"),
    ("data.val_sequences=-1", "data.val_sequences must be >= 0"),
    ("data.seed=-1", "data.seed must be >= 0"),
    ("seed=-1", "seed must be >= 0"),
    ("seed=1.5", "'seed' must be int"),
    ("replay.coeff=-1", "replay.coeff must be >= 0"),
    ("replay.temperature=0", "replay.temperature must be > 0"),
    ("replay.batch_size=0", "replay.batch_size must be >= 1"),
    ("replay.buffer=0", "replay.buffer must be >= 1"),
    ("lora.rank=-1", "lora.rank must be >= 0"),
    ("lora.alpha=0", "lora.alpha must be > 0"),
    ("model.rope_base=0", "model.rope_base must be > 1"),
    ("model.D=0", "model.D must be positive"),
    ("precision=fp16", "unknown precision 'fp16'"),
    ("device=tpu", "unknown device 'tpu'"),
    ("compile=maybe", "'compile' must be bool"),
    ("replay.length=1", "replay.length must be >= 2"),
    ("replay.top_p=0", "replay.top_p must be in (0, 1]"),
    ("replay.top_p=1.5", "replay.top_p must be in (0, 1]"),
    ("replay.coeff=autos", "replay.coeff must be >= 0 or auto, got 'autos'"),
    ("replay.coeff=auto", "replay.coeff=auto holds the replay KL at a budget: set replay.budget"),
    ("replay.budget=0.01", "replay.budget belongs to replay.coeff=auto"),
    ("replay.coeff_max=30", "replay.coeff_max belongs to replay.coeff=auto"),
    ("replay.budget=0", "replay.budget must be > 0"),
    ("replay.coeff_max=-1", "replay.coeff_max must be > 0"),
    ("replay.horizon=0", "replay.horizon must be >= 1"),
    ("stop.on_capacity_bound=true", "stop.on_capacity_bound stops a run whose replay.coeff=auto"),
])
def test_every_invalid_setting_is_refused_with_one_line_before_anything_is_written(tmp_path, override, message):
    from selfreplay.training.validate import validate

    with pytest.raises(SelfReplayError) as e:
        validate(load_config(None, [*VALID, f"out={tmp_path / 'run'}", override]), "pretrain")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("out, message", [("file", "is a file, not a directory"),
                                          ("file/run", "lies under the file")])
def test_output_paths_that_cannot_be_a_run_directory_are_refused(tmp_path, out, message):
    from selfreplay.training.validate import validate

    (tmp_path / "file").write_text("keep me")
    with pytest.raises(SelfReplayError, match=message):
        validate(load_config(None, [*VALID, f"out={tmp_path / out}"]), "pretrain")
    assert (tmp_path / "file").read_text() == "keep me"


HF_VALID = ["init=hf:some/model", "data.train=new.jsonl", "data.old_text=old.jsonl", "stop.tokens=1000"]


@pytest.mark.parametrize("override, message", [
    ("data.old_text=null", "needs held-out old-domain text to measure forgetting: set data.old_text="),
    ("init=hf:", "init=hf: needs a model"),
    ("replay.method=replace", "replay.method=replace is now replay.fraction=F"),
    ("replay.fraction=0.25", "drop replay.fraction"),
    ("replay.source=real", "replay.source=self"),
    ("data.old=old.bin", "drop data.old and data.mix"),
    ("data.tokenizer=tok", "drop data.tokenizer"),
    ("replay.domains=en", "drop replay.domains"),
    ("stop.tokens_per_param=10", "not stop.tokens_per_param"),
    ("compile=true", "compile=false"),
    ("replay.compile=true", "set replay.compile=false"),
    ("model.D=64", "takes its shape from the model: drop model.D"),
])
def test_hf_settings_it_cannot_take_are_refused_with_one_line(tmp_path, override, message):
    from selfreplay.training.validate import validate

    with pytest.raises(SelfReplayError) as e:
        validate(load_config(None, [*HF_VALID, f"out={tmp_path / 'run'}", override]), "finetune")
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SelfReplayError, match="names a model to finetune"):
        validate(load_config(None, [*HF_VALID, f"out={tmp_path / 'run'}"]), "pretrain")


def test_hf_settings_load_and_validate(tmp_path):
    from selfreplay.config import is_hf
    from selfreplay.training.validate import validate

    config = load_config(None, [*HF_VALID, f"out={tmp_path / 'run'}", "replay.top_p=0.9", "replay.length=64",
                                "replay.stop_at_eos=false", "model.trust_remote_code=true", "data.text_field=body"])
    validate(config, "finetune")
    assert is_hf(config) and config.replay.top_p == 0.9 and config.replay.length == 64
    assert not config.replay.stop_at_eos and config.model.trust_remote_code and config.data.text_field == "body"


def test_coeff_auto_and_its_budget_load_and_save_back_as_written(tmp_path):
    config = load_config(None, ["replay.method=kl", "replay.coeff=auto", "replay.budget=0.01", "replay.coeff_max=30",
                                "replay.horizon=50", "stop.on_capacity_bound=true"])
    assert (config.replay.coeff, config.replay.budget, config.replay.coeff_max, config.replay.horizon) == \
        ("auto", 0.01, 30.0, 50)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config(None, ["replay.coeff=3"]).replay.coeff == 3.0  # a number stays a number
    path = tmp_path / "none.yaml"
    path.write_text("replay:\n  coeff: null\n")
    with pytest.raises(SelfReplayError, match="'replay.coeff' must be float or str, got None"):
        load_config(path)


def test_typed_settings_build_what_the_command_line_builds(corpus, pretrained, tmp_path, monkeypatch):
    """The experiments' typed settings (RunConfig.finetune_from, RunConfig.updated) are the command
    line's: the same init run's shape and data as the base, the same checks, paths made absolute."""
    from dataclasses import replace

    from conftest import finetune_overrides
    from selfreplay.training.loop import resolve_config

    monkeypatch.chdir(tmp_path)
    given = finetune_overrides(corpus, pretrained, "ft", "replay.method=kl", "replay.coeff=3")
    typed = RunConfig.finetune_from(
        pretrained, out="ft", data={"train": str(corpus["new"])},
        optim={"lr": 3e-3, "batch_size": 8, "warmup_steps": 2}, replay={"method": "kl", "coeff": 3, "batch_size": 4,
                                                                      "buffer": 2},
        stop={"tokens": 2048}, log={"every_tokens": 512, "progress": False})
    from_strings = resolve_config("finetune", None, given)
    assert replace(typed, replay=replace(typed.replay, length=from_strings.replay.length)) == from_strings
    assert typed.out == str(tmp_path / "ft") and typed.model == from_strings.model
    assert typed.updated(seed=3, replay={"coeff": 5}).replay.coeff == 5.0
    with pytest.raises(SelfReplayError, match="replay.temperature must be > 0"):
        typed.updated(replay={"temperature": 0})
    with pytest.raises(SelfReplayError, match="unknown config key 'optim.learning_rate'"):
        typed.updated(optim={"learning_rate": 1.0})
