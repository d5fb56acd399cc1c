"""The sweep runner with 1 and with 2 workers: the same small sweep, wall time of each.

    python benchmarks/sweep_workers.py [--points 4] [--tokens 400000]

Each worker gets cores / workers threads, so both settings use every core; the question is
whether two single-threaded runs side by side finish sooner than the same runs one after
another on two threads (small models parallelise poorly inside a run, and each run starts
Python and torch). Writes benchmarks/results/sweep_workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from selfreplay.experiments.corpora import synthetic_token_files
from selfreplay.experiments.sweep import cores, run_sweep


def sweep_file(path: Path, points: int, tokens: int) -> Path:
    """Pretraining of a D=64 L=2 model over `points` seeds, each finetuned with self-replay KL."""
    model = {"model.D": 64, "model.L": 2, "model.H": 32, "model.T": 64, "model.V": "${vocab}"}
    common = {"optim.batch_size": 32, "log.every_tokens": 131072, "data.val_sequences": 64}
    path.write_text(yaml.safe_dump({"stages": [
        {"name": "pretrain", "mode": "pretrain", "grid": {"seed": list(range(points))},
         "settings": {**model, **common, "data.tokenizer": "${tokenizer}", "data.train": "${old}",
                      "stop.tokens": tokens}},
        {"name": "finetune", "mode": "finetune", "init": "pretrain",
         "settings": {**common, "data.train": "${new}", "stop.tokens": tokens // 4, "replay.method": "kl"}},
    ]}, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=4, help="pretraining points (each also finetuned)")
    parser.add_argument("--tokens", type=int, default=400_000, help="pretraining tokens per point")
    parser.add_argument("--out", default="benchmark_runs/sweep_workers")
    args = parser.parse_args()

    out = Path(args.out)
    files = synthetic_token_files(out / "corpus", num_words=300_000, vocab_size=1024)
    data = [f"old={files.old}", f"new={files.new}", f"tokenizer={files.tokenizer}"]
    path = sweep_file(out / "sweep.yaml", args.points, args.tokens)
    results = {"cores": cores(), "points": args.points, "pretrain_tokens": args.tokens, "runs": []}
    for workers in (1, 2):
        sweep_dir = out / f"workers_{workers}"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        runs = run_sweep(path, data, sweep_dir, workers=workers)
        seconds = time.perf_counter() - started
        train = sum(r.summary.get("train_seconds", 0.0) for r in runs)
        results["runs"].append({"workers": workers, "threads_per_worker": max(1, cores() // workers),
                                "wall_seconds": round(seconds, 1), "train_seconds_summed": round(train, 1),
                                "done": sum(r.status == "done" for r in runs), "load_average_before": load})
        print(f"{workers} worker(s): {seconds:.0f} s wall, {train:.0f} s of training summed over runs")
    result_path = Path(__file__).parent / "results" / "sweep_workers.json"
    result_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {result_path}")


if __name__ == "__main__":
    main()
