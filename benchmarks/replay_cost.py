"""What replay costs (issue 12): the sampler against the hardware, and self-KL against plain finetuning.

    python benchmarks/replay_cost.py                          # tiny and small, fp32 and bf16+compile
    python benchmarks/replay_cost.py --configs tiny --label before --out FILE.json
    python benchmarks/replay_cost.py --configs tiny replay.decode_batch=128   # overrides for the finetuning runs
    python benchmarks/replay_cost.py --configs tiny --sampler-only           # the samplers alone (a few minutes)

For each config it pretrains a model briefly on real text (../shared/data/fortunes, else the
built-in synthetic corpus) and measures, in one process:
- the KV-cache sampler: sequences of T tokens per second at decode batches 128 and 512, with the
  weights a run's replay pool decodes with (float32 on CPU whatever the run's precision), and
  its fraction of this machine's measured fp32 matrix-multiply peak (FLOPs of the decoding:
  the matrix multiplies of every position's forward pass, the output projection and attention
  over the cached positions); the sampler as it was before issue 12 (`baseline_sample`, kept
  here) is timed in turn with today's, its keys ending in `_baseline`, and their ratio
  `sample_new_vs_baseline_b*`;
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

from selfreplay.model import KVCache, ModelConfig, Transformer, rms_norm
from selfreplay.sampling import inverse_cdf_draw, sample

PRECISIONS = {"fp32": [], "bf16+compile": ["precision=bf16", "compile=true"]}


def decoding_flops(config: ModelConfig) -> float:
    """FLOPs of decoding one sequence of T tokens from its first: T - 1 single-token forward
    passes (block matrices and output projection) and attention of each over the positions so far."""
    per_token = 2 * (config.non_embedding_params + config.V * config.D)
    attention = sum(4 * config.L * config.D * (pos + 1) for pos in range(config.T - 1))
    return (config.T - 1) * per_token + attention


# The sampler as it was before issue 12's work (commit 59b2d7e), kept callable as the baseline:
# its decoding step and its draw at temperature 1, copied from selfreplay/model.py and sampling.py.

def baseline_rotation_matrices(cos: torch.Tensor, sin: torch.Tensor, query_scale: float) -> torch.Tensor:
    half = cos.shape[0]
    idx = torch.arange(half, device=cos.device)
    rotation = torch.zeros(2 * half, 2 * half, dtype=torch.float32, device=cos.device)
    cos, sin = cos.float(), sin.float()
    rotation[idx, idx] = rotation[idx + half, idx + half] = cos
    rotation[idx + half, idx] = -sin
    rotation[idx, idx + half] = sin
    return torch.stack((rotation * query_scale, rotation))


def baseline_decode(model: Transformer, tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """Transformer.decode, Block.decode and Attention.decode before issue 12."""
    rotation = baseline_rotation_matrices(model.rope_cos[pos], model.rope_sin[pos], model.config.H**-0.5)
    x = model.embed(tokens)
    for layer, block in enumerate(model.blocks):
        attn, a = block.attn, rms_norm(x)
        B, D = a.shape
        h, H = attn.heads, attn.head_dim
        qkv = attn.qkv(a).view(B, 3, h, H)
        qk = rms_norm(qkv[:, :2]).transpose(0, 1).reshape(2, B * h, H)
        qk = torch.bmm(qk.to(rotation.dtype), rotation).to(cache.k.dtype)
        cache.k[layer, :, :, pos] = qk[1].view(B, h, H)
        cache.v[layer, :, :, pos] = qkv[:, 2]
        scores = qk[0].view(B, h, 1, H) @ cache.k[layer, :, :, :pos + 1].transpose(-1, -2)
        y = scores.float().softmax(-1).type_as(cache.v) @ cache.v[layer, :, :, :pos + 1]
        x = x + attn.out(y.view(B, D).type_as(a))
        x = x + block.down(torch.nn.functional.gelu(block.up(rms_norm(x))))
    return rms_norm(x)


@torch.inference_mode()
def baseline_sample(model: Transformer, first_token: int, num_samples: int, seed: int = 0,
                    batch_size: int = 128) -> torch.Tensor:
    """sample() before issue 12 at temperature 1, no truncation, full length: [num_samples, T]."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(num_samples, config.T, dtype=torch.long)
    dtype = next(model.parameters()).dtype
    for lo in range(0, num_samples, batch_size):
        hi = min(lo + batch_size, num_samples)
        cache = KVCache(config, hi - lo, dtype=KVCache.storage_dtype(dtype, "cpu"))
        tokens = out[lo:hi]
        tokens[:, 0] = first_token
        for pos in range(config.T - 1):
            logits = model.head(baseline_decode(model, tokens[:, pos], cache, pos)).float()
            tokens[:, pos + 1] = inverse_cdf_draw((logits - logits.amax(-1, keepdim=True)).exp_(), generator)
    return out


SAMPLERS = {"baseline": baseline_sample, "new": sample}


def sampler_speeds(model: Transformer, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Sequences/s of each sampler in SAMPLERS at one decode batch: the median over `repeats`
    draws after a warm-up, the samplers taking turns (so a slower spell of a shared machine
    hits both alike)."""
    times = {name: [] for name in SAMPLERS}
    for seed in range(repeats + 1):
        for name, draw in SAMPLERS.items():
            tick = time.perf_counter()
            draw(model, 0, batch_size, seed=seed, batch_size=batch_size)
            if seed:  # the first round is a warm-up
                times[name].append(time.perf_counter() - tick)
    return {name: batch_size / statistics.median(t) for name, t in times.items()}


def measure(name: str, config: ModelConfig, files: dict, work: Path, steps: int, peak_fp32: float,
            overrides: list[str], repeats: int = 3, sampler_only: bool = False) -> dict:
    batch = 32
    tokens_per_step = batch * config.T
    common = [f"optim.batch_size={batch}", f"stop.tokens={steps * tokens_per_step}", "optim.warmup_steps=10"]
    pretrained = work / f"{name}-pretrain"
    run_training("pretrain", [f"out={pretrained}", f"data.tokenizer={files['tokenizer']}",
                              f"data.train={files['old']}", *model_overrides(config), *common], tokens_per_step)
    row = {"config": name, "params": config.params, "decoding_gflop_per_sequence": decoding_flops(config) / 1e9}

    model = Transformer.from_pretrained(pretrained).eval()
    for batch_size in (128, 512):
        speeds = sampler_speeds(model, batch_size, repeats)
        for name, speed in speeds.items():
            suffix = "" if name == "new" else f"_{name}"
            row[f"sample_seq_per_s_b{batch_size}{suffix}"] = speed
            row[f"sample_fraction_of_fp32_peak_b{batch_size}{suffix}"] = speed * decoding_flops(config) / (peak_fp32 * 1e9)
        row[f"sample_new_vs_baseline_b{batch_size}"] = speeds["new"] / speeds["baseline"]
    del model
    if sampler_only:
        return row

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
    parser.add_argument("--sampler-repeats", type=int, default=3, help="timed draws per sampler and decode batch")
    parser.add_argument("--sampler-only", action="store_true", help="measure the samplers only, no finetuning runs")
    parser.add_argument("overrides", nargs="*", help="config overrides for the finetuning runs")
    args = parser.parse_args()

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        files = token_files(Path(tmp), vocab=4096)
        rows = [measure(name, CONFIGS[name], files, Path(tmp), args.steps, peaks["fp32"], args.overrides,
                        args.sampler_repeats, args.sampler_only) for name in args.configs]

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
