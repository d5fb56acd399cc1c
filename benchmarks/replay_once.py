"""Replay drawn once (issue 23): how few unique samples and how few of π0's answers self-replay
needs, and what drawing the pool once buys on the clock and in memory.

    python benchmarks/replay_once.py --work runs/replay_once                 # every part, ~45 min on 2 cores
    python benchmarks/replay_once.py --work runs/replay_once --parts memory  # one part
    python benchmarks/replay_once.py --work /tmp/ro --quick                  # a smoke run, a few minutes

Every step runs through the `selfreplay` command line, as a user would run it, each command in its
own process (so each run's peak memory is its own). A finished run or pool in --work is reused,
so an interrupted benchmark continues where it stopped. Time it on a quiet machine.

Parts:
- study: on three settings, each finetuning π0 (pretrained here) on a new domain for a fixed
  budget of STEPS steps: `synthetic` (the built-in model on the synthetic English → Spanish
  corpus), `real` (the built-in model on English → Spanish fortunes, ../shared/data) and `hf`
  (the `real` π0 exported with `selfreplay export --hf`, finetuned through init=hf: on the
  Spanish text, forgetting measured on held-out English text). Runs: plain finetuning; self-KL
  replay drawn fresh (F = STEPS × replay.batch_size samples over the run); self-KL from a pool
  drawn once with π0's hidden states and replayed pass after pass (replay.reuse=0), holding
  F/4, F/16 or F/64 unique samples; and from a pool of F/16 samples with π0's top-K answers
  (K = 1, 8, 64) instead of its hidden states (exact, "full"). Each run is read at the same
  new-domain loss (the highest loss every run of the setting reaches; along each run's logged
  curve, linearly interpolated): forgetting there, and the time to get there with the pool's
  drawing counted in (the `selfreplay sample` command's wall time, shown apart as draw_s).
- speed: on the `real` setting, plain, fresh and the stored default in fp32 and in bf16 with
  torch.compile, the stored default as one command (replay.draw_once=F/4: the run draws its
  pool before its first step, `replay_pool_seconds`): new-domain tokens/s with the drawing
  counted in (tokens over training seconds plus drawing seconds) and its ratio to plain's.
- memory: a ~100M-parameter Llama-style model with random weights (hidden 768, 12 layers,
  vocabulary 32000), full finetuning through init=hf: for a few steps: plain, self-KL fresh (π0
  held as a frozen copy), and from a stored pool with hidden or top-64 targets (π0 not loaded).
  Peak memory (on CPU the process's peak RSS) against π0's weight bytes and its head's.
Prints the tables and writes benchmarks/results/replay_once.json (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FORTUNES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fortunes"

SHAPE = ["model.D=128", "model.L=4", "model.H=32", "model.T=128", "model.V=4096"]
STEPS, BATCH, REPLAY_BATCH, LOG_POINTS = 150, 16, 8, 10


def finetune_settings(steps: int) -> list[str]:
    """What every finetuning run of the study shares: `steps` steps of BATCH rows of 128 tokens,
    REPLAY_BATCH replay rows, c = 10, LOG_POINTS log points along the way."""
    every = max(5, steps // LOG_POINTS) * BATCH * 128  # a log point measures both domains: not every step
    return [f"optim.batch_size={BATCH}", "optim.lr=1e-3", "optim.warmup_steps=10", "data.val_sequences=64",
            f"stop.tokens={steps * BATCH * 128}", f"log.every_tokens={every}", "log.progress=false",
            f"replay.batch_size={REPLAY_BATCH}", "replay.coeff=10"]

DIVISORS = (4, 16, 64)  # unique samples: F / divisor
TOPK_DIVISOR = 16  # the top-K pools' unique samples: F / 16
DEFAULT_DIVISOR = 4  # the default the study chose (forgetting within 10% or 0.005 nats of fresh replay's)
TOP_K = (1, 8, 64)
PRECISIONS = {"fp32": [], "bf16+compile": ["precision=bf16", "compile=true"]}


def selfreplay(*args: str) -> float:
    """Run `selfreplay ARGS` in its own process; returns its wall seconds."""
    print("+ selfreplay", " ".join(args), flush=True)
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "selfreplay", *args], check=True)
    return time.perf_counter() - tick


# ---------------------------------------------------------------- π0 of each setting

def prepare_builtin(work: Path, setting: str, pretrain_tokens: int) -> dict:
    """Tokenizer, token files and π0 of a built-in setting; returns what its runs need."""
    root = work / setting
    root.mkdir(parents=True, exist_ok=True)
    if setting == "synthetic":
        texts = {"en": root / "text" / "en_synth.jsonl", "es": root / "text" / "es_synth.jsonl"}
        if not texts["es"].exists():
            selfreplay("synth", "--out", str(root / "text"), "--words", "600000")
    else:
        texts = split_english(root)
    if not (root / "tok").exists():
        selfreplay("tokenizer", "train", str(texts["en"]), str(texts["es"]), "--vocab-size", "4096",
                   "--domains", "en,es", "--out", str(root / "tok"))
    for domain in ("en", "es"):
        if not (root / f"{domain}.bin").exists():
            selfreplay("tokenize", str(texts[domain]), "--tokenizer", str(root / "tok"), "--domain", domain,
                       "--out", str(root / f"{domain}.bin"))
    if not (root / "pre" / "summary.json").exists():
        selfreplay("pretrain", f"out={root / 'pre'}", f"data.tokenizer={root / 'tok'}", f"data.train={root / 'en.bin'}",
                   *SHAPE, "optim.lr=3e-3", "optim.batch_size=32", "optim.schedule=cosine", "data.val_sequences=64",
                   f"stop.tokens={pretrain_tokens}", "log.every_tokens=500000", "log.progress=false")
    return {"source": [str(root / "pre"), "--domain", "en"],
            "init": [f"init={root / 'pre'}", f"data.train={root / 'es.bin'}"]}


def split_english(root: Path, held_out: float = 0.1) -> dict[str, Path]:
    """The fortunes: the first 90% of the English documents to pretrain on, the last 10% held out
    (the HF setting's old-domain text), and the Spanish ones."""
    lines = [line for line in (FORTUNES / "en.jsonl").read_text().splitlines() if line.strip()]
    cut = int(len(lines) * (1 - held_out))
    texts = {"en": root / "en_train.jsonl", "en_heldout": root / "en_heldout.jsonl", "es": FORTUNES / "es.jsonl"}
    if not texts["en_heldout"].exists():
        texts["en"].write_text("\n".join(lines[:cut]) + "\n")
        texts["en_heldout"].write_text("\n".join(lines[cut:]) + "\n")
    return texts


def prepare_hf(work: Path) -> dict:
    """The `real` π0 as a transformers directory, finetuned on Spanish text, measured on held-out English."""
    real, root = work / "real", work / "hf"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model").exists():
        selfreplay("export", str(real / "pre"), "--hf", str(root / "model"))
    model = f"init=hf:{root / 'model'}"
    return {"source": [model, "--length", "128"],
            "init": [model, f"data.train={FORTUNES / 'es.jsonl'}", f"data.old_text={real / 'en_heldout.jsonl'}",
                     "model.T=128", "replay.length=128"]}


# ---------------------------------------------------------------- runs

def draw_pool(root: Path, setting: dict, name: str, count: int, targets: str) -> tuple[Path, float]:
    """A pool of `count` samples with π0's `targets` (seed 1: every pool of a setting starts with
    the same samples), and the seconds `selfreplay sample` took to draw and write it."""
    pool, timing = root / "pools" / name, root / "pools" / f"{name}.seconds"
    if not timing.exists():
        seconds = selfreplay("sample", *setting["source"], "-n", str(count), "--out", str(pool),
                             "--targets", targets, "--seed", "1")
        timing.write_text(f"{seconds}\n")
    return pool, float(timing.read_text())


def finetune(root: Path, setting: dict, name: str, settings: list[str], draw_s: float = 0.0) -> dict:
    """One finetuning run (reused when finished): its summary, curve and the pool's draw seconds."""
    out = root / name
    if not (out / "summary.json").exists():
        selfreplay("finetune", f"out={out}", *setting["init"], *finetune_settings(setting["steps"]), *settings)
    summary = json.loads((out / "summary.json").read_text())
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    draw_s += summary.get("replay_pool_seconds") or 0.0  # a run that drew its own pool (replay.draw_once)
    return {"settings": settings, "summary": summary, "curve": curve, "draw_s": draw_s}


def study_runs(root: Path, setting: dict, steps: int, top_k: tuple[int, ...] = TOP_K) -> dict[str, dict]:
    """Plain, fresh, stored F/4, F/16, F/64 (hidden) and stored F/16 with top-K targets."""
    fresh_count = steps * REPLAY_BATCH
    runs = {"plain": finetune(root, setting, "plain", ["replay.method=none"]),
            "fresh": finetune(root, setting, "fresh", ["replay.method=kl"])}
    kinds = [(f"hidden_F{d}", max(1, math.ceil(fresh_count / d)), "hidden") for d in DIVISORS]
    kinds += [(f"top{k}_F{TOPK_DIVISOR}", math.ceil(fresh_count / TOPK_DIVISOR), f"topk:{k}") for k in top_k]
    for name, count, targets in kinds:
        pool, draw_s = draw_pool(root, setting, name, count, targets)
        runs[name] = finetune(root, setting, name, ["replay.method=kl", f"replay.pool={pool}", "replay.reuse=0"],
                              draw_s)
    return runs


# ---------------------------------------------------------------- reading the curves

def at_new_loss(curve: list[dict], target: float, key: str) -> float | None:
    """`key` (old_loss, train_seconds, tokens) where the run's new-domain loss first reaches
    `target`, linearly interpolated between the two log points around it; None if it never does."""
    for before, after in zip(curve, curve[1:]):
        if after["new_loss"] <= target:
            if before["new_loss"] <= target:
                return before[key]
            share = (before["new_loss"] - target) / (before["new_loss"] - after["new_loss"])
            return before[key] + share * (after[key] - before[key])
    return None


def common_target(runs: dict[str, dict]) -> float:
    """The highest new-domain loss that every run reaches: the loss all are compared at."""
    return max(min(p["new_loss"] for p in run["curve"]) for run in runs.values())


def row(run: dict, target: float, plain_rate: float | None = None) -> dict:
    """One run's line: forgetting and time at the target (the pool's drawing counted in), tokens/s."""
    s, curve = run["summary"], run["curve"]
    seconds = at_new_loss(curve, target, "train_seconds")
    rate = s["tokens"] / (s["train_seconds"] + run["draw_s"])
    line = {"forgetting_at_target": at_new_loss(curve, target, "old_loss") - curve[0]["old_loss"],
            "time_to_target_s": seconds + run["draw_s"] if seconds is not None else None, "draw_s": run["draw_s"],
            "forgetting_end": s["forgetting"], "new_loss_end": s["new_loss"], "old_kl_end": s.get("old_kl"),
            "tokens_per_s": rate, "train_tokens_per_s": s["tokens_per_second"], "peak_memory_mib": s["peak_memory_mib"]}
    if plain_rate:
        line["vs_plain_tokens_per_s"] = rate / plain_rate
    return line


def table(runs: dict[str, dict]) -> dict:
    target = common_target(runs)
    plain_rate = row(runs["plain"], target)["tokens_per_s"]
    return {"target_new_loss": target, "rows": {name: row(run, target, plain_rate) for name, run in runs.items()}}


# ---------------------------------------------------------------- parts

def study(work: Path, steps: int, pretrain_tokens: int, settings: list[str], top_k: tuple[int, ...]) -> dict:
    results = {}
    for name in settings:
        if name == "hf":
            prepare_builtin(work, "real", pretrain_tokens)
            setting = prepare_hf(work)
        else:
            setting = prepare_builtin(work, name, pretrain_tokens)
        results[name] = table(study_runs(work / name, {**setting, "steps": steps}, steps, top_k))
        print_table(f"study: {name}", results[name])
    return results


def matmul_gflops(dtype, n: int = 1024, repeats: int = 10) -> float:
    """This machine's n×n matrix-multiply rate in `dtype` (a CPU without bf16 units emulates bf16)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    tick = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - tick) / 1e9


def speed(work: Path, steps: int, pretrain_tokens: int, precisions: list[str]) -> dict:
    """Plain, fresh and the stored default on `real`, in each precision, each run timed anew."""
    import torch

    setting = {**prepare_builtin(work, "real", pretrain_tokens), "steps": steps}
    root, count = work / "real", math.ceil(steps * REPLAY_BATCH / DEFAULT_DIVISOR)
    results = {"matmul_gflops": {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}}
    print(f"matrix multiply: fp32 {results['matmul_gflops']['fp32']:.1f} GFLOP/s, "
          f"bf16 {results['matmul_gflops']['bf16']:.1f} GFLOP/s")
    for precision in precisions:
        extra = PRECISIONS[precision]
        suffix = f"_speed_{precision}"  # runs of their own, timed on a quiet machine, apart from the study's
        # the one command a user runs: the run draws its pool before its first step (replay.draw_once)
        runs = {"plain": finetune(root, setting, "plain" + suffix, ["replay.method=none", *extra]),
                "fresh": finetune(root, setting, "fresh" + suffix, ["replay.method=kl", *extra]),
                f"draw_once_F{DEFAULT_DIVISOR}": finetune(root, setting, f"draw_once_F{DEFAULT_DIVISOR}" + suffix,
                                                          ["replay.method=kl", f"replay.draw_once={count}", *extra])}
        results[precision] = table(runs)
        print_table(f"speed: real, {precision}", results[precision])
    return results


LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)


def memory(work: Path, quick: bool) -> dict:
    """Peak memory of full finetuning a ~100M-parameter random Llama: plain, fresh KL, stored pools."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = work / "memory"
    model_dir = root / "model"
    shape = {**LLAMA_100M, **(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=512) if quick else {})}
    if not (model_dir / "config.json").exists():
        model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2))
        model.save_pretrained(model_dir)
        _byte_tokenizer(model_dir, shape["vocab_size"])
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(model_dir).parameters())
    head = shape["vocab_size"] * shape["hidden_size"]
    setting = {"source": [f"init=hf:{model_dir}", "--length", "128"],
               "init": [f"init=hf:{model_dir}", f"data.train={FORTUNES / 'es.jsonl'}",
                        f"data.old_text={FORTUNES / 'en.jsonl'}", "model.T=128", "replay.length=128"]}
    common = ["optim.batch_size=8", "replay.batch_size=4", "replay.decode_batch=16", "replay.buffer=1",
              "stop.tokens=3072", "log.every_tokens=1024", "data.val_sequences=8", "log.progress=false"]
    runs = {}
    for name, targets in (("plain", None), ("fresh", None), ("stored_hidden", "hidden"), ("stored_top64", "topk:64")):
        settings = ["replay.method=none"] if name == "plain" else ["replay.method=kl"]
        if targets:
            pool, _ = draw_pool(root, setting, name, 16, targets)
            settings += [f"replay.pool={pool}", "replay.reuse=0"]
        out = root / name
        if not (out / "summary.json").exists():
            selfreplay("finetune", f"out={out}", *setting["init"], *common, *settings)
        runs[name] = json.loads((out / "summary.json").read_text())["peak_memory_mib"]
    result = {"params": params, "pi0_weight_mib": params * 4 / 2**20, "pi0_head_mib": head * 4 / 2**20,
              "peak_memory_mib": runs, "fresh_minus_stored_hidden_mib": runs["fresh"] - runs["stored_hidden"],
              "fresh_minus_stored_top64_mib": runs["fresh"] - runs["stored_top64"]}
    print(f"\nmemory: {params / 1e6:.1f}M-parameter Llama, full finetuning, fp32, peak RSS (MiB): " +
          ", ".join(f"{k} {v:,.0f}" for k, v in runs.items()))
    print(f"  π0's weights {result['pi0_weight_mib']:,.0f} MiB (head {result['pi0_head_mib']:,.0f}); fresh − stored: "
          f"hidden {result['fresh_minus_stored_hidden_mib']:,.0f}, top-64 {result['fresh_minus_stored_top64_mib']:,.0f}")
    return result


