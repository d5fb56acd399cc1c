"""The method's core behaviour on tiny models: after the same finetuning steps on a new domain,
self-replay KL forgets the old domain less than plain finetuning, and still learns the new one.

Both runs are measured the same way: `forgetting` = old_loss − old_loss_0 (nats) on the same
held-out old-domain sequences, at the same step. Over seeds 0-4 (seed and data.seed) plain
finetuning forgot 0.43-0.53 nats against KL replay's 0.02-0.05 on the built-in model, and
3.9-4.5 against 0.44-0.63 on the Hugging Face one; the margins asserted here lie well inside
that, and fail when the replay term does nothing (replay.coeff=0 reproduces plain finetuning
exactly). One torch thread: on shared cores, threads contending make these runs many times slower.
"""

import pytest

from conftest import finetune_config, sentences, write_jsonl
from selfreplay.training.loop import resolve_config, train

STEPS = 24  # "a few dozen": enough for plain finetuning to forget, short enough for a fast test


def assert_replay_forgets_less(plain: dict, replay: dict) -> None:
    """The two run summaries: plain forgets (or the comparison says nothing), replay forgets
    less than a quarter as much, and replay still learns at least half as much of the new domain."""
    assert plain["steps"] == replay["steps"] == STEPS
    assert plain["old_loss_0"] == replay["old_loss_0"]  # the same π0 on the same sequences
    assert plain["forgetting"] > 0.2, plain
    assert replay["forgetting"] < plain["forgetting"] / 4, (replay["forgetting"], plain["forgetting"])
    learned = lambda summary: summary["new_loss_0"] - summary["new_loss"]  # noqa: E731
    assert learned(replay) > learned(plain) / 2 > 0, (learned(replay), learned(plain))


def test_self_replay_kl_forgets_less_than_plain_finetuning(corpus, pretrained, tmp_path, one_thread):
    batch_tokens = 8 * 32  # optim.batch_size × model.T of the tiny finetuning runs
    steps = [f"stop.tokens={STEPS * batch_tokens}", f"log.every_tokens={STEPS * batch_tokens}"]
    plain = train(finetune_config(corpus, pretrained, tmp_path / "plain", "replay.method=none", *steps), "finetune")
    replay = train(finetune_config(corpus, pretrained, tmp_path / "kl", "replay.method=kl", "replay.source=self",
                                   "replay.coeff=1", *steps), "finetune")
    assert_replay_forgets_less(plain, replay)


def test_self_replay_kl_forgets_less_on_a_hugging_face_model(tmp_path, one_thread, request):
    pytest.importorskip("transformers")  # the optional [hf] install
    taught_llama_dir = request.getfixturevalue("taught_llama_dir")
    # old domain: the English the tiny Llama was taught; new domain: Spanish
    new = write_jsonl(tmp_path / "new.jsonl", sentences("es", 400, seed=1))
    old = write_jsonl(tmp_path / "old.jsonl", sentences("en", 60, seed=2))
    batch_tokens = 4 * 32
    common = [f"init=hf:{taught_llama_dir}", f"data.train={new}", f"data.old_text={old}", "model.T=32",
              "data.val_sequences=8", "optim.lr=1e-2", "optim.batch_size=4", "optim.warmup_steps=2",
              "replay.batch_size=4", "replay.buffer=2", "replay.decode_batch=8", "replay.length=32",
              f"stop.tokens={STEPS * batch_tokens}", f"log.every_tokens={STEPS * batch_tokens}",
              "log.progress=false"]
    plain = train(resolve_config("finetune", None, [*common, f"out={tmp_path / 'plain'}", "replay.method=none"]),
                  "finetune")
    replay = train(resolve_config("finetune", None, [*common, f"out={tmp_path / 'kl'}", "replay.method=kl",
                                                     "replay.source=self", "replay.coeff=1"]), "finetune")
    assert_replay_forgets_less(plain, replay)
