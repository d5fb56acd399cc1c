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


# ---------------------------------------------------------------- tiny runs on the synthetic corpus

MODEL = ["model.D=32", "model.L=2", "model.H=8", "model.T=32", "model.V=320"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tokenizer and two token files (old: en_synth, new: es_synth) from the synthetic corpus."""
    from selfreplay.synth import LANGUAGES, write_corpus
    from selfreplay.tokenizer import train_tokenizer
    from selfreplay.tokens import write_token_file

    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root / "text", num_words=40_000, seed=1)
    tokenizer = train_tokenizer([str(p) for p in texts.values()], vocab_size=320, out_dir=root / "tok",
                                domains=list(LANGUAGES))
    files = {}
    for language in LANGUAGES:
        files[language] = root / f"{language}.bin"
        write_token_file(str(texts[language]), tokenizer, domain=language, out=files[language])
    return {"tokenizer": root / "tok", "old": files[LANGUAGES[0]], "new": files[LANGUAGES[1]]}


@pytest.fixture(scope="session")
def pretrained(corpus, tmp_path_factory):
    from selfreplay.train import resolve_config, train

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    config = resolve_config("pretrain", None, [
        f"out={out}", f"data.tokenizer={corpus['tokenizer']}", f"data.train={corpus['old']}", *MODEL,
        "data.val_sequences=32", "optim.lr=3e-3", "optim.batch_size=16", "optim.warmup_steps=5",
        "stop.tokens=16384", "log.every_tokens=4096", "log.progress=false"])
    train(config, "pretrain")
    return out


def finetune_overrides(corpus, pretrained, out, *overrides) -> list[str]:
    """The command-line settings of a tiny finetuning run (2048 tokens, a log point every 512)."""
    return [f"init={pretrained}", f"data.train={corpus['new']}", f"out={out}", "optim.lr=3e-3",
            "optim.batch_size=8", "optim.warmup_steps=2", "replay.batch_size=4", "replay.buffer=2",
            "stop.tokens=2048", "log.every_tokens=512", "log.progress=false", *overrides]


def finetune_config(corpus, pretrained, out, *overrides):
    from selfreplay.train import resolve_config

    return resolve_config("finetune", None, finetune_overrides(corpus, pretrained, out, *overrides))
