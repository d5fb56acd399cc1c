import json

import pytest
import tokenizers

from selfreplay.errors import SelfReplayError
from selfreplay.data.tokenizer import load_tokenizer, train_tokenizer

TEXTS = ["The cat sees the river today.", "El niño comió jalapeños en la montaña.",
         "café, naïve, résumé", "emoji 🎉🦙 and 中文", "  spaces\tand\ttabs\n\nnewlines  ", ""]


def documents(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_reserved_ids(tokenizer):
    names = [tokenizer.backend.id_to_token(i) for i in range(9)]
    assert names == ["<|domain:en|>", "<|domain:es|>"] + [f"<|domain:{k}|>" for k in range(2, 8)] + ["<|eos|>"]
    assert tokenizer.eos_id == 8
    assert tokenizer.domain_ids == {"en": 0, "es": 1}
    assert tokenizer.domain_id("es") == 1
    assert tokenizer.domain_id("3") == 3 and tokenizer.domain_id(5) == 5
    assert tokenizer.domain_name(1) == "es" and tokenizer.domain_name(4) == "4"
    assert 265 <= tokenizer.vocab_size <= 300


def test_unknown_domain_lists_the_known_names(tokenizer):
    with pytest.raises(SelfReplayError, match="unknown domain 'fr': this tokenizer knows en, es"):
        tokenizer.domain_id("fr")
    with pytest.raises(SelfReplayError):
        tokenizer.domain_id(8)  # EOS is not a domain


def test_ordinary_text_never_encodes_to_special_ids(tokenizer, corpora):
    texts = documents(corpora["en"]) + documents(corpora["es"]) + ["literal <|eos|> and <|domain:en|>"]
    ids = [i for doc in tokenizer.encode_batch(texts) for i in doc]
    assert min(ids) >= 9
    assert tokenizer.decode(tokenizer.encode(texts[-1])) == texts[-1]


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(t) for t in TEXTS]


def test_decode_skips_special_tokens_unless_asked(tokenizer):
    ids = [tokenizer.domain_id("es")] + tokenizer.encode("hola") + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == "hola"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|domain:es|>hola<|eos|>"


def test_save_and_load_keep_fingerprint_and_encodings(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "copy")
    for where in (tmp_path / "copy", path):  # a directory or the file itself
        loaded = load_tokenizer(where)
        assert loaded.fingerprint == tokenizer.fingerprint
        assert len(loaded.fingerprint) == 16
        assert loaded.domain_ids == tokenizer.domain_ids
        assert loaded.encode_batch(TEXTS) == tokenizer.encode_batch(TEXTS)
    plain = tokenizers.Tokenizer.from_file(str(path))
    assert plain.encode("The cat", add_special_tokens=False).ids == tokenizer.encode("The cat")
    assert plain.token_to_id("<|eos|>") == 8


def test_unnamed_slots_and_a_different_fingerprint(corpora, tokenizer, tmp_path):
    other = train_tokenizer(str(corpora["en"]), vocab_size=280, out_dir=tmp_path)
    assert other.domain_ids == {}
    assert other.domain_id("0") == 0 and other.domain_name(0) == "0"
    assert other.fingerprint != tokenizer.fingerprint
    assert (tmp_path / "tokenizer.json").is_file()


@pytest.mark.parametrize("vocab_size, domains, match", [
    (264, [], "vocab size 264 is too small.*at least 265"),
    (300, [f"d{i}" for i in range(9)], "9 domain names given, at most 8"),
    (300, ["en", "en"], "unique, repeated: en"),
    (300, ["en", "es|x"], "bad domain name 'es|x'"),
    (300, ["en", ""], "bad domain name ''"),
    (300, ["3"], "plain numbers"),
])
def test_train_validates_its_arguments(corpora, tmp_path, vocab_size, domains, match):
    with pytest.raises(SelfReplayError, match=match):
        train_tokenizer(str(corpora["en"]), vocab_size=vocab_size, out_dir=tmp_path, domains=domains)
    assert not (tmp_path / "tokenizer.json").exists()


def test_train_reports_bad_corpora(corpora, tmp_path):
    with pytest.raises(SelfReplayError, match="corpus not found"):
        train_tokenizer([str(corpora["en"]), str(tmp_path / "nope.jsonl")], vocab_size=300, out_dir=tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(SelfReplayError, match="holds no documents"):  # raised from inside the Rust trainer
        train_tokenizer(str(tmp_path / "empty.jsonl"), vocab_size=300, out_dir=tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()


def test_load_errors(tmp_path):
    with pytest.raises(SelfReplayError, match="no tokenizer at .*selfreplay tokenizer train"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SelfReplayError, match="could not read tokenizer"):
        load_tokenizer(tmp_path)
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SelfReplayError, match="not a selfreplay tokenizer"):
        load_tokenizer(tmp_path)
