"""Continual tasks: the generators, exact-answer accuracy, the accuracy matrix and BWT, a tiny run."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from selfreplay.errors import SelfReplayError
from selfreplay.model.transformer import Transformer
from selfreplay.replay import pool
from selfreplay.training.replay_run import ReplayRun
from selfreplay.experiments.continual import (TASKS, Exam, accuracy, average_accuracy, backward_transfer, examples,
                                              load_continual_config, replay_tasks, retention, train_continual,
                                              write_task_files)


def test_every_generator_gives_the_right_answer_at_a_fixed_width():
    rng = random.Random(0)
    for _ in range(200):
        q, a = TASKS["addition"](rng)
        x, y = q.rstrip("=").split("+")
        assert int(a) == int(x) + int(y) and (len(q), len(a)) == (6, 3)
        q, a = TASKS["modular_addition"](rng)
        x, y = q.rstrip("=").split("+")
        assert int(a) == (int(x) + int(y)) % 97 and (len(q), len(a)) == (6, 2)
        q, a = TASKS["reversal"](rng)
        assert a == q[:-1][::-1] and len(a) == 5
        q, a = TASKS["sorting"](rng)
        assert a == "".join(sorted(q[:-1])) and len(a) == 5
    assert examples("sorting", 5, seed=1) == examples("sorting", 5, seed=1) != examples("sorting", 5, seed=2)


def test_task_files_put_one_task_token_per_task_and_one_token_per_character(tmp_path):
    from selfreplay.data.sequences import TokenSequences

    tokenizer, files = write_task_files(["addition", "sorting"], tmp_path, train_examples=50, seed=0)
    assert tokenizer.domain_id("addition") == 0 and tokenizer.domain_id("sorting") == 1
    assert tokenizer.encode("47+85=132") == [tokenizer.encode(c)[0] for c in "47+85=132"]
    sequences = TokenSequences(str(files["sorting"]), T=16, val_sequences=0)
    assert (sequences.rows(sequences.train_index)[:, 0] == 1).all()  # the task token at position 0


class Answers(torch.nn.Module):
    """A stand-in model that always predicts `token` next."""

    def __init__(self, token, vocab=20):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.token, self.vocab = token, vocab

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        logits[..., self.token] = 1.0
        return logits


def test_accuracy_counts_only_exact_answers():
    exam = Exam(prompts=torch.zeros(4, 3, dtype=torch.long),
                answers=torch.tensor([[5, 5], [5, 5], [5, 6], [6, 6]]))
    assert accuracy(Answers(5), exam) == 0.5
    assert accuracy(Answers(7), exam) == 0.0


def test_matrix_measures_on_a_hand_made_case():
    # after task 0: 1.0 on it; after task 1: task 0 fell to 0.5; after task 2: task 0 at 0.25, task 1 at 0.6
    matrix = [[1.0, 0.0, 0.0],
              [0.5, 0.8, 0.1],
              [0.25, 0.6, 0.9]]
    assert average_accuracy(matrix) == pytest.approx((0.25 + 0.6 + 0.9) / 3)
    assert backward_transfer(matrix) == pytest.approx(((0.25 - 1.0) + (0.6 - 0.8)) / 2)
    assert retention(matrix) == pytest.approx([0.25, 0.75])
    assert backward_transfer([[0.7]]) == 0.0


def test_config_errors_name_the_fix():
    with pytest.raises(SelfReplayError, match="did you mean 'tasks.steps'"):
        load_continual_config(None, ["out=x", "tasks.step=3"])
    with pytest.raises(SelfReplayError, match="unknown task"):
        load_continual_config(None, ["out=x", "tasks.names=addition,division"])
    with pytest.raises(SelfReplayError, match="choose one of none, ntp, kl$"):
        load_continual_config(None, ["out=x", "replay.method=kl_new"])
    with pytest.raises(SelfReplayError, match="replay.method=replace is now replay.fraction"):
        load_continual_config(None, ["out=x", "replay.method=replace"])
    with pytest.raises(SelfReplayError, match="replay.domains is set by continual"):
        load_continual_config(None, ["out=x", "replay.method=ntp", "replay.domains=addition"])
    with pytest.raises(SelfReplayError, match="replay.coeff must be >= 0"):
        load_continual_config(None, ["out=x", "replay.coeff=-1"])
    with pytest.raises(SelfReplayError, match="tasks.replay_weighting='oldest': choose equal or age"):
        load_continual_config(None, ["out=x", "tasks.replay_weighting=oldest"])
    assert load_continual_config(None, ["out=x", "model.D=64"]).model.L == 2  # section defaults survive an override


def test_age_weighting_gives_the_oldest_task_the_largest_share_of_the_replay_rows():
    names = ["addition", "reversal", "sorting", "modular_addition"]
    assert replay_tasks(names, 3) == ["addition", "reversal", "sorting"]
    assert replay_tasks(names, 3, "age") == ["addition"] * 3 + ["reversal"] * 2 + ["sorting"]
    assert replay_tasks(names, 1, "age") == ["addition"]
    # the draw starts its samples at the domains in turn: a repeated task takes that share of the rows
    from selfreplay.config import ReplayConfig
    from selfreplay.model.transformer import ModelConfig
    torch.manual_seed(0)
    model = Transformer(ModelConfig(D=16, L=1, H=8, T=8, V=32)).eval()
    ids = [5, 5, 5, 6, 6, 7]  # the ids of replay_tasks(names, 3, "age")
    drawn = pool.builtin_draw(model, ids, ReplayConfig(decode_batch=12), keep_hidden=False)(
        24, torch.Generator().manual_seed(0), 0)
    first = drawn.tokens[:, 0].tolist()
    assert (first.count(5), first.count(6), first.count(7)) == (12, 8, 4)


TINY = ["tasks.names=reversal,sorting,addition", "tasks.steps=3", "tasks.train_examples=60", "tasks.eval_examples=8",
        "tasks.val_sequences=4", "model.D=16", "model.H=8", "model.T=16", "optim.batch_size=4", "optim.warmup_steps=1",
        "replay.batch_size=3", "replay.buffer=2", "log.progress=false"]


@pytest.mark.parametrize("method", ["none", "ntp", "kl"])
def test_a_tiny_continual_run_writes_the_matrix(tmp_path, method, capsys, one_thread):
    config = load_continual_config(None, [f"out={tmp_path / 'run'}", *TINY, f"replay.method={method}"])
    summary = train_continual(config)
    assert summary["tasks"] == ["reversal", "sorting", "addition"]
    assert summary["runs"] == ["1-reversal", "2-sorting", "3-addition"]
    assert len(summary["accuracy"]) == 3 and all(len(row) == 3 for row in summary["accuracy"])
    assert summary["bwt"] == pytest.approx(backward_transfer(summary["accuracy"]))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"] and saved["method"] == method
    for i, run in enumerate(summary["runs"]):  # each task is a run of the training loop
        task = json.loads((tmp_path / "run" / run / "summary.json").read_text())
        assert (task["mode"], task["steps"]) == ("pretrain" if i == 0 else "finetune", 3)
        lines = [json.loads(x) for x in (tmp_path / "run" / run / "metrics.jsonl").read_text().splitlines()]
        assert all((x["replay_loss"] is None) == (method == "none" or i == 0) for x in lines[1:])
    assert train_continual(config) == summary  # the same command again: nothing to do
    assert "nothing to do" in capsys.readouterr().err


def test_a_continual_run_holds_each_tasks_replay_kl_to_a_budget(tmp_path, one_thread):
    config = load_continual_config(None, [f"out={tmp_path / 'run'}", *TINY, "replay.method=kl", "replay.coeff=auto",
                                          "replay.budget=0.02", "replay.coeff_start=5", "replay.horizon=1"])
    summary = train_continual(config)
    assert (summary["coeff"], summary["budget"]) == ("auto", 0.02)
    assert summary["replay_coeff_end"][0] is None  # the first task pretrains: nothing to replay
    for run, coeff in zip(summary["runs"][1:], summary["replay_coeff_end"][1:]):  # each task's c, started at 5
        task = json.loads((tmp_path / "run" / run / "summary.json").read_text())
        assert task["replay_coeff_end"] == coeff and coeff != 5.0


def test_each_task_finetunes_the_previous_tasks_run_with_replay_of_every_earlier_task(tmp_path, one_thread):
    out = tmp_path / "run"
    config = load_continual_config(None, [f"out={out}", *TINY, "replay.method=ntp", "replay.coeff=3"])
    train_continual(config)
    configs = [yaml.safe_load((out / run / "config.yaml").read_text()) for run in ("1-reversal", "2-sorting", "3-addition")]
    assert configs[0]["data"]["train"] == str(out / "data" / "reversal.bin") and configs[0]["replay"]["method"] == "none"
    third = configs[2]
    assert third["init"] == str(out / "2-sorting")  # π0: the model as the third task starts
    assert third["data"]["train"] == str(out / "data" / "addition.bin")
    assert third["data"]["old"] == str(out / "data" / "sorting.bin")
    assert (third["replay"]["method"], third["replay"]["coeff"], third["replay"]["source"]) == ("ntp", 3.0, "self")
    assert third["replay"]["domains"] == "reversal,sorting"
    assert third["stop"]["tokens"] == 3 * 4 * 16  # steps x batch x T
    with pytest.raises(SelfReplayError, match="holds a continual run with tasks.steps=3, not 4"):
        train_continual(load_continual_config(None, [f"out={out}", *TINY, "replay.method=ntp", "replay.coeff=3",
                                                     "tasks.steps=4"]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SelfReplayError, match="holds no continual run"):
        train_continual(load_continual_config(None, [f"out={tmp_path / 'other'}", *TINY]))
    with pytest.raises(SelfReplayError, match="too few for tasks.val_sequences=64 plus training"):
        train_continual(load_continual_config(None, [f"out={tmp_path / 'small'}", *TINY, "tasks.val_sequences=64"]))



def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ntp", "kl"])
def test_replay_is_sampled_from_the_snapshot_at_the_tasks_start_not_the_model_being_trained(
        tmp_path, monkeypatch, one_thread, method):
    """Every replay draw of task i decodes with the weights task i-1 ended with, while θ, the model
    trained on task i, has moved away from them: a draw from θ would fail the first assertion."""
    draws, trained = [], []
    real_sample, real_next = pool.sample, ReplayRun.next_replay

    def sample(model, first_tokens, *args, **kwargs):
        draws.append((len(trained), first_tokens.tolist(), weights(model)))  # at which step of the run, from which ids
        return real_sample(model, first_tokens, *args, **kwargs)

    def next_replay(self, step, model):
        trained.append(weights(model))  # θ as this step starts
        return real_next(self, step, model)

    monkeypatch.setattr(pool, "sample", sample)
    monkeypatch.setattr(ReplayRun, "next_replay", next_replay)
    out = tmp_path / "run"
    settings = [f"out={out}", *TINY, "tasks.steps=4", f"replay.method={method}", "replay.buffer=1",
                "replay.decode_batch=3", "optim.lr=1e-2"]
    train_continual(load_continual_config(None, settings))

    assert len(draws) == len(trained) == 8  # tasks 2 and 3: one pool of 3 samples drawn at each of 4 steps
    for task, (snapshot_run, ids) in enumerate([("1-reversal", [0]), ("2-sorting", [0, 1])], start=1):
        snapshot = weights(Transformer.from_pretrained(out / snapshot_run))
        for step in range(4):
            at, first, drawn = draws[4 * (task - 1) + step]
            theta = trained[at - 1]  # θ at the step whose batch this draw fills
            assert same(drawn, snapshot), f"task {task + 1}, step {step}: replay not drawn from {snapshot_run}"
            assert step == 0 or not same(theta, snapshot), "θ should have moved from the snapshot by now"
            assert sorted(set(first)) == ids  # started at every earlier task's token, and only those


# Runs the CLI with the second task's run SIGKILLed right after its second checkpoint.
DIE_IN_SECOND_TASK = """
import os, signal, sys
from selfreplay.rundir import RunDirectory
real = RunDirectory.save_checkpoint
def save_checkpoint(self, *args, **kwargs):
    real(self, *args, **kwargs)
    if self.path.name.startswith("2-") and len(self.checkpoints()) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
RunDirectory.save_checkpoint = save_checkpoint
from selfreplay.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_continual_run_finishes_with_the_same_command_and_matches(tmp_path, one_thread):
    from test_rundir import assert_same_run

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as in this process: the same arithmetic
    settings = [*TINY, "tasks.steps=8", "log.every_steps=2", "log.checkpoint_every=1", "replay.method=kl"]
    command = lambda out: [sys.executable, "-m", "selfreplay.cli", "continual", f"out={out}", *settings]  # noqa: E731
    train_continual(load_continual_config(None, [f"out={tmp_path / 'whole'}", *settings]))
    killed = subprocess.run([sys.executable, "-c", DIE_IN_SECOND_TASK, *command(tmp_path / "run")[3:]],
                            capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "run" / "1-reversal" / "summary.json").exists()
    assert not (tmp_path / "run" / "2-sorting" / "summary.json").exists()
    finished = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, env=env)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr and "Traceback" not in finished.stderr
    whole, resumed = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "run"))
    assert resumed["accuracy"] == whole["accuracy"]
    for run in whole["runs"]:
        assert_same_run(tmp_path / "run" / run, tmp_path / "whole" / run)
