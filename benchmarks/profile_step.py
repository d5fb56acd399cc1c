"""Where a training step's time goes (issue 4): torch.profiler over steady-state steps.

    python benchmarks/profile_step.py                          # tiny, fp32, plain pretraining step
    python benchmarks/profile_step.py --precision bf16 --compile --replay

Random tokens and a random model of the `tiny` config (D=128 L=4 H=32 T=128 V=4096, batch
32); --replay adds the self-replay KL of 16 replay rows (pool sampling excluded: see
benchmarks/speed.py for its share). Prints the median step time and the operators that
take the most time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile

from selfreplay.model.transformer import ModelConfig, Transformer
from selfreplay.runtime import autocast
from selfreplay.objective.methods import training_loss
from selfreplay.replay.samples import ReplaySamples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--replay", action="store_true", help="self-replay KL on 16 replay rows")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20, help="operators to list")
    args = parser.parse_args()

    config = ModelConfig(D=128, L=4, H=32, T=128, V=4096)
    torch.manual_seed(0)
    model = Transformer(config).train()
    reference = Transformer(config).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trunk = torch.compile(model.hidden, dynamic=False) if args.compile else model.hidden
    new = torch.randint(0, config.V, (32, config.T))
    replay = None
    if args.replay:
        tokens = torch.randint(0, config.V, (16, config.T))
        with torch.no_grad():
            replay = ReplaySamples(tokens, hidden=reference.hidden(tokens))
    method = "kl" if args.replay else "none"
    device = torch.device("cpu")

    def step() -> None:
        with autocast(device, args.precision):
            loss, _, _ = training_loss(model, reference, new, replay, method, 1.0, trunk, args.compile)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    times = []
    for _ in range(args.steps):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    print(f"median step {median * 1e3:.1f} ms = {new.numel() / median:,.0f} new tokens/s "
          f"(precision={args.precision}, compile={args.compile}, replay={args.replay})")
    with profile() as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
