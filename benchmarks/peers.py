"""Side by side with what practitioners run instead: TRL and Liger-Kernel on the same model, data and clock.

    python benchmarks/peers.py                                  # all three parts, on a quiet machine
    python benchmarks/peers.py --parts kl                       # one or more of: finetune, kl_finetune, kl
    python benchmarks/peers.py --model runs/hf_real_text/hf     # an exported model already at hand
    python benchmarks/peers.py --quick                          # a smoke run on tiny sizes (--parts kl: seconds)
    python benchmarks/peers.py --parts kl --kl-rows 2048 --kl-dims 512    # fewer part-3 shapes
    python benchmarks/peers.py --parts kl_finetune --seeds 0              # part 2 at one seed

The model is a transformers directory: --model, or by default the 2.5M-parameter Llama-style
model that benchmarks/hf_real_text.py pretrains on English fortunes and exports with
`selfreplay export --hf` (built here under --work when absent). The new domain is Spanish
(../shared/data/fortunes/es.jsonl), the old one the held-out last 10% of the English file.
Everything runs in float32.

1. finetune: plain finetuning, tokens/s and peak memory. TRL's `SFTTrainer`, selfreplay's
   `SelfReplayTrainer(replay_method="none")` and `selfreplay finetune init=hf:` (the command's
   own `run_from_cli`) on the same rows (the Spanish text packed into rows of T tokens by
   selfreplay.data.text.pack_text, given to the trainers as input_ids), batch, AdamW (same lr,
   betas, eps 1e-8, weight decay 0, so the trainers' bias/norm exclusion changes nothing),
   constant learning rate and gradient clipping at 1. tokens/s is the steady rate after the
   first `skip` steps: step end to step end for the trainers (data loading included), the
   command's train_seconds between log points (its validation left out, as the trainers have
   none). Repeated in turn (sft, trainer, command, sft, ...); the median is reported. The same
   on a random-weight Llama of ~100M parameters with a 128k vocabulary (memory rows: the
   [tokens, vocabulary] logits that SFTTrainer forms whole are what selfreplay computes in blocks).
2. kl_finetune: finetuning with a KL to the base model, 3 seeds (seed and data.seed: each seed
   redraws the split, the batch order and the replay). The selfreplay runs are hf_real_text's
   settings through the command: plain (none, the scale of forgetting), self-replay KL (kl,
   c = 10; kl_c100, c = 100) and the KL on the task batch (kl_new, the anchor LLaMA-Factory
   and Unsloth ship, at c = 1 and 10); and TRL's SDFTTrainer (trl.experimental.sdft) with the base model as
   teacher, as TRL ships it otherwise (top-100 logits, generalised JSD alpha 0.5). SDFT needs
   prompts and demonstrations: each training row's first P = T/16 tokens are the prompt, its first
   P + C tokens the demonstration, and C = (T - 2P)/2 - 4 completion tokens are sampled, so the
   teacher's input (prompt, blank line, demonstration, completion) stays within T; one completion
   per prompt (num_generations=1: no group statistics enter SDFT's loss); its Trainer leaves
   norm weights out of the weight decay, the command decays every weight. Its new_loss,
   old_loss and forgetting are measured with the command's own validation sets (the same rows,
   the same ValidationSet) every as many sequences as the command's log interval, and it stops
   at the target as the command does. Its peak memory holds one model copy more than the
   command's: SDFT's teacher and the measurement's frozen π0.
   Forgetting and time are read at one new-domain loss (--target), interpolated linearly
   along each run's logged curve between the two points around its first crossing. Each peer
   method is then set against self-replay KL where every seed of the peer got to: the target,
   or the lowest loss all its seeds reached if they did not (a stronger anchor learns slower),
   self-replay at whichever of its two coefficients forgot less there.
   tokens/s: new-domain tokens per training second (SDFT: its nominal prompt + completion tokens).
3. kl: the KL term alone, forward + backward, at V x rows x D (quick: tiny sizes):
   - selfreplay: `head_kl_divergence(teacher_hidden, teacher_head, hidden, head)` (blocks of
     `head_block_rows(V)` rows: 512 up to V = 32k, 128 at 128k; `compile=True` for selfreplay_compiled);
   - liger: `LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0, weight_soft_loss=1,
     temperature=1)` (the pure-PyTorch chunked loss, chunks of 1024 rows, its default; compiled=False,
     and its default compiled=True for liger_compiled);
   - liger_triton (CUDA only): `liger_kernel.transformers.LigerFusedLinearJSD(jsd_beta=0)`, Liger's
     Triton kernel of the fused linear + JSD, the path its GPU users run (beta = 0: forward KL);
   - full_logits: `F.kl_div(log_softmax(h W^T), log_softmax(h_t W_t^T), log_target=True,
     reduction="batchmean")`, the [rows, V] logits whole.
   All three are the same number: the mean over rows of the forward KL(teacher || student) =
   sum_v p_t (log p_t - log p_s), in nats per row, at temperature 1. Liger with beta = 0 takes
   F.kl_div(student_logp, teacher_logp, log_target=True) summed over the vocabulary (forward KL,
   not reverse: beta = 1 is the reverse one), summed over the rows whose label is not
   ignore_index and divided by their count (the labels are all 0 here, so by all rows); no T^2
   factor (T = 1 anyway). Its softmax runs in the input dtype, float32 here, as selfreplay's.
   Gradients reach the student's hidden states and head only. Agreement: each method's value
   and gradients against selfreplay's (relative Frobenius error; "agrees" within 1e-4).

Measurements. Every configuration runs in its own subprocess (this script with --worker), one
after another, so no measurement inherits another's memory, compiled kernels or warm caches;
part 3 measures memory and time in two separate processes per configuration. Peak memory on
CPU: the resident set's high-water mark (VmHWM) minus the resident set at the start of what is
measured, the mark reset there through /proc/self/clear_refs (tracemalloc does not see torch's
allocator). For training, from after the imports: model, data, optimizer and steps counted, as
the operating system sees them. For the KL term, the measured call alone, after its inputs and
a warm-up call, in a process where glibc returns every freed block of 64 KiB or more to the
system (MALLOC_MMAP_THRESHOLD_), so the resident set follows what is live (by default glibc keeps
blocks up to 32 MiB, and the warm-up's kept blocks would hide the measured call's); the timing
process keeps glibc's default. Where clear_refs cannot be written: ru_maxrss minus the resident
set (memory_method says which). On CUDA: torch.cuda.max_memory_allocated minus what was allocated
at the start. On CPU each worker runs under an address-space limit (--memory-cap-gib), so a
configuration that does not fit fails with torch's allocation error, recorded in one line,
instead of waking the OOM killer on a shared machine. Any peer that cannot run is recorded
with its one-line error and the rest goes on. Logs of every worker: --work/logs/.

Prints a table per part and writes benchmarks/results/peers.json (--quick: peers_quick.json).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path[:0] = [str(REPO), str(HERE)]  # selfreplay from this checkout; hf_real_text beside this script
import hf_real_text  # its data, English split, pretraining and export
from selfreplay.experiments.measures import at_new_loss

DATA = hf_real_text.DATA
NEW_TEXT = DATA / "es.jsonl"
PARTS = ("finetune", "kl_finetune", "kl")
KL_METHODS = ("selfreplay", "selfreplay_compiled", "liger", "liger_compiled", "liger_triton", "full_logits")
CUDA_ONLY = ("liger_triton",)  # Triton kernels: part 3 runs them by default on CUDA only
AGREE_TOLERANCE = 1e-4
LOGIT_SCALE = 2.0  # standard deviation of the random logits in part 3 (peaked, as a trained model's)

# part 1: AdamW and schedule shared by every tool
PLAIN_OPTIM = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 1.0}
# part 2: hf_real_text's finetuning settings (its FINETUNE list), the same for SDFT's Trainer
KL_OPTIM = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.02, "warmup_steps": 10, "grad_clip": 1.0}
KL_RUNS = [("none", ["replay.method=none"]), ("kl", ["replay.method=kl", "replay.coeff=10"]),
           ("kl_c100", ["replay.method=kl", "replay.coeff=100"]),
           ("kl_new_c1", ["replay.method=kl_new", "replay.coeff=1"]),
           ("kl_new_c10", ["replay.method=kl_new", "replay.coeff=10"])]
SELF_REPLAY_RUNS = ("kl", "kl_c100")  # self-replay KL at the two coefficients of the grid
PEER_RUNS = ("kl_new_c1", "kl_new_c10", "trl_sdft")

SIZES = {
    "full": {
        "finetune": {"T": 128, "batch": 32, "skip": 5, "steps": 45, "repeats": 3},
        "finetune_big": {"T": 128, "batch": 8, "skip": 2, "steps": 7, "repeats": 1},
        # ~100M parameters, 128k vocabulary, head tied to the embedding (as Llama 3.2's)
        "big_model": {"vocab_size": 128256, "hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 4,
                      "num_attention_heads": 10, "num_key_value_heads": 2, "tie_word_embeddings": True},
        "kl_finetune": {"T": 128, "seeds": [0, 1, 2], "target": 3.9, "settings": hf_real_text.FINETUNE,
                        "every_tokens": 32768, "tokens": 3_000_000, "wall_seconds": 600},
        "kl": {"V": [4096, 32768, 131072], "rows": [2048, 8192], "D": [512, 2048], "warmup": 1, "repeats": 2,
               "methods": [m for m in KL_METHODS if m not in CUDA_ONLY]},
        "timeout": 3600,
    },
    "quick": {
        "finetune": {"T": 32, "batch": 4, "skip": 1, "steps": 3, "repeats": 1},
        "finetune_big": {"T": 32, "batch": 2, "skip": 1, "steps": 2, "repeats": 1},
        "big_model": {"vocab_size": 4096, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
        "kl_finetune": {"T": 32, "seeds": [0], "target": None,
                        "settings": ["model.T=32", "optim.batch_size=4", "data.val_sequences=8",
                                     "log.progress=false", "replay.length=32", "replay.batch_size=4",
                                     "replay.decode_batch=8", "log.checkpoint_seconds=0"],
                        "every_tokens": 256, "tokens": 1024, "wall_seconds": 60},
        "kl": {"V": [512], "rows": [256], "D": [32], "warmup": 1, "repeats": 1,
               "methods": ["selfreplay", "liger", "full_logits"]},
        "timeout": 300,
    },
}


def one_line_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------- memory, inside a worker

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class MemoryProbe:
    """The peak memory (MiB) of what runs between `start()` and `peak_mib()` (module docstring)."""

    def __init__(self, device: str):
        self.device, self.method, self.base = device, None, 0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method, self.base = "cuda_max_allocated", torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.method = "vmhwm_reset"
        except OSError:
            self.method = "ru_maxrss"
        self.base = _status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.method == "cuda_max_allocated":
            import torch

            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        peak = _status_kib("VmHWM") * 1024 if self.method == "vmhwm_reset" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return (peak - self.base) / 2**20


# ---------------------------------------------------------------- workers: one measurement per process

def step_clock():
    """A TrainerCallback that notes the time at every step's end."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def steady_rate(ends: list[float], skip: int, tokens_per_step: int) -> float:
    """Tokens per second over the steps after the first `skip` (from the step ends' times)."""
    return (len(ends) - skip) * tokens_per_step / (ends[-1] - ends[skip - 1])


