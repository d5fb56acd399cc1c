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
  `sample_new_vs_baseline_b*`; so is today's sampler through the compiled decoding step
  (`sample(compile=True)`, what replay.compile=true runs), keys ending in `_compiled`;
- the sampler's roofline: its ceiling in sequences/s if every matrix multiply ran at the fp32
  peak and every cached key and value were read at the read bandwidth measured on a buffer of
  the cache's size (`sample_roofline_seq_per_s_b*`), the sampler's fraction of that ceiling,
  and the fractions of it that issue 12's targets (2x the baseline, 45% of the fp32 peak) ask;
- the sampler's kernel floor (`sample_floor_seq_per_s_b*`): its sequences/s if a draw ran
  nothing but its weight products and its attention over the cache, each timed alone at the
  draw's shapes on this machine, everything else free; the samplers' and the targets' fractions
  of it (a target over 100% is out of reach of these kernels here);
- plain and self-replay-KL finetuning new-task tokens/s (batch 32, replay batch 16, buffer 8,
  sampling included, steady state) and their ratio, for each precision (fp32, bf16+compile, and
  bf16+compile with the pool decoding through the compiled step): `--pairs` plain and KL runs
  in turn, the medians kept and every pair's ratio listed; and from the same
  measurements: the ratio with sampling free, with the pool drawn at the sampler's ceiling or
  at its kernel floor, and the sampler speed a ratio of 0.55 would need (inf: none).
The same script runs against an older checkout (PYTHONPATH=OLD python benchmarks/replay_cost.py
--label before) for a before/after table. Prints a table and writes
benchmarks/results/replay_cost.json. Time it on a quiet machine: nothing else running.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from attention_kernels import median_ms
from speed import CONFIGS, INTERVAL_STEPS, matmul_peak, model_overrides, run_training, token_files

from selfreplay.model.transformer import KVCache, ModelConfig, Transformer, flops_per_token, rms_norm
from selfreplay.replay.sampling import inverse_cdf_draw, sample

PRECISIONS = {"fp32": [], "bf16+compile": ["precision=bf16", "compile=true"],
              "bf16+compile+decoding": ["precision=bf16", "compile=true", "replay.compile=true"]}
COMPILED_DECODING = "replay.compile=true"  # a run whose pool decodes through the compiled step


def cache_bytes(config: ModelConfig) -> float:
    """Bytes of float32 keys and values that decoding one sequence of T tokens reads: each of the
    T - 1 single-token steps reads every cached key and value of every layer once."""
    return sum(config.L * 2 * (pos + 1) * config.D * 4 for pos in range(config.T - 1))


def cache_read_bandwidth(config: ModelConfig, batch_size: int, repeats: int = 5) -> float:
    """GB/s at which this machine reads a float32 buffer the size of the sampler's full KV cache
    at this decode batch (which decides whether it stays in the last-level cache): the faster of
    a plain sum and the attention's own batched product (weights [1, T] times [T, H] blocks),
    the median of `repeats` reads after a warm-up."""
    blocks = torch.randn(config.L * 2 * batch_size * config.heads, config.T, config.H)
    weights = torch.rand(len(blocks), 1, config.T)
    reads = (lambda: blocks.sum(), lambda: torch.bmm(weights, blocks))
    return max(blocks.numel() * 4 / (median_ms(read, repeats) / 1e3) / 1e9 for read in reads)


REPLAY_BATCH = 16


def kl_flop_ratio(config: ModelConfig, batch: int, replay_batch: int) -> float:
    """Training FLOPs of a self-KL step over a plain one: forward and backward over the new and
    replay rows together, plus π0's output projection on the replay rows (its hidden states
    come from the pool)."""
    plain = batch * config.T * flops_per_token(config)
    return (plain * (batch + replay_batch) / batch + 2 * replay_batch * config.T * config.D * config.V) / plain


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


SAMPLERS = {"baseline": baseline_sample, "new": sample, "compiled": functools.partial(sample, compile=True)}


