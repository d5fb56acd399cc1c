"""Self-replay for a Hugging Face model on real text: plain, self-replay KL, LoRA, LoRA + KL.

    python benchmarks/hf_real_text.py --out runs/hf_real_text            # about 30 minutes on 2 cores
    python benchmarks/hf_real_text.py --out runs/hf_real_text --collect  # only the table of finished runs

A Llama-style model (2.5M parameters: D=160, L=4, T=128, V=4096) is pretrained by selfreplay
on English fortunes (the first 90% of ../shared/data/fortunes/en.jsonl; an English-only
byte-level tokenizer, as a pretrained model's would be), exported as a transformers directory
(`selfreplay export --hf`), then finetuned on Spanish fortunes through `init=hf:` to one
common Spanish loss, with forgetting measured on the held-out last 10% of the English file.
Every command runs through the `selfreplay` command line, as a user would run it. Prints a
table and writes benchmarks/results/hf_real_text.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fortunes"

SHAPE = ["model.D=160", "model.L=4", "model.H=32", "model.T=128", "model.V=4096"]
FINETUNE = ["model.T=128", "optim.batch_size=32", "optim.warmup_steps=10", "log.every_tokens=32768",
            "data.val_sequences=128", "log.progress=false", "replay.length=128", "replay.batch_size=16",
            "stop.tokens=3000000", "stop.wall_seconds=600"]
# (name, settings): the LoRA runs take a 10x higher learning rate, as LoRA usually does
METHODS = [
    ("plain", ["replay.method=none", "optim.lr=1e-3"]),
    ("kl", ["replay.method=kl", "replay.coeff=10", "optim.lr=1e-3"]),
    ("lora", ["replay.method=none", "lora.rank=16", "optim.lr=1e-2"]),
    ("lora_kl", ["replay.method=kl", "replay.coeff=10", "lora.rank=16", "optim.lr=1e-2"]),
    ("lora_kl_c3", ["replay.method=kl", "replay.coeff=3", "lora.rank=16", "optim.lr=1e-2"]),
]
KEYS = ("forgetting", "new_loss", "old_kl", "stop_reason", "time_to_target_seconds", "train_seconds",
        "tokens_per_second", "peak_memory_mib", "params")


def selfreplay(*args: str) -> None:
    print("+ selfreplay", " ".join(args), flush=True)
    subprocess.run(["selfreplay", *args], check=True)


def split_english(out: Path, held_out: float = 0.1) -> tuple[Path, Path]:
    """The first 90% of the English documents for pretraining, the last 10% held out."""
    lines = [line for line in (DATA / "en.jsonl").read_text().splitlines() if line.strip()]
    cut = int(len(lines) * (1 - held_out))
    train, test = out / "en_train.jsonl", out / "en_heldout.jsonl"
    train.write_text("\n".join(lines[:cut]) + "\n")
    test.write_text("\n".join(lines[cut:]) + "\n")
    return train, test


def pretrain_and_export(out: Path) -> None:
    train, _ = split_english(out)
    if not (out / "tok").exists():
        selfreplay("tokenizer", "train", str(train), "--vocab-size", "4096", "--domains", "en", "--out", str(out / "tok"))
    if not (out / "en.bin").exists():
        selfreplay("tokenize", str(train), "--tokenizer", str(out / "tok"), "--domain", "en", "--out", str(out / "en.bin"))
    selfreplay("pretrain", f"out={out / 'pre'}", f"data.tokenizer={out / 'tok'}", f"data.train={out / 'en.bin'}", *SHAPE,
               "optim.lr=3e-3", "optim.batch_size=32", "optim.schedule=cosine", "stop.tokens=3000000",
               "log.every_tokens=500000", "log.progress=false")
    if not (out / "hf").exists():
        selfreplay("export", str(out / "pre"), "--hf", str(out / "hf"))


def finetune(out: Path, target: float) -> None:
    common = [f"init=hf:{out / 'hf'}", f"data.train={DATA / 'es.jsonl'}", f"data.old_text={out / 'en_heldout.jsonl'}",
              *FINETUNE, f"stop.target_loss={target}"]
    for name, settings in METHODS:
        selfreplay("finetune", f"out={out / name}", *common, *settings)


def collect(out: Path, target: float) -> dict:
    rows = {}
    for name, settings in METHODS:
        path = out / name / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            rows[name] = {"settings": settings, **{key: summary.get(key) for key in KEYS}}
    plain = rows.get("plain", {}).get("forgetting")
    print(f"{'run':12s} {'forgetting':>10s} {'% plain':>8s} {'new loss':>9s} {'to target s':>11s} "
          f"{'tokens/s':>9s} {'peak MiB':>9s}  stop")
    for name, row in rows.items():
        share = f"{100 * row['forgetting'] / plain:.1f}" if plain else "-"
        to_target = f"{row['time_to_target_seconds']:.0f}" if row["time_to_target_seconds"] else "missed"
        print(f"{name:12s} {row['forgetting']:10.4f} {share:>8s} {row['new_loss']:9.4f} {to_target:>11s} "
              f"{row['tokens_per_second']:9.0f} {row['peak_memory_mib']:9.0f}  {row['stop_reason']}")
    return {"target_new_loss": target, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of the runs")
    parser.add_argument("--target", type=float, default=3.9,
                        help="the common Spanish loss (the default: where LoRA without replay, the slowest "
                             "learner, was still falling in a probe run)")
    parser.add_argument("--collect", action="store_true", help="only read finished runs")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        pretrain_and_export(out)
        finetune(out, args.target)
    results = collect(out, args.target)
    (RESULTS / "hf_real_text.json").write_text(json.dumps(results, indent=2))
    print(f"-> {RESULTS / 'hf_real_text.json'}")


if __name__ == "__main__":
    main()
