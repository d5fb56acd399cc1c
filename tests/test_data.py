import numpy as np
import pytest
import torch

from selfreplay.data.sequences import BatchLoader, SequenceStream, TokenSequences
from selfreplay.errors import SelfReplayError
from selfreplay.data.tokens import DTYPE, TokenFileMeta, metadata_path

T = 8


def token_file(path, num_tokens, domain_id, offset=0):
    """A token file whose token at position i is (offset + i) % 60000, so every sequence is recognisable."""
    tokens = ((np.arange(num_tokens) + offset) % 60000).astype(DTYPE)
    tokens.tofile(path)
    meta = TokenFileMeta(domain=f"d{domain_id}", domain_id=domain_id, tokenizer_fingerprint="f" * 16,
                         vocab_size=65536, eos_id=8, num_documents=1, num_tokens=num_tokens, source="test",
                         seconds=0.0)
    metadata_path(path).write_text(meta.to_json())
    return str(path)


def sequence_ids(rows, offset=0):
    """Which sequence of the file each row is (from its second token)."""
    return ((rows[:, 1] - 1 - offset) // T).tolist()


def test_split_is_deterministic_and_disjoint(tmp_path):
    path = token_file(tmp_path / "a.bin", 100 * T + 5, domain_id=2)
    a = TokenSequences(path, T, val_sequences=10, seed=3)
    b = TokenSequences(path, T, val_sequences=10, seed=3)
    c = TokenSequences(path, T, val_sequences=10, seed=4)
    assert np.array_equal(a.val_index, b.val_index) and np.array_equal(a.train_index, b.train_index)
    assert not np.array_equal(a.val_index, c.val_index)
    assert set(a.val_index).isdisjoint(a.train_index)
    assert sorted([*a.val_index, *a.train_index]) == list(range(100))  # the tail of 5 tokens is dropped
    # the validation rows are the held-out sequences, not a copy of training rows
    assert set(sequence_ids(a.validation().numpy())) == set(a.val_index)


def test_domain_id_replaces_the_first_token_of_every_sequence(tmp_path):
    seqs = TokenSequences(token_file(tmp_path / "a.bin", 50 * T, domain_id=5), T, val_sequences=4)
    stream = SequenceStream(seqs)
    rows = stream.take(20)
    assert (rows[:, 0] == 5).all() and (seqs.validation()[:, 0] == 5).all()
    i = sequence_ids(rows)[0]
    assert rows[0, 1:].tolist() == list(range(i * T + 1, (i + 1) * T))  # the rest is the file's own tokens


def test_epochs_cover_every_training_sequence_once_and_reshuffle(tmp_path):
    seqs = TokenSequences(token_file(tmp_path / "a.bin", 30 * T, domain_id=0), T, val_sequences=5)
    stream = SequenceStream(seqs, seed=1)
    first, second = sequence_ids(stream.take(25)), sequence_ids(stream.take(25))
    assert sorted(first) == sorted(second) == sorted(seqs.train_index.tolist())
    assert first != second and stream.epoch == 2


def test_mixing_fraction_is_exact(tmp_path):
    old = TokenSequences(token_file(tmp_path / "a.bin", 400 * T, domain_id=0), T, val_sequences=10)
    new = TokenSequences(token_file(tmp_path / "b.bin", 400 * T, domain_id=1), T, val_sequences=10)
    loader = BatchLoader(SequenceStream(old), 12, SequenceStream(new, seed=1), mix_fraction=0.3)
    batches = [loader.next_batch()[0] for _ in range(50)]
    mixed = [int((b[:, 0] == 1).sum()) for b in batches]
    assert all(b.shape == (12, T) for b in batches)
    assert sum(mixed) == int(50 * 0.3 * 12)  # 180 of 600 rows
    assert set(mixed) <= {3, 4}  # spread evenly, never bunched


def test_loader_state_resumes_the_same_batches(tmp_path):
    seqs = TokenSequences(token_file(tmp_path / "a.bin", 40 * T, domain_id=0), T, val_sequences=4)
    loader = BatchLoader(SequenceStream(seqs, seed=9), 7)
    for _ in range(8):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(6)]
    fresh = BatchLoader(SequenceStream(seqs, seed=9), 7)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [fresh.next_batch()[0] for _ in range(6)]))


