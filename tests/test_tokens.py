import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from selfreplay.errors import SelfReplayError
from selfreplay.data.tokenizer import load_tokenizer
from selfreplay.data.tokens import metadata_path, open_tokens, read_token_meta, write_token_file

REPO = Path(__file__).resolve().parents[1]


def documents(path):
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def expected_tokens(tokenizer, texts):
    return [i for doc in tokenizer.encode_batch(texts) for i in doc + [tokenizer.eos_id]]


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "selfreplay.cli", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True)


def big_vocab_tokenizer(directory: Path) -> Path:
    """A selfreplay-layout tokenizer with 70,000 ids, built directly rather than trained."""
    specials = [f"<|domain:{k}|>" for k in range(8)] + ["<|eos|>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(70_000 - 10)] + ["[UNK]"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_write_and_read_back(tokenizer, corpora, tmp_path):
    out = tmp_path / "es.bin"
    meta = write_token_file(str(corpora["es"]), tokenizer, domain="es", out=out)
    texts = documents(corpora["es"])
    want = expected_tokens(tokenizer, texts)
    tokens, read = open_tokens(out, tokenizer.fingerprint)
    assert read == meta == read_token_meta(out)
    assert tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert tokens.tolist() == want
    assert np.fromfile(out, dtype="<u2").tolist() == want  # the documented raw layout
    assert (meta.domain, meta.domain_id, meta.eos_id) == ("es", 1, 8)
    assert (meta.num_documents, meta.num_tokens) == (len(texts), len(want))
    assert meta.vocab_size == tokenizer.vocab_size and meta.tokenizer_fingerprint == tokenizer.fingerprint
    assert meta.source == str(corpora["es"]) and meta.dtype == "uint16" and meta.seconds >= 0
    assert json.loads(metadata_path(out).read_text())["num_tokens"] == len(want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["es.bin", "es.bin.json"]  # no temp files left


def test_max_tokens_truncates_exactly(tokenizer, corpora, tmp_path):
    texts = documents(corpora["en"])
    want = expected_tokens(tokenizer, texts)
    lengths = np.cumsum([len(ids) + 1 for ids in tokenizer.encode_batch(texts)])
    cut = int(lengths[4]) + 3  # three tokens into the sixth document
    write_token_file(str(corpora["en"]), tokenizer, "en", tmp_path / "a.bin", max_tokens=cut)
    tokens, meta = open_tokens(tmp_path / "a.bin")
    assert tokens.tolist() == want[:cut]
    assert (meta.num_tokens, meta.num_documents) == (cut, 6)
    meta = write_token_file(str(corpora["en"]), tokenizer, "en", tmp_path / "b.bin", max_tokens=10**9)
    assert meta.num_tokens == len(want)


def test_gz_and_txt_inputs_and_slot_domains(tokenizer, tmp_path):
    texts = ["uno dos tres.", "la casa roja\ny el gato.", "ñandú 🎉"]
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    for source, domain in ((gz, "es"), (txt, 5)):
        meta = write_token_file(str(source), tokenizer, domain, tmp_path / "t.bin")
        tokens, _ = open_tokens(tmp_path / "t.bin")
        assert tokens.tolist() == expected_tokens(tokenizer, texts)
        assert meta.num_documents == 3
    assert (meta.domain, meta.domain_id) == ("5", 5)


def test_hf_dataset_input(tokenizer, tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part.jsonl").write_text('{"text": "hola"}\n{"text": "adiós"}\n', encoding="utf-8")
    meta = write_token_file(f"hf:{tmp_path / 'data'}::train", tokenizer, "es", tmp_path / "t.bin")
    assert open_tokens(tmp_path / "t.bin")[0].tolist() == expected_tokens(tokenizer, ["hola", "adiós"])
    assert meta.num_documents == 2


def test_cli_tokenize(tokenizer, corpora, tmp_path):
    tokenizer.save(tmp_path / "tok")
    result = cli("tokenize", corpora["en"], "--tokenizer", tmp_path / "tok", "--domain", "en",
                 "--out", tmp_path / "en.bin", "--max-tokens", 500, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "500 tokens from" in result.stdout and "id 0" in result.stdout
    assert read_token_meta(tmp_path / "en.bin").num_tokens == 500


def _empty(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    return tmp_path / "empty.jsonl"


def _no_field(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(3000)] + [json.dumps({"body": "x"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "bad.jsonl"


@pytest.mark.parametrize("make_corpus, message", [
    (lambda tmp_path: tmp_path / "missing.jsonl", "corpus not found"),
    (_empty, "holds no documents"),
    # after a full batch was written; `tokenize` chooses the field with its flag
    (_no_field, "bad.jsonl:3001: no 'text' field (fields: body): choose one with --text-field"),
])
def test_failed_tokenize_reports_one_line_and_keeps_the_old_file(tokenizer, tmp_path, make_corpus, message):
    corpus = make_corpus(tmp_path)
    tokenizer.save(tmp_path / "tok")
    out = tmp_path / "out.bin"
    out.write_bytes(b"old data")
    metadata_path(out).write_text("old meta", encoding="utf-8")
    with pytest.raises(SelfReplayError) as info:
        write_token_file(str(corpus), tokenizer, "en", out)
    assert message in str(info.value)
    result = cli("tokenize", corpus, "--tokenizer", tmp_path / "tok", "--domain", "en", "--out", out, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("selfreplay: error:") and message in result.stderr
    assert out.read_bytes() == b"old data" and metadata_path(out).read_text() == "old meta"
    assert not list(tmp_path.glob(".out.bin.*"))  # temp files removed


def test_vocab_over_uint16_is_refused_before_writing(tmp_path):
    big = load_tokenizer(big_vocab_tokenizer(tmp_path / "big"))
    assert big.vocab_size == 70_000
    (tmp_path / "c.jsonl").write_text('{"text": "w1 w2"}\n', encoding="utf-8")
    with pytest.raises(SelfReplayError, match="70,000 ids, more than a uint16 token file holds"):
        write_token_file(str(tmp_path / "c.jsonl"), big, "0", tmp_path / "t.bin")
    result = cli("tokenize", tmp_path / "c.jsonl", "--tokenizer", tmp_path / "big", "--domain", "0",
                 "--out", tmp_path / "t.bin", cwd=tmp_path)
    assert result.returncode == 1 and "uint16" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "t.bin").exists() and not list(tmp_path.glob(".t.bin*"))


def test_unknown_domain_is_refused_before_writing(tokenizer, corpora, tmp_path):
    with pytest.raises(SelfReplayError, match="unknown domain 'fr'"):
        write_token_file(str(corpora["en"]), tokenizer, "fr", tmp_path / "t.bin")
    assert not list(tmp_path.iterdir())


def test_open_errors(tokenizer, corpora, tmp_path):
    out = tmp_path / "en.bin"
    with pytest.raises(SelfReplayError, match="token file not found"):
        open_tokens(out)
    write_token_file(str(corpora["en"]), tokenizer, "en", out)
    with pytest.raises(SelfReplayError, match=f"made with tokenizer {tokenizer.fingerprint}, but this run uses "
                                              "tokenizer 0123456789abcdef: re-tokenize"):
        open_tokens(out, "0123456789abcdef")
    with open(out, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(SelfReplayError, match="bytes but its metadata says"):
        open_tokens(out)
    metadata_path(out).write_text("{broken", encoding="utf-8")
    with pytest.raises(SelfReplayError, match="could not read token metadata"):
        open_tokens(out)
    metadata_path(out).unlink()
    with pytest.raises(SelfReplayError, match=r"has no metadata .*re-run `selfreplay tokenize`"):
        open_tokens(out)
