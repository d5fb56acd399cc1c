"""What self-replay costs at 135M parameters: SmolLM2-135M-Instruct, on the CPU.

    python benchmarks/real_model_cost.py            # about 5 minutes on 2 cores; run it alone

1. Memory, stage by stage: the process's resident memory after each piece a full-finetuning run
   holds (θ, π0's copy, a step's gradients, Adam's two moments), and the peak inside one plain step
   and one KL step, so that a run's peak is accounted for.
2. Time: one plain step and one KL step (batch 8 × 128 tokens, replay batch 4 with π0's hidden
   states kept by the draw), the median of --steps after a warm-up.
3. The replay draw against transformers' own `generate` with a static cache, same batch, length and
   sampling (temperature 1, no truncation), alternated --draws times in one process.

Prints a table and writes benchmarks/results/real_model_cost.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from selfreplay.experiments.real_model import DEFAULT_CACHE, model_directory  # noqa: E402
from selfreplay.model.hf import CausalLM, frozen_reference, load_causal_lm  # noqa: E402
from selfreplay.objective.methods import training_loss  # noqa: E402
from selfreplay.replay.hf_sampling import base_format, sample_replay  # noqa: E402

MIB = 2**20


def resident_mib() -> float:
    """The process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--draw-batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--json", default=HERE / "results" / "real_model_cost.json", type=Path)
    args = parser.parse_args()
    folder = model_directory(args.cache)
    torch.manual_seed(0)
    stages = [("python, torch and transformers imported", resident_mib())]

    model, tokenizer = load_causal_lm(str(folder), torch.float32)
    model.train()
    lm = CausalLM(model)
    weights = tensor_mib(model.parameters())
    stages.append((f"θ loaded ({weights:.0f} MiB of float32 weights, memory-mapped from the file)", resident_mib()))
    with torch.no_grad():  # a mapped page is resident once read: the first forward pass reads them all
        sum(float(p.sum()) for p in model.parameters())
    stages.append(("θ's weights read once", resident_mib()))
    reference = frozen_reference(lm)
    stages.append(("π0's frozen copy", resident_mib()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    V = model.config.vocab_size
    new = torch.randint(0, V, (8, 128))
    replay = sample_replay(reference, base_format(tokenizer), 4, args.length, seed=0, keep_hidden=True)

    def step(method: str) -> float:
        start = time.perf_counter()
        loss, _, _ = training_loss(lm, reference, new, replay if method == "kl" else None, method, 10.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    before_first = resident_mib()
    step("none")
    stages.append(("after the first plain step (gradients freed; Adam's two moments held)", resident_mib()))
    gc.collect()
    plain_peak = peak_mib()
    plain = [step("none") for _ in range(args.steps)]
    kl = [step("kl") for _ in range(args.steps)]
    kl_peak = peak_mib()
    adam = tensor_mib(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    stages.append(("after the KL steps", resident_mib()))

    def ours() -> float:
        start = time.perf_counter()
        sample_replay(reference, base_format(tokenizer, stop_at_eos=False), args.draw_batch, args.length,
                      batch_size=args.draw_batch, seed=1)
        return time.perf_counter() - start

    def generate() -> float:
        ids = torch.full((args.draw_batch, 1), tokenizer.bos_token_id, dtype=torch.long)
        start = time.perf_counter()
        with torch.no_grad():
            reference.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, max_new_tokens=args.length - 1, min_new_tokens=args.length - 1,
                                     cache_implementation="static", pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    ours(), generate()  # warm-up
    draws = {"selfreplay": [], "generate_static": []}
    for _ in range(args.draws):
        draws["selfreplay"].append(ours())
        draws["generate_static"].append(generate())

    result = {
        "model": str(folder), "parameters": sum(p.numel() for p in model.parameters()), "vocabulary": V,
        "weights_mib": weights, "adam_moments_mib": adam, "gradients_mib": weights,
        "stages_mib": stages, "resident_before_first_step_mib": before_first,
        "peak_through_plain_steps_mib": plain_peak, "peak_through_kl_steps_mib": kl_peak,
        "plain_step_seconds": statistics.median(plain), "kl_step_seconds": statistics.median(kl),
        "draw": {"batch": args.draw_batch, "length": args.length,
                 **{name: {"seconds": statistics.median(t), "tokens_per_second":
                           args.draw_batch * (args.length - 1) / statistics.median(t), "all": t}
                    for name, t in draws.items()}},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    print(f"{'stage':72s} {'resident MiB':>12s}")
    for name, mib in stages:
        print(f"{name:72s} {mib:12.0f}")
    print(f"weights {weights:.0f} MiB, gradients {weights:.0f}, Adam moments {adam:.0f}; "
          f"peak through plain steps {plain_peak:.0f} MiB, through KL steps {kl_peak:.0f} MiB")
    print(f"plain step {result['plain_step_seconds']:.2f} s, KL step {result['kl_step_seconds']:.2f} s")
    for name, d in result["draw"].items():
        if isinstance(d, dict):
            print(f"draw {args.draw_batch} x {args.length} tokens, {name:16s} {d['seconds']:.1f} s "
                  f"({d['tokens_per_second']:.0f} tokens/s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