def trainer_arguments(spec: dict, out: str) -> dict:
    """The TrainingArguments every Trainer here shares: batch, length, steps, AdamW, schedule, clipping,
    float32 and no activation checkpointing (TRL's configs default to bf16 and to recomputing
    activations in the backward pass: both are turned off, as selfreplay runs)."""
    o = spec["optim"]
    return {"output_dir": out, "bf16": False, "fp16": False, "activation_checkpointing": False,
            "per_device_train_batch_size": spec["batch"], "max_length": spec["T"],
            "max_steps": spec["steps"], "learning_rate": o["lr"], "adam_beta1": o["beta1"], "adam_beta2": o["beta2"],
            "adam_epsilon": 1e-8, "weight_decay": o["weight_decay"], "optim": "adamw_torch",
            "lr_scheduler_type": "constant_with_warmup", "warmup_steps": o["warmup_steps"],
            "max_grad_norm": o["grad_clip"], "logging_steps": spec["steps"], "save_strategy": "no", "report_to": [],
            "seed": spec["seed"], "use_cpu": spec["device"] == "cpu", "disable_tqdm": True,
            "dataloader_num_workers": 0}


def trainer_worker(spec: dict, probe: MemoryProbe) -> dict:
    """Part 1 through a Trainer: SFTTrainer (spec["tool"] == "sft") or SelfReplayTrainer."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfreplay.data.text import pack_text

    if spec["tool"] == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer
        extra = {}
    else:
        from selfreplay.hf.trainer import SelfReplayConfig as Config
        from selfreplay.hf.trainer import SelfReplayTrainer as Trainer
        extra = {"replay_method": "none"}
    probe.start()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = pack_text(str(NEW_TEXT), tokenizer, spec["T"])
    dataset = Dataset.from_list([{"input_ids": row["input_ids"]} for row in rows])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    clock = step_clock()
    args = Config(**trainer_arguments(spec, spec["run_dir"]), **extra)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    return {"tokens_per_second": steady_rate(clock.ends, spec["skip"], spec["batch"] * spec["T"]),
            "peak_mib": probe.peak_mib(), "memory_method": probe.method, "steps": len(clock.ends),
            "threads": torch.get_num_threads()}


CURVE_KEYS = ("step", "tokens", "train_seconds", "train_loss", "new_loss", "old_loss", "old_kl", "forgetting")
SUMMARY_KEYS = ("steps", "tokens", "train_seconds", "tokens_per_second", "stop_reason", "new_loss", "forgetting",
                "old_kl", "time_to_target_seconds", "params")


def cli_worker(spec: dict, probe: MemoryProbe) -> dict:
    """`selfreplay finetune OVERRIDES` as the command runs it (run_from_cli), with its logged curve."""
    import torch

    from selfreplay.rundir import METRICS_NAME, SUMMARY_NAME
    from selfreplay.training.loop import run_from_cli

    probe.start()
    run_from_cli("finetune", None, spec["overrides"])
    out = Path(spec["run_dir"])
    lines = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines() if line.strip()]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    result = {"peak_mib": probe.peak_mib(), "memory_method": probe.method, "threads": torch.get_num_threads(),
              "curve": [{k: line.get(k) for k in CURVE_KEYS} for line in lines],
              "summary": {k: summary.get(k) for k in SUMMARY_KEYS}}
    if spec.get("skip"):  # part 1: the steady rate after the first log point, at step `skip`
        start = next(line for line in lines if line["step"] >= spec["skip"])
        end = lines[-1]
        result["tokens_per_second"] = (end["tokens"] - start["tokens"]) / (end["train_seconds"] - start["train_seconds"])
        result["steps"] = end["step"]
    return result


def sdft_lengths(T: int) -> tuple[int, int]:
    """(prompt, completion) tokens of SDFT's rows: the teacher's prompt + demonstration + completion fit in T."""
    prompt = max(1, T // 16)
    return prompt, (T - 2 * prompt) // 2 - 4  # 4: the template's blank line, and text re-encoded a little longer


def demonstrations(rows, tokenizer, T: int) -> list[dict]:
    """SDFT's prompt/demonstration rows from training rows [N, T] (module docstring, part 2)."""
    prompt, completion = sdft_lengths(T)
    return [{"prompt": tokenizer.decode(row[:prompt]), "privileged_context": tokenizer.decode(row[:prompt + completion])}
            for row in rows.tolist()]


