"""Method comparison on real text (issue 3): English -> Spanish, forgetting at a common target loss.

    python benchmarks/method_comparison.py --corpus ../shared/data/fortunes

Trains a vocab-4096 tokenizer on both languages, pretrains D=128 L=4 H=32 T=128 on
English (~2M tokens), then finetunes on Spanish five ways: none, self-replay KL c=10,
real-replay KL c=10, self-replay NTP c=10 and LoRA r=16. The common target is set by a
probe: plain finetuning with early stopping; target = its best Spanish loss + margin.
Prints a table and writes benchmarks/results/method_comparison_<corpus>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from selfreplay.experiments.compare import finetune_methods, format_table, plot_old_vs_new, read_curve
from selfreplay.data.tokenizer import train_tokenizer
from selfreplay.data.tokens import write_token_file
from selfreplay.config import RunConfig, merge
from selfreplay.training.loop import train

MODEL = dict(D=128, L=4, H=32, T=128, V=4096)
METHODS = {
    "none": {"replay": {"method": "none"}},
    "self-kl": {"replay": {"method": "kl", "source": "self", "coeff": 10}},
    "real-kl": {"replay": {"method": "kl", "source": "real", "coeff": 10}},
    "self-ntp": {"replay": {"method": "ntp", "source": "self", "coeff": 10}},
    "lora-r16": {"replay": {"method": "none"}, "lora": {"rank": 16}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="../shared/data/fortunes", help="folder with en.jsonl and es.jsonl")
    parser.add_argument("--out", default="benchmark_runs", help="where the runs go")
    parser.add_argument("--pretrain-tokens", type=float, default=2e6)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-tokens", type=float, default=1e6, help="budget cap of every finetuning run")
    parser.add_argument("--margin", type=float, default=0.3, help="target = probe's best Spanish loss + margin")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = parser.parse_args()

    corpus, name = Path(args.corpus), Path(args.corpus).name
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tokenizer = train_tokenizer([str(corpus / "en.jsonl"), str(corpus / "es.jsonl")], vocab_size=4096,
                                out_dir=out / "tokenizer", domains=["en", "es"])
    data = {}
    for lang in ("en", "es"):
        meta = write_token_file(str(corpus / f"{lang}.jsonl"), tokenizer, domain=lang, out=out / f"{lang}.bin")
        data[lang] = out / f"{lang}.bin"
        print(f"{lang}: {meta.num_tokens:,} tokens from {meta.num_documents:,} documents in {meta.seconds:.2f} s")

    pretrained = out / "pretrain-en"
    if not (pretrained / "summary.json").exists():
        train(RunConfig().updated(out=str(pretrained), model=MODEL,
                                  data={"tokenizer": str(out / "tokenizer"), "train": str(data["en"])},
                                  optim={"lr": args.pretrain_lr, "schedule": "cosine"},
                                  stop={"tokens": int(args.pretrain_tokens)}, log={"every_tokens": 131072}), "pretrain")
    pre = json.loads((pretrained / "summary.json").read_text())
    print(f"pretrained on en: {pre['tokens']:,} tokens, loss {pre['old_loss']:.3f}, {pre['tokens_per_second']:,.0f} tokens/s")

    common = {"optim": {"lr": args.finetune_lr, "warmup_steps": 20}, "stop": {"tokens": int(args.finetune_tokens)},
              "log": {"every_tokens": 32768}}
    probe = finetune_methods(str(pretrained), str(data["es"]),
                             {"probe-none": {"replay": {"method": "none"}, "stop": {"patience": 3}}},
                             out / "finetune", common)[0]
    best = min(p["new_loss"] for p in read_curve(probe["run_dir"]))
    target = round(best + args.margin, 3)
    print(f"probe: best Spanish loss {best:.3f} -> common target {target}")

    methods = {m: METHODS[m] for m in args.methods.split(",")}
    rows = finetune_methods(str(pretrained), str(data["es"]), methods, out / "finetune",
                            merge(common, {"stop": {"target_loss": target}}))
    plain = next((r for r in rows if r["method"] == "none"), None)
    for row in rows:
        if plain and plain["forgetting"] > 0:
            row["forgetting_vs_plain"] = row["forgetting"] / plain["forgetting"]
    columns = (("method", "{}"), ("old_loss_0", "{:.3f}"), ("old_loss", "{:.3f}"), ("forgetting", "{:+.3f}"),
               ("forgetting_vs_plain", "{:.0%}"), ("new_loss", "{:.3f}"), ("time_to_target_seconds", "{:.1f}"),
               ("time_to_target_steps", "{}"), ("tokens_per_second", "{:,.0f}"), ("stop_reason", "{}"))
    print()
    print(format_table(rows, columns))
    plot_old_vs_new(rows, out / "forgetting.png", title=f"{name}: English -> Spanish")
    result = {"corpus": str(corpus), "target_loss": target, "probe_best_new_loss": best, "pretrain": pre,
              "rows": rows, "seconds": time.perf_counter() - started}
    path = Path(__file__).parent / "results" / f"method_comparison_{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {path}\nfigure: {out / 'forgetting.png'}")


if __name__ == "__main__":
    main()
