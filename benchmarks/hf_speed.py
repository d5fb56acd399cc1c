"""Hugging Face path against the built-in engine (issue 10): the same model, both ways.

    python benchmarks/hf_speed.py                       # tiny shape, CPU
    python benchmarks/hf_speed.py --shape D=256,L=6,H=64,T=256 --device cuda --dtype bfloat16

A random built-in model is exported to a transformers directory (selfreplay.model.export,
identical logits), then measured:
- self-replay KL finetuning, new-task tokens/s (replay batch 16, buffer 8, sampling
  included, fixed-length samples as the built-in draws them): the built-in step
  (`training_loss` with `self_replay_pool`) and `SelfReplayTrainer` on the export;
- replay sampling with π0's hidden states kept, tokens/s: the built-in KV-cache sampler
  and `selfreplay.replay.hf_sampling.sample_replay`.
Steady state: the first steps (warm-up, the first draw) are timed apart. Prints a table
and writes benchmarks/results/hf_speed_<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from selfreplay.model.transformer import ModelConfig, Transformer
from selfreplay.config import ReplayConfig
from selfreplay.replay.pool import self_replay_pool
from selfreplay.replay.sampling import sample
from selfreplay.objective.methods import training_loss

RESULTS = Path(__file__).resolve().parent / "results"


def built_in_kl_step_rate(model: Transformer, batch: int, replay_batch: int, buffer: int, steps: int,
                          warmup: int, device) -> float:
    """New-task tokens/s of built-in self-replay KL steps (sampling included) after `warmup` steps."""
    reference = Transformer(model.config).to(device)
    reference.load_state_dict(model.state_dict())
    reference.eval().requires_grad_(False)
    replay = ReplayConfig(batch_size=replay_batch, buffer=buffer, decode_batch=replay_batch * buffer)
    pool = self_replay_pool(reference, 0, replay, keep_hidden=True, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    T = model.config.T
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        new = torch.randint(0, model.config.V, (batch, T), device=device)
        loss, _, _ = training_loss(model, reference, new, pool.next_batch(), "kl", 10.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch * T / (time.perf_counter() - start)


def hf_kl_step_rate(model_dir: str, batch: int, replay_batch: int, buffer: int, steps: int, warmup: int,
                    T: int, V: int, device, dtype: str | None) -> float:
    """New-task tokens/s of `SelfReplayTrainer` steps with self-replay KL, after `warmup` steps."""
    from transformers import TrainerCallback

    from selfreplay.model.hf import load_causal_lm
    from selfreplay.hf.trainer import SelfReplayConfig, SelfReplayTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter())

    model, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=device)
    rows = [{"input_ids": torch.randint(0, V, (T,)).tolist()} for _ in range(batch * (warmup + steps))]
    args = SelfReplayConfig(output_dir=tempfile.mkdtemp(), max_steps=warmup + steps, learning_rate=1e-4,
                            per_device_train_batch_size=batch, replay_batch_size=replay_batch, replay_buffer=buffer,
                            replay_length=T, max_length=T, replay_stop_at_eos=False, report_to=[],
                            save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
                            use_cpu=device.type == "cpu", bf16=dtype == "bfloat16", dataloader_num_workers=0)
    clock = StepClock()
    trainer = SelfReplayTrainer(model, args, train_dataset=rows, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    seconds = clock.times[-1] - clock.times[warmup - 1]
    return steps * batch * T / seconds


def sampling_rates(model: Transformer, model_dir: str, count: int, device, dtype: str | None) -> dict[str, float]:
    """Tokens/s of fixed-length replay sampling with hidden states kept: built-in and HF."""
    from selfreplay.model.hf import CausalLM, load_causal_lm
    from selfreplay.replay.hf_sampling import base_format, sample_replay

    T = model.config.T
    hf_model, tokenizer = load_causal_lm(model_dir, dtype=dtype, device=device)
    lm, form = CausalLM(hf_model.eval()), base_format(tokenizer, stop_at_eos=False)
    sampler = model.eval() if dtype is None else model.eval().to(getattr(torch, dtype))
    rates = {}
    for name, draw in (("built_in", lambda: sample(sampler, 0, count, T, seed=0, return_hidden=True)),
                       ("hf", lambda: sample_replay(lm, form, count, T, seed=0, batch_size=count, keep_hidden=True))):
        draw()  # warm-up
        _sync(device)
        start = time.perf_counter()
        draw()
        _sync(device)
        rates[name] = count * T / (time.perf_counter() - start)
    return rates


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_run(config: ModelConfig, folder: Path) -> Transformer:
    """A random built-in model with a small tokenizer, saved as a run directory."""
    from selfreplay.data.tokenizer import train_tokenizer

    corpus = folder / "corpus.jsonl"
    words = "the cat dog house river walks sees big small red old new el gato perro casa".split()
    corpus.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(12))}) + "\n"
                              for i in range(500)))
    tokenizer = train_tokenizer(str(corpus), vocab_size=min(config.V, 512), out_dir=folder / "run", domains=["en"])
    model = Transformer(config)
    model.reset_parameters(torch.Generator().manual_seed(0))
    model.save_pretrained(folder / "run")
    tokenizer.save(folder / "run")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="D=128,L=4,H=32,T=128,V=4096", help="built-in ModelConfig fields")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 for the HF model (CUDA); default float32")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from selfreplay.model.export import export_hf

    config = ModelConfig(**{k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(","))})
    device = torch.device(args.device)
    folder = Path(tempfile.mkdtemp())
    model = make_run(config, folder)
    model_dir = str(export_hf(folder / "run", folder / "hf"))
    results = {"shape": args.shape, "device": args.device, "dtype": args.dtype or "float32",
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "batch": args.batch, "replay_batch": 16, "buffer": 8}
    results["sampling_tokens_per_s"] = sampling_rates(model.to(device), model_dir, 64, device, args.dtype)
    model = Transformer.from_pretrained(folder / "run", device=device).train()
    results["kl_finetune_tokens_per_s"] = {
        "built_in": built_in_kl_step_rate(model, args.batch, 16, 8, args.steps, args.warmup, device),
        "hf_trainer": hf_kl_step_rate(model_dir, args.batch, 16, 8, args.steps, args.warmup, config.T, config.V,
                                      device, args.dtype),
    }
    for key in ("sampling_tokens_per_s", "kl_finetune_tokens_per_s"):
        rates = results[key]
        first, second = rates.values()
        print(f"{key:28s} " + "  ".join(f"{k} {v:9.0f}" for k, v in rates.items()) + f"  ratio {second / first:.2f}")
    out = Path(args.out) if args.out else RESULTS / f"hf_speed_{args.shape.replace(',', '_').replace('=', '')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
