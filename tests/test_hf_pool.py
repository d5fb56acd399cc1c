import json

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

import selfreplay.replay.pool_dir as pool_module  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.model.hf import CausalLM, load_causal_lm  # noqa: E402
from selfreplay.config import ReplayConfig  # noqa: E402
from selfreplay.replay.pool_dir import hf_replay_pool, read_pool, sample_pool  # noqa: E402
from selfreplay.replay.hf_sampling import base_format  # noqa: E402


@pytest.fixture(scope="module")
def pool_dir(taught_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool") / "pool"
    sample_pool(taught_llama_dir, out, count=12, length=40, temperature=0.9, top_p=0.95, seed=5, batch_size=5)
    return out


@pytest.fixture(scope="module")
def reference(taught_llama_dir):
    model, tokenizer = load_causal_lm(taught_llama_dir)
    return CausalLM(model.eval()), tokenizer


def test_a_pool_directory_holds_ids_text_and_what_drew_them(pool_dir, taught_llama_dir, hf_tokenizer):
    header = json.loads((pool_dir / "pool.json").read_text())
    assert {k: header[k] for k in ("model", "format", "temperature", "top_p", "length", "seed", "count")} == {
        "model": taught_llama_dir, "format": "base", "temperature": 0.9, "top_p": 0.95, "length": 40, "seed": 5,
        "count": 12}
    lines = [json.loads(line) for line in (pool_dir / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for line in lines:
        assert line["ids"][0] == hf_tokenizer.bos_token_id and 1 < len(line["ids"]) <= 40
        assert line["text"] == hf_tokenizer.decode(line["ids"], skip_special_tokens=False)
    with pytest.raises(SelfReplayError, match="already holds a replay pool"):
        sample_pool(taught_llama_dir, pool_dir, count=1, length=8)


def test_a_run_replays_the_pool_file_in_order_and_draws_only_after_it(pool_dir, reference, monkeypatch):
    lm, tokenizer = reference
    rows, _ = read_pool(pool_dir)
    replay = hf_replay_pool(lm, base_format(tokenizer), ReplayConfig(batch_size=4, buffer=2, decode_batch=8, length=40,
                                                                    pool=str(pool_dir)), keep_hidden=True)

    def no_sampling(*args, **kwargs):
        raise AssertionError("a pool file's samples were drawn again")

    with monkeypatch.context() as m:
        m.setattr(pool_module, "sample_replay", no_sampling)
        for b in range(3):
            batch = replay.next_batch()
            for i, (row, mask) in enumerate(zip(batch.tokens, batch.mask)):
                assert row[mask].tolist() == rows[4 * b + i]
            with torch.no_grad():
                assert torch.allclose(batch.hidden, lm.hidden(batch.tokens), atol=1e-5)
    assert replay.draws == 0
    fresh = replay.next_batch()  # the file is used up: now π0 is sampled
    assert replay.draws == 1 and fresh.tokens.shape[0] == 4


def test_ranks_split_the_pool_file_and_draw_with_their_own_seeds(pool_dir, reference):
    lm, tokenizer = reference
    replay = ReplayConfig(batch_size=2, buffer=1, decode_batch=2, length=40, pool=str(pool_dir))
    ranks = [hf_replay_pool(lm, base_format(tokenizer), replay, True, rank=r, world_size=2) for r in (0, 1)]
    shares = [read_pool(pool_dir, r, 2)[0] for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 6 and not set(map(tuple, shares[0])) & set(map(tuple, shares[1]))
    for replay in ranks:
        replay.stored_cursor = len(replay.stored)  # skip to the fresh draws
    first, second = (replay.next_batch().tokens for replay in ranks)
    assert not torch.equal(first[:, :8], second[:, :8])


def test_an_unfinished_or_missing_pool_is_one_line(tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"ids": [1, 2]}\n')
    for folder, what in ((tmp_path, "unfinished pool"), (tmp_path / "none", "no replay pool")):
        with pytest.raises(SelfReplayError, match=what):
            read_pool(folder)


def test_drawn_batches_are_cut_after_their_longest_sample(reference):
    lm, tokenizer = reference
    replay = hf_replay_pool(lm, base_format(tokenizer), ReplayConfig(batch_size=4, buffer=2, decode_batch=8, length=60),
                            keep_hidden=True, seed=0)
    batches = [replay.next_batch() for _ in range(3)]
    assert replay.draws == 2
    for batch in batches:
        assert batch.mask[:, -1].any() and batch.hidden.shape[:2] == batch.tokens.shape