def curve_tracker(sets: dict, every: int, target: float | None, wall_seconds: float):
    """A TrainerCallback measuring as the command does (its validation sets) at step 0 and every
    `every` steps, keeping train_seconds without the measurements, stopping at the target or the wall."""
    from transformers import TrainerCallback

    from selfreplay.model.hf import CausalLM

    class CurveTracker(TrainerCallback):
        def __init__(self):
            self.curve, self.train_seconds, self.mark, self.first_old = [], 0.0, 0.0, None
            self.reached = None

        def point(self, model, step: int) -> dict:
            lm = CausalLM(model)
            new, old = sets["new"].evaluate(lm), sets["old"].evaluate(lm)
            self.first_old = old["loss"] if self.first_old is None else self.first_old
            line = {"step": step, "train_seconds": self.train_seconds, "new_loss": new["loss"],
                    "old_loss": old["loss"], "old_kl": old.get("kl"), "forgetting": old["loss"] - self.first_old}
            self.curve.append(line)
            if target is not None and line["new_loss"] <= target and self.reached is None:
                self.reached = self.train_seconds
            return line

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.point(model, 0)
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.train_seconds += time.perf_counter() - self.mark
            out_of_time = self.train_seconds >= wall_seconds
            if state.global_step % every == 0 or out_of_time or state.global_step >= state.max_steps:
                self.point(model, state.global_step)
                if out_of_time or self.reached is not None:  # never unset: the step budget may have set it
                    control.should_training_stop = True
            self.mark = time.perf_counter()

    return CurveTracker()


