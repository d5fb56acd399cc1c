"""The training loop end to end on tiny models: stop rules, regularisers, resume, bad configs."""

import json

import pytest
import torch
from conftest import MODEL, finetune_config
from test_rundir import WALL_CLOCK

from selfreplay.config import load_config
from selfreplay.errors import SelfReplayError
from selfreplay.model.transformer import ModelConfig, Transformer
from selfreplay.objective.methods import training_loss
from selfreplay.replay.samples import ReplaySamples
from selfreplay.training.loop import is_log_step, resolve_config, train


def test_pretraining_writes_a_complete_run_directory(pretrained):
    names = {p.name for p in pretrained.iterdir()}
    assert {"config.yaml", "tokenizer.json", "metrics.jsonl", "summary.json", "weights.safetensors"} <= names
    assert not any(n.startswith("ckpt-") or n == "checkpoint.json" for n in names)
    curve = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert curve[0]["tokens"] == 0 and curve[-1]["tokens"] == 16384
    assert curve[-1]["old_loss"] < curve[0]["old_loss"] - 0.5  # it learned something
    Transformer.from_pretrained(pretrained)


@pytest.mark.parametrize("method, source", [("none", "self"), ("ntp", "self"), ("kl", "self"), ("kl", "real"),
                                            ("kl_new", "self"), ("replace", "real")])
def test_each_regulariser_runs_and_writes_the_summary(corpus, pretrained, tmp_path, method, source, one_thread):
    """A method with a replay term logs it (replay_loss) and ends nearer π0 on the old domain than
    plain finetuning after the same steps; method none is plain finetuning and logs no term."""
    coeff = "0.25" if method == "replace" else "1"
    summary = train(finetune_config(corpus, pretrained, tmp_path / "ft", f"replay.method={method}",
                                    f"replay.source={source}", f"replay.coeff={coeff}"), "finetune")
    plain = train(finetune_config(corpus, pretrained, tmp_path / "plain", "replay.method=none"), "finetune")
    lines = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    logged = [line["replay_loss"] for line in lines[1:]]  # lines[0] is the measurement before any step
    assert len(logged) == 4 and lines[0]["replay_loss"] is None
    if method in ("none", "replace"):  # no replay term (replace mixes replay rows into the new batch)
        assert logged == [None] * 4
    else:
        assert all(value > 0 for value in logged)
    if method in ("kl", "kl_new"):  # a KL to π0: zero at the first step, growing as θ moves away
        assert logged[0] < logged[-1] / 5, logged
    measured = ("old_loss", "new_loss", "old_kl", "new_kl", "drift")
    if method == "none":
        assert {k: summary[k] for k in measured} == {k: plain[k] for k in measured}
    else:  # seeds 0-2 gave 0.29-0.32 plain, 0.11-0.14 with a replay term, 0.22-0.24 with replace
        assert summary["old_kl"] < 0.9 * plain["old_kl"], (summary["old_kl"], plain["old_kl"])
    assert summary["tokens"] >= 2048 and summary["stop_reason"] == "budget"
    assert summary["peak_memory_mib"] > 50 and summary["peak_memory_of"] == "process_peak_rss"  # torch alone is more


def test_regulariser_gradients_reach_only_the_finetuned_model():
    config = ModelConfig(D=16, L=1, H=8, T=8, V=32)
    model, reference = Transformer(config), Transformer(config)
    reference.requires_grad_(False)
    new, replay = torch.randint(0, 32, (2, 8)), ReplaySamples(torch.randint(0, 32, (3, 8)))
    for method in ("ntp", "kl", "kl_new"):
        model.zero_grad()
        loss, ntp, reg = training_loss(model, reference, new, replay, method, coeff=5.0)
        loss.backward()
        assert reg.item() > 0
        assert all(p.grad is not None for p in model.parameters())
        assert all(p.grad is None for p in reference.parameters())
    # with identical weights the KL penalty is zero and adds no gradient
    reference.load_state_dict(model.state_dict())
    assert training_loss(model, reference, new, replay, "kl", 5.0)[2].item() == pytest.approx(0.0, abs=1e-6)


