"""Shared fixtures: two small generated corpora and a tokenizer trained on them once per session."""

import json
import random

import pytest

WORDS = {
    "en": "the cat dog house river walks sees big small red old new quickly today and with under".split(),
    "es": "el gato perro casa río camina ve grande pequeño rojo viejo nuevo rápido hoy y con bajo".split(),
}


def sentences(language: str, n: int, seed: int = 0) -> list[str]:
    """n short pseudo-sentences of one language's words."""
    rng = random.Random(f"{language}-{seed}")
    return [" ".join(rng.choices(WORDS[language], k=rng.randint(3, 12))).capitalize() + "."
            for _ in range(n)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    """{"en": path, "es": path} of 300-document JSONL corpora."""
    root = tmp_path_factory.mktemp("corpora")
    return {lang: write_jsonl(root / f"{lang}.jsonl", sentences(lang, 300)) for lang in WORDS}


@pytest.fixture(scope="session")
def tokenizer(corpora, tmp_path_factory):
    """A vocab-300 tokenizer with domains en (id 0) and es (id 1)."""
    from selfreplay.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer([str(corpora["en"]), str(corpora["es"])], vocab_size=300, out_dir=out,
                           domains=["en", "es"])