def sdft_worker(spec: dict, probe: MemoryProbe) -> dict:
    """Part 2 through TRL's SDFTTrainer, measured with the command's validation sets."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from selfreplay.model.hf import CausalLM, frozen_reference
    from selfreplay.families import family_of
    from selfreplay.training.loop import resolve_config

    probe.start()
    config = resolve_config("finetune", None, spec["overrides"])  # the command's own split and validation rows
    family = family_of(config)
    data = family.load_data(config, "finetune")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    sets = family.validation_sets(config, "finetune", data, frozen_reference(CausalLM(model)))
    rows = demonstrations(data.train.rows(data.train.train_index), data.tokenizer, spec["T"])
    prompt, completion = sdft_lengths(spec["T"])
    batch = config.optim.batch_size
    every = max(1, round(spec["every_tokens"] / (batch * spec["T"])))  # as many sequences as the command's interval
    tracker = curve_tracker(sets, every, spec["target"], spec["wall_seconds"])
    steps = max(1, spec["tokens"] // (batch * spec["T"]))  # the command's token budget, in its steps
    shared = trainer_arguments({**spec, "batch": batch, "steps": steps}, spec["run_dir"])
    del shared["max_length"]  # SDFT's lengths are its prompt's and completion's
    args = SDFTConfig(**shared, max_prompt_length=spec["T"], max_completion_length=completion, num_generations=1,
                      teacher_model_kind="base")
    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=data.tokenizer, callbacks=[tracker])
    trainer.train()
    steps = tracker.curve[-1]["step"]
    tokens = steps * batch * (prompt + completion)
    return {"peak_mib": probe.peak_mib(), "memory_method": probe.method, "threads": torch.get_num_threads(),
            "curve": tracker.curve,
            "summary": {"steps": steps, "tokens": tokens, "train_seconds": tracker.train_seconds,
                        "tokens_per_second": tokens / tracker.train_seconds if tracker.train_seconds else None,
                        "stop_reason": "target_loss" if tracker.reached is not None else "budget_or_wall",
                        "new_loss": tracker.curve[-1]["new_loss"], "forgetting": tracker.curve[-1]["forgetting"],
                        "old_kl": tracker.curve[-1]["old_kl"], "time_to_target_seconds": tracker.reached}}


def full_logit_kl(teacher_hidden, teacher_head, hidden, head):
    """Mean over rows of KL(teacher ‖ student) (nats) with the [rows, V] logits whole."""
    import torch.nn.functional as F

    teacher_logp = F.log_softmax(teacher_hidden @ teacher_head.T, dim=-1)
    return F.kl_div(F.log_softmax(hidden @ head.T, dim=-1), teacher_logp, log_target=True, reduction="batchmean")


def kl_function(method: str):
    """(teacher_hidden [N, D], teacher_head [V, D], hidden [N, D], head [V, D]) -> the mean KL, by method."""
    import torch

    if method in ("selfreplay", "selfreplay_compiled"):
        from selfreplay.objective.losses import head_kl_divergence

        compile = method == "selfreplay_compiled"
        return lambda th, tw, h, w: head_kl_divergence(th, tw, h, w, compile=compile)
    if method in ("liger", "liger_compiled"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0,
                                       compiled=method == "liger_compiled")
        return lambda th, tw, h, w: loss(h, w, th, tw, torch.zeros(len(h), dtype=torch.long, device=h.device))
    if method == "liger_triton":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
        return lambda th, tw, h, w: loss(h, w, th, tw, None)
    if method == "full_logits":
        return full_logit_kl
    raise ValueError(f"unknown KL method {method!r}: one of {', '.join(KL_METHODS)}")


def kl_inputs(rows: int, D: int, V: int, device: str, seed: int = 0):
    """Teacher hidden [rows, D] and head [V, D], student hidden and head (these two with gradients):
    logits of standard deviation LOGIT_SCALE, the student a perturbed teacher; built in place, so
    no temporary raises the memory mark before the measurement."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    scale = LOGIT_SCALE / math.sqrt(D)
    teacher_hidden = torch.randn(rows, D, generator=g, device=device)
    teacher_head = torch.randn(V, D, generator=g, device=device).mul_(scale)
    hidden = torch.randn(rows, D, generator=g, device=device).mul_(0.5).add_(teacher_hidden)
    head = torch.randn(V, D, generator=g, device=device).mul_(0.5 * scale).add_(teacher_head)
    return teacher_hidden, teacher_head, hidden.requires_grad_(), head.requires_grad_()


def kl_worker(spec: dict, probe: MemoryProbe) -> dict:
    """Part 3: one method at one shape, measuring either its memory (spec["measure"] == "memory": the
    peak of one forward + backward, after a warm-up call: of the same shape where it compiles, else
    a small one) or its time (the median of `repeats` calls after `warmup` ones; the value and
    gradients saved for the agreement check)."""
    import gc

    import torch

    device = spec["device"]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    memory = spec["measure"] == "memory"
    warmup, calls = spec["warmup"], 1 if memory else spec["repeats"]
    kl = kl_function(spec["method"])
    if memory and "compiled" not in spec["method"]:  # its libraries' lazy buffers set up on a small call
        kl(*kl_inputs(8, spec["D"], 16, device)).backward()
        warmup = 0
    th, tw, h, w = kl_inputs(spec["rows"], spec["D"], spec["V"], device)
    times = []
    for i in range(warmup + calls):
        h.grad = w.grad = None
        gc.collect()
        if memory and i == warmup:
            probe.start()
        tick = time.perf_counter()
        value = kl(th, tw, h, w)
        value.backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - tick)
    if memory:
        return {"peak_mib": probe.peak_mib(), "memory_method": probe.method}
    if spec.get("grads"):
        torch.save({"value": value.detach().double().cpu(), "hidden": h.grad.cpu(), "head": w.grad.cpu()}, spec["grads"])
    return {"value": value.item(), "seconds": statistics.median(times), "times": times,
            "threads": torch.get_num_threads()}


WORKERS = {"trainer": trainer_worker, "cli": cli_worker, "sdft": sdft_worker, "kl": kl_worker}


def worker_main(spec: dict, result: Path) -> None:
    probe = MemoryProbe(spec.get("device", "cpu"))
    try:
        out = WORKERS[spec["kind"]](spec, probe)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a result: its one-line error
        out = {"error": one_line_error(exc)}
    result.write_text(json.dumps(out))


# ---------------------------------------------------------------- running workers, from the parent