def test_target_loss_stops_at_the_first_log_point_at_or_below_it(corpus, pretrained, tmp_path):
    probe = train(finetune_config(corpus, pretrained, tmp_path / "probe", "stop.tokens=4096"), "finetune")
    curve = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    target = curve[3]["new_loss"] + 1e-9  # reached at the 4th log point (or earlier)
    first = next(p for p in curve if p["new_loss"] <= target)
    summary = train(finetune_config(corpus, pretrained, tmp_path / "target", "stop.tokens=4096",
                                    f"stop.target_loss={target}"), "finetune")
    assert probe["stop_reason"] == "budget"
    assert summary["stop_reason"] == "target_loss"
    assert summary["steps"] == first["step"] == summary["time_to_target_steps"]
    assert summary["new_loss"] == pytest.approx(first["new_loss"])


def test_a_run_stopped_by_its_wall_time_cap_says_so_after_its_final_measurement(corpus, pretrained, tmp_path):
    # the cap stops the run between log points; the final log point must not erase why it stopped
    summary = train(finetune_config(corpus, pretrained, tmp_path / "capped", "stop.tokens=8192", "stop.wall_seconds=1e-6",
                                    "log.every_tokens=4096"), "finetune")
    assert summary["stop_reason"] == "wall_seconds" and summary["steps"] == 1
    assert json.loads((tmp_path / "capped" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_log_points_are_even_or_spaced_geometrically():
    assert [s for s in range(1, 40) if is_log_step(s, 5, 1.0)] == [5, 10, 15, 20, 25, 30, 35]
    assert [s for s in range(1, 40) if is_log_step(s, 2, 2.0)] == [2, 6, 14, 30]  # intervals 2, 4, 8, 16
    assert [s for s in range(1, 8) if is_log_step(s, 1, 1.01)] == [1, 2, 3, 4, 5, 6, 7]  # never under one step


def test_a_run_with_log_growth_measures_at_growing_intervals_and_at_its_end(corpus, pretrained, tmp_path):
    config = finetune_config(corpus, pretrained, tmp_path / "ft", "log.growth=2")  # 8 steps, first interval 2
    train(config, "finetune")
    lines = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 6, 8]


def test_resumed_run_ends_where_an_uninterrupted_one_does(corpus, pretrained, tmp_path, monkeypatch):
    from selfreplay.evaluation.validation import ValidationSet

    overrides = ("replay.method=kl", "replay.source=self", "log.checkpoint_every=1", "stop.tokens=3072")
    whole = train(finetune_config(corpus, pretrained, tmp_path / "whole", *overrides), "finetune")
    assert 0 < whole["replay_seconds"] < whole["train_seconds"]  # sampling time is measured, inside training time

    calls = {"n": 0}
    real_evaluate = ValidationSet.evaluate

    def dying_evaluate(*args, **kwargs):  # the run is killed during its 4th log point (2 sets each)
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ValidationSet, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(finetune_config(corpus, pretrained, tmp_path / "resumed", *overrides), "finetune")
    assert (tmp_path / "resumed" / "checkpoint.json").exists()
    monkeypatch.setattr(ValidationSet, "evaluate", real_evaluate)
    resumed = train(finetune_config(corpus, pretrained, tmp_path / "resumed", *overrides), "finetune")

    for key in ("old_loss", "new_loss", "old_kl", "new_kl", "forgetting", "steps", "tokens", "drift"):
        assert resumed[key] == whole[key], key
    lines = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa
    strip = lambda p: {k: v for k, v in p.items() if k not in WALL_CLOCK}  # noqa
    assert [strip(p) for p in lines("resumed")] == [strip(p) for p in lines("whole")]


def test_a_kill_during_checkpoint_save_leaves_the_previous_checkpoint_loadable(corpus, pretrained, tmp_path,
                                                                            monkeypatch):
    import safetensors.torch

    from selfreplay.rundir import RunDirectory

    overrides = ("log.checkpoint_every=1", "stop.tokens=3072")
    saves = {"n": 0}
    real_save = safetensors.torch.save_file

    def dying_save(tensors, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 3:  # the second checkpoint: weights written, then killed mid-way
            real_save(tensors, path, *args, **kwargs)
            raise KeyboardInterrupt
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(finetune_config(corpus, pretrained, out, *overrides), "finetune")
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    newest = RunDirectory(out).checkpoints()[0]
    assert RunDirectory(out).read_checkpoint(newest, "cpu").progress["step"] > 0
    summary = train(finetune_config(corpus, pretrained, out, *overrides), "finetune")
    assert summary["tokens"] >= 3072


def test_self_replay_pool_starts_at_the_old_domain_and_is_redrawn_every_buffer_steps(pretrained):
    from selfreplay.config import ReplayConfig
    from selfreplay.replay.pool import self_replay_pool

    reference = Transformer.from_pretrained(pretrained).eval()
    pool = self_replay_pool(reference, 0, ReplayConfig(batch_size=3, buffer=4, decode_batch=12), keep_hidden=True, seed=0)
    drawn = [pool.next_batch() for _ in range(9)]
    batches, hidden = [d.tokens for d in drawn], [d.hidden for d in drawn]
    assert all((b[:, 0] == 0).all() and b.shape == (3, reference.config.T) for b in batches)
    with torch.no_grad():  # the hidden states kept from decoding are π0's on the samples
        assert all(torch.allclose(h, reference.hidden(b), atol=1e-4) for b, h in zip(batches, hidden))
    assert pool.draws == 3  # steps 0, 4 and 8 drew a fresh pool
    assert len({tuple(row.tolist()) for b in batches[:8] for row in b}) == 24  # no sample replayed twice


def test_a_pool_holds_at_least_decode_batch_samples_drawn_together(pretrained, monkeypatch):
    import selfreplay.replay.pool as replay_module
    from selfreplay.config import ReplayConfig
    from selfreplay.replay.pool import self_replay_pool

    calls = []
    real_sample = replay_module.sample
    monkeypatch.setattr(replay_module, "sample", lambda *a, **k: calls.append((a[2], k["batch_size"])) or real_sample(*a, **k))
    reference = Transformer.from_pretrained(pretrained).eval()
    # 3 rows a step, buffer 2, but 10 decoded together: pools of 12 (4 batches), drawn every 4 steps
    pool = self_replay_pool(reference, 0, ReplayConfig(batch_size=3, buffer=2, decode_batch=10), keep_hidden=True, seed=0)
    batches = [pool.next_batch().tokens for _ in range(8)]
    assert calls == [(12, 10), (12, 10)] and pool.draws == 2
    assert len({tuple(row.tolist()) for b in batches for row in b}) == 24  # still never replayed twice


@pytest.mark.parametrize("spelling", [["replay.fraction=0.3"], ["replay.method=replace", "replay.coeff=0.3"]])
def test_fraction_puts_floor_fB_replay_rows_in_each_batch(corpus, pretrained, tmp_path, monkeypatch, spelling):
    import selfreplay.training.replay_run as train_module  # where the objective is called

    seen = []
    real_loss = train_module.training_loss

    def spy(model, reference, new, replay, method, coeff, *args, **kwargs):
        seen.append((len(new), int((new[:, 0] == 0).sum()), replay, method.name))  # rows, rows of the old domain (id 0)
        assert kwargs["new_mask"] is None  # token files: every token counts
        return real_loss(model, reference, new, replay, method, coeff, *args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", spy)
    summary = train(finetune_config(corpus, pretrained, tmp_path / "rep", *spelling, "optim.batch_size=10"), "finetune")
    # floor(0.3 · 10) = 3 of 10 rows are π0's samples (they start at the old domain's id); no replay term
    assert seen and all(step == (10, 3, None, "none") for step in seen)
    assert summary["method"] == "none"


@pytest.mark.parametrize("override, message", [
    ("replay.coeff=-1", "replay.coeff must be >= 0"),
    ("replay.method=klx", "unknown replay.method"),
    ("data.val_sequences=0", "need validation data"),
])
def test_bad_finetune_configs_fail_with_one_line(corpus, pretrained, tmp_path, override, message):
    extra = ["stop.target_loss=1.0"] if "val_sequences" in override else []
    with pytest.raises(SelfReplayError, match=message) as e:
        finetune_config(corpus, pretrained, tmp_path / "bad", override, *extra)
    assert "\n" not in str(e.value)


def test_missing_init_run_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(SelfReplayError, match="pretrain it first"):
        resolve_config("finetune", None, [f"init={tmp_path / 'nope'}", f"data.train={corpus['new']}",
                                          f"out={tmp_path / 'x'}", "stop.tokens=10"])
    with pytest.raises(SelfReplayError, match="set init="):
        resolve_config("finetune", None, [f"data.train={corpus['new']}", f"out={tmp_path / 'x'}", "stop.tokens=1"])


def test_a_finished_run_directory_is_never_overwritten(corpus, pretrained, tmp_path):
    before = (pretrained / "weights.safetensors").read_bytes()
    config = load_config(None, [f"out={pretrained}", f"data.tokenizer={corpus['tokenizer']}",
                                f"data.train={corpus['old']}", *MODEL, "stop.tokens=100"])
    with pytest.raises(SelfReplayError, match="already holds a finished run"):
        train(config, "pretrain")
    assert (pretrained / "weights.safetensors").read_bytes() == before


@pytest.mark.parametrize("engine", [["precision=bf16"], ["compile=true"], ["replay.compile=true"]],
                         ids=["bf16", "compile", "compiled-decoding"])
def test_engine_settings_train_to_nearly_the_same_loss(corpus, pretrained, tmp_path, engine):
    """bf16 autocast and torch.compile (of training, or of replay's decoding) change speed, not
    what is learned."""
    reference = train(finetune_config(corpus, pretrained, tmp_path / "fp32", "replay.method=kl"), "finetune")
    other = train(finetune_config(corpus, pretrained, tmp_path / "other", "replay.method=kl", *engine), "finetune")
    assert other["new_loss"] == pytest.approx(reference["new_loss"], rel=0.01)
    assert other["old_loss"] == pytest.approx(reference["old_loss"], rel=0.01)


def test_self_replay_can_start_from_several_domains_in_turn(corpus, pretrained, tmp_path):
    from selfreplay.config import ReplayConfig
    from selfreplay.replay.pool import self_replay_pool

    pool = self_replay_pool(Transformer.from_pretrained(pretrained).eval(), [0, 1], ReplayConfig(batch_size=3, buffer=2,
                            decode_batch=6), keep_hidden=True, seed=0)
    first = torch.cat([pool.next_batch().tokens[:, 0] for _ in range(2)])
    assert first.tolist() == [0, 1, 0, 1, 0, 1]
    summary = train(finetune_config(corpus, pretrained, tmp_path / "two", "replay.method=kl",
                                    "replay.domains=en_synth,es_synth"), "finetune")
    assert summary["stop_reason"] == "budget"
    with pytest.raises(SelfReplayError, match="replay.domains: unknown domain 'fr'"):
        train(finetune_config(corpus, pretrained, tmp_path / "bad", "replay.method=kl", "replay.domains=fr"),
              "finetune")
    assert not (tmp_path / "bad").exists()


def test_a_pool_drawn_once_replays_with_pi0s_stored_answers_and_resumes_exactly(corpus, pretrained, tmp_path,
                                                                              monkeypatch):
    """selfreplay sample --out: a pool with π0's hidden states and one with its top-V train alike;
    replayed pass after pass (replay.reuse=0) a run killed mid-pool resumes to the same end; a pool
    another model drew is refused in one line."""
    from conftest import killed_at_log_point
    from selfreplay.data.synth import LANGUAGES
    from selfreplay.training.pools import sample_builtin_pool

    V = Transformer.from_pretrained(pretrained).config.V
    for targets in ("hidden", f"topk:{V}"):
        sample_builtin_pool(str(pretrained), tmp_path / targets.split(":")[0], count=12, domain=LANGUAGES[0],
                            targets=targets, seed=3)
    overrides = lambda pool: ("replay.method=kl", f"replay.pool={tmp_path / pool}", "replay.reuse=0",  # noqa: E731
                              "log.checkpoint_every=1", "stop.tokens=3072")
    by_hidden = train(finetune_config(corpus, pretrained, tmp_path / "hidden_run", *overrides("hidden")), "finetune")
    by_topk = train(finetune_config(corpus, pretrained, tmp_path / "topk_run", *overrides("topk")), "finetune")
    # the same samples in the same order: equal but for float32 rounding over 12 steps (the step's exact
    # equality at K = V is tests/test_objective.py's)
    assert by_topk["old_loss"] == pytest.approx(by_hidden["old_loss"], rel=1e-3)
    assert by_topk["new_loss"] == pytest.approx(by_hidden["new_loss"], rel=1e-3)
    # neither run loaded π0 (reuse=0 never draws); with top-K targets not even its head, so no KL is measured
    assert by_hidden["old_kl"] > 0 and by_topk["old_kl"] is None
    # ... and each ends where a run holding π0 whole does (replay.reuse=1000: the same order, π0 loaded)
    with_pi0 = train(finetune_config(corpus, pretrained, tmp_path / "with_pi0", *overrides("hidden"),
                                     "replay.reuse=1000"), "finetune")
    for key in ("old_loss", "new_loss", "old_kl", "old_loss_0"):
        assert with_pi0[key] == by_hidden[key], key

    killed_at_log_point(monkeypatch, lambda: train(finetune_config(corpus, pretrained, tmp_path / "resumed",
                                                                   *overrides("topk")), "finetune"), 4)  # step 8 of 12
    assert (tmp_path / "resumed" / "checkpoint.json").exists()  # it resumes, not restarts
    resumed = train(finetune_config(corpus, pretrained, tmp_path / "resumed", *overrides("topk")), "finetune")
    for key in ("old_loss", "new_loss", "old_kl", "steps"):
        assert resumed[key] == by_topk[key], key

    sample_builtin_pool(str(tmp_path / "topk_run"), tmp_path / "other", count=4, domain=LANGUAGES[0])
    with pytest.raises(SelfReplayError, match="was drawn by model .* this run's π0 is"):
        train(finetune_config(corpus, pretrained, tmp_path / "refused", *overrides("other")), "finetune")


def test_a_run_draws_its_own_pool_once_and_a_resumed_run_does_not_draw_it_again(corpus, pretrained, tmp_path,
                                                                                monkeypatch):
    """replay.draw_once=N: the run draws N samples (with π0's hidden states) into RUN_DIR/replay_pool
    and ends where a run replaying the same pool from `selfreplay sample` (replay.reuse=0) ends;
    killed and resumed, it replays the pool it drew and ends where the uninterrupted run does."""
    from conftest import killed_at_log_point
    from selfreplay.data.synth import LANGUAGES
    from selfreplay.replay.store import StoredPool
    from selfreplay.training.pools import sample_builtin_pool

    common = ("replay.method=kl", "log.checkpoint_every=1", "stop.tokens=3072")
    whole = train(finetune_config(corpus, pretrained, tmp_path / "whole", *common, "replay.draw_once=12"), "finetune")
    pool = StoredPool(tmp_path / "whole" / "replay_pool")
    assert (len(pool), pool.kind) == (12, "hidden") and whole["replay_pool_seconds"] > 0
    sample_builtin_pool(str(pretrained), tmp_path / "pool", count=12, domain=LANGUAGES[0], seed=0)  # the run's seed
    given = train(finetune_config(corpus, pretrained, tmp_path / "given", *common, f"replay.pool={tmp_path / 'pool'}",
                                  "replay.reuse=0"), "finetune")
    for key in ("old_loss", "new_loss", "old_kl"):
        assert given[key] == whole[key], key

    config = finetune_config(corpus, pretrained, tmp_path / "resumed", *common, "replay.draw_once=12")
    killed_at_log_point(monkeypatch, lambda: train(config, "finetune"), 4)
    drawn = (tmp_path / "resumed" / "replay_pool" / "pool.json").read_text()
    resumed = train(config, "finetune")
    assert (tmp_path / "resumed" / "replay_pool" / "pool.json").read_text() == drawn  # not drawn again
    for key in ("old_loss", "new_loss", "old_kl", "steps"):
        assert resumed[key] == whole[key], key
    with pytest.raises(SelfReplayError, match="replay.draw_once draws the run's own pool"):
        train(finetune_config(corpus, pretrained, tmp_path / "both", *common, "replay.draw_once=4",
                              f"replay.pool={tmp_path / 'pool'}"), "finetune")


def test_the_optimizer_takes_adams_settings_from_the_config(corpus, pretrained, tmp_path, monkeypatch, one_thread):
    made = []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **settings):
            made.append(settings)
            super().__init__(params, **settings)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    train(finetune_config(corpus, pretrained, tmp_path / "run", "stop.tokens=512", "optim.eps=1e-6",
                          "optim.beta2=0.99"), "finetune")
    assert len(made) == 1 and made[0]["eps"] == 1e-6 and made[0]["betas"][1] == 0.99
