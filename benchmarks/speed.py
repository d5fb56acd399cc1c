"""Engine speed (issue 4): training, replay sampling, KL finetuning and evaluation throughput.

    python benchmarks/speed.py                                  # tiny and small, fp32 eager
    python benchmarks/speed.py --configs tiny precision=bf16 compile=true --out FILE.json

For each config it measures, on real text (../shared/data/fortunes, else the built-in
synthetic corpus): pretraining tokens/s; plain finetuning and self-replay-KL finetuning
new-task tokens/s (replay batch 16, buffer 8, sampling included), steady state, with the
first logging interval (compilation, warm-up) timed apart; sampling throughput
(sequences of T tokens/s) of the KV-cache sampler and of a naive sampler that reruns the
full forward pass each step; evaluation tokens/s; peak resident memory. It also measures
this machine's fp32 and bf16 matrix-multiply peak and reports model FLOPs utilisation.
Prints a table and writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from selfreplay.evaluation.validation import evaluate
from selfreplay.model.transformer import ModelConfig, Transformer, flops_per_token
from selfreplay.replay.sampling import next_token, sample
from selfreplay.training.loop import resolve_config, train

CONFIGS = {
    "tiny": ModelConfig(D=128, L=4, H=32, T=128, V=4096),
    "small": ModelConfig(D=256, L=6, H=64, T=256, V=4096),
}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fortunes"


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of an n×n by n×n matrix multiply in `dtype`: the median of repeated runs after a
    warm-up (single runs on a shared VM scatter by ±30%)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        tick = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tick)
    return 2 * n**3 / statistics.median(times) / 1e9


@torch.inference_mode()
def naive_sample(model: Transformer, first_token: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """The baseline: no cache, the full forward pass over the whole prefix at every step (without
    autograd, like the cached sampler)."""
    tokens = torch.full((num_samples, 1), first_token, dtype=torch.long)
    for _ in range(model.config.T - 1):
        logits = model(tokens)[:, -1]
        tokens = torch.cat([tokens, next_token(logits, generator=generator)[:, None]], dim=1)
    return tokens


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_files(work: Path, vocab: int) -> dict[str, Path]:
    """Old (English) and new (Spanish) token files from the shared corpus, or the synthetic one."""
    from selfreplay.data.tokenizer import train_tokenizer
    from selfreplay.data.tokens import write_token_file

    if (SHARED / "en.jsonl").exists():
        texts = {"old": SHARED / "en.jsonl", "new": SHARED / "es.jsonl"}
    else:
        from selfreplay.data.synth import LANGUAGES, write_corpus

        corpus = write_corpus(work / "corpus", num_words=600_000)
        texts = {"old": corpus[LANGUAGES[0]], "new": corpus[LANGUAGES[1]]}
    tokenizer = train_tokenizer([str(p) for p in texts.values()], vocab_size=vocab, out_dir=work / "tok",
                                domains=["old", "new"])
    files = {"tokenizer": work / "tok"}
    for name, text in texts.items():
        files[name] = work / f"{name}.bin"
        write_token_file(str(text), tokenizer, domain=name, out=files[name])
    return files


def model_overrides(config: ModelConfig) -> list[str]:
    return [f"model.{k}={getattr(config, k)}" for k in ("D", "L", "H", "T", "V")]


INTERVAL_STEPS = 8  # = the replay buffer: every interval of a self-KL run draws one pool


def run_training(mode: str, overrides: list[str], tokens_per_step: int) -> tuple[float, float, dict]:
    """(steady tokens/s, warm-up seconds, summary) of one run: tokens/s over every logging interval but
    the first, and how much longer the first interval took than a steady one (torch.compile's
    compilation, allocator warm-up). Evaluation at log points is not training time. The summary
    gains `steady_replay_share`: the part of training time spent drawing replay over the same
    intervals (so a compilation in the first draw counts in neither)."""
    every = INTERVAL_STEPS * tokens_per_step
    config = resolve_config(mode, None, [*overrides, "log.progress=false", "data.val_sequences=16",
                                         f"log.every_tokens={every}"])
    summary = train(config, mode)
    lines = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    seconds = [b["train_seconds"] - a["train_seconds"] for a, b in zip(lines, lines[1:])]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(lines, lines[1:])]
    steady = sum(tokens[1:]) / sum(seconds[1:])
    replay = lines[-1].get("replay_seconds", 0.0) - lines[1].get("replay_seconds", 0.0)
    return steady, seconds[0] - tokens[0] / steady, {**summary, "steady_replay_share": replay / sum(seconds[1:])}


def measure(name: str, config: ModelConfig, files: dict, work: Path, steps: int, extra: list[str]) -> dict:
    batch = 32
    tokens_per_step = batch * config.T
    common = [f"optim.batch_size={batch}", f"stop.tokens={steps * tokens_per_step}", "optim.warmup_steps=10",
              *extra]
    row = {"config": name, "params": config.params, "flops_per_token": flops_per_token(config)}

    pretrain_dir = work / f"{name}-pretrain"
    row["pretrain_tokens_per_s"], row["pretrain_warmup_s"], _ = run_training(
        "pretrain", [f"out={pretrain_dir}", f"data.tokenizer={files['tokenizer']}", f"data.train={files['old']}",
                     *model_overrides(config), *common], tokens_per_step)
    finetune = [f"init={pretrain_dir}", f"data.train={files['new']}", *common]
    row["finetune_plain_tokens_per_s"], _, _ = run_training(
        "finetune", [f"out={work / f'{name}-plain'}", *finetune], tokens_per_step)
    row["finetune_self_kl_tokens_per_s"], _, kl = run_training(
        "finetune", [f"out={work / f'{name}-kl'}", *finetune, "replay.method=kl", "replay.source=self",
                     "replay.batch_size=16", f"replay.buffer={INTERVAL_STEPS}"], tokens_per_step)
    row["kl_vs_plain"] = row["finetune_self_kl_tokens_per_s"] / row["finetune_plain_tokens_per_s"]
    # the share of steady training time that replay sampling takes
    row["self_kl_sampling_share"] = kl["steady_replay_share"]

    model = Transformer.from_pretrained(pretrain_dir).eval()
    # the sampler decodes with the weights the run's replay pool uses: bf16 runs sample in bf16
    sampler = model.to(torch.bfloat16) if "precision=bf16" in extra else model
    for batch_size in (64, 128):
        sample(sampler, 0, batch_size, seed=0, batch_size=batch_size)  # warm up
        times = []
        for seed in (1, 2, 3):
            tick = time.perf_counter()
            sample(sampler, 0, batch_size, seed=seed, batch_size=batch_size)
            times.append(time.perf_counter() - tick)
        row[f"sample_seq_per_s_b{batch_size}"] = batch_size / statistics.median(times)

    evaluated = Transformer.from_pretrained(pretrain_dir).eval()
    val = torch.randint(0, config.V, (256, config.T))
    evaluate(evaluated, val[:64])
    tick = time.perf_counter()
    evaluate(evaluated, val)
    row["eval_tokens_per_s"] = val.numel() / (time.perf_counter() - tick)
    # the process's peak so far: training, replay sampling, evaluation. Taken before the naive
    # baseline, whose T - 1 distinct input shapes fill oneDNN's primitive cache and fragment the
    # heap (several GB for `small`): memory no selfreplay command uses.
    row["peak_rss_mib"] = peak_rss_mib()

    tick = time.perf_counter()
    naive_sample(sampler, 0, 64, torch.Generator().manual_seed(1))
    row["naive_sample_seq_per_s_b64"] = 64 / (time.perf_counter() - tick)
    row["cache_speedup"] = row["sample_seq_per_s_b64"] / row["naive_sample_seq_per_s_b64"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=40,
                        help=f"training steps per run (logged every {INTERVAL_STEPS}; the first interval is warm-up)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. 'before')")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every training run")
    args = parser.parse_args()

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = token_files(Path(tmp), vocab=4096)
        for name in args.configs:
            row = measure(name, CONFIGS[name], files, Path(tmp), args.steps, args.overrides)
            row["mfu_pretrain_vs_fp32_peak"] = row["pretrain_tokens_per_s"] * row["flops_per_token"] / (peaks["fp32"] * 1e9)
            row["mfu_pretrain_vs_bf16_peak"] = row["pretrain_tokens_per_s"] * row["flops_per_token"] / (peaks["bf16"] * 1e9)
            rows.append(row)

    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    columns = [("config", "{}"), ("pretrain_tokens_per_s", "{:,.0f}"), ("mfu_pretrain_vs_fp32_peak", "{:.1%}"),
               ("mfu_pretrain_vs_bf16_peak", "{:.1%}"), ("pretrain_warmup_s", "{:.1f}"),
               ("finetune_plain_tokens_per_s", "{:,.0f}"), ("finetune_self_kl_tokens_per_s", "{:,.0f}"),
               ("kl_vs_plain", "{:.0%}"), ("self_kl_sampling_share", "{:.0%}"), ("sample_seq_per_s_b64", "{:.1f}"), ("sample_seq_per_s_b128", "{:.1f}"),
               ("naive_sample_seq_per_s_b64", "{:.1f}"), ("cache_speedup", "{:.1f}x"),
               ("eval_tokens_per_s", "{:,.0f}"), ("peak_rss_mib", "{:,.0f}")]
    for row in rows:
        print()
        for key, fmt in columns:
            print(f"  {key:32s} {fmt.format(row[key])}")
    result = {"label": args.label, "overrides": args.overrides, "matmul_peak_gflops": peaks, "rows": rows,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor()
              or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