class Context:
    """What every part needs: sizes, the working folder, the device, limits."""

    def __init__(self, quick: bool, work: Path, device: str, memory_cap_gib: float, timeout: float | None):
        self.quick, self.work, self.device = quick, work, device
        self.sizes = SIZES["quick" if quick else "full"]
        self.memory_cap = int(memory_cap_gib * 2**30)
        self.timeout = timeout or self.sizes["timeout"]
        (work / "logs").mkdir(parents=True, exist_ok=True)


def _limit_memory(cap: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_worker(ctx: Context, spec: dict, name: str, env: dict | None = None) -> dict:
    """One measurement in a process of its own (with `env` added to its environment): its result,
    or {"error": one line}."""
    log, result = ctx.work / "logs" / f"{name}.log", ctx.work / "logs" / f"{name}.json"
    result.unlink(missing_ok=True)
    limit = (lambda: _limit_memory(ctx.memory_cap)) if ctx.device == "cpu" else None
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**spec, "device": ctx.device}),
               "--result", str(result)]
    print(f"  {name} ...", end="", flush=True)
    with open(log, "w") as f:
        try:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=ctx.timeout, cwd=REPO, check=False,
                                  preexec_fn=limit, env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            print(" timed out", flush=True)
            return {"error": f"timed out after {ctx.timeout:.0f} s (log: {log})"}
    if result.is_file():
        out = json.loads(result.read_text())
        print(f" {'error: ' + out['error'] if 'error' in out else 'done'}", flush=True)
        return out
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    why = f"was killed by signal {-done.returncode}" if done.returncode < 0 else f"exited with {done.returncode}"
    error = f"the worker {why}: {' '.join((lines[-1] if lines else 'no output').split())[:250]}"
    print(f" {error}", flush=True)
    return {"error": error}


def median_of(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if "error" not in r and r.get(key) is not None]
    return statistics.median(values) if values else None


def fresh(path: Path) -> Path:
    """An empty run directory (a command run finds a finished run there and does nothing)."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- models

def tiny_model(folder: Path) -> str:
    """--quick: a random 2-layer Llama (width 32) with a byte-level BPE tokenizer (512 tokens) of the fortunes."""
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for name in ("en.jsonl", "es.jsonl"):
        with open(DATA / name) as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                        model_max_length=32)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def big_model(ctx: Context, tokenizer_from: str) -> str:
    """The memory rows' random-weight Llama (ctx.sizes["big_model"]) with the main model's tokenizer
    (its ids all fall inside the larger vocabulary)."""
    shape = ctx.sizes["big_model"]
    folder = ctx.work / f"llama_random_{shape['vocab_size']}"
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=max(128, ctx.sizes["finetune_big"]["T"]),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


def prepare_model(ctx: Context, model: str | None) -> tuple[str, str]:
    """(the model directory, the held-out old-domain text): --model, the tiny random model (--quick),
    or hf_real_text's pretrained and exported model, built under --work when absent."""
    _, held_out = hf_real_text.split_english(ctx.work)
    if model:
        return str(Path(model).resolve()), str(held_out)
    if ctx.quick:
        return tiny_model(ctx.work / "tiny"), str(held_out)
    folder = ctx.work / "pretrained"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "hf" / "config.json").is_file():
        hf_real_text.pretrain_and_export(folder)
    return str(folder / "hf"), str(held_out)


# ---------------------------------------------------------------- part 1: plain finetuning

TOOLS = ("trl_sft", "selfreplay_trainer", "selfreplay_command")


def optim_overrides(optim: dict) -> list[str]:
    return [f"optim.{key}={value}" for key, value in optim.items()]


def plain_spec(ctx: Context, tool: str, model: str, old: str, shape: dict, run_dir: Path) -> dict:
    if tool == "selfreplay_command":
        overrides = [f"out={run_dir}", f"init=hf:{model}", f"data.train={NEW_TEXT}", f"data.old_text={old}",
                     f"model.T={shape['T']}", f"optim.batch_size={shape['batch']}", *optim_overrides(PLAIN_OPTIM),
                     "replay.method=none", f"stop.tokens={shape['steps'] * shape['batch'] * shape['T']}",
                     f"log.every_tokens={shape['skip'] * shape['batch'] * shape['T']}", "data.val_sequences=8",
                     "log.progress=false", "log.checkpoint_seconds=0", "seed=0", f"device={ctx.device}"]
        return {"kind": "cli", "overrides": overrides, "run_dir": str(run_dir), "skip": shape["skip"]}
    return {"kind": "trainer", "tool": "sft" if tool == "trl_sft" else "selfreplay", "model": model,
            "run_dir": str(run_dir), "optim": PLAIN_OPTIM, "seed": 0, **shape}


def part_finetune(ctx: Context, model: str, old: str) -> dict:
    """Part 1 on the exported model and on the random 128k-vocabulary Llama."""
    rows = {}
    for label, path, shape in (("exported", model, ctx.sizes["finetune"]),
                               ("llama_random_128k" if not ctx.quick else "llama_random_4k", big_model(ctx, model),
                                ctx.sizes["finetune_big"])):
        runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
        for repeat in range(shape["repeats"]):
            for tool in TOOLS:  # in turn, so a slow spell of the machine falls on every tool
                name = f"finetune_{label}_{tool}_{repeat}"
                spec = plain_spec(ctx, tool, path, old, shape, fresh(ctx.work / "runs" / name))
                runs[tool].append(run_worker(ctx, spec, name))
        sft_rate = median_of(runs["trl_sft"], "tokens_per_second")
        tools = {}
        for tool, results in runs.items():
            rate = median_of(results, "tokens_per_second")
            errors = sorted({r["error"] for r in results if "error" in r})
            tools[tool] = {"tokens_per_second": rate, "tokens_per_second_each": [r.get("tokens_per_second") for r in results],
                           "peak_mib": median_of(results, "peak_mib"), "vs_trl_sft": rate / sft_rate if rate and sft_rate else None,
                           "memory_method": next((r["memory_method"] for r in results if "memory_method" in r), None),
                           "errors": errors}
        rows[label] = {"model": path, "shape": shape, "tools": tools}
    return {"optim": PLAIN_OPTIM, "models": rows}


