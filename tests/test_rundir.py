"""The run directory rule: the same command on a run directory always works, and never loses
anything it should not (restart without a checkpoint, damaged checkpoints, budget extension,
refused changes, divergence, strict JSON, permissions)."""

import json
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.validation import ValidationSet
from selfreplay.rundir import RunDirectory, changed_settings, strict_json
from selfreplay.training.loop import TrainingDiverged, train

from conftest import MODEL, finetune_config

KL = ("replay.method=kl", "replay.source=self", "log.checkpoint_every=1", "stop.tokens=3072")


def killed_at_log_point(monkeypatch, config, point):
    """Run `config` and kill it (KeyboardInterrupt) while it measures log point `point`."""
    calls = {"n": 0}
    real_evaluate = ValidationSet.evaluate

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * point + 1:  # two validation sets per log point
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ValidationSet, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(config, "finetune")
    monkeypatch.setattr(ValidationSet, "evaluate", real_evaluate)


WALL_CLOCK = ("train_seconds", "replay_seconds", "tokens_per_second")  # metrics fields that differ run to run


def comparable(run_dir):
    """A finished run's metrics lines and weights, without the wall-clock fields."""
    lines = [{k: v for k, v in json.loads(x).items() if k not in WALL_CLOCK}
             for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines, load_file(str(run_dir / "weights.safetensors"))


def assert_same_run(a, b):
    lines_a, weights_a = comparable(a)
    lines_b, weights_b = comparable(b)
    assert lines_a == lines_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def uninterrupted(corpus, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    train(finetune_config(corpus, pretrained, out, *KL), "finetune")
    return out


def test_a_run_killed_before_its_first_checkpoint_starts_over_and_ends_the_same(
        corpus, pretrained, uninterrupted, tmp_path, monkeypatch, capsys):
    config = finetune_config(corpus, pretrained, tmp_path / "run", *KL[:2], "stop.tokens=3072",
                             "log.checkpoint_seconds=0")
    killed_at_log_point(monkeypatch, config, 3)
    assert not RunDirectory(tmp_path / "run").checkpoints() and (tmp_path / "run" / "metrics.jsonl").exists()
    train(config, "finetune")
    assert "starting it over" in capsys.readouterr().err
    assert_same_run(tmp_path / "run", uninterrupted)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
        corpus, pretrained, uninterrupted, tmp_path, monkeypatch, capsys):
    config = finetune_config(corpus, pretrained, tmp_path / "run", *KL)
    killed_at_log_point(monkeypatch, config, 4)
    newest, previous = RunDirectory(tmp_path / "run").checkpoints()
    weights = newest / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    (tmp_path / "run" / "checkpoint.json").write_text("{garbage")
    train(config, "finetune")
    err = capsys.readouterr().err
    assert f"checkpoint {newest.name}" in err and "damaged" in err
    assert f"from step {int(previous.name[5:])}" in err
    assert "Traceback" not in err
    assert_same_run(tmp_path / "run", uninterrupted)


@pytest.mark.parametrize("damage", ["garbage progress", "folders gone"])
def test_no_usable_checkpoint_means_a_clean_restart(corpus, pretrained, uninterrupted, tmp_path, monkeypatch,
                                                    capsys, damage):
    config = finetune_config(corpus, pretrained, tmp_path / "run", *KL)
    killed_at_log_point(monkeypatch, config, 3)
    for folder in RunDirectory(tmp_path / "run").checkpoints():
        if damage == "garbage progress":
            (folder / "progress.json").write_text("not json")
        else:
            shutil.rmtree(folder)
    train(config, "finetune")
    assert "starting it over" in capsys.readouterr().err
    assert_same_run(tmp_path / "run", uninterrupted)


def test_a_resumed_run_may_get_a_larger_budget_and_says_where_it_resumed(corpus, pretrained, tmp_path,
                                                                         monkeypatch, capsys):
    killed_at_log_point(monkeypatch, finetune_config(corpus, pretrained, tmp_path / "run", *KL), 3)
    summary = train(finetune_config(corpus, pretrained, tmp_path / "run", *KL, "stop.tokens=4096",
                                    "log.progress=true"), "finetune")
    assert "resuming" in capsys.readouterr().err
    assert summary["tokens"] == 4096 and summary["stop_reason"] == "budget"


def test_a_resumed_run_refuses_a_changed_setting_naming_the_key_and_both_values(corpus, pretrained, tmp_path,
                                                                                monkeypatch):
    killed_at_log_point(monkeypatch, finetune_config(corpus, pretrained, tmp_path / "run", *KL), 3)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(SelfReplayError, match=r"optim\.lr=0\.003, not 0\.001") as e:
        train(finetune_config(corpus, pretrained, tmp_path / "run", *KL, "optim.lr=1e-3"), "finetune")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_a_finished_run_run_again_is_left_as_it_is(corpus, pretrained, uninterrupted, capsys):
    before = (uninterrupted / "weights.safetensors").read_bytes()
    summary = train(finetune_config(corpus, pretrained, uninterrupted, *KL), "finetune")
    assert "nothing to do" in capsys.readouterr().err
    assert summary == json.loads((uninterrupted / "summary.json").read_text())
    assert (uninterrupted / "weights.safetensors").read_bytes() == before


def test_a_directory_holding_other_files_is_refused_untouched(corpus, pretrained, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(SelfReplayError, match="not a selfreplay run's.*notes.txt"):
        train(finetune_config(corpus, pretrained, tmp_path / "run", *KL), "finetune")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_divergence_stops_at_once_with_a_summary_that_says_so_in_strict_json(corpus, pretrained, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"diverged: .* at step \d+ \(lr 1e\+09\): lower optim.lr"):
        train(finetune_config(corpus, pretrained, tmp_path / "run", "optim.lr=1e9", "optim.warmup_steps=0",
                              "optim.grad_clip=null", "stop.tokens=100000"), "finetune")

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    summary = strict((tmp_path / "run" / "summary.json").read_text())
    lines = [strict(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["stop_reason"] == "diverged" and summary["steps"] < 20
    assert "non_finite" in lines[-1]
    assert not (tmp_path / "run" / "weights.safetensors").exists()
    with pytest.raises(TrainingDiverged):  # the same command again says the same
        train(finetune_config(corpus, pretrained, tmp_path / "run", "optim.lr=1e9", "optim.warmup_steps=0",
                              "optim.grad_clip=null", "stop.tokens=100000"), "finetune")


def test_run_files_are_readable_by_everyone(uninterrupted):
    for name in ("weights.safetensors", "summary.json", "metrics.jsonl", "config.yaml", "tokenizer.json"):
        assert stat.S_IMODE((uninterrupted / name).stat().st_mode) & 0o044 == 0o044, name


def test_strict_json_and_changed_settings():
    assert strict_json({"a": float("nan"), "b": 1.0}) == {"a": None, "b": 1.0, "non_finite": {"a": "nan"}}
    assert changed_settings({"optim": {"lr": 1, "beta1": 0.9}}, {"optim": {"lr": 2, "beta1": 0.9}}) == \
        [("optim.lr", 1, 2)]


def test_token_ids_beyond_the_vocabulary_are_refused_before_anything_is_written(corpus, pretrained, tmp_path):
    import numpy as np

    bad = tmp_path / "bad.bin"
    ids = np.fromfile(corpus["new"], dtype="<u2").copy()
    ids[1000] = 5000
    ids.tofile(bad)
    shutil.copy(str(corpus["new"]) + ".json", str(bad) + ".json")  # a sidecar that looks right
    with pytest.raises(SelfReplayError, match=r"bad.bin holds token id 5000 at position 1,000.*model.V=320"):
        train(finetune_config(corpus, pretrained, tmp_path / "run", f"data.train={bad}"), "finetune")
    assert not (tmp_path / "run").exists()


def test_pretraining_restart_rule_holds_too(corpus, tmp_path, capsys):
    from selfreplay.training.loop import resolve_config

    args = [f"out={tmp_path / 'pre'}", f"data.tokenizer={corpus['tokenizer']}", f"data.train={corpus['old']}",
            *MODEL, "data.val_sequences=16", "stop.tokens=2048", "log.every_tokens=512", "log.progress=false"]
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "metrics.jsonl").write_text('{"step": 0, "tok')  # a run killed mid-line
    summary = train(resolve_config("pretrain", None, args), "pretrain")
    assert summary["tokens"] == 2048 and "starting it over" in capsys.readouterr().err
