"""Continual learning on algorithmic tasks (REFERENCE.md, "continual toy tasks").

A small model learns tasks one after another, each marked by its own task token (a domain id of
the tokenizer, at position 0 of every training sequence as for any token file). With replay,
training on task i adds a penalty on sequences that the snapshot of the model taken when task i
starts samples from the tokens of every earlier task, so replay covers all of them.

    selfreplay continual out=runs/continual replay.method=ntp replay.coeff=10

Tasks, fixed-width digits so that every question of a task has one length:

    addition          47+85=132   two 2-digit numbers, their 3-digit sum
    reversal          58231=13285
    sorting           52813=12358
    modular_addition  47+85=35    the sum mod 97; the same questions as addition: only the task token differs

Each run writes its tasks as token files (`data/TASK.bin`, documents "question=answer" joined by
EOS), then trains; accuracy is exact match of the greedy answer to held-out questions. The run's
summary.json holds the accuracy matrix A (A[i][j]: accuracy on task j after training on task i),
the average final accuracy and the backward transfer BWT = mean over j < n-1 of A[n-1][j] - A[j][j].
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from selfreplay.config import OptimConfig, ReplayConfig, _build, merge, parse_overrides, read_yaml, to_dict
from selfreplay.errors import SelfReplayError
from selfreplay.model import ModelConfig, Transformer

MODULUS = 97


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a:02d}+{b:02d}=", f"{a + b:03d}"


def reversal(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choices("0123456789", k=5))
    return f"{digits}=", digits[::-1]


def sorting(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choices("0123456789", k=5))
    return f"{digits}=", "".join(sorted(digits))


def modular_addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a:02d}+{b:02d}=", f"{(a + b) % MODULUS:02d}"


TASKS = {"addition": addition, "reversal": reversal, "sorting": sorting, "modular_addition": modular_addition}

# the paper's toy setting: a 2-layer model; defaults of every section live here
DEFAULTS = {"model": {"D": 128, "L": 2, "H": 32, "T": 64, "V": 265},
            "optim": {"lr": 1e-3, "batch_size": 32, "warmup_steps": 50}}


@dataclass
class TaskConfig:
    names: str = ",".join(TASKS)  # tasks in training order, comma-separated
    steps: int = 1000  # training steps per task
    train_examples: int = 20000  # examples generated per task
    eval_examples: int = 256  # held-out questions per task for accuracy


@dataclass
class ContinualLogConfig:
    every_steps: int = 100  # log the training loss every this many steps
    progress: bool = True  # tqdm progress bar


@dataclass
class ContinualConfig:
    out: str | None = None  # run directory (required)
    seed: int = 0
    device: str = "cpu"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**DEFAULTS["model"]))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(**DEFAULTS["optim"]))
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # method none, ntp or kl
    tasks: TaskConfig = field(default_factory=TaskConfig)
    log: ContinualLogConfig = field(default_factory=ContinualLogConfig)

    @property
    def task_names(self) -> list[str]:
        return [name.strip() for name in self.tasks.names.split(",") if name.strip()]


def load_continual_config(path: str | None, overrides: list[str]) -> ContinualConfig:
    """Defaults <- YAML file <- dotted overrides, checked; an unknown key names the nearest."""
    values = merge(DEFAULTS, read_yaml(path) if path else {})
    config = _build(ContinualConfig, merge(values, parse_overrides(overrides)))
    names, r = config.task_names, config.replay
    checks = [
        (not config.out, "set out=RUN_DIR, the directory the run writes to"),
        (not names, "set tasks.names to a comma-separated list of tasks"),
        (any(n not in TASKS for n in names), f"unknown task in tasks.names={config.tasks.names!r}: "
                                             f"choose from {', '.join(TASKS)}"),
        (len(set(names)) != len(names), "tasks.names repeats a task"),
        (r.method not in ("none", "ntp", "kl"), f"replay.method must be none, ntp or kl here, got {r.method!r}"),
        (r.coeff < 0 or r.batch_size < 1 or r.buffer < 1, "replay.coeff >= 0, replay.batch_size and buffer >= 1"),
        (min(config.tasks.steps, config.tasks.train_examples, config.tasks.eval_examples) < 1,
         "tasks.steps, tasks.train_examples and tasks.eval_examples must be at least 1"),
        (config.optim.lr <= 0 or config.optim.batch_size < 1, "optim.lr must be > 0 and optim.batch_size >= 1"),
        (config.log.every_steps < 1, "log.every_steps must be at least 1"),
    ]
    for failed, message in checks:
        if failed:
            raise SelfReplayError(message)
    return config


# ---------------------------------------------------------------- data

def examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs of a task, the same for the same seed."""
    rng = random.Random(f"{task}/{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def write_task_files(names: list[str], out: Path, train_examples: int, seed: int):
    """A character-level tokenizer with one domain (task token) per task, and a token file per
    task of `train_examples` documents "question=answer"; (tokenizer, {task: token file})."""
    from selfreplay.tokenizer import NUM_BYTES, NUM_SPECIAL, train_tokenizer
    from selfreplay.tokens import write_token_file

    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for name in names:
        texts[name] = out / f"{name}.jsonl"
        texts[name].write_text("".join(json.dumps({"text": q + a}) + "\n" for q, a in examples(name, train_examples, seed)))
    # bytes only, no merges: every digit and sign is one token
    tokenizer = train_tokenizer([str(p) for p in texts.values()], vocab_size=NUM_SPECIAL + NUM_BYTES,
                                out_dir=out / "tokenizer", domains=names)
    files = {}
    for name in names:
        files[name] = out / f"{name}.bin"
        write_token_file(str(texts[name]), tokenizer, domain=name, out=files[name])
    return tokenizer, files


@dataclass
class Exam:
    """Held-out questions of one task: prompts [N, P] (task token, EOS, question) and answers [N, A]."""

    prompts: torch.Tensor
    answers: torch.Tensor


def make_exam(task: str, tokenizer, n: int, seed: int) -> Exam:
    pairs = examples(task, n, seed + 1_000_003)  # another stream than the training examples'
    start = [tokenizer.domain_id(task), tokenizer.eos_id]
    prompts = [start + tokenizer.encode(q) for q, _ in pairs]
    answers = [tokenizer.encode(a) for _, a in pairs]
    return Exam(torch.tensor(prompts), torch.tensor(answers))


@torch.inference_mode()
def accuracy(model: Transformer, exam: Exam) -> float:
    """Fraction of questions whose greedy answer matches exactly."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = exam.prompts.to(device)
    for _ in range(exam.answers.shape[1]):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.train(was_training)
    answered = tokens[:, exam.prompts.shape[1]:].cpu()
    return (answered == exam.answers).all(dim=1).float().mean().item()


# ---------------------------------------------------------------- the accuracy matrix

def average_accuracy(matrix: list[list[float]]) -> float:
    """Mean accuracy over all tasks after the last one was trained."""
    return sum(matrix[-1]) / len(matrix[-1])


def backward_transfer(matrix: list[list[float]]) -> float:
    """BWT: mean over earlier tasks j of A[n-1][j] - A[j][j] (negative: forgetting)."""
    n = len(matrix)
    return sum(matrix[-1][j] - matrix[j][j] for j in range(n - 1)) / (n - 1) if n > 1 else 0.0


def retention(matrix: list[list[float]]) -> list[float | None]:
    """For each earlier task, its final accuracy over the accuracy it had when its training ended."""
    n = len(matrix)
    return [matrix[-1][j] / matrix[j][j] if matrix[j][j] > 0 else None for j in range(n - 1)]


# ---------------------------------------------------------------- training

def replay_pool(config: ContinualConfig, snapshot: Transformer, earlier: list[int]):
    """Self-replay from the snapshot, its rows started at the earlier tasks' tokens in turn."""
    from selfreplay.replay import SelfReplayPool

    r = config.replay
    rows = r.buffer * r.batch_size
    first_tokens = torch.tensor(earlier).repeat(rows // len(earlier) + 1)[:rows]
    # sample() takes one first token per row; the pool passes them through as its domain id
    return SelfReplayPool(snapshot, first_tokens, r.batch_size, r.buffer, r.temperature, config.seed,
                          keep_hidden=r.method == "kl")


def train_task(model: Transformer, snapshot: Transformer, batches, replay, config: ContinualConfig,
               log, task: str) -> float:
    """Train one task for tasks.steps steps with a fresh AdamW; returns the training seconds."""
    from selfreplay.train import learning_rate, training_loss

    o, r, steps = config.optim, config.replay, config.tasks.steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    method = r.method if replay is not None else "none"
    device = next(model.parameters()).device
    seconds, loss_sum, reg_sum = 0.0, 0.0, 0.0
    for step in range(steps):
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config, steps)
        new = batches.next_batch().to(device)
        replay_batch, replay_hidden = replay.next_batch() if replay is not None else (None, None)
        loss, ntp, reg = training_loss(model, snapshot, new, replay_batch, method, r.coeff,
                                       replay_hidden=replay_hidden)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        seconds += time.perf_counter() - tick
        loss_sum, reg_sum = loss_sum + ntp.item(), reg_sum + reg.item()
        if (step + 1) % config.log.every_steps == 0 or step + 1 == steps:
            every = (step % config.log.every_steps) + 1
            log({"task": task, "step": step + 1, "train_loss": loss_sum / every,
                 "replay_loss": reg_sum / every if method != "none" else None, "train_seconds": round(seconds, 3)})
            loss_sum = reg_sum = 0.0
    return seconds


def train_continual(config: ContinualConfig) -> dict:
    """Train the tasks in order; after each, measure accuracy on all of them. Returns the summary."""
    from selfreplay.data import BatchLoader, SequenceStream, TokenSequences
    from selfreplay.runtime import resolve_device

    out, names = Path(config.out), config.task_names
    if (out / "summary.json").exists():
        raise SelfReplayError(f"{out} already holds a finished run: choose another out= or delete it")
    if out.exists() and any(out.iterdir()):
        if not (out / "config.yaml").exists():
            raise SelfReplayError(f"{out} is not empty and is not a continual run: choose another out=")
        print(f"{out} holds an unfinished run: starting it over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    device = resolve_device(config.device)
    tokenizer, files = write_task_files(names, out / "data", config.tasks.train_examples, config.seed)
    if tokenizer.vocab_size > config.model.V:
        raise SelfReplayError(f"the task tokenizer has {tokenizer.vocab_size} ids: set model.V >= {tokenizer.vocab_size}")
    exams = {name: make_exam(name, tokenizer, config.tasks.eval_examples, config.seed) for name in names}
    model = Transformer(config.model)
    model.reset_parameters(torch.Generator().manual_seed(config.seed))
    model.to(device).train()

    metrics = open(out / "metrics.jsonl", "w", buffering=1)  # line-buffered: a line per log point
    log = lambda line: metrics.write(json.dumps(line) + "\n")  # noqa: E731
    matrix, seconds = [], 0.0
    for i, name in enumerate(names):
        sequences = TokenSequences(str(files[name]), config.model.T, 0, config.seed, tokenizer.fingerprint)
        batches = BatchLoader(SequenceStream(sequences, config.seed + i), config.optim.batch_size)
        snapshot = copy.deepcopy(model).eval().requires_grad_(False)  # the model as task i starts
        earlier = [tokenizer.domain_id(n) for n in names[:i]]
        replay = replay_pool(config, snapshot, earlier) if earlier and config.replay.method != "none" else None
        seconds += train_task(model, snapshot, batches, replay, config, log, name)
        matrix.append([accuracy(model, exams[n]) for n in names])
        log({"task": name, "after_task": i, "accuracy": dict(zip(names, matrix[-1]))})
        if config.log.progress:
            print(f"after {name}: " + "  ".join(f"{n} {a:.0%}" for n, a in zip(names, matrix[-1])))
    metrics.close()
    model.save_pretrained(out, to_dict(config))
    summary = {"mode": "continual", "tasks": names, "accuracy": matrix, "final_accuracy": matrix[-1],
               "average_accuracy": average_accuracy(matrix), "bwt": backward_transfer(matrix),
               "retention": retention(matrix), "method": config.replay.method, "coeff": config.replay.coeff,
               "steps": config.tasks.steps * len(names), "train_seconds": seconds}
    (out / ".summary.json.tmp").write_text(json.dumps(summary, indent=2))
    (out / ".summary.json.tmp").replace(out / "summary.json")
    return summary


def continual_cli(config_path: str | None, overrides: list[str]) -> dict:
    """`selfreplay continual`: train the tasks in sequence and print the accuracy matrix."""
    config = load_continual_config(config_path, overrides)
    summary = train_continual(config)
    names = summary["tasks"]
    print(f"continual finished -> {config.out}\naccuracy after each task (rows) on each task (columns):")
    print("  " + " ".join(f"{n[:10]:>10}" for n in ["after"] + names))
    for name, row in zip(names, summary["accuracy"]):
        print("  " + " ".join(f"{x:>10}" for x in [name[:10]] + [f"{a:.1%}" for a in row]))
    print(f"  average final accuracy {summary['average_accuracy']:.1%}, backward transfer {summary['bwt']:+.3f}")
    return summary
