"""The CUDA paths in one run (issue 23): built-in and Hugging Face models, fp32 and bf16, eager and
compiled decoding, plain finetuning against self-KL from a fresh and from a stored pool.

    python benchmarks/gpu_check.py                          # ~100M-parameter shapes, cuda if present
    python benchmarks/gpu_check.py --tiny --device cpu      # a few thousand parameters, seconds on CPU

Measured on whatever device it runs, each path on a fresh model with random weights (π0 is the
model before its first step):
- training, new-domain tokens/s (replay rows not counted): plain finetuning; self-KL with a fresh
  pool (π0 decodes `buffer` batches at a time, the draws counted in the time); self-KL from a pool
  drawn once beforehand with π0's top-K answers (no π0 in training) and with its hidden states
  (only π0's head in training); the drawing's own seconds are recorded apart (pool_draw_s);
- decoding, sequences/s of full-length samples: the built-in KV-cache sampler eager and compiled,
  and Hugging Face decoding (`sample_replay`), with the model in float32 and in bfloat16;
- peak memory of each path (CUDA: the most allocated, reset per path; CPU: the process's peak RSS).
Every path runs inside its own try/except: one failing path records its one-line error and the
others still run. Writes JSON (default benchmarks/results/gpu_check.json) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from selfreplay.config import ModelConfig, ReplayConfig
from selfreplay.errors import one_line
from selfreplay.model.fingerprint import model_fingerprint
from selfreplay.model.hf import CausalLM, frozen_reference
from selfreplay.model.transformer import Transformer
from selfreplay.objective.methods import training_loss
from selfreplay.replay.hf_sampling import ReplayFormat, sample_replay
from selfreplay.replay.pool import ReplayPool, builtin_draw, self_replay_pool
from selfreplay.replay.hf_pool import hf_draw, hf_replay_pool
from selfreplay.replay.sampling import sample
from selfreplay.replay.store import StoredPool
from selfreplay.runtime import autocast, peak_memory_mib, resolve_device
from selfreplay.training.pools import draw_pool

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16")
TRAIN_PATHS = ("plain", "kl_fresh", "kl_stored_topk", "kl_stored_hidden")
DECODERS = {"builtin": ("eager", "compiled"), "hf": ("eager",)}  # HF decoding has no compiled step here


@dataclass
class Shapes:
    """What a run measures: the two models' shapes and the batches and steps of each path."""

    builtin: dict  # ModelConfig fields
    llama: dict  # transformers.LlamaConfig fields
    batch: int  # new-domain rows a step, each model.T tokens
    replay_batch: int  # replay rows a step
    buffer: int  # a fresh pool holds buffer × replay_batch samples, drawn together
    warmup: int  # steps (or decoding calls) run before the clock starts
    steps: int  # timed steps: a multiple of buffer, so every timed pool is drawn and used up
    decode_samples: int  # samples a decoding call draws together
    decode_calls: int  # timed decoding calls
    topk: int  # K of the stored pool's top-K targets
    coeff: float = 10.0


def shapes(tiny: bool, steps: int | None) -> Shapes:
    """~100M-parameter models (hidden 768, 12 layers, vocabulary 32000, 512 tokens), or a few thousand parameters."""
    if tiny:
        builtin = {"D": 16, "L": 1, "H": 8, "T": 16, "V": 64}
        llama = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 16}
        return Shapes(builtin, llama, batch=2, replay_batch=2, buffer=2, warmup=2, steps=steps or 4,
                      decode_samples=4, decode_calls=1, topk=8)
    builtin = {"D": 768, "L": 12, "H": 64, "T": 512, "V": 32000}
    llama = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 512}
    return Shapes(builtin, llama, batch=8, replay_batch=8, buffer=4, warmup=4, steps=steps or 8,
                  decode_samples=32, decode_calls=1, topk=64)


# ---------------------------------------------------------------- the two model families