def sampler_speeds(model: Transformer, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Sequences/s of each sampler in SAMPLERS at one decode batch: the median over `repeats`
    draws after a warm-up, the samplers taking turns (so a slower spell of a shared machine
    hits both alike; the warm-up draw holds the compiled sampler's compilation)."""
    times = {name: [] for name in SAMPLERS}
    for seed in range(repeats + 1):
        for name, draw in SAMPLERS.items():
            tick = time.perf_counter()
            draw(model, 0, batch_size, seed=seed, batch_size=batch_size)
            if seed:  # the first round is a warm-up
                times[name].append(time.perf_counter() - tick)
    return {name: batch_size / statistics.median(t) for name, t in times.items()}


def measure(name: str, config: ModelConfig, files: dict, work: Path, steps: int, peak_fp32: float,
            overrides: list[str], repeats: int = 3, sampler_only: bool = False, pairs: int = 2) -> dict:
    batch = 32
    tokens_per_step = batch * config.T
    common = [f"optim.batch_size={batch}", f"stop.tokens={steps * tokens_per_step}", "optim.warmup_steps=10"]
    pretrained = work / f"{name}-pretrain"
    run_training("pretrain", [f"out={pretrained}", f"data.tokenizer={files['tokenizer']}",
                              f"data.train={files['old']}", *model_overrides(config), *common], tokens_per_step)
    row = {"config": name, "params": config.params, "decoding_gflop_per_sequence": decoding_flops(config) / 1e9,
           "cache_mb_read_per_sequence": cache_bytes(config) / 1e6,
           "kl_flop_ratio": kl_flop_ratio(config, batch, REPLAY_BATCH)}

    model = Transformer.from_pretrained(pretrained).eval()
    for batch_size in (128, 512):
        speeds = sampler_speeds(model, batch_size, repeats)
        for sampler, speed in speeds.items():
            suffix = "" if sampler == "new" else f"_{sampler}"
            row[f"sample_seq_per_s_b{batch_size}{suffix}"] = speed
            row[f"sample_fraction_of_fp32_peak_b{batch_size}{suffix}"] = speed * decoding_flops(config) / (peak_fp32 * 1e9)
        row[f"sample_new_vs_baseline_b{batch_size}"] = speeds["new"] / speeds["baseline"]
        row[f"sample_compiled_vs_new_b{batch_size}"] = speeds["compiled"] / speeds["new"]
        row.update(roofline(config, batch_size, peak_fp32))
        row.update(sampler_floor(model, batch_size))
        for bound in ("roofline", "floor"):
            row.update(standing(bound, config, batch_size, peak_fp32, speeds, row))
    del model
    if sampler_only:
        return row

    finetune = [f"init={pretrained}", f"data.train={files['new']}", *common, *overrides]
    for precision, extra in PRECISIONS.items():
        row.update(finetuning_pairs(precision, [*finetune, *extra], work / f"{name}-{precision}", tokens_per_step,
                                    pairs))
        row.update(kl_bounds(precision, row, "_compiled" if COMPILED_DECODING in extra else ""))
    return row


def finetuning_pairs(precision: str, finetune: list[str], work: Path, tokens_per_step: int, pairs: int) -> dict:
    """Plain and self-KL finetuning run in turn, `pairs` times: the medians of their steady tokens/s
    and of the KL runs' sampling shares, and the median of the pairs' ratios (each ratio from two
    runs minutes apart, so a slow spell of a shared machine moves it less than the tokens/s)."""
    plain, kl, share = [], [], []
    for pair in range(pairs):
        plain.append(run_training("finetune", [f"out={work}-plain-{pair}", *finetune], tokens_per_step)[0])
        tokens_per_s, _, summary = run_training(
            "finetune", [f"out={work}-kl-{pair}", *finetune, "replay.method=kl", "replay.source=self",
                         f"replay.batch_size={REPLAY_BATCH}", f"replay.buffer={INTERVAL_STEPS}"], tokens_per_step)
        kl.append(tokens_per_s)
        share.append(summary["steady_replay_share"])
    ratios = [k / p for k, p in zip(kl, plain)]
    return {f"{precision}_plain_tokens_per_s": statistics.median(plain),
            f"{precision}_self_kl_tokens_per_s": statistics.median(kl),
            f"{precision}_kl_vs_plain": statistics.median(ratios),
            f"{precision}_kl_vs_plain_pairs": ratios,
            f"{precision}_sampling_share": statistics.median(share)}


def roofline(config: ModelConfig, batch_size: int, peak_fp32: float) -> dict:
    """The sampler's ceiling on this machine at one decode batch: sequences/s if its matrix
    multiplies ran at the measured fp32 peak and its cache reads at the measured read bandwidth,
    one after the other (a step needs its keys before its next product)."""
    bandwidth = cache_read_bandwidth(config, batch_size)
    ceiling = 1 / (decoding_flops(config) / (peak_fp32 * 1e9) + cache_bytes(config) / (bandwidth * 1e9))
    return {f"cache_read_gb_per_s_b{batch_size}": bandwidth, f"sample_roofline_seq_per_s_b{batch_size}": ceiling}


def standing(bound: str, config: ModelConfig, batch_size: int, peak_fp32: float, speeds: dict[str, float],
             row: dict) -> dict:
    """Where the samplers (eager and compiled) and issue 12's two targets (2x the baseline, 45%
    of the fp32 peak) stand against one of the sampler's bounds in `row` at this decode batch
    ("roofline" or "floor"): fractions of its sequences/s, a target over 100% out of its reach."""
    limit = row[f"sample_{bound}_seq_per_s_b{batch_size}"]
    at_45 = 0.45 * peak_fp32 * 1e9 / decoding_flops(config)
    return {f"sample_fraction_of_{bound}_b{batch_size}": speeds["new"] / limit,
            f"sample_fraction_of_{bound}_b{batch_size}_compiled": speeds["compiled"] / limit,
            f"target_2x_baseline_fraction_of_{bound}_b{batch_size}": 2 * speeds["baseline"] / limit,
            f"target_45pct_peak_fraction_of_{bound}_b{batch_size}": at_45 / limit}


def sampler_floor(model: Transformer, batch_size: int, repeats: int = 5) -> dict[str, float]:
    """The sampler's kernel floor at one decode batch, measured rather than modelled: the time a
    draw of `batch_size` sequences would take if it ran nothing but its weight products (each
    layer's four projections and the output projection, with the model's weights at the step's
    shapes, through the calls Transformer.decode_step makes) and its attention over the cache
    (attend_new_position's two batched products and softmax, one layer at every position, times
    the layers), each timed alone here; norms, rotations, GELU, cache writes and the draw cost
    nothing in it. Unlike the roofline, it uses this machine's own speed on these shapes."""
    config = model.config
    head = model.head.weight.t().contiguous()
    with torch.inference_mode():
        x, wide = torch.randn(batch_size, config.D), torch.randn(batch_size, 4 * config.D)
        logits = torch.empty(batch_size, config.V)

        def weight_products():
            for block in model.blocks:
                torch.nn.functional.linear(x, block.attn.qkv.weight)
                torch.addmm(x, x, block.attn.out.weight.t())
                torch.nn.functional.linear(x, block.up.weight)
                torch.addmm(x, wide, block.down.weight.t())
            torch.mm(x, head, out=logits)

        cache = KVCache(config, batch_size)
        cache.k.normal_()
        cache.v.normal_()
        q = torch.randn(batch_size, config.heads, config.H) * config.H**-0.5

        def attention(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            scores = q[:, :, None] @ keys.transpose(-1, -2)
            return scores.float().softmax(-1) @ values

        products_ms = (config.T - 1) * median_ms(weight_products, repeats)
        attention_ms = 0.0
        for pos in range(config.T - 1):
            keys, values = cache.through(pos)  # [L, B, heads, pos + 1, H]: every layer alike, so layer 0 timed
            attention_ms += config.L * median_ms(functools.partial(attention, keys[0], values[0]), repeats)
    return {f"floor_weight_products_ms_b{batch_size}": products_ms,
            f"floor_cache_attention_ms_b{batch_size}": attention_ms,
            f"sample_floor_seq_per_s_b{batch_size}": batch_size / ((products_ms + attention_ms) / 1e3)}


def kl_bounds(precision: str, row: dict, sampler: str = "", target: float = 0.55) -> dict:
    """What self-KL/plain could be with faster sampling, from this run's measurements (per
    new-task token): with sampling free; with the pool drawn at the sampler's ceiling, and at its
    kernel floor, at decode batch 128 (the pool's default; every run's pool decodes with float32
    weights on CPU); and the sampler speed (sequences/s at decode batch 128) that `target` needs
    while the rest of the
    KL step stays as measured (inf: no sampler speed reaches it). sampler: the suffix of the
    sampler the run's pool used ("" eager, "_compiled"). The KL step's training
    efficiency against plain finetuning's: FLOPs per step over time per step, the KL step's
    (rows of both batches, and π0's output projection on the replay rows) against plain's."""
    plain = 1 / row[f"{precision}_plain_tokens_per_s"]
    kl = 1 / row[f"{precision}_self_kl_tokens_per_s"]
    sampling = row[f"{precision}_sampling_share"] * kl
    training = kl - sampling
    speed = row[f"sample_seq_per_s_b128{sampler}"]
    sampling_at_ceiling = sampling * speed / row["sample_roofline_seq_per_s_b128"]
    sampling_at_floor = sampling * speed / row["sample_floor_seq_per_s_b128"]
    sampling_allowed = plain / target - training
    needed = speed * sampling / sampling_allowed if sampling_allowed > 0 else float("inf")
    return {f"{precision}_kl_vs_plain_sampling_free": plain / training,
            f"{precision}_kl_training_efficiency_vs_plain": row["kl_flop_ratio"] * plain / training,
            f"{precision}_kl_vs_plain_sampler_at_roofline": plain / (training + sampling_at_ceiling),
            f"{precision}_kl_vs_plain_sampler_at_floor": plain / (training + sampling_at_floor),
            f"{precision}_sampler_seq_per_s_needed_for_{target}": needed}


def shown(key: str, value) -> str:
    """One table cell: shares and fractions as percentages, ratios to three places, lists item by item."""
    if isinstance(value, list):
        return ", ".join(shown(key, v) for v in value)
    if "fraction" in key or "share" in key:
        return f"{value:.1%}"
    if any(word in key for word in ("vs", "gflop", "gb_per_s", "ratio")):
        return f"{value:.3f}"
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=32,
                        help=f"training steps per run (logged every {INTERVAL_STEPS}; the first interval is warm-up)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "replay_cost.json"))
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. 'before')")
    parser.add_argument("--sampler-repeats", type=int, default=3, help="timed draws per sampler and decode batch")
    parser.add_argument("--sampler-only", action="store_true", help="measure the samplers only, no finetuning runs")
    parser.add_argument("--pairs", type=int, default=2, help="plain and self-KL finetuning runs in turn, per precision")
    parser.add_argument("overrides", nargs="*", help="config overrides for the finetuning runs")
    args = parser.parse_args()

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        files = token_files(Path(tmp), vocab=4096)
        rows = [measure(name, CONFIGS[name], files, Path(tmp), args.steps, peaks["fp32"], args.overrides,
                        args.sampler_repeats, args.sampler_only, args.pairs) for name in args.configs]

    print(f"{args.label or 'this checkout'}: matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
          f"GFLOP/s ({torch.get_num_threads()} threads)")
    for row in rows:
        print()
        for key, value in row.items():
            print(f"  {key:40s} {shown(key, value)}")
    result = {"label": args.label, "overrides": args.overrides, "matmul_peak_gflops": peaks, "rows": rows, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
