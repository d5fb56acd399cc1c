"""What replay costs (issue 12): the sampler against the hardware, and self-KL against plain finetuning.

    python benchmarks/replay_cost.py                          # tiny and small, fp32 and bf16+compile
    python benchmarks/replay_cost.py --configs tiny --label before --out FILE.json
    python benchmarks/replay_cost.py --configs tiny replay.decode_batch=128   # overrides for the finetuning runs

For each config it pretrains a model briefly on real text (../shared/data/fortunes, else the
built-in synthetic corpus) and measures, in one process:
- the KV-cache sampler: sequences of T tokens per second at decode batches 128 and 512, with the
  weights a run's replay pool decodes with (float32 on CPU whatever the run's precision), and
  its fraction of this machine's measured fp32 matrix-multiply peak (FLOPs of the decoding:
  the matrix multiplies of every position's forward pass, the output projection and attention
  over the cached positions);
- plain and self-replay-KL finetuning new-task tokens/s (batch 32, replay batch 16, buffer 8,
  sampling included, steady state) and their ratio, for each precision.
The same script runs against an older checkout (PYTHONPATH=OLD python benchmarks/replay_cost.py
--label before) for a before/after table. Prints a table and writes
benchmarks/results/replay_cost.json. Time it on a quiet machine: nothing else running.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from speed import CONFIGS, INTERVAL_STEPS, matmul_peak, model_overrides, run_training, token_files

from selfreplay.model import ModelConfig, Transformer
from selfreplay.sampling import sample

PRECISIONS = {"fp32": [], "bf16+compile": ["precision=bf16", "compile=true"]}


def decoding_flops(config: ModelConfig) -> float:
    """FLOPs of decoding one sequence of T tokens from its first: T - 1 single-token forward
    passes (block matrices and output projection) and attention of each over the positions so far."""
    per_token = 2 * (config.non_embedding_params + config.V * config.D)
    attention = sum(4 * config.L * config.D * (pos + 1) for pos in range(config.T - 1))
    return (config.T - 1) * per_token + attention


def sampler_speed(model: Transformer, batch_size: int, repeats: int = 3) -> float:
    """Sequences/s of sample() at one decode batch: the median over `repeats` draws after a warm-up."""
    sample(model, 0, batch_size, seed=0, batch_size=batch_size)
    times = []
    for seed in range(1, repeats + 1):
        tick = time.perf_counter()
        sample(model, 0, batch_size, seed=seed, batch_size=batch_size)
        times.append(time.perf_counter() - tick)
    return batch_size / statistics.median(times)


def measure(name: str, config: ModelConfig, files: dict, work: Path, steps: int, peak_fp32: float,
            overrides: list[str]) -> dict:
    batch = 32
    tokens_per_step = batch * config.T
    common = [f"optim.batch_size={batch}", f"stop.tokens={steps * tokens_per_step}", "optim.warmup_steps=10"]
    pretrained = work / f"{name}-pretrain"
    run_training("pretrain", [f"out={pretrained}", f"data.tokenizer={files['tokenizer']}",
                              f"data.train={files['old']}", *model_overrides(config), *common], tokens_per_step)
    row = {"config": name, "params": config.params, "decoding_gflop_per_sequence": decoding_flops(config) / 1e9}

    model = Transformer.from_pretrained(pretrained).eval()
    for batch_size in (128, 512):
        speed = sampler_speed(model, batch_size)
        row[f"sample_seq_per_s_b{batch_size}"] = speed
        row[f"sample_fraction_of_fp32_peak_b{batch_size}"] = speed * decoding_flops(config) / (peak_fp32 * 1e9)
    del model

    finetune = [f"init={pretrained}", f"data.train={files['new']}", *common, *overrides]
    for precision, extra in PRECISIONS.items():
        plain, _, _ = run_training("finetune", [f"out={work / f'{name}-{precision}-plain'}", *finetune, *extra],
                                   tokens_per_step)
        kl, warmup, summary = run_training(
            "finetune", [f"out={work / f'{name}-{precision}-kl'}", *finetune, *extra, "replay.method=kl",
                         "replay.source=self", "replay.batch_size=16", f"replay.buffer={INTERVAL_STEPS}"],
            tokens_per_step)
        row[f"{precision}_plain_tokens_per_s"] = plain
        row[f"{precision}_self_kl_tokens_per_s"] = kl
        row[f"{precision}_kl_vs_plain"] = kl / plain
        row[f"{precision}_sampling_share"] = summary["replay_seconds"] / (summary["train_seconds"] - warmup)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=32,
                        help=f"training steps per run (logged every {INTERVAL_STEPS}; the first interval is warm-up)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "replay_cost.json"))
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. 'before')")
    parser.add_argument("overrides", nargs="*", help="config overrides for the finetuning runs")
    args = parser.parse_args()

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        files = token_files(Path(tmp), vocab=4096)
        rows = [measure(name, CONFIGS[name], files, Path(tmp), args.steps, peaks["fp32"], args.overrides)
                for name in args.configs]

    print(f"{args.label or 'this checkout'}: matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
          f"GFLOP/s ({torch.get_num_threads()} threads)")
    for row in rows:
        print()
        for key, value in row.items():
            shown = f"{value:.1%}" if "fraction" in key or "share" in key else (
                f"{value:.3f}" if "vs" in key or "gflop" in key else f"{value:,.1f}" if isinstance(value, float) else value)
            print(f"  {key:40s} {shown}")
    result = {"label": args.label, "overrides": args.overrides, "matmul_peak_gflops": peaks, "rows": rows, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
