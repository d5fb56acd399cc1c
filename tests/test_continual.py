"""Continual tasks: the generators, exact-answer accuracy, the accuracy matrix and BWT, a tiny run."""

import json
import random

import pytest
import torch

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.continual import (TASKS, Exam, accuracy, average_accuracy, backward_transfer, examples,
                                              load_continual_config, retention, train_continual, write_task_files)


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
    from selfreplay.data import TokenSequences

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
    with pytest.raises(SelfReplayError, match="none, ntp or kl"):
        load_continual_config(None, ["out=x", "replay.method=replace"])
    assert load_continual_config(None, ["out=x", "model.D=64"]).model.L == 2  # section defaults survive an override


@pytest.mark.parametrize("method", ["none", "ntp", "kl"])
def test_a_tiny_continual_run_writes_the_matrix(tmp_path, method):
    config = load_continual_config(None, [
        f"out={tmp_path / 'run'}", "tasks.names=reversal,sorting,addition", "tasks.steps=3", "tasks.train_examples=60",
        "tasks.eval_examples=8", "model.D=16", "model.H=8", "model.T=16", "optim.batch_size=4", "optim.warmup_steps=1",
        f"replay.method={method}", "replay.batch_size=3", "replay.buffer=2", "log.progress=false"])
    summary = train_continual(config)
    assert summary["tasks"] == ["reversal", "sorting", "addition"]
    assert len(summary["accuracy"]) == 3 and all(len(row) == 3 for row in summary["accuracy"])
    assert summary["bwt"] == pytest.approx(backward_transfer(summary["accuracy"]))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"] and saved["method"] == method
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    replay_losses = [x["replay_loss"] for x in lines if "train_loss" in x and x["task"] != "reversal"]
    assert all((v is None) == (method == "none") for v in replay_losses)  # replay from the second task on
    with pytest.raises(SelfReplayError, match="already holds a finished run"):
        train_continual(config)


def test_replay_starts_from_every_earlier_task_token():
    from selfreplay.experiments.continual import replay_pool
    from selfreplay.model import ModelConfig, Transformer

    config = load_continual_config(None, ["out=x", "replay.method=ntp", "replay.batch_size=6", "replay.buffer=2"])
    snapshot = Transformer(ModelConfig(D=16, L=1, H=8, T=8, V=265)).eval()
    pool = replay_pool(config, snapshot, earlier=[0, 1, 2])
    for _ in range(2):
        batch, hidden = pool.next_batch()
        assert batch.shape == (6, 8) and hidden is None
        assert batch[:, 0].tolist() == [0, 1, 2, 0, 1, 2]
