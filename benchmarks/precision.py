"""Accuracy of bf16 autocast (issue 4): the same `tiny` pretraining in float32 and in bf16.

    python benchmarks/precision.py                 # 1M tokens each, fortunes English
    python benchmarks/precision.py --tokens 2e6 --out FILE.json

Both runs share the seed, data order and schedule; the benchmark prints their validation
loss curves side by side and the relative gap at the end (the acceptance bar is 1%), and
writes benchmarks/results/precision_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from speed import CONFIGS, model_overrides, token_files

from selfreplay.training.loop import resolve_config, train


def pretrain(out: Path, files: dict, tokens: int, precision: str) -> tuple[list[dict], dict]:
    config = resolve_config("pretrain", None, [
        f"out={out}", f"data.tokenizer={files['tokenizer']}", f"data.train={files['old']}",
        *model_overrides(CONFIGS["tiny"]), "optim.batch_size=32", "optim.lr=3e-3", "optim.schedule=cosine",
        "optim.warmup_steps=20", f"stop.tokens={tokens}", "data.val_sequences=128",
        f"log.every_tokens={tokens // 8}", f"precision={precision}", "log.progress=false"])
    summary = train(config, "pretrain")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"tokens": p["tokens"], "val_loss": p["old_loss"], "train_seconds": p["train_seconds"]} for p in lines], summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e6)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision_tiny.json"))
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = token_files(Path(tmp), vocab=4096)
        for precision in ("fp32", "bf16"):
            curve, summary = pretrain(Path(tmp) / precision, files, int(args.tokens), precision)
            result[precision] = {"curve": curve, "tokens_per_second": summary["tokens_per_second"]}
    fp32, bf16 = result["fp32"]["curve"], result["bf16"]["curve"]
    print(f"{'tokens':>10s} {'fp32 val loss':>14s} {'bf16 val loss':>14s} {'gap':>8s}")
    for a, b in zip(fp32, bf16):
        print(f"{a['tokens']:>10,d} {a['val_loss']:>14.4f} {b['val_loss']:>14.4f} "
              f"{(b['val_loss'] - a['val_loss']) / a['val_loss']:>+8.2%}")
    gap = (bf16[-1]["val_loss"] - fp32[-1]["val_loss"]) / fp32[-1]["val_loss"]
    result["final_relative_gap"] = gap
    print(f"\nfinal: fp32 {fp32[-1]['val_loss']:.4f}, bf16 {bf16[-1]['val_loss']:.4f}, relative gap {gap:+.2%} "
          f"({'within' if abs(gap) <= 0.01 else 'OUTSIDE'} 1%); tokens/s fp32 "
          f"{result['fp32']['tokens_per_second']:,.0f}, bf16 {result['bf16']['tokens_per_second']:,.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
