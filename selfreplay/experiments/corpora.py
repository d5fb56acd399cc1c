"""Token files for experiments: an old/new pair of corpora, a tokenizer trained on both, made once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfreplay.data.synth import LANGUAGES, write_corpus
from selfreplay.data.tokenizer import TOKENIZER_FILE, load_tokenizer, train_tokenizer
from selfreplay.data.tokens import metadata_path, write_token_file


@dataclass
class CorpusFiles:
    tokenizer: Path  # directory holding tokenizer.json
    old: Path  # token file of the old (pretraining) domain
    new: Path  # token file of the new (finetuning) domain


def pair_token_files(old_text: str | Path, new_text: str | Path, out_dir: str | Path, vocab_size: int,
                     domains: tuple[str, str]) -> CorpusFiles:
    """Train a tokenizer on both corpora and tokenize each into `out_dir/DOMAIN.bin`.

    What is already complete in `out_dir` is kept: a rerun (or a resumed sweep) reuses the
    tokenizer and token files rather than making new ones.
    """
    out = Path(out_dir)
    files = CorpusFiles(out / "tokenizer", out / f"{domains[0]}.bin", out / f"{domains[1]}.bin")
    if (files.tokenizer / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(files.tokenizer)
    else:
        tokenizer = train_tokenizer([str(old_text), str(new_text)], vocab_size=vocab_size,
                                    out_dir=files.tokenizer, domains=list(domains))
    for text, path, domain in ((old_text, files.old, domains[0]), (new_text, files.new, domains[1])):
        if not (path.is_file() and metadata_path(path).is_file()):
            write_token_file(str(text), tokenizer, domain=domain, out=path)
    return files


def synthetic_token_files(out_dir: str | Path, num_words: int, vocab_size: int, seed: int = 0) -> CorpusFiles:
    """The built-in synthetic two-language corpus (`selfreplay synth`) as an old/new pair of token files."""
    out = Path(out_dir)
    texts = {language: out / "text" / f"{language}.jsonl" for language in LANGUAGES}
    if not all(p.is_file() for p in texts.values()) or not (out / "tokenizer" / TOKENIZER_FILE).is_file():
        texts = write_corpus(out / "text", num_words=num_words, seed=seed)
    old, new = LANGUAGES
    return pair_token_files(texts[old], texts[new], out, vocab_size, (old, new))
