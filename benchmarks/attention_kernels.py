"""The kernel choices behind the model's attention (issue 4), timed on this machine.

    python benchmarks/attention_kernels.py

1. Training attention, `tiny` shapes [32, 4 heads, 128, 32]: PyTorch's fused CPU attention
   forward + backward in float32 and in bfloat16 (why attention stays float32 under bf16
   autocast on CPU).
2. Decoding attention, one query over a cache of 1..127 positions at batch 128: the fused
   kernel against two small matmuls (what the KV-cache sampler uses).

Prints a table and writes benchmarks/results/attention_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times) * 1e3


def training_attention_ms(dtype: torch.dtype, shape=(32, 4, 128, 32)) -> float:
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)
    return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad))


def decode_attention_ms(fused: bool, batch: int = 128, heads: int = 4, length: int = 128, dim: int = 32) -> float:
    """Total over a whole sequence: one query at each position 1..length-1."""
    k_cache, v_cache = torch.randn(batch, heads, length, dim), torch.randn(batch, heads, length, dim)
    q = torch.randn(batch, heads, 1, dim)

    def sequence():
        for t in range(1, length):
            k, v = k_cache[:, :, :t], v_cache[:, :, :t]
            if fused:
                F.scaled_dot_product_attention(q, k, v)
            else:
                ((q @ k.transpose(-1, -2)).float() * dim**-0.5).softmax(-1) @ v
    return median_ms(sequence, repeats=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_kernels.json"))
    args = parser.parse_args()
    result = {
        "training_attention_fwd_bwd_ms_per_layer": {"fp32": training_attention_ms(torch.float32),
                                                    "bf16": training_attention_ms(torch.bfloat16)},
        "decode_attention_ms_per_layer_per_sequence": {"fused": decode_attention_ms(True),
                                                       "two_matmuls": decode_attention_ms(False)},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    train, decode = result["training_attention_fwd_bwd_ms_per_layer"], result["decode_attention_ms_per_layer_per_sequence"]
    print(f"training attention [32, 4, 128, 32], forward + backward, ms per layer: "
          f"fp32 {train['fp32']:.1f}, bf16 {train['bf16']:.1f} (bf16 / fp32 = {train['bf16'] / train['fp32']:.1f}x)")
    print(f"decoding attention, batch 128, positions 1..127, ms per layer and sequence: "
          f"fused {decode['fused']:.1f}, two matmuls {decode['two_matmuls']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
