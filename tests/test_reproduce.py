"""`selfreplay reproduce`: every experiment (packaged, or of a folder) run and gathered into one report of claims."""

import csv
import re

import pytest
import yaml

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.reproduce import experiment_files, overrides_for, reproduce

TINY_MODEL = {"model.D": 16, "model.L": 1, "model.H": 8, "model.T": 16}
FINETUNE = {"data.train": "${new}", "optim.batch_size": 4, "optim.warmup_steps": 1, "stop.tokens": "${tokens}",
            "log.every_tokens": 128, "replay.batch_size": 2, "replay.buffer": 1}
METHODS = {
    "corpus": {"words": 1000, "vocab": 300},
    "profiles": {"small": {"tokens": 256}, "paper": {"tokens": 100000}},
    "stages": [
        {"name": "pre", "mode": "pretrain",
         "settings": {**TINY_MODEL, "model.V": "${vocab}", "data.tokenizer": "${tokenizer}", "data.train": "${old}",
                      "data.val_sequences": 8, "optim.batch_size": 4, "stop.tokens": "${tokens}"}},
        {"name": "ft", "mode": "finetune", "init": "pre", "settings": FINETUNE,
         "list": [{"replay.method": "none"}, {"replay.method": "kl", "replay.source": "self"},
                  {"replay.method": "kl", "replay.source": "real"}]}],
    "report": [{"figure": "methods", "stage": "ft"}]}
CONTINUAL = {
    "profiles": {"small": {"steps": 2}},
    "stages": [{"name": "tasks", "mode": "continual",
                "settings": {**TINY_MODEL, "tasks.steps": "${steps}", "tasks.train_examples": 40,
                             "tasks.eval_examples": 4, "tasks.val_sequences": 4, "optim.batch_size": 4, "replay.batch_size": 2,
                             "replay.buffer": 1},
                "list": [{"replay.method": "none"}, {"replay.method": "ntp"}]}],
    "report": [{"figure": "continual", "stage": "tasks"}]}


def test_overrides_go_to_every_experiment_or_to_the_one_named():
    given = ["old=a.bin", "capacity:budgets=[1, 10]", "continual:steps=3", "x=a:b"]
    assert overrides_for("capacity", given) == ["old=a.bin", "budgets=[1, 10]", "x=a:b"]
    assert overrides_for("continual", given) == ["old=a.bin", "steps=3", "x=a:b"]


def test_the_packaged_experiments_are_found_and_checked(tmp_path):
    from selfreplay.experiments.sweep import check_sweep

    files = experiment_files()
    assert {"method_comparison", "capacity", "grid", "learning_rate", "continual"} <= set(files)
    for name, path in files.items():
        for profile in ("small", "paper"):
            check_sweep(path, [f"profile={profile}"], tmp_path / name)  # every stage, var and figure resolves
        check_sweep(name, ["profile=small"], tmp_path / name)  # by name, as `selfreplay sweep NAME` runs it
    with pytest.raises(SelfReplayError, match="did you mean 'capacity'"):
        experiment_files(None, ["capacty"])
    assert list(experiment_files(None, ["continual", "capacity"])) == ["capacity", "continual"]


def test_a_folder_of_experiments_holds_name_yaml_or_name_sweep_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("stages: []\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "sweep.yaml").write_text("stages: []\n")
    assert experiment_files(tmp_path) == {"a": tmp_path / "a.yaml", "b": tmp_path / "b" / "sweep.yaml"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfReplayError, match="holds no NAME.yaml"):
        experiment_files(tmp_path / "empty")


def test_reproduce_runs_each_experiment_and_writes_one_report_of_claims(tmp_path):
    experiments = tmp_path / "experiments"
    (experiments / "continual").mkdir(parents=True)
    (experiments / "methods.yaml").write_text(yaml.safe_dump(METHODS, sort_keys=False))
    (experiments / "continual" / "sweep.yaml").write_text(yaml.safe_dump(CONTINUAL, sort_keys=False))
    out = tmp_path / "out"
    path = reproduce("small", out, experiments, overrides=["methods:tokens=512"], workers=2, say=lambda line: None)
    text = path.read_text()
    claims = text.split("## Claims")[1].split("\n## ")[0]
    assert "| continual: Continual tasks: the accuracy matrix |" in claims
    assert "| methods: Method comparison |" in claims
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (out / image).is_file()
    assert (out / "methods" / "report.md").is_file() and (out / "continual" / "report.md").is_file()
    row = next(line for line in text.split("## Claims")[0].splitlines() if line.startswith("| methods |"))
    wall, run_seconds, finished, failed = [cell.strip() for cell in row.strip("|").split("|")[1:]]
    rows = list(csv.DictReader((out / "methods" / "results.csv").open()))
    expected = sum(float(r["wall_seconds"]) for r in rows if r["status"] == "done")
    assert expected > 0 and run_seconds == f"{expected:.0f}"  # the runs' own time, from their summaries
    assert int(finished) == len(rows) and failed == "0"
    config = yaml.safe_load((out / "methods" / "pre" / "run" / "config.yaml").read_text())
    assert config["stop"]["tokens"] == 512  # the NAME:VAR=VALUE override reached that experiment


@pytest.mark.parametrize("command", ["sweep", "report", "reproduce", "continual"])
def test_the_new_subcommands_have_help(command, capsys):
    from selfreplay.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: selfreplay" in capsys.readouterr().out