def print_finetune(part: dict) -> None:
    print(f"\n{'model':20s} {'tool':20s} {'tokens/s':>9s} {'x SFT':>6s} {'peak MiB':>9s}  error")
    for label, row in part["models"].items():
        for tool, r in row["tools"].items():
            rate = f"{r['tokens_per_second']:9.0f}" if r["tokens_per_second"] else f"{'-':>9s}"
            ratio = f"{r['vs_trl_sft']:6.3f}" if r["vs_trl_sft"] else f"{'-':>6s}"
            peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9s}"
            print(f"{label:20s} {tool:20s} {rate} {ratio} {peak}  {'; '.join(r['errors'])}")


# ---------------------------------------------------------------- part 2: finetuning with a KL to the base model

def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize_runs(results: list[dict], target: float | None) -> dict:
    """A method's seeds: forgetting and time at the target, tokens/s, peak memory, errors."""
    ok = [r for r in results if "error" not in r]
    points = [at_new_loss(r["curve"], target) for r in ok] if target is not None else []
    reached = [p for p in points if p is not None]
    out = {"seeds_run": len(ok), "seeds_at_target": len(reached),
           "errors": sorted({r["error"] for r in results if "error" in r}),
           "final_new_loss": [r["summary"]["new_loss"] for r in ok],
           "final_forgetting": [r["summary"]["forgetting"] for r in ok]}
    if reached:
        out["forgetting_at_target"] = spread([p["forgetting"] for p in reached])
        out["seconds_to_target"] = spread([p["train_seconds"] for p in reached])
    rates = [r["summary"]["tokens_per_second"] for r in ok if r["summary"].get("tokens_per_second")]
    out["tokens_per_second"] = statistics.fmean(rates) if rates else None
    out["peak_mib"] = statistics.fmean([r["peak_mib"] for r in ok]) if ok else None
    return out


def kl_base_overrides(ctx: Context, model: str, old: str, seed: int, target: float | None) -> list[str]:
    k = ctx.sizes["kl_finetune"]
    return [f"init=hf:{model}", f"data.train={NEW_TEXT}", f"data.old_text={old}", *k["settings"],
            *optim_overrides(KL_OPTIM), f"seed={seed}", f"data.seed={seed}", f"device={ctx.device}",
            f"stop.tokens={k['tokens']}", f"stop.wall_seconds={k['wall_seconds']}",
            f"log.every_tokens={k['every_tokens']}", *([f"stop.target_loss={target}"] if target is not None else [])]


def part_kl_finetune(ctx: Context, model: str, old: str, target: float | None) -> dict:
    """Part 2: every method at every seed; read at one new-domain loss."""
    k = ctx.sizes["kl_finetune"]
    target = target if target is not None else k["target"]
    runs: dict[str, list[dict]] = {name: [] for name, _ in KL_RUNS} | {"trl_sdft": []}
    for seed in k["seeds"]:
        base = kl_base_overrides(ctx, model, old, seed, target)
        for name, settings in KL_RUNS:
            run_dir = fresh(ctx.work / "runs" / f"kl_finetune_{name}_{seed}")
            spec = {"kind": "cli", "overrides": [f"out={run_dir}", *base, *settings], "run_dir": str(run_dir)}
            runs[name].append(run_worker(ctx, spec, f"kl_finetune_{name}_{seed}"))
        run_dir = fresh(ctx.work / "runs" / f"kl_finetune_trl_sdft_{seed}")
        spec = {"kind": "sdft", "overrides": [f"out={run_dir}", *base, "replay.method=none"], "model": model,
                "run_dir": str(run_dir), "T": k["T"], "tokens": k["tokens"], "optim": KL_OPTIM, "seed": seed,
                "every_tokens": k["every_tokens"], "target": target, "wall_seconds": k["wall_seconds"]}
        runs["trl_sdft"].append(run_worker(ctx, spec, f"kl_finetune_trl_sdft_{seed}"))
    if target is None:  # --quick: the loss both the plain and the self-replay KL runs reached
        lows = [min(line["new_loss"] for line in r["curve"]) for name in ("none", "kl") for r in runs[name]
                if "error" not in r]
        target = max(lows) if lows else None
    methods = {name: summarize_runs(results, target) for name, results in runs.items()}
    return {"target_new_loss": target, "seeds": k["seeds"], "optim": KL_OPTIM, "methods": methods,
            "kl_against_peers": kl_against_peers(runs, target), "runs": runs}


def common_loss(results: list[dict], target: float) -> float | None:
    """Where a peer is compared: the target if every seed reached it, else the lowest new-domain
    loss every seed reached (a peer that cannot reach the target is read where it can)."""
    curves = [r["curve"] for r in results if "error" not in r]
    if not curves:
        return None
    return max(target, *(min(line["new_loss"] for line in curve) for curve in curves))


def at_loss_over_seeds(results: list[dict], loss: float) -> dict | None:
    """Forgetting and seconds at `loss` over the seeds (spread of each), None unless every seed reached it."""
    points = [at_new_loss(r["curve"], loss) for r in results if "error" not in r]
    if not points or None in points:
        return None
    return {"forgetting": spread([p["forgetting"] for p in points]),
            "seconds": spread([p["train_seconds"] for p in points])}


def kl_against_peers(runs: dict, target: float | None) -> dict:
    """Each peer method against self-replay KL at one new-domain loss (`common_loss`): self-replay
    at the coefficient of its grid that forgot least there, the margin of the mean forgettings,
    the larger of the two seed-to-seed spreads (max - min), and whether the margin exceeds it."""
    out = {}
    for name in PEER_RUNS:
        loss = common_loss(runs[name], target) if target is not None else None
        peer = at_loss_over_seeds(runs[name], loss) if loss is not None else None
        ours = {kl: at_loss_over_seeds(runs[kl], loss) for kl in SELF_REPLAY_RUNS} if peer else {}
        ours = {kl: point for kl, point in ours.items() if point is not None}
        if not ours:
            out[name] = {"compared": False, "new_loss": loss}
            continue
        best = min(ours, key=lambda kl: ours[kl]["forgetting"]["mean"])
        kl, them = ours[best]["forgetting"], peer["forgetting"]
        margin, seeds_spread = them["mean"] - kl["mean"], max(kl["max"] - kl["min"], them["max"] - them["min"])
        out[name] = {"compared": True, "new_loss": loss, "self_replay": best, "forgetting": kl["mean"],
                     "peer_forgetting": them["mean"], "seconds": ours[best]["seconds"]["mean"],
                     "peer_seconds": peer["seconds"]["mean"], "margin": margin, "spread": seeds_spread,
                     "kl_lower_beyond_spread": margin > seeds_spread,
                     "every_self_replay_run": {kl: point["forgetting"]["mean"] for kl, point in ours.items()}}
    return out