class Family:
    """What a path needs of a model family: a fresh model (π0's weights, seed 0), its trainable
    view as the losses take it, π0 as a frozen copy, and the draw of π0's samples."""

    def __init__(self, name: str, s: Shapes, device: torch.device):
        self.name, self.s, self.device = name, s, device
        self.T = s.builtin["T"] if name == "builtin" else s.llama["max_position_embeddings"]
        self.V = s.builtin["V"] if name == "builtin" else s.llama["vocab_size"]

    def model(self):
        """(the network, its view for the losses): a Transformer twice, or a Llama and its CausalLM."""
        torch.manual_seed(0)
        if self.name == "builtin":
            net = Transformer(ModelConfig(**self.s.builtin)).to(self.device)
            return net, net
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**self.s.llama, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        net = LlamaForCausalLM(config).to(self.device)
        return net, CausalLM(net)

    def reference(self, lm):
        """π0 as a frozen copy of the model about to be trained."""
        if self.name == "hf":
            return frozen_reference(lm)
        return copy.deepcopy(lm).eval().requires_grad_(False)

    def replay(self) -> ReplayConfig:
        s = self.s
        return ReplayConfig(method="kl", coeff=s.coeff, batch_size=s.replay_batch, buffer=s.buffer,
                            decode_batch=s.replay_batch * s.buffer, length=self.T)

    def fresh_pool(self, reference) -> ReplayPool:
        if self.name == "builtin":
            return self_replay_pool(reference, 0, self.replay(), keep_hidden=True, seed=0)
        return hf_replay_pool(reference, self.form(), self.replay(), keep_hidden=True, seed=0)

    def draw(self, lm):
        if self.name == "builtin":
            return builtin_draw(lm, 0, self.replay(), keep_hidden=True)
        return hf_draw(lm, self.form(), self.replay(), keep_hidden=True)

    def form(self) -> ReplayFormat:
        """Samples from BOS that never stop early (no stop token): full-length rows, as the built-in draws."""
        return ReplayFormat(prompts=[[1]], stop=[], pad=0)  # 1: the Llama config's BOS


# ---------------------------------------------------------------- measurements

def measured(device: torch.device, fn, *args) -> dict:
    """fn(*args)'s figures with peak memory; a failure is its one-line error, and the run goes on."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 (one failing path must not cost the others their GPU time)
        return {"error": f"{type(e).__name__}: {one_line(e)}"}
    peak, what = peak_memory_mib(device)
    return {**result, "peak_mib": round(peak, 1), "peak_measures": what}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stored_pool(family: Family, lm, targets: str, rows: int, out: Path) -> tuple[StoredPool, float]:
    """A pool of `rows` samples that π0 (`lm` before training) draws once with `targets`; (pool, seconds drawing)."""
    s = family.s
    sync(family.device)
    start = time.perf_counter()
    with torch.no_grad():
        fingerprint = model_fingerprint(lm.model if family.name == "hf" else lm)
        draw_pool(out, family.draw(lm), rows, s.replay_batch * s.buffer, targets, lm.head.weight, fingerprint,
                  {"model": f"gpu_check {family.name}"}, seed=0, device=family.device)
    sync(family.device)
    return StoredPool(out, fingerprint, family.device), time.perf_counter() - start


def train_rate(family: Family, path: str, precision: str, scratch: Path) -> dict:
    """New-domain tokens/s of `path` (TRAIN_PATHS) in `precision` after s.warmup steps."""
    s, device = family.s, family.device
    net, lm = family.model()
    extra, reference, pool, method = {}, None, None, "none"
    if path == "kl_fresh":
        reference, method = family.reference(lm), "kl"
        pool = family.fresh_pool(reference)
    elif path.startswith("kl_stored"):
        targets = f"topk:{min(s.topk, family.V)}" if path == "kl_stored_topk" else "hidden"
        stored, seconds = stored_pool(family, lm, targets, s.replay_batch * (s.warmup + s.steps), scratch / path)
        extra = {"targets": targets, "pool_rows": len(stored), "pool_draw_s": round(seconds, 3)}
        # π0 is not loaded: the top-K targets need none of it, the hidden states only its head
        head = SimpleNamespace(weight=lm.head.weight.detach().clone())
        reference, method = (SimpleNamespace(head=head) if targets == "hidden" else None), "kl"
        pool = ReplayPool(None, s.replay_batch, s.replay_batch, device, seed=0, stored=stored, reuse=0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for step in range(s.warmup + s.steps):
        if step == s.warmup:
            sync(device)
            start = time.perf_counter()
        new = torch.randint(0, family.V, (s.batch, family.T), device=device)
        replay = pool.next_batch() if pool is not None else None  # drawn outside autocast, as the training loop does
        with autocast(device, precision):
            loss, _, _ = training_loss(lm, reference, new, replay, method, s.coeff)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss.detach()):
        raise RuntimeError(f"the loss is {loss.item()} after {s.warmup + s.steps} steps")
    return {"tokens_per_s": s.steps * s.batch * family.T / seconds, "seconds": round(seconds, 3), **extra}


def decode_rate(family: Family, decoder: str, precision: str) -> dict:
    """Sequences/s of full-length samples, `s.decode_samples` drawn together, the model's weights in
    `precision` (bf16: cast to bfloat16, as decoding sees no autocast); the first call untimed."""
    s, device = family.s, family.device
    net, lm = family.model()
    net.eval().requires_grad_(False)
    if precision == "bf16":
        net.to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)

    def once():
        if family.name == "builtin":
            return sample(net, 0, s.decode_samples, family.T, generator=generator, batch_size=s.decode_samples,
                          compile=decoder == "compiled")
        return sample_replay(lm, family.form(), s.decode_samples, family.T, generator=generator,
                             batch_size=s.decode_samples).tokens

    sync(device)
    start = time.perf_counter()
    once()  # compilation, cache allocation
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(s.decode_calls):
        tokens = once()
    sync(device)
    seconds = time.perf_counter() - start
    if tuple(tokens.shape) != (s.decode_samples, family.T):
        raise RuntimeError(f"decoding gave samples of shape {tuple(tokens.shape)}")
    return {"seqs_per_s": s.decode_calls * s.decode_samples / seconds, "seconds": round(seconds, 3),
            "first_call_s": round(first, 3)}


def run_all(s: Shapes, device: torch.device) -> dict[str, dict]:
    """Every measurement by key: {family}/train/{precision}/{path} and {family}/decode/{precision}/{decoder}."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("builtin", "hf"):
            family = Family(name, s, device)
            for precision in PRECISIONS:
                for path in TRAIN_PATHS:
                    key = f"{name}/train/{precision}/{path}"
                    results[key] = measured(device, train_rate, family, path, precision, Path(tmp) / name / precision)
                    report(key, results)
            for precision in PRECISIONS:
                for decoder in DECODERS[name]:
                    key = f"{name}/decode/{precision}/{decoder}"
                    results[key] = measured(device, decode_rate, family, decoder, precision)
                    report(key, results)
    return results


