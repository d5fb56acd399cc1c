"""`selfreplay demo`: the paper's method comparison on the built-in synthetic corpus.

Pretrain on language A, then finetune on language B to one target loss three
ways: plain, self-replay KL, real-replay KL. Print forgetting for each, and
draw old-domain loss against new-domain loss along each run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from selfreplay.config import RunConfig
from selfreplay.data.synth import LANGUAGES
from selfreplay.data.tokens import read_token_meta
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.compare import (
    finetune_methods,
    format_table,
    plot_old_vs_new,
)
from selfreplay.experiments.corpora import synthetic_token_files
from selfreplay.training.loop import train

# Sizes per scale. small finishes in minutes on a 2-core CPU; large is a bigger model and corpus.
SCALES = {
    "small": dict(words=300_000, vocab=2048, model=dict(D=128, L=4, H=32, T=128),
                  pretrain_tokens=800_000, pretrain_lr=3e-3, finetune_lr=3e-3, target=4.0,
                  finetune_tokens=400_000, log_tokens=24_576, val_sequences=128),
    "large": dict(words=3_000_000, vocab=4096, model=dict(D=256, L=6, H=64, T=256),
                  pretrain_tokens=20_000_000, pretrain_lr=2e-3, finetune_lr=1e-3, target=None,
                  finetune_tokens=4_000_000, log_tokens=262_144, val_sequences=256),
}


def run_demo(out_dir: str | Path = "demo_runs", scale: str = "small", seed: int = 0) -> list[dict]:
    if scale not in SCALES:
        raise SelfReplayError(f"unknown demo scale {scale!r}: choose {', '.join(SCALES)}")
    s = SCALES[scale]
    out = Path(out_dir) / scale
    out.mkdir(parents=True, exist_ok=True)
    old, new = LANGUAGES
    started = time.perf_counter()

    # text -> tokens
    files = synthetic_token_files(out / "data", num_words=s["words"], vocab_size=s["vocab"], seed=seed)
    tokenizer_dir, tokens = files.tokenizer, {old: files.old, new: files.new}
    for language in LANGUAGES:
        print(f"{language}: {read_token_meta(tokens[language]).num_tokens:,} tokens")

    # pretrain on A
    pretrained = out / "pretrain"
    if not (pretrained / "summary.json").exists():
        config = RunConfig().updated(
            out=str(pretrained), seed=seed, model={**s["model"], "V": s["vocab"]},
            data={"tokenizer": str(tokenizer_dir), "train": str(tokens[old]), "val_sequences": s["val_sequences"]},
            optim={"lr": s["pretrain_lr"], "schedule": "cosine"}, stop={"tokens": s["pretrain_tokens"]},
            log={"every_tokens": s["log_tokens"] * 4})
        train(config, "pretrain")
    pretrain_summary = json.loads((pretrained / "summary.json").read_text())
    print(f"pretrained on {old}: validation loss {pretrain_summary['old_loss']:.3f}")

    # finetune on B three ways, to the same target
    target = s["target"]
    common = {"seed": seed, "optim": {"lr": s["finetune_lr"], "warmup_steps": 20},
              "stop": {"tokens": s["finetune_tokens"], "target_loss": target},
              "data": {"val_sequences": s["val_sequences"]}, "log": {"every_tokens": s["log_tokens"]}}
    methods = {
        "plain": {"replay": {"method": "none"}},
        "self-kl": {"replay": {"method": "kl", "source": "self", "coeff": 10}},
        "real-kl": {"replay": {"method": "kl", "source": "real", "coeff": 10}},
    }
    rows = finetune_methods(str(pretrained), str(tokens[new]), methods, out / "finetune", common)
    print()
    print(format_table(rows))
    figure = out / "forgetting.png"
    plot_old_vs_new(rows, figure, title=f"{old} -> {new}: old-domain loss along finetuning")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nfigure: {figure}\nresults: {out / 'results.json'}\ntotal time {time.perf_counter() - started:.0f} s")
    return rows