def print_kl_finetune(part: dict) -> None:
    print(f"\nat new-domain loss {part['target_new_loss']}: forgetting (mean ± std over seeds at target)")
    print(f"{'method':12s} {'at target':>9s} {'forgetting':>18s} {'seconds':>8s} {'tokens/s':>9s} {'peak MiB':>9s}  error")
    for name, m in part["methods"].items():
        f, s = m.get("forgetting_at_target"), m.get("seconds_to_target")
        forgetting = f"{f['mean']:.4f} ± {f['std']:.4f}" if f else "missed"
        seconds = f"{s['mean']:8.0f}" if s else f"{'-':>8s}"
        rate = f"{m['tokens_per_second']:9.0f}" if m["tokens_per_second"] else f"{'-':>9s}"
        peak = f"{m['peak_mib']:9.0f}" if m["peak_mib"] is not None else f"{'-':>9s}"
        print(f"{name:12s} {m['seeds_at_target']:>4d}/{m['seeds_run']:<4d} {forgetting:>18s} {seconds} {rate} {peak}  "
              f"{'; '.join(m['errors'])}")
    print("\neach peer against self-replay KL (its best coefficient there) at the loss every seed of the peer reached")
    print(f"{'peer':12s} {'new loss':>8s} {'self-replay':>11s} {'forgot':>7s} {'s':>5s} {'peer forgot':>11s} {'s':>5s} "
          f"{'margin':>7s} {'spread':>7s}  beyond")
    for name, c in part["kl_against_peers"].items():
        if not c["compared"]:
            print(f"{name:12s} not compared (a run missing)")
            continue
        print(f"{name:12s} {c['new_loss']:8.3f} {c['self_replay']:>11s} {c['forgetting']:7.4f} {c['seconds']:5.0f} "
              f"{c['peer_forgetting']:11.4f} {c['peer_seconds']:5.0f} {c['margin']:7.4f} {c['spread']:7.4f}  "
              f"{c['kl_lower_beyond_spread']}")


# ---------------------------------------------------------------- part 3: the KL term alone

def agreement(reference: Path, other: Path) -> dict:
    """Relative errors of `other`'s value and gradients against `reference`'s (saved by kl_worker)."""
    import torch

    a, b = torch.load(reference), torch.load(other)
    errors = {"value_rel": (abs(b["value"] - a["value"]) / abs(a["value"])).item()}
    for key in ("hidden", "head"):
        errors[f"grad_{key}_rel"] = (torch.linalg.vector_norm(b[key] - a[key]) / torch.linalg.vector_norm(a[key])).item()
    errors["agrees"] = max(errors.values()) <= AGREE_TOLERANCE
    return errors


# glibc returns every block of 64 KiB or more to the system when freed, so the resident set follows
# what is live (by default it keeps blocks up to 32 MiB for reuse, and a warm-up call's blocks would
# hide the measured call's); only in the memory processes, as it slows allocation
PRECISE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_kl(ctx: Context, method: str, shape: dict, grads: Path) -> dict:
    """One method at one shape: its memory in one process, then (if that ran) its time in another."""
    k = ctx.sizes["kl"]
    spec = {"kind": "kl", "method": method, **shape, "warmup": k["warmup"], "repeats": k["repeats"]}
    name = f"kl_{method}_V{shape['V']}_N{shape['rows']}_D{shape['D']}"
    memory = run_worker(ctx, {**spec, "measure": "memory"}, f"{name}_memory", env=PRECISE_MALLOC)
    if "error" in memory:
        return memory
    timed = run_worker(ctx, {**spec, "measure": "time", "grads": str(grads / f"{method}.pt")}, f"{name}_time")
    return timed if "error" in timed else {**timed, **memory}


def part_kl(ctx: Context, keep=lambda part: None) -> dict:
    """Part 3: every method at every shape; agreement against selfreplay's value and gradients.
    `keep(part so far)` after every shape, so a run cut short keeps the shapes it measured."""
    k, rows = ctx.sizes["kl"], []
    grads = ctx.work / "kl_grads"
    grads.mkdir(parents=True, exist_ok=True)
    for V in k["V"]:
        for N in k["rows"]:
            for D in k["D"]:
                shape = {"V": V, "rows": N, "D": D}
                methods = {method: measure_kl(ctx, method, shape, grads) for method in k["methods"]}
                done = [m for m in k["methods"] if "error" not in methods[m]]
                reference = "selfreplay" if "selfreplay" in done else (done[0] if done else None)
                for method in done:
                    if method != reference:
                        methods[method]["agreement"] = agreement(grads / f"{reference}.pt", grads / f"{method}.pt")
                for method in k["methods"]:
                    (grads / f"{method}.pt").unlink(missing_ok=True)
                rows.append({**shape, "agreement_reference": reference, "methods": methods})
                keep({**kl_settings(k), "shapes": rows})
    return {**kl_settings(k), "shapes": rows}


def kl_settings(k: dict) -> dict:
    return {"tolerance": AGREE_TOLERANCE, "logit_scale": LOGIT_SCALE, "warmup": k["warmup"], "repeats": k["repeats"]}