def parameter_counts(s: Shapes) -> dict:
    counts = {}
    for name in ("builtin", "hf"):
        with torch.device("meta"):  # the shapes alone: no memory, no initialisation
            net, _ = Family(name, s, torch.device("meta")).model()
        counts[name] = sum(p.numel() for p in net.parameters())
    return counts


# ---------------------------------------------------------------- report

def report(key: str, results: dict) -> None:
    """One line as each measurement ends (a long GPU run shows its progress)."""
    r = results[key]
    if "error" in r:
        print(f"{key:36s} ERROR {r['error']}", flush=True)
        return
    rate = f"{r['tokens_per_s']:12.0f} tok/s" if "tokens_per_s" in r else f"{r['seqs_per_s']:12.2f} seq/s"
    drawn = f"  pool drawn in {r['pool_draw_s']:.2f} s" if "pool_draw_s" in r else ""
    print(f"{key:36s} {rate}  {r['seconds']:8.2f} s  peak {r['peak_mib']:9.1f} MiB{drawn}", flush=True)


def environment(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="a few thousand parameters: seconds on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 8; --tiny 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for --tiny on CPU, else torch's own)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    # tiny operations gain nothing from threads, and on busy shared cores their hand-offs cost ~100x
    threads = args.threads or (1 if args.tiny and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    s = shapes(args.tiny, args.steps)
    if s.steps % s.buffer:
        parser.error(f"--steps {s.steps} must be a multiple of the pool's {s.buffer} steps")
    start = time.perf_counter()
    results = run_all(s, device)
    out = {"environment": environment(device), "tiny": args.tiny, "shapes": asdict(s),
           "parameters": parameter_counts(s), "measurements": results,
           "errors": sorted(key for key, r in results.items() if "error" in r),
           "wall_s": round(time.perf_counter() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(results) - len(out['errors'])}/{len(results)} paths measured in {out['wall_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