def test_too_little_data_and_bad_fractions_are_clear_errors(tmp_path):
    path = token_file(tmp_path / "a.bin", 5 * T, domain_id=0)
    with pytest.raises(SelfReplayError, match="too few"):
        TokenSequences(path, T, val_sequences=8)
    seqs = TokenSequences(path, T, val_sequences=1)
    with pytest.raises(SelfReplayError, match="mix_fraction"):
        BatchLoader(SequenceStream(seqs), 4, None, mix_fraction=0.5)


def test_rows_in_memory_split_like_a_token_file_and_keep_their_first_token():
    rows = np.arange(50 * T, dtype=np.int64).reshape(50, T) + 70000  # ids beyond uint16: a 128k vocabulary
    a = TokenSequences.from_rows(rows, val_sequences=5, seed=3)
    b = TokenSequences.from_rows(rows, val_sequences=5, seed=3)
    assert a.validation().shape == (5, T) and a.train_tokens == 45 * T
    assert torch.equal(a.validation(), b.validation())
    assert not set(a.val_index) & set(a.train_index)
    assert torch.equal(a.validation(), torch.from_numpy(rows[a.val_index]))  # position 0 is not a domain id
    batch, mask = BatchLoader(SequenceStream(a, seed=0), batch_size=4).next_batch()
    assert mask is None  # every token counts: no mask tensor at all
    assert batch.dtype == torch.int64 and set(batch[:, 0].tolist()) <= set(rows[a.train_index, 0].tolist())
    with pytest.raises(SelfReplayError, match="too few for 50 validation"):
        TokenSequences.from_rows(rows, val_sequences=50)


def masked_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows [n, T] whose first token is the row's number, and a random mask [n, T]."""
    rows = np.arange(n * T, dtype=np.int64).reshape(n, T)
    rows[:, 0] = np.arange(n)
    return rows, np.random.default_rng(seed).random((n, T)) < 0.5


def test_a_batch_carries_the_mask_of_its_rows_and_resumes_with_it():
    rows, mask = masked_rows(40)
    seqs = TokenSequences.from_rows(rows, val_sequences=4, seed=1, mask=mask)
    assert torch.equal(seqs.validation_mask(), torch.from_numpy(mask[seqs.val_index]))
    loader = BatchLoader(SequenceStream(seqs, seed=2), 6)
    for _ in range(9):  # past the end of the first epoch
        tokens, batch_mask = loader.next_batch()
        assert batch_mask.dtype == torch.bool and torch.equal(batch_mask, torch.from_numpy(mask[tokens[:, 0]]))
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(4)]
    fresh = BatchLoader(SequenceStream(seqs, seed=2), 6)
    fresh.load_state_dict(state)
    for (tokens, batch_mask), (again, again_mask) in zip(expected, [fresh.next_batch() for _ in range(4)]):
        assert torch.equal(tokens, again) and torch.equal(batch_mask, again_mask)


def test_mixing_masked_and_unmasked_rows_counts_every_unmasked_token(tmp_path):
    rows, mask = masked_rows(40)
    chat = TokenSequences.from_rows(rows, val_sequences=4, mask=mask)
    text = TokenSequences(token_file(tmp_path / "a.bin", 40 * T, domain_id=900), T, val_sequences=4)
    assert text.validation_mask() is None
    for primary, mix in ((chat, text), (text, chat)):
        loader = BatchLoader(SequenceStream(primary), 10, SequenceStream(mix, seed=1), mix_fraction=0.3)
        for _ in range(5):
            tokens, batch_mask = loader.next_batch()
            from_text = tokens[:, 0] == 900
            assert 0 < from_text.sum() < 10 and batch_mask[from_text].all()
            assert torch.equal(batch_mask[~from_text], torch.from_numpy(mask[tokens[~from_text, 0]]))
    with pytest.raises(ValueError, match="differ in shape"):
        TokenSequences.from_rows(rows, val_sequences=4, mask=mask[:, 1:])