def print_kl(part: dict) -> None:
    print(f"\n{'V':>7s} {'rows':>5s} {'D':>5s} {'method':20s} {'ms':>9s} {'peak MiB':>9s} {'KL':>10s} "
          f"{'max rel err':>11s}  error")
    for row in part["shapes"]:
        for method, r in row["methods"].items():
            if "error" in r:
                print(f"{row['V']:7d} {row['rows']:5d} {row['D']:5d} {method:20s} {'-':>9s} {'-':>9s} {'-':>10s} "
                      f"{'-':>11s}  {r['error']}")
                continue
            agree = r.get("agreement")
            err = f"{max(v for key, v in agree.items() if key != 'agrees'):11.2e}" if agree else f"{'(ref)':>11s}"
            print(f"{row['V']:7d} {row['rows']:5d} {row['D']:5d} {method:20s} {1e3 * r['seconds']:9.1f} "
                  f"{r['peak_mib']:9.1f} {r['value']:10.6f} {err}")


# ---------------------------------------------------------------- the whole run

def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(ctx: Context) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), "0") if Path("/proc/meminfo").is_file() else "0"
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gib": int(memory) / 2**20, "device": ctx.device, "commit": commit,
            "memory_cap_gib": ctx.memory_cap / 2**30,
            "packages": {p: version(p) for p in ("torch", "transformers", "trl", "liger-kernel", "triton", "peft",
                                                 "accelerate", "datasets")}}


def default_memory_cap_gib() -> float:
    """80% of the machine's memory (the workers' address-space limit on CPU)."""
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def whole_numbers(parser: argparse.ArgumentParser, flag: str, given: str) -> list[int]:
    """A comma-separated list of whole numbers from the command line; a one-line usage error otherwise."""
    try:
        numbers = [int(x) for x in given.split(",") if x.strip()]
    except ValueError:
        numbers = []
    if not numbers:
        parser.error(f"{flag} takes whole numbers separated by commas, got {given!r}")
    return numbers


def kl_finetune_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace, sizes: dict) -> dict:
    """Part 2's settings, with the command line's seeds in place of the defaults."""
    return {**sizes, "seeds": whole_numbers(parser, "--seeds", args.seeds)} if args.seeds else sizes


def kl_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace, sizes: dict) -> dict:
    """Part 3's methods and shapes, with the command line's choices in place of the defaults."""
    sizes = dict(sizes)
    if args.kl_methods:
        sizes["methods"] = [m.strip() for m in args.kl_methods.split(",") if m.strip()]
    elif args.device.startswith("cuda"):
        sizes["methods"] = [*sizes["methods"], *CUDA_ONLY]
    if args.kl_repeats is not None:
        if args.kl_repeats < 1:
            parser.error(f"--kl-repeats takes a whole number of at least 1, got {args.kl_repeats}")
        sizes["repeats"] = args.kl_repeats
    for flag, key in (("kl_vocab", "V"), ("kl_rows", "rows"), ("kl_dims", "D")):
        given = getattr(args, flag)
        if given:
            sizes[key] = whole_numbers(parser, f"--{flag.replace('_', '-')}", given)
    return sizes


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds on tiny sizes")
    parser.add_argument("--out", help="the JSON written (default benchmarks/results/peers.json; --quick: peers_quick.json)")
    parser.add_argument("--work", help="folder of models, runs and logs (default runs/peers; --quick: runs/peers_quick)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--model", help="a transformers model directory (default: hf_real_text's exported model)")
    parser.add_argument("--target", type=float, help="part 2's common new-domain loss (default 3.9; --quick: automatic)")
    parser.add_argument("--seeds", help="part 2's seeds, comma-separated (default 0,1,2; --quick: 0)")
    parser.add_argument("--kl-methods", help=f"part 3's methods, comma-separated, of {', '.join(KL_METHODS)}")
    parser.add_argument("--kl-vocab", help="part 3's vocabulary sizes, comma-separated (default 4096,32768,131072)")
    parser.add_argument("--kl-rows", help="part 3's row counts, comma-separated (default 2048,8192)")
    parser.add_argument("--kl-dims", help="part 3's hidden sizes D, comma-separated (default 512,2048)")
    parser.add_argument("--kl-repeats", type=int, help="part 3's timed calls per configuration, the median reported "
                        "(default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--memory-cap-gib", type=float, default=default_memory_cap_gib(),
                        help="address-space limit of each CPU worker (default: 80%% of the machine's memory)")
    parser.add_argument("--timeout", type=float, help="seconds allowed to each worker (default 3600; --quick: 300)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker), Path(args.result))
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}")
    # the `selfreplay` command hf_real_text runs, and every worker, import this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    name = "peers_quick" if args.quick else "peers"
    work = Path(args.work or REPO / "runs" / name).resolve()
    out = Path(args.out or RESULTS / f"{name}.json")
    ctx = Context(args.quick, work, args.device, args.memory_cap_gib, args.timeout)
    ctx.sizes = {**ctx.sizes, "kl": kl_sizes(parser, args, ctx.sizes["kl"]),
                 "kl_finetune": kl_finetune_sizes(parser, args, ctx.sizes["kl_finetune"])}
    results = {"quick": args.quick, "command": " ".join(["python", *sys.argv]), "environment": environment(ctx)}
    model = old = None
    if {"finetune", "kl_finetune"} & set(parts):
        model, old = prepare_model(ctx, args.model)
        results["model"] = model
    for part in parts:
        print(f"part {part}", flush=True)
        tick = time.perf_counter()
        if part == "finetune":
            results[part] = part_finetune(ctx, model, old)
        elif part == "kl_finetune":
            results[part] = part_kl_finetune(ctx, model, old, args.target)
        else:
            results[part] = part_kl(ctx, keep=lambda so_far: write_json(out, {**results, "kl": so_far}))
        results[part]["wall_seconds"] = time.perf_counter() - tick
        write_json(out, results)  # after every part: a later failure keeps what was measured
    for part in parts:
        {"finetune": print_finetune, "kl_finetune": print_kl_finetune, "kl": print_kl}[part](results[part])
    print(f"-> {out}")


if __name__ == "__main__":
    main()
