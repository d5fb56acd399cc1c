"""Does one optimizer step on a replay sample leave θ further from π0 on that very sample?

    selfreplay sample init=hf:MODEL --out runs/pool -n 64 --length 128
    python benchmarks/replay_overshoot.py --model MODEL --pool runs/pool --new ../shared/data/fortunes/es.jsonl

The finetuning step of the real-model study's default (benchmarks/real_model.py), its loss the
training objective itself (`selfreplay.objective.methods.training_loss`, with the pool's stored π0
hidden states): AdamW, weight decay 0.02, gradient norm clipped to 1, batch 8 × 128 of the new text,
loss = its next-token loss + c · KL(π0 ‖ πθ) on 2 of the pool's samples a step, each sample once. Before and
after every step it measures KL(π0 ‖ πθ) on the two samples the step trains on, and on eight samples no
step trains on (the control: how far a step moves θ on π0's samples it is not given). A step
*overshoots* a sample when the KL on it after the step is higher than before, by more than the
control moved. Prints a line a step; writes --json (default benchmarks/results/replay_overshoot.json).
The KL measured is `selfreplay.objective.losses.kl_divergence` on full logits, the direct
computation the tests check the objective against.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from selfreplay.data.text import pack_text  # noqa: E402
from selfreplay.model.hf import CausalLM  # noqa: E402
from selfreplay.objective.methods import training_loss  # noqa: E402
from selfreplay.objective.losses import kl_divergence  # noqa: E402
from selfreplay.replay.store import StoredPool  # noqa: E402

CONTROL = 8  # samples no step trains on: the pool's last eight


def kl_on(model, reference, tokens: torch.Tensor) -> torch.Tensor:
    """KL(π0 ‖ πθ) averaged over the positions of one sample [t] (its padding cut off)."""
    x = tokens[None]
    with torch.no_grad():
        return kl_divergence(reference(x).logits[0, :-1], model(x).logits[0, :-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model directory (π0)")
    parser.add_argument("--pool", required=True, type=Path, help="a pool of π0's samples (selfreplay sample --out)")
    parser.add_argument("--new", required=True, help="the new domain's text (.jsonl with a text field)")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--coeff", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "replay_overshoot.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reference = AutoModelForCausalLM.from_pretrained(args.model).eval().requires_grad_(False)
    model = AutoModelForCausalLM.from_pretrained(args.model).train()
    lm, pi0 = CausalLM(model), CausalLM(reference)
    new = torch.tensor([row["input_ids"] for row in pack_text(args.new, tokenizer, 128)])
    pool = StoredPool(args.pool)
    samples, _ = pool.take(torch.arange(len(pool)))
    rows = [samples.tokens[i, : int(samples.mask[i].sum())] if samples.mask is not None else samples.tokens[i]
            for i in range(len(pool))]
    if len(rows) < 2 * args.steps + CONTROL:
        raise SystemExit(f"{args.pool} holds {len(rows)} samples: {2 * args.steps + CONTROL} needed for "
                         f"{args.steps} steps of 2 and {CONTROL} control samples")
    control = rows[-CONTROL:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.02)
    generator = torch.Generator().manual_seed(args.seed)
    steps = []
    for step in range(args.steps):
        batch = new[torch.randint(len(new), (8,), generator=generator)]
        replayed = rows[2 * step: 2 * step + 2]
        before = [float(kl_on(model, reference, r)) for r in replayed]
        control_before = [float(kl_on(model, reference, r)) for r in control]
        optimizer.zero_grad()
        replay = pool.take(torch.arange(2 * step, 2 * step + 2))[0].trimmed()
        loss, new_loss, _ = training_loss(lm, pi0, batch, replay, "kl", args.coeff)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        after = [float(kl_on(model, reference, r)) for r in replayed]
        control_after = [float(kl_on(model, reference, r)) for r in control]
        record = {"step": step, "new_loss": float(new_loss), "replayed_before": before, "replayed_after": after,
                  "control_before": control_before, "control_after": control_after}
        moved = max(a - b for a, b in zip(control_after, control_before))
        record["overshot"] = [a - b > max(moved, 0.0) for a, b in zip(after, before)]
        steps.append(record)
        print(f"step {step:2d}  new loss {record['new_loss']:.3f}  replayed KL "
              + "  ".join(f"{b:.4f} -> {a:.4f}" for b, a in zip(before, after))
              + "  control " + "  ".join(f"{b:.4f} -> {a:.4f}" for b, a in zip(control_before, control_after)),
              flush=True)
    trained = [s for s in steps if s["step"] > 0]  # at θ = π0 the KL and its gradient are 0
    overshot = sum(sum(s["overshot"]) for s in trained)
    rises = [a / b for s in trained for b, a in zip(s["replayed_before"], s["replayed_after"]) if b > 0]
    final = {"replayed": statistics.median(float(kl_on(model, reference, r)) for r in rows[: 2 * args.steps]),
             "control": statistics.median(float(kl_on(model, reference, r)) for r in control)}
    print(f"\n{overshot} of {2 * len(trained)} replayed samples overshot (KL higher after the step that trained on "
          f"them, by more than the control moved); after/before ratio median {statistics.median(rises):.2f}, "
          f"max {max(rises):.1f}; at the end, median KL {final['replayed']:.4f} on the replayed samples, "
          f"{final['control']:.4f} on the control")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": vars(args) | {"pool": str(args.pool), "json": str(args.json)},
                                     "steps": steps, "overshot": overshot, "replayed": 2 * len(trained),
                                     "ratio_median": statistics.median(rises), "ratio_max": max(rises),
                                     "final_median_kl": final, "platform": platform.platform()}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
