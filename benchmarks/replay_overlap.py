"""Can replay sampling be hidden behind training? (issue 4): serial, overlapped and sampling-free KL steps.

    python benchmarks/replay_overlap.py                          # tiny, bf16, eager
    python benchmarks/replay_overlap.py --compile --out FILE.json

A self-replay-KL run with replay batch 16 and buffer 8 draws a pool of 128 sequences every 8
steps. Per round, in one process and on the `tiny` config (D=128 L=4 H=32 T=128 V=4096, batch
32), this times: 8 plain finetuning steps; 8 KL steps whose replay rows are ready (training
alone); one pool draw (sampling alone); and 8 KL steps while a second thread draws the next pool
(overlapped). It also times pool draws at sampling batch 128 and 256 (a larger batch amortises
the per-step cost of decoding over more sequences). Reports KL finetuning's new-task speed as a
fraction of plain finetuning's: as the trainer runs it (serial), overlapped, and with free
sampling (the ceiling any overlap could reach). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from selfreplay.model.transformer import ModelConfig, Transformer
from selfreplay.runtime import autocast
from selfreplay.replay.sampling import sample
from selfreplay.objective.methods import ReplaySamples, training_loss

STEPS_PER_POOL = 8  # replay.buffer
REPLAY_BATCH = 16


def seconds(fn) -> float:
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "replay_overlap.json"))
    args = parser.parse_args()

    config = ModelConfig(D=128, L=4, H=32, T=128, V=4096)
    torch.manual_seed(0)
    model = Transformer(config).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    # bf16 runs sample from a bf16 copy of π0, as the trainer does
    sampler = copy.deepcopy(reference).to(torch.bfloat16) if args.precision == "bf16" else reference
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trunk = torch.compile(model.hidden, dynamic=False) if args.compile else model.hidden
    device = torch.device("cpu")
    new = torch.randint(0, config.V, (32, config.T))
    pool_size = STEPS_PER_POOL * REPLAY_BATCH

    def draw(batch_size: int = pool_size):
        return sample(sampler, 0, pool_size, seed=0, batch_size=batch_size, return_hidden=True)

    tokens, hidden = (x[:REPLAY_BATCH] for x in draw())
    replay = ReplaySamples(tokens, hidden=hidden)

    def steps(kl: bool) -> None:
        for _ in range(STEPS_PER_POOL):
            with autocast(device, args.precision):
                if kl:
                    loss, _, _ = training_loss(model, reference, new, replay, "kl", 1.0, trunk, args.compile)
                else:
                    loss, _, _ = training_loss(model, reference, new, None, "none", 1.0, trunk,
                                               compile=args.compile)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def overlapped() -> None:
        drawer = threading.Thread(target=draw)
        drawer.start()
        steps(kl=True)
        drawer.join()

    # warm-up and compilation
    steps(kl=False)
    steps(kl=True)
    draw(batch_size=2 * pool_size)
    times: dict[str, list[float]] = {"plain": [], "kl_training": [], "pool_draw": [], "kl_overlapped": [],
                                     "pool_draw_b128": [], "pool_draw_b256_per_pool": []}
    for _ in range(args.rounds):
        times["plain"].append(seconds(lambda: steps(kl=False)))
        times["kl_training"].append(seconds(lambda: steps(kl=True)))
        times["pool_draw"].append(seconds(draw))
        times["kl_overlapped"].append(seconds(overlapped))
        times["pool_draw_b128"].append(seconds(lambda: sample(sampler, 0, 2 * pool_size, seed=1, batch_size=128))
                                       / 2)
        times["pool_draw_b256_per_pool"].append(
            seconds(lambda: sample(sampler, 0, 2 * pool_size, seed=1, batch_size=256)) / 2)
    median = {name: statistics.median(values) for name, values in times.items()}
    plain = median["plain"]
    result = {
        "precision": args.precision, "compile": args.compile, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "seconds_per_8_steps_median": median, "seconds_per_round": times,
        "plain_new_tokens_per_s": STEPS_PER_POOL * new.numel() / plain,
        "kl_vs_plain_serial": plain / (median["kl_training"] + median["pool_draw"]),
        "kl_vs_plain_overlapped": plain / median["kl_overlapped"],
        "kl_vs_plain_free_sampling": plain / median["kl_training"],
        "kl_vs_plain_serial_b256_draws": plain / (median["kl_training"] + median["pool_draw_b256_per_pool"]),
        "sampling_share_serial": median["pool_draw"] / (median["kl_training"] + median["pool_draw"]),
    }
    print(f"tiny, {args.precision}, compile={args.compile}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds (one round = {STEPS_PER_POOL} steps = one pool of {pool_size})")
    print(f"| what | seconds per {STEPS_PER_POOL} steps | KL / plain new-task tokens/s |")
    print("|---|---|---|")
    print(f"| plain finetuning | {plain:.2f} | |")
    print(f"| KL, replay rows ready (free sampling) | {median['kl_training']:.2f} | {result['kl_vs_plain_free_sampling']:.0%} |")
    print(f"| pool draw alone (batch {pool_size}) | {median['pool_draw']:.2f} | |")
    print(f"| KL then draw (serial, as the trainer runs) | {median['kl_training'] + median['pool_draw']:.2f} "
          f"| {result['kl_vs_plain_serial']:.0%} |")
    print(f"| KL with the next draw in a second thread | {median['kl_overlapped']:.2f} | {result['kl_vs_plain_overlapped']:.0%} |")
    print(f"| KL then draw, pools drawn two at a time (batch 256) | "
          f"{median['kl_training'] + median['pool_draw_b256_per_pool']:.2f} | {result['kl_vs_plain_serial_b256_draws']:.0%} |")
    print(f"pool draw per pool: batch 128 {median['pool_draw_b128']:.2f} s, batch 256 {median['pool_draw_b256_per_pool']:.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
