"""replay.coeff=auto through the training loop (both model families): c held to a budget, logged,
checkpointed and resumed exactly; the capacity-bound diagnostic; the self-replay samples'
fidelity in the summary."""

import json

import pytest
import torch
from conftest import finetune_config, killed_at_log_point
from test_rundir import WALL_CLOCK

from selfreplay.errors import SelfReplayError
from selfreplay.training.loop import resolve_config, train

pytestmark = pytest.mark.usefixtures("one_thread")

AUTO = ("replay.coeff=auto", "replay.horizon=2")
# a tight budget that c, held at a low ceiling, cannot keep (tests/test_coefficient.py: the detector alone)
PAST_CAPACITY = (*AUTO, "replay.method=kl", "replay.budget=1e-3", "replay.coeff_start=0.3", "replay.coeff_max=0.3")


def lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def narrow(corpus, tmp_path_factory):
    """A 16-wide, one-layer model pretrained on the old domain as `pretrained` is (~4 s)."""
    out = tmp_path_factory.mktemp("narrow") / "pretrain"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread`, which a module fixture cannot use
    train(resolve_config("pretrain", None, [
        f"out={out}", f"data.tokenizer={corpus['tokenizer']}", f"data.train={corpus['old']}", "model.D=16",
        "model.L=1", "model.H=8", "model.T=32", "model.V=320", "data.val_sequences=32", "optim.lr=3e-3",
        "optim.batch_size=16", "optim.warmup_steps=5", "stop.tokens=16384", "log.every_tokens=4096",
        "log.progress=false"]), "pretrain")
    torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("method, budget, rises", [("kl", "1e-4", True), ("kl", "10", False), ("ntp", "1e-4", True)])
def test_c_moves_toward_the_budget_and_is_logged_at_every_log_point(corpus, pretrained, tmp_path, method, budget,
                                                                    rises):
    summary = train(finetune_config(corpus, pretrained, tmp_path / "auto", *AUTO, f"replay.method={method}",
                                    f"replay.budget={budget}", "replay.coeff_start=1"), "finetune")
    logged = lines(tmp_path / "auto")
    coeffs = [line["replay_coeff"] for line in logged]
    assert coeffs[0] == 1.0 and logged[0]["replay_kl"] is None  # before any step
    assert len(logged) == 5 and all(isinstance(line["replay_kl"], float) for line in logged[1:])
    assert (coeffs[-1] > 1.2) if rises else (coeffs[-1] < 0.5)  # 8 steps, horizon 2: up ≤ e^4, down ≥ e^-0.8
    assert summary["replay_coeff_end"] == coeffs[-1] and summary["coeff"] == "auto"
    assert summary["replay_kl_end"] > 0  # the controller's average, what c was last moved by
    assert summary["capacity_bound"] is False and summary["capacity_bound_since"] is None
    if method == "kl":  # the KL term is what the budget holds
        assert [line["replay_kl"] for line in logged] == [line["replay_loss"] for line in logged]
        fixed = train(finetune_config(corpus, pretrained, tmp_path / "fixed", "replay.method=kl", "replay.coeff=1"),
                      "finetune")
        end, fixed_end = logged[-1]["replay_kl"], lines(tmp_path / "fixed")[-1]["replay_loss"]
        # the same samples: a larger c keeps the KL lower, a smaller one lets it rise
        assert (end < fixed_end) if rises else (end > fixed_end)
        assert fixed["replay_coeff_end"] == 1.0 and fixed["capacity_bound"] is None


def test_the_replay_fidelity_of_pi0s_first_draw_is_in_the_summary(corpus, pretrained, tmp_path):
    summary = train(finetune_config(corpus, pretrained, tmp_path / "kl", "replay.method=kl"), "finetune")
    fidelity = summary["replay_fidelity"]
    assert fidelity["samples"] == 128 and fidelity["width"] == 31  # the first draw, less its domain token
    assert fidelity["nll_old"] == summary["old_loss_0"] and 0 < fidelity["nll_samples"] < 2 * fidelity["nll_old"]
    assert fidelity["eos_rate"] is not None and fidelity["short_rate"] == 0.0  # EOS joins documents, stops nothing
    assert fidelity["warnings"] == []
    real = train(finetune_config(corpus, pretrained, tmp_path / "real", "replay.method=kl", "replay.source=real"),
                 "finetune")
    assert real["replay_fidelity"] is None  # the old domain's own data: nothing sampled to judge


def test_a_run_resumed_mid_run_moves_c_as_an_uninterrupted_one(corpus, narrow, tmp_path, monkeypatch):
    """Killed at its 4th log point (step 8 of 12), mid-way through the capacity detector's stretch,
    the run resumes from step 6 with c, its KL average and the stretch, and logs every line alike."""
    overrides = (*PAST_CAPACITY, "log.checkpoint_every=1", "stop.tokens=3072")
    whole = train(finetune_config(corpus, narrow, tmp_path / "whole", *overrides), "finetune")
    killed_at_log_point(monkeypatch, lambda: train(finetune_config(corpus, narrow, tmp_path / "resumed", *overrides),
                                                   "finetune"), 4)
    latest = json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["latest"]
    progress = json.loads((tmp_path / "resumed" / latest / "progress.json").read_text())
    assert progress["step"] == 6 and progress["coefficient"]["updates"] == 6 and progress["capacity"]["start"] == 4
    resumed = train(finetune_config(corpus, narrow, tmp_path / "resumed", *overrides), "finetune")
    def strip(line):
        return {k: v for k, v in line.items() if k not in WALL_CLOCK}

    assert [strip(p) for p in lines(tmp_path / "resumed")] == [strip(p) for p in lines(tmp_path / "whole")]
    for key in ("replay_coeff_end", "capacity_bound", "capacity_bound_since", "replay_fidelity", "old_loss"):
        assert resumed[key] == whole[key], key
    assert whole["capacity_bound_since"] == 4


def test_a_narrow_model_held_to_a_tight_budget_is_capacity_bound_and_says_so_once(corpus, narrow, tmp_path, capfd):
    summary = train(finetune_config(corpus, narrow, tmp_path / "bound", *PAST_CAPACITY), "finetune")
    logged = lines(tmp_path / "bound")
    assert summary["capacity_bound"] is True and summary["capacity_bound_since"] == 4
    assert all(line["replay_coeff"] == 0.3 and line["replay_kl"] > 1e-3 for line in logged[2:])  # pinned, over budget
    assert logged[2]["new_loss"] > logged[3]["new_loss"] > logged[4]["new_loss"]  # ... and still learning
    said = [line for line in capfd.readouterr().err.splitlines() if "capacity bound" in line]
    assert len(said) == 1 and "must forget" in said[0] and "from step 4" in said[0]
    assert summary["stop_reason"] == "budget" and summary["steps"] == 8

    stopped = train(finetune_config(corpus, narrow, tmp_path / "stopped", *PAST_CAPACITY, "stop.tokens=4096",
                                    "stop.on_capacity_bound=true"), "finetune")
    assert stopped["stop_reason"] == "capacity_bound" and stopped["steps"] == 8  # of 16: where it turned bound

    # room to hold the KL: a budget it keeps under, a ceiling far above c; c falls and never reaches it
    roomy = train(finetune_config(corpus, narrow, tmp_path / "roomy", *AUTO, "replay.method=kl", "replay.budget=0.05",
                                  "replay.coeff_max=100"), "finetune")
    assert roomy["capacity_bound"] is False and roomy["capacity_bound_since"] is None
    assert all(line["replay_kl"] < 0.05 for line in lines(tmp_path / "roomy")[1:]) and roomy["replay_coeff_end"] < 10


@pytest.mark.parametrize("overrides, message", [
    (("replay.method=none", "replay.budget=0.01"), "replay.method=none has none"),
    (("replay.fraction=0.25", "replay.budget=0.01"), "replay.method=none has none"),
    (("replay.method=ntp", "replay.budget=0.01", "replay.pool=somewhere", "replay.reuse=0"), "holds no π0"),
    (("replay.method=kl",), "set replay.budget"),
    (("replay.method=kl", "replay.budget=0.01", "replay.coeff_start=5000"), "replay.coeff_start=5000 is outside"),
])
def test_settings_coeff_auto_cannot_take_are_refused_in_one_line(corpus, pretrained, tmp_path, overrides, message):
    with pytest.raises(SelfReplayError, match=message) as error:
        finetune_config(corpus, pretrained, tmp_path / "bad", "replay.coeff=auto", *overrides)
    assert "\n" not in str(error.value) and not (tmp_path / "bad").exists()


def test_the_budgeted_divergence_of_ntp_is_its_rise_over_pi0s_loss_on_the_same_rows():
    import torch.nn.functional as F

    from selfreplay.config import ModelConfig
    from selfreplay.model.transformer import Transformer
    from selfreplay.objective.methods import (
        REPLAY_KL,
        REPLAY_NTP,
        budgeted_divergence,
        training_loss,
    )
    from selfreplay.replay.samples import ReplaySamples

    torch.manual_seed(0)
    model, reference = Transformer(ModelConfig(D=16, L=1, H=8, T=8, V=32)), Transformer(ModelConfig(D=16, L=1, H=8,
                                                                                                   T=8, V=32))
    new, tokens = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    replay = ReplaySamples(tokens, mask)

    def direct_loss(m):  # mean next-token loss over the counted predictions, from the full logits
        losses = F.cross_entropy(m(tokens)[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1), reduction="none")
        return losses[mask[:, 1:].reshape(-1)].mean().item()

    _, _, reg = training_loss(model, reference, new, replay, REPLAY_NTP, 1.0)
    measured = budgeted_divergence(REPLAY_NTP, reg, reference, replay).item()
    assert measured == pytest.approx(direct_loss(model) - direct_loss(reference), abs=1e-5)
    assert abs(measured) > 0.01  # two different random models
    reference.load_state_dict(model.state_dict())
    assert budgeted_divergence(REPLAY_NTP, reg, reference, replay).item() == pytest.approx(0.0, abs=1e-5)
    _, _, kl = training_loss(model, reference, new, replay, REPLAY_KL, 1.0)
    assert budgeted_divergence(REPLAY_KL, kl, reference, replay) is not kl and not \
        budgeted_divergence(REPLAY_KL, kl, reference, replay).requires_grad


def test_a_hugging_face_model_holds_c_to_a_budget_through_the_same_loop(taught_llama_dir, tmp_path):
    """init=hf: with replay.coeff=auto: c logged and in the summary, with the fidelity of π0's
    samples from BOS."""
    from conftest import sentences, write_jsonl

    texts = {"new": write_jsonl(tmp_path / "new.jsonl", sentences("es", 100, seed=1)),
             "old": write_jsonl(tmp_path / "old.jsonl", sentences("en", 30, seed=2))}
    config = resolve_config("finetune", None, [
        f"init=hf:{taught_llama_dir}", f"data.train={texts['new']}", f"data.old_text={texts['old']}",
        f"out={tmp_path / 'hf'}", "model.T=32", "data.val_sequences=8", "optim.lr=1e-2", "optim.batch_size=4",
        "optim.warmup_steps=0", "replay.method=kl", "replay.batch_size=3", "replay.buffer=2", "replay.decode_batch=6",
        "replay.length=32", "stop.tokens=512", "log.every_tokens=256", "log.progress=false", *AUTO,
        "replay.budget=1e-4", "replay.coeff_start=1"])
    summary = train(config, "finetune")
    logged = lines(tmp_path / "hf")
    assert logged[0]["replay_coeff"] == 1.0 and summary["replay_coeff_end"] > 1.0
    assert logged[-1]["replay_kl"] == logged[-1]["replay_loss"] > 1e-4
    fidelity = summary["replay_fidelity"]  # the first draw: 6 samples of 31 tokens after BOS, EOS counted
    assert (fidelity["samples"], fidelity["width"]) == (6, 31) and fidelity["eos_rate"] is not None
    assert fidelity["nll_old"] == summary["old_loss_0"] and fidelity["nll_samples"] > 0
