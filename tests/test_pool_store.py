"""Replay pools on disk (selfreplay/replay/store.py) and the model fingerprint they carry
(selfreplay/model/fingerprint.py): what a reused pool gives back is what was drawn, a pool from
another model or a damaged shard is refused in one line, and the reuse order resumes exactly."""

import copy
import json

import pytest
import torch

from selfreplay.config import ModelConfig
from selfreplay.errors import SelfReplayError
from selfreplay.model.fingerprint import model_fingerprint
from selfreplay.model.lora import add_lora
from selfreplay.model.transformer import Transformer
from selfreplay.replay.samples import ReplaySamples
from selfreplay.replay.store import PoolWriter, ReuseOrder, StoredPool

FP = "0123456789abcdef"


def drawn(n: int, t: int = 6, V: int = 50, D: int = 4, K: int = 3, seed: int = 0):
    """n samples [n, t] whose ends are padding (a stop at EOS), π0's hidden states, and top-K targets."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    logp, ids = torch.randn(n, t, V, generator=g).log_softmax(-1).topk(K)
    topk = {"logp": logp, "ids": ids, "rest": torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-6))}
    return ReplaySamples(tokens, mask), torch.randn(n, t, D, generator=g), topk


def write_pool(path, batches, shard_rows=4, fingerprint=FP):
    """A pool written batch by batch: batches of (samples, targets)."""
    writer = PoolWriter(path, fingerprint, {"model": "tiny", "temperature": 1.0}, shard_rows=shard_rows)
    for samples, targets in batches:
        writer.write(samples, targets)
    return writer.close()


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- round trip

def test_hidden_targets_round_trip_across_shards(tmp_path):
    samples, hidden, _ = drawn(11)
    # writes of 3, 5 and 3 rows into shards of 4: writes and shards straddle each other
    header = write_pool(tmp_path / "pool", [(samples.rows(slice(a, b)), {"hidden": hidden[a:b]})
                                            for a, b in ((0, 3), (3, 8), (8, 11))])
    assert [s["rows"] for s in header["shards"]] == [4, 4, 3]
    assert header["targets"] == "hidden" and header["rows"] == 11 and header["mask"] and header["width"] == 6
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == \
        ["pool.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]

    pool = StoredPool(tmp_path / "pool", fingerprint=FP)
    assert len(pool) == 11
    got, targets = pool.rows(2, 10)  # from the first shard to the last
    assert got.tokens.dtype == torch.long and torch.equal(got.tokens, samples.tokens[2:10])
    assert torch.equal(got.mask, samples.mask[2:10])
    assert torch.equal(targets["hidden"], hidden[2:10]) and got.hidden is targets["hidden"]
    order = torch.tensor([10, 0, 5, 5, 3])  # any order, a row twice
    got, targets = pool.take(order)
    assert torch.equal(got.tokens, samples.tokens[order]) and torch.equal(targets["hidden"], hidden[order])


def test_topk_targets_round_trip(tmp_path):
    samples, _, topk = drawn(9, K=3)
    header = write_pool(tmp_path / "pool", [(samples, topk)])
    assert header["targets"] == "topk:3"
    got, targets = StoredPool(tmp_path / "pool").rows(0, 9)
    assert set(targets) == {"logp", "ids", "rest"} and got.hidden is None
    assert targets["ids"].dtype == torch.long and torch.equal(targets["ids"], topk["ids"])
    assert torch.equal(targets["logp"], topk["logp"]) and torch.equal(targets["rest"], topk["rest"])
    assert torch.equal(got.mask, samples.mask)


def test_unmasked_samples_come_back_unmasked_and_narrow_writes_are_padded(tmp_path):
    tokens = torch.arange(12).view(2, 6)
    write_pool(tmp_path / "full", [(ReplaySamples(tokens), None)])
    got, targets = StoredPool(tmp_path / "full").rows(0, 2)
    assert got.mask is None and targets == {} and torch.equal(got.tokens, tokens)

    # a second write 4 tokens wide joins rows 6 wide: padded, and masked off
    write_pool(tmp_path / "narrow", [(ReplaySamples(tokens), None), (ReplaySamples(tokens[:, :4]), None)])
    got, _ = StoredPool(tmp_path / "narrow").rows(0, 4)
    assert got.mask[:2].all() and got.mask[2:, :4].all() and not got.mask[2:, 4:].any()
    assert torch.equal(got.tokens[2:, :4], tokens[:, :4])


def test_sample_hidden_is_stored_as_hidden_targets(tmp_path):
    samples, hidden, _ = drawn(5)
    write_pool(tmp_path / "pool", [(ReplaySamples(samples.tokens, samples.mask, hidden), None)])
    got, targets = StoredPool(tmp_path / "pool").rows(0, 5)
    assert torch.equal(got.hidden, hidden) and set(targets) == {"hidden"}


def test_writer_refuses_a_held_directory_and_mismatched_writes(tmp_path):
    samples, hidden, topk = drawn(4)
    write_pool(tmp_path / "pool", [(samples, {"hidden": hidden})])
    with pytest.raises(SelfReplayError) as e:
        PoolWriter(tmp_path / "pool", FP, {})
    assert "already holds a replay pool" in one_line(e)

    writer = PoolWriter(tmp_path / "other", FP, {})
    writer.write(samples, {"hidden": hidden})
    with pytest.raises(SelfReplayError) as e:
        writer.write(samples, topk)  # another kind of targets
    assert "do not match the pool's (hidden" in one_line(e)
    with pytest.raises(SelfReplayError) as e:
        writer.write(ReplaySamples(torch.zeros(2, 7, dtype=torch.long)), {"hidden": torch.zeros(2, 7, 4)})
    assert "width 7" in one_line(e)
    with pytest.raises(SelfReplayError) as e:
        writer.write(samples, {"logits": hidden})
    assert "'hidden'" in one_line(e)
    with pytest.raises(SelfReplayError) as e:
        PoolWriter(tmp_path / "empty", FP, {}).close()
    assert "no samples" in one_line(e)


# ---------------------------------------------------------------- refusals

def test_another_models_pool_is_refused(tmp_path):
    samples, hidden, _ = drawn(4)
    write_pool(tmp_path / "pool", [(samples, {"hidden": hidden})])
    with pytest.raises(SelfReplayError) as e:
        StoredPool(tmp_path / "pool", fingerprint="fedcba9876543210")
    message = one_line(e)
    assert f"drawn by model {FP} (tiny)" in message and "π0 is fedcba9876543210" in message
    assert "selfreplay sample" in message


def test_unfinished_or_absent_pool_is_refused(tmp_path):
    samples, hidden, _ = drawn(10)
    writer = PoolWriter(tmp_path / "pool", FP, {}, shard_rows=4)
    writer.write(samples, {"hidden": hidden})  # two full shards on disk, no close(): no pool.json
    assert (tmp_path / "pool" / "shard-00001.safetensors").is_file()
    with pytest.raises(SelfReplayError) as e:
        StoredPool(tmp_path / "pool")
    assert "unfinished replay pool" in one_line(e)
    with pytest.raises(SelfReplayError) as e:
        StoredPool(tmp_path / "nothing")
    assert "holds no replay pool" in one_line(e)
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "pool.json").write_text(json.dumps({"model": "gpt2", "count": 3}))
    with pytest.raises(SelfReplayError) as e:
        StoredPool(tmp_path / "jsonl")
    assert "not a pool of safetensors shards" in one_line(e)


def test_flipped_byte_is_refused_when_its_shard_is_reached(tmp_path):
    samples, hidden, _ = drawn(12)
    write_pool(tmp_path / "pool", [(samples, {"hidden": hidden})])
    shard = tmp_path / "pool" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of the data: same size, still a readable file, other numbers
    shard.write_bytes(bytes(data))

    pool = StoredPool(tmp_path / "pool")  # opening checks sizes only
    assert torch.equal(pool.rows(0, 4)[0].tokens, samples.tokens[:4])  # shard 0 is whole
    with pytest.raises(SelfReplayError) as e:
        pool.rows(3, 6)
    assert "shard-00001.safetensors is damaged (checksum differs): redraw the pool" in one_line(e)
    assert torch.equal(pool.rows(8, 12)[0].tokens, samples.tokens[8:12])


def test_truncated_or_missing_shard_is_refused(tmp_path):
    samples, hidden, _ = drawn(12)
    write_pool(tmp_path / "pool", [(samples, {"hidden": hidden})])
    shard = tmp_path / "pool" / "shard-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(SelfReplayError) as e:
        StoredPool(tmp_path / "pool")
    assert "shard-00002.safetensors is damaged (truncated" in one_line(e)

    shard.write_bytes(data)
    pool = StoredPool(tmp_path / "pool")
    shard.write_bytes(data[:-10])  # cut after the pool was opened: refused when reached
    with pytest.raises(SelfReplayError) as e:
        pool.rows(8, 9)
    assert "damaged (truncated" in one_line(e)
    shard.unlink()
    with pytest.raises(SelfReplayError) as e:
        StoredPool(tmp_path / "pool")
    assert "shard-00002.safetensors is missing" in one_line(e)


def test_reading_rows_maps_only_their_shard(tmp_path):
    samples, hidden, _ = drawn(12)
    write_pool(tmp_path / "pool", [(samples, {"hidden": hidden})])
    pool = StoredPool(tmp_path / "pool")
    (tmp_path / "pool" / "shard-00002.safetensors").unlink()  # never read below
    (tmp_path / "pool" / "shard-00001.safetensors").unlink()
    got, targets = pool.rows(1, 3)
    assert torch.equal(got.tokens, samples.tokens[1:3]) and torch.equal(targets["hidden"], hidden[1:3])
    assert list(pool._maps) == [0] and pool.verified == {0}
    with pytest.raises(SelfReplayError) as e:
        pool.rows(4, 5)
    assert "shard-00001.safetensors is missing" in one_line(e)


# ---------------------------------------------------------------- reuse order

def test_reuse_order_covers_every_row_once_a_pass_and_is_seeded():
    order = ReuseOrder(10, 4, seed=3)
    batches = [order.next_indices() for _ in range(5)]  # 20 rows: two whole passes
    assert all(b.dtype == torch.long and len(b) == 4 for b in batches)
    rows = torch.cat(batches)
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert not torch.equal(rows[:10], rows[10:])  # each pass its own permutation
    again = ReuseOrder(10, 4, seed=3)
    assert torch.equal(torch.cat([again.next_indices() for _ in range(5)]), rows)
    other = ReuseOrder(10, 4, seed=4)
    assert not torch.equal(torch.cat([other.next_indices() for _ in range(5)]), rows)


def test_reuse_order_resumes_mid_pass():
    order = ReuseOrder(10, 3, seed=0)
    for _ in range(2):
        order.next_indices()
    state = order.state_dict()
    assert state == {"pass": 0, "position": 6}
    rest = [order.next_indices() for _ in range(6)]  # crosses two pass boundaries
    resumed = ReuseOrder(10, 3, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert all(torch.equal(a, b) for a, b in zip(rest, [resumed.next_indices() for _ in range(6)]))
    assert resumed.state_dict() == order.state_dict() == {"pass": 2, "position": 4}


# ---------------------------------------------------------------- fingerprint

def tiny_model(seed=0, V=32):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(D=16, L=1, H=8, T=8, V=V))


def test_fingerprint_of_a_copy_and_a_reload_is_the_models(tmp_path):
    model = tiny_model()
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert model_fingerprint(copy.deepcopy(model)) == fingerprint
    model.save_pretrained(tmp_path / "run")
    assert model_fingerprint(Transformer.from_pretrained(tmp_path / "run")) == fingerprint
    assert model_fingerprint(tiny_model(seed=1)) != fingerprint
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fingerprint


def test_fingerprint_sees_a_training_step_in_a_large_tensor_and_any_change_in_a_small_one():
    model = tiny_model(V=4096)  # head [4096, 16]: 256 KiB, hashed through a sample of its bytes
    fingerprint = model_fingerprint(model)
    tokens = torch.randint(0, 4096, (2, 8))
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    with torch.no_grad():
        model.head.weight -= 1e-3 * model.head.weight.grad  # one SGD step, on the large tensor alone
    assert model_fingerprint(model) != fingerprint

    small = tiny_model()  # every tensor under 192 KiB: hashed whole, so one element anywhere counts
    fingerprint = model_fingerprint(small)
    with torch.no_grad():
        small.blocks[0].down.weight[7, 21] += 1e-3
    assert model_fingerprint(small) != fingerprint


def test_fingerprint_leaves_adapters_out():
    model = tiny_model()
    adapted = copy.deepcopy(model)
    add_lora(adapted, rank=2)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.1)  # trained adapters: π0 (adapters disabled) is still the base model
    assert model_fingerprint(adapted) == model_fingerprint(model)


def test_fingerprint_of_a_transformers_model_and_its_peft_wrapper(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from selfreplay.model.hf import with_adapters
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    fingerprint = model_fingerprint(model)
    model.save_pretrained(tmp_path / "llama")
    assert model_fingerprint(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")) == fingerprint

    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    wrapped = with_adapters(copy.deepcopy(model), lora)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.1)  # adapters and the saved head's trainable copy move; π0 does not
    assert model_fingerprint(wrapped) == fingerprint
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    assert model_fingerprint(model) != fingerprint