def _byte_tokenizer(model_dir: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer of `vocab` ids trained on the fortunes, saved beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for name in ("en", "es")
             for line in (FORTUNES / f"{name}.jsonl").read_text().splitlines()[:3000] if line.strip()]
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(model_dir)


# ---------------------------------------------------------------- output

COLUMNS = [("forgetting_at_target", "{:.4f}"), ("time_to_target_s", "{:.1f}"), ("draw_s", "{:.1f}"),
           ("forgetting_end", "{:.4f}"), ("new_loss_end", "{:.3f}"), ("tokens_per_s", "{:,.0f}"),
           ("vs_plain_tokens_per_s", "{:.2f}"), ("peak_memory_mib", "{:,.0f}")]


def print_table(title: str, result: dict) -> None:
    print(f"\n{title}: compared at new-domain loss {result['target_new_loss']:.3f}")
    print(f"  {'run':16s}" + "".join(f"{name:>24s}" for name, _ in COLUMNS))
    for name, values in result["rows"].items():
        cells = ["-" if values.get(k) is None else form.format(values[k]) for k, form in COLUMNS]
        print(f"  {name:16s}" + "".join(f"{c:>24s}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the pretrained models, pools and runs (reused)")
    parser.add_argument("--parts", nargs="+", default=["study", "speed", "memory"], choices=["study", "speed", "memory"])
    parser.add_argument("--settings", nargs="+", default=["synthetic", "real", "hf"], choices=["synthetic", "real", "hf"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="the speed part's precisions (bf16 is worth timing only where the CPU has bf16 units)")
    parser.add_argument("--top-k", nargs="*", type=int, default=list(TOP_K), help="the K of the top-K pools studied")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short runs, a tiny memory model")
    parser.add_argument("--out", default=str(RESULTS / "replay_once.json"))
    args = parser.parse_args(argv)
    steps, pretrain_tokens = (STEPS, 1_500_000) if not args.quick else (20, 100_000)
    work = Path(args.work)
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "quick": args.quick},
               "steps": steps, "replay_batch": REPLAY_BATCH, "fresh_samples": steps * REPLAY_BATCH}
    if "study" in args.parts:
        results["study"] = study(work, steps, pretrain_tokens, args.settings, tuple(args.top_k))
    if "speed" in args.parts:
        results["speed"] = speed(work, steps, pretrain_tokens, args.precisions)
    if "memory" in args.parts:
        results["memory"] = memory(work, args.quick)
    write_results(results, Path(args.out))
    return 0


def write_results(results: dict, out: Path) -> None:
    """The benchmark's JSON, its folder made if missing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
