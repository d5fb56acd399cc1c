"""The replay coefficient held to a budget (issue 24), on real text: does replay.coeff=auto hold
the replay KL at B, is forgetting ordered with B, and how fast does it reach the new domain
against the fixed coefficient a user would have had to search for?

    python benchmarks/budget.py --work runs/replay_once              # both settings, ~40 min on 2 cores
    python benchmarks/budget.py --work /tmp/b --quick                 # a smoke run, a few minutes
    python benchmarks/budget.py --work runs/replay_once --lr 3e-4 --coeffs 1 3 10 30 100 300 \
        --out benchmarks/results/budget_lr3e-4.json                   # the whole study at a lower rate

Two settings, the π0s of benchmarks/replay_once.py (reused from --work when there, built when
not): `real`, the built-in model pretrained on English fortunes (../shared/data) and finetuned on
Spanish ones; `hf`, the same π0 exported with `selfreplay export --hf` and finetuned through
init=hf:, forgetting measured on held-out English text. Each finetunes STEPS steps (batch 16 ×
128 tokens, lr 1e-3 or --lr, self-replay KL with 8 fresh samples a step) with:
- replay.coeff=auto at each budget B (its defaults otherwise: c starts at 10, horizon 20 steps);
- fixed coefficients COEFFS, and plain finetuning for reference;
- the smallest budget again at a 3x lower learning rate (LOW_LR; not when --lr is already that
  low): at lr 1e-3 Adam's own steps,
  of about lr in every parameter whatever c is, keep the replay KL above ~0.006 nats on this
  model even at c = 300 (the optimizer's noise floor), so a budget under it cannot be held by c.
Every command runs through the `selfreplay` command line in its own process, --workers at a time
(one thread each). A finished run in --work is reused. Nothing here is timed in seconds: time to
target is counted in steps, which cost the same whatever c is, so the runs may share the CPU.

Read from each run: the replay KL at the end (the mean over the last log interval, nats per
token), forgetting at the end (old-domain loss rise), and the steps to reach a new-domain target
loss (interpolated along the logged curve). For each budget the *best fixed c* is the smallest
coefficient of the grid whose end replay KL is within the budget (the one a user searching the
grid would keep: the least replay weight that meets it); the two are compared at the highest
new-domain loss both reach. Prints the tables; writes benchmarks/results/budget.json (--out) and,
with --figure, c and the replay KL over its budget along each held run (docs/figures/budget.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay_once  # its π0s and curve readers

from selfreplay.experiments.figures.coefficient import (
    TOLERANCE,  # the end replay KL may be this many times B
)

RESULTS = Path(__file__).resolve().parent / "results"
STEPS, LOG_EVERY = 300, 15
BUDGETS = (0.003, 0.01, 0.03)
COEFFS = (3, 10, 30, 100, 300)
LR = 1e-3  # every run's learning rate unless --lr
LOW_LR = 3e-4  # the smallest budget is run again at this learning rate (under the noise floor of 1e-3)


def run_settings(steps: int, lr: float) -> list[str]:
    """What every run shares (replay_once's finetuning, logged every LOG_EVERY steps)."""
    every = min(LOG_EVERY, max(1, steps // 5)) * replay_once.BATCH * 128
    return [f"optim.batch_size={replay_once.BATCH}", f"optim.lr={lr:g}", "optim.warmup_steps=10",
            "data.val_sequences=64", f"stop.tokens={steps * replay_once.BATCH * 128}",
            f"log.every_tokens={every}", "log.progress=false", f"replay.batch_size={replay_once.REPLAY_BATCH}"]


def plan(budgets, coeffs, lr: float) -> dict[str, list[str]]:
    """Run name -> its settings (those of run_settings(steps, lr) come first)."""
    runs = {"plain": ["replay.method=none"]}
    runs |= {f"c{c:g}": ["replay.method=kl", f"replay.coeff={c:g}"] for c in coeffs}
    runs |= {f"B{b:g}": ["replay.method=kl", "replay.coeff=auto", f"replay.budget={b:g}"] for b in budgets}
    if lr > LOW_LR:
        runs[low_lr_name(min(budgets))] = [*runs[f"B{min(budgets):g}"], f"optim.lr={LOW_LR:g}"]
    return runs


def low_lr_name(budget: float) -> str:
    return f"B{budget:g}_lr{LOW_LR:g}"


def launch(root: Path, setting: dict, name: str, settings: list[str], steps: int, lr: float) -> None:
    """One `selfreplay finetune` in its own single-threaded process; skipped when finished."""
    out = root / name
    if (out / "summary.json").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "selfreplay", "finetune", f"out={out}", *setting["init"],
               *run_settings(steps, lr), *settings]
    print("+", " ".join(command[2:]), flush=True)
    with open(root / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})


def read(root: Path, name: str) -> dict:
    summary = json.loads((root / name / "summary.json").read_text())
    curve = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": summary, "curve": curve}


def end_replay_kl(run: dict) -> float | None:
    """The replay KL of the last log interval (replay_kl with c held, replay_loss, the KL term, with c fixed)."""
    last = run["curve"][-1]
    value = last.get("replay_kl", last.get("replay_loss"))
    return float(value) if value is not None else None


def steps_to(run: dict, target: float) -> float | None:
    return replay_once.at_new_loss(run["curve"], target, "step")


def best_fixed(runs: dict[str, dict], budget: float, coeffs, slack: float = 1.0) -> str | None:
    """The smallest fixed c whose end replay KL is within slack × the budget; None when none of the grid is."""
    within = [c for c in sorted(coeffs) if (end_replay_kl(runs[f"c{c:g}"]) or float("inf")) <= slack * budget]
    return f"c{within[0]:g}" if within else None


def against(held: dict, other: dict) -> dict:
    """The held run and a fixed-c run at the highest new-domain loss both reach: steps to it."""
    target = max(min(p["new_loss"] for p in r["curve"]) for r in (held, other))
    return {"target_new_loss": target, "held_steps_to_target": steps_to(held, target),
            "fixed_steps_to_target": steps_to(other, target), "fixed_end_replay_kl": end_replay_kl(other),
            "fixed_forgetting_end": other["summary"]["forgetting"], "fixed_old_kl_end": other["summary"].get("old_kl"),
            "fixed_new_loss_end": other["summary"]["new_loss"]}


def compare(runs: dict[str, dict], budget: float, coeffs, name: str | None = None) -> dict:
    """B's held run (`name`, by default B<budget>) against the best fixed c: end KL/B, forgetting,
    steps to their common target."""
    held = runs[name or f"B{budget:g}"]
    end_kl = end_replay_kl(held)
    row = {"run": name or f"B{budget:g}", "budget": budget, "old_kl_end": held["summary"].get("old_kl"),
           "end_replay_kl": end_kl, "kl_over_budget": end_kl / budget,
           "forgetting_end": held["summary"]["forgetting"], "new_loss_end": held["summary"]["new_loss"],
           "coeff_end": held["summary"].get("replay_coeff_end"), "capacity_bound": held["summary"].get("capacity_bound"),
           "within_tolerance": end_kl <= TOLERANCE * budget}
    fixed = best_fixed(runs, budget, coeffs)
    row["best_fixed"] = fixed
    if fixed:
        row |= against(held, runs[fixed])
    # the smallest c within the tolerance the held run is judged by: the fastest fixed c a user could accept
    loose = best_fixed(runs, budget, coeffs, TOLERANCE)
    row["best_fixed_within_tolerance"] = loose
    if loose:
        row["against_fixed_within_tolerance"] = against(held, runs[loose])
    return row


def study(work: Path, setting_name: str, steps: int, lr: float, budgets, coeffs, workers: int,
          pretrain_tokens: int) -> dict:
    setting = replay_once.prepare_builtin(work, "real", pretrain_tokens)  # the hf setting exports its π0
    if setting_name == "hf":
        setting = replay_once.prepare_hf(work)
    root = work / "budget" / (f"{setting_name}_{steps}" + (f"_lr{lr:g}" if lr != LR else ""))
    runs = plan(budgets, coeffs, lr)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda item: launch(root, setting, item[0], item[1], steps, lr), runs.items()))
    read_runs = {name: read(root, name) for name in runs}
    rows = [compare(read_runs, b, coeffs) for b in budgets]
    forgetting, old_kl = [r["forgetting_end"] for r in rows], [r["old_kl_end"] for r in rows]
    low = compare(read_runs, min(budgets), [], low_lr_name(min(budgets))) if lr > LOW_LR else None
    return {"lr": lr, "rows": rows, "low_lr": low,
            "forgetting_ordered_with_budget": all(a <= b for a, b in zip(forgetting, forgetting[1:])),
            "old_kl_ordered_with_budget": all(a <= b for a, b in zip(old_kl, old_kl[1:])),
            "fixed": {name: {"coeff": float(name[1:]), "end_replay_kl": end_replay_kl(read_runs[name]),
                             "forgetting_end": read_runs[name]["summary"]["forgetting"],
                             "old_kl_end": read_runs[name]["summary"].get("old_kl"),
                             "new_loss_end": read_runs[name]["summary"]["new_loss"]}
                      for name in runs if name.startswith("c")},
            "plain": {"forgetting_end": read_runs["plain"]["summary"]["forgetting"],
                      "new_loss_end": read_runs["plain"]["summary"]["new_loss"]},
            "trajectories": {name: [(p["step"], p.get("replay_coeff"), p.get("replay_kl")) for p in read_runs[name]["curve"]]
                             for name in runs if name.startswith("B")}}


