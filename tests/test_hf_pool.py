"""A Hugging Face model's replay pools: drawn once into a pool directory with π0's targets, replayed
by runs before (or instead of) fresh draws, through the one ReplayPool."""

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

import selfreplay.replay.hf_pool as pool_module  # noqa: E402
from selfreplay.config import ReplayConfig  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.model.fingerprint import model_fingerprint  # noqa: E402
from selfreplay.model.hf import CausalLM, load_causal_lm  # noqa: E402
from selfreplay.objective.methods import training_loss  # noqa: E402
from selfreplay.replay.hf_sampling import base_format  # noqa: E402
from selfreplay.replay.hf_pool import hf_replay_pool  # noqa: E402
from selfreplay.replay.store import StoredPool  # noqa: E402
from selfreplay.training.pools import sample_hf_pool  # noqa: E402


@pytest.fixture(scope="module")
def reference(taught_llama_dir):
    model, tokenizer = load_causal_lm(taught_llama_dir)
    return CausalLM(model.eval()), tokenizer


@pytest.fixture(scope="module")
def pools(taught_llama_dir, hf_tokenizer, tmp_path_factory):
    """The same 12 samples (one seed) drawn three times: with π0's hidden states, its top-V (every
    token: the exact KL), and bare."""
    root = tmp_path_factory.mktemp("pools")
    for name, targets in (("hidden", "hidden"), ("topk", f"topk:{len(hf_tokenizer)}"), ("none", "none")):
        sample_hf_pool(taught_llama_dir, root / name, count=12, length=40, temperature=0.9, top_p=0.95, seed=5,
                       batch_size=5, targets=targets)
    return root


def test_a_pool_holds_what_drew_it_and_refuses_another_model_or_an_existing_directory(pools, taught_llama_dir,
                                                                                        tiny_llama_dir, reference):
    pool = StoredPool(pools / "hidden", model_fingerprint(reference[0].model))
    assert len(pool) == 12 and pool.kind == "hidden"
    meta = pool.header["meta"]
    assert {k: meta[k] for k in ("model", "format", "temperature", "top_p", "length", "seed", "count")} == {
        "model": taught_llama_dir, "format": "base", "temperature": 0.9, "top_p": 0.95, "length": 40, "seed": 5,
        "count": 12}
    samples, _ = pool.rows(0, 12)
    assert (samples.tokens[:, 0] == reference[1].bos_token_id).all() and samples.mask[:, 0].all()
    other = model_fingerprint(load_causal_lm(tiny_llama_dir)[0])
    with pytest.raises(SelfReplayError, match="was drawn by model .* this run's π0 is"):
        StoredPool(pools / "hidden", other)
    with pytest.raises(SelfReplayError, match="already holds a replay pool"):
        sample_hf_pool(taught_llama_dir, pools / "hidden", count=1, length=8)


def test_every_kind_of_stored_target_gives_the_kl_of_running_pi0(pools, reference):
    """π0's stored hidden states, its stored top-V and bare samples (π0 scores them) give one KL."""
    import copy

    lm, tokenizer = reference
    theta = copy.deepcopy(lm)
    with torch.no_grad():
        theta.head.weight.mul_(1.5)  # a θ that differs from π0, so that the KL is positive
    new = torch.randint(5, lm.head.weight.shape[0], (2, 16), generator=torch.Generator().manual_seed(0))
    kls = {}
    for name in ("hidden", "topk", "none"):
        replay = ReplayConfig(method="kl", batch_size=4, pool=str(pools / name))
        batch = hf_replay_pool(lm, base_format(tokenizer), replay, keep_hidden=True, seed=1).next_batch()
        assert (batch.topk is not None) == (name == "topk") and (batch.hidden is not None) == (name != "topk")
        with torch.no_grad():
            kls[name] = training_loss(theta, lm, new, batch, "kl", 1.0)[2].item()
    assert kls["none"] > 0
    assert kls["hidden"] == pytest.approx(kls["none"], rel=1e-5)
    assert kls["topk"] == pytest.approx(kls["none"], rel=1e-5)


def test_a_run_replays_the_stored_pool_once_in_a_seeded_order_then_draws(pools, reference, monkeypatch):
    lm, tokenizer = reference
    stored = StoredPool(pools / "hidden")
    everything = {tuple(row[mask].tolist()) for row, mask in zip(*(lambda s: (s.tokens, s.mask))(stored.rows(0, 12)[0]))}
    replay = ReplayConfig(method="kl", batch_size=4, buffer=2, decode_batch=8, length=40, pool=str(pools / "hidden"))
    pool = hf_replay_pool(lm, base_format(tokenizer), replay, keep_hidden=True)

    def no_sampling(*args, **kwargs):
        raise AssertionError("a stored pool's samples were drawn again")

    seen = set()
    with monkeypatch.context() as m:
        m.setattr(pool_module, "sample_replay", no_sampling)
        for _ in range(3):
            batch = pool.next_batch()
            seen |= {tuple(row[mask].tolist()) for row, mask in zip(batch.tokens, batch.mask)}
            with torch.no_grad():  # the stored hidden states are π0's where the KL reads them: predicting a real token
                read = batch.mask[:, 1:]
                assert torch.allclose(batch.hidden[:, :-1][read], lm.hidden(batch.tokens)[:, :-1][read], atol=1e-4)
    assert seen == everything and pool.draws == 0  # one pass: every stored sample once
    fresh = pool.next_batch()  # replay.reuse=1: the pool is used up, π0 is sampled
    assert pool.draws == 1 and fresh.tokens.shape[0] == 4


def test_reuse_zero_replays_the_pool_pass_after_pass_and_ranks_split_it(pools, reference):
    lm, tokenizer = reference
    replay = ReplayConfig(method="kl", batch_size=3, length=40, pool=str(pools / "topk"), reuse=0)
    pool = hf_replay_pool(lm, base_format(tokenizer), replay, keep_hidden=True)
    pool.draw = None  # it must never draw
    batches = [pool.next_batch() for _ in range(10)]  # 30 rows: two and a half passes over 12
    assert all(b.topk is not None for b in batches) and pool.order.pass_ == 2
    ranks = [hf_replay_pool(lm, base_format(tokenizer), replay, True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r.stored_rows) for r in ranks] == [6, 6]
    assert not set(ranks[0].stored_rows.tolist()) & set(ranks[1].stored_rows.tolist())


def test_drawn_batches_are_cut_after_their_longest_sample(reference):
    lm, tokenizer = reference
    replay = ReplayConfig(batch_size=4, buffer=2, decode_batch=8, length=60)
    pool = hf_replay_pool(lm, base_format(tokenizer), replay, keep_hidden=True, seed=0)
    batches = [pool.next_batch() for _ in range(3)]
    assert pool.draws == 2
    for batch in batches:
        assert batch.mask[:, -1].any() and batch.hidden.shape[:2] == batch.tokens.shape