def draw(results: dict, settings: list[str], path: Path) -> None:
    """The held runs' c and replay KL / budget, every setting in one figure."""
    from selfreplay.experiments.figures.coefficient import plot_coefficients

    series = []
    for name in settings:
        for run, trajectory in results[name]["trajectories"].items():
            budget = float(run[1:].split("_")[0])
            lr = LOW_LR if "_lr" in run else results[name]["lr"]
            label = f"{name}, B={budget:g}" + (f", lr {lr:g}" if lr != LR else "")
            series.append((label, budget, [tuple(point) for point in trajectory]))
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_coefficients(series, path)
    print(f"drew {path}")


def cell(value, form: str) -> str:
    return "-" if value is None else form.format(value)


def print_study(name: str, result: dict) -> None:
    print(f"\n{name} at lr {result['lr']:g}: plain finetuning forgets {result['plain']['forgetting_end']:.4f} "
          f"(new loss {result['plain']['new_loss_end']:.3f})")
    print("  fixed c: " + ", ".join(f"c={f['coeff']:g}: KL {f['end_replay_kl']:.4f}, forgetting {f['forgetting_end']:.4f}, "
                                   f"new {f['new_loss_end']:.3f}" for f in result["fixed"].values()))
    print(f"  {'run':>14s} {'end KL':>8s} {'KL/B':>6s} {'c end':>7s} {'forgot':>8s} {'old KL':>7s} {'new':>7s} "
          f"{'best c':>7s} {'target':>7s} {'steps':>6s} {'c steps':>7s} {'c forgot':>8s}")
    for r in [*result["rows"], *([result["low_lr"]] if result["low_lr"] else [])]:
        print(f"  {r['run']:>14s} {r['end_replay_kl']:8.4f} {r['kl_over_budget']:6.2f} {cell(r['coeff_end'], '{:7.1f}')} "
              f"{r['forgetting_end']:8.4f} {cell(r['old_kl_end'], '{:7.4f}')} {r['new_loss_end']:7.3f} "
              f"{r['best_fixed'] or 'none':>7s} "
              f"{cell(r.get('target_new_loss'), '{:7.3f}')} {cell(r.get('held_steps_to_target'), '{:6.0f}')} "
              f"{cell(r.get('fixed_steps_to_target'), '{:7.0f}')} {cell(r.get('fixed_forgetting_end'), '{:8.4f}')}")
    for r in result["rows"]:
        loose = r.get("against_fixed_within_tolerance")
        if loose:
            print(f"  B={r['budget']:g} against the smallest c within {TOLERANCE:g}x B ({r['best_fixed_within_tolerance']}, "
                  f"KL {loose['fixed_end_replay_kl']:.4f}, new {loose['fixed_new_loss_end']:.3f}): to new loss "
                  f"{loose['target_new_loss']:.3f} held {cell(loose['held_steps_to_target'], '{:.0f}')} steps, "
                  f"fixed {cell(loose['fixed_steps_to_target'], '{:.0f}')}")
    print(f"  ordered with B: forgetting {result['forgetting_ordered_with_budget']}, "
          f"old-domain KL {result['old_kl_ordered_with_budget']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="the folder benchmarks/replay_once.py builds its π0s in (reused)")
    parser.add_argument("--settings", nargs="+", default=["real", "hf"], choices=["real", "hf"])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR, help=f"every run's learning rate (default {LR:g})")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--coeffs", nargs="+", type=float, default=list(COEFFS))
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, a small π0")
    parser.add_argument("--out", default=str(RESULTS / "budget.json"))
    parser.add_argument("--figure", help="a PNG of c and the replay KL against the budget along the held runs")
    args = parser.parse_args(argv)
    steps, pretrain_tokens = (args.steps, 1_500_000) if not args.quick else (20, 100_000)
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "quick": args.quick},
               "steps": steps, "lr": args.lr, "budgets": args.budgets, "coeffs": args.coeffs, "tolerance": TOLERANCE}
    for name in args.settings:
        results[name] = study(Path(args.work), name, steps, args.lr, args.budgets, args.coeffs, args.workers,
                              pretrain_tokens)
        print_study(name, results[name])
    if args.figure:
        draw(results, args.settings, Path(args.figure))
    replay_once.write_results(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
