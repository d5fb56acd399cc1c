"""Continual learning on algorithmic tasks (docs/method.md, "Continual toy tasks").

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

Each task is one run of the training loop (`selfreplay.training.loop.train`) in its own run directory
under OUT: task 0 pretrains (OUT/1-addition), task i finetunes the run of task i-1
(OUT/2-reversal, ...), so π0 is the model as task i starts; its old domain (old_loss, forgetting)
is task i-1. The tasks' token files (OUT/data/TASK.bin, documents "question=answer" joined by
EOS) are written once. After each task, accuracy is the exact match of the greedy answer to
held-out questions of every task. OUT/summary.json holds the accuracy matrix A (A[i][j]:
accuracy on task j after training on task i), the average final accuracy and the backward
transfer BWT = mean over j < n-1 of A[n-1][j] - A[j][j]. Running the same command again carries
on where a killed run stopped: finished task runs are kept, an unfinished one resumes or starts over.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from selfreplay.config import (
    OptimConfig,
    ReplayConfig,
    RunConfig,
    build,
    check_keys,
    check_value,
    merge,
    parse_overrides,
    read_yaml,
    to_dict,
)
from selfreplay.data.tokenizer import (
    NUM_BYTES,
    NUM_SPECIAL,
    load_tokenizer,
    train_tokenizer,
)
from selfreplay.data.tokens import read_token_meta, write_token_file
from selfreplay.errors import SelfReplayError
from selfreplay.model.transformer import ModelConfig, Transformer
from selfreplay.objective.methods import NO_REPLAY, REPLAY_METHODS, replay_method
from selfreplay.rundir import (
    CONFIG_NAME,
    RESUMABLE,
    SUMMARY_NAME,
    RunDirectory,
    changed_settings,
    notice,
    write_atomic,
)
from selfreplay.runtime import resolve_device
from selfreplay.training.loop import TrainingDiverged, train

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


WEIGHTINGS = ("equal", "age")  # tasks.replay_weighting: how task i's replay rows are shared among the earlier tasks


@dataclass
class TaskConfig:
    names: str = ",".join(TASKS)  # tasks in training order, comma-separated
    steps: int = 1000  # training steps per task
    train_examples: int = 20000  # examples generated per task
    eval_examples: int = 256  # held-out questions per task for accuracy
    val_sequences: int = 256  # sequences held out of each task's token file for the validation losses
    replay_weighting: str = "equal"  # each earlier task's share of the replay rows: equal, or age (task j of i: i - j)


@dataclass
class ContinualLogConfig:
    every_steps: int = 100  # measure and log every this many steps (each task run's log.every_tokens)
    checkpoint_every: int = 0  # each task run's log.checkpoint_every
    checkpoint_seconds: float = 300.0  # each task run's log.checkpoint_seconds
    progress: bool = True  # tqdm progress bar


@dataclass
class ContinualConfig:
    out: str | None = None  # run directory (required)
    seed: int = 0
    device: str = "cpu"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**DEFAULTS["model"]))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(**DEFAULTS["optim"]))
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # method none, ntp or kl; self replay of every earlier task
    tasks: TaskConfig = field(default_factory=TaskConfig)
    log: ContinualLogConfig = field(default_factory=ContinualLogConfig)

    @property
    def task_names(self) -> list[str]:
        return [name.strip() for name in self.tasks.names.split(",") if name.strip()]


def load_continual_config(path: str | None, overrides: list[str]) -> ContinualConfig:
    """Defaults <- YAML file <- dotted overrides, checked; an unknown key names the nearest."""
    values = merge(DEFAULTS, read_yaml(path) if path else {})
    config = build(ContinualConfig, merge(values, parse_overrides(overrides)))
    names, r, t = config.task_names, config.replay, config.tasks
    method = replay_method(r.method)
    checks = [
        (not config.out, "set out=RUN_DIR, the directory the run writes to"),
        (not names, "set tasks.names to a comma-separated list of tasks"),
        (any(n not in TASKS for n in names), f"unknown task in tasks.names={config.tasks.names!r}: "
                                             f"choose from {', '.join(TASKS)}"),
        (len(set(names)) != len(names), "tasks.names repeats a task"),
        (method is not NO_REPLAY and not method.needs_replay,
         f"replay.method={method.name} has no replay to carry earlier tasks: choose one of "
         f"{', '.join(m.name for m in REPLAY_METHODS.values() if m.needs_replay or m is NO_REPLAY)}"),
        (r.source != "self", "replay here is self-replay from the snapshot at each task's start: set replay.source=self"),
        (r.domains is not None, "replay.domains is set by continual (every earlier task): drop it"),
        (t.replay_weighting not in WEIGHTINGS, f"tasks.replay_weighting={t.replay_weighting!r}: choose "
                                               f"{' or '.join(WEIGHTINGS)}"),
        (min(t.steps, t.train_examples, t.eval_examples) < 1,
         "tasks.steps, tasks.train_examples and tasks.eval_examples must be at least 1"),
        (config.log.every_steps < 1, "log.every_steps must be at least 1"),
    ]
    for failed, message in checks:
        if failed:
            raise SelfReplayError(message)
    # the settings the task runs share, checked before anything is written
    # (the replay section checked itself when it was made)
    check_keys(config.model, "model.")
    check_keys(config.optim, "optim.")
    for key, value in (("seed", config.seed), ("data.val_sequences", t.val_sequences),
                       ("log.checkpoint_every", config.log.checkpoint_every),
                       ("log.checkpoint_seconds", config.log.checkpoint_seconds)):
        check_value(key, value)
    resolve_device(config.device)
    return config


# ---------------------------------------------------------------- data

def examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs of a task, the same for the same seed."""
    rng = random.Random(f"{task}/{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def write_task_files(names: list[str], out: Path, train_examples: int, seed: int):
    """A character-level tokenizer with one domain (task token) per task, and a token file per
    task of `train_examples` documents "question=answer"; (tokenizer, {task: token file})."""
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


# ---------------------------------------------------------------- the sequence of runs

def run_name(names: list[str], i: int) -> str:
    """The directory of task i's run under OUT: 1-addition, 2-reversal, ..."""
    return f"{i + 1}-{names[i]}"


def task_run(config: ContinualConfig, out: Path, i: int, files: dict[str, Path]) -> tuple[str, RunConfig]:
    """(mode, settings) of task i's run in OUT/<i+1>-<task>: task 0 pretrains a fresh model; task i > 0
    finetunes the run of task i-1 (π0 = the model as task i starts), its old domain task i-1 and, with
    replay, self-replay started at every earlier task's token."""
    names, t, o = config.task_names, config.tasks, config.optim
    tokens_per_step = o.batch_size * config.model.T
    settings = {
        "out": str(out / run_name(names, i)), "seed": config.seed, "device": config.device,
        "data": {"tokenizer": str(out / "data" / "tokenizer"), "train": str(files[names[i]]),
                 "val_sequences": t.val_sequences, "seed": config.seed},
        "optim": vars(o), "stop": {"tokens": t.steps * tokens_per_step},
        "log": {"every_tokens": config.log.every_steps * tokens_per_step, "checkpoint_every": config.log.checkpoint_every,
                "checkpoint_seconds": config.log.checkpoint_seconds, "progress": config.log.progress},
    }
    if i == 0:
        return "pretrain", RunConfig().updated(**settings, model=vars(config.model))
    settings["data"]["old"] = str(files[names[i - 1]])
    if replay_method(config.replay.method).needs_replay or config.replay.fraction > 0:
        settings["replay"] = {**vars(config.replay), "domains": ",".join(replay_tasks(names, i, t.replay_weighting))}
    return "finetune", RunConfig.finetune_from(out / run_name(names, i - 1), **settings)


def replay_tasks(names: list[str], i: int, weighting: str = "equal") -> list[str]:
    """The earlier tasks task i's replay samples start from, in turn (replay.domains): each once
    (equal), or task j i - j times (age), so the oldest task, which every later snapshot has
    drifted on a little more, takes the largest share of the replay rows."""
    if weighting == "age":
        return [name for j, name in enumerate(names[:i]) for _ in range(i - j)]
    return names[:i]


def open_continual_dir(out: Path, settings: dict) -> bool:
    """Make `out` ready for the continual run of `settings`; True when it already holds it finished.

    The restart rule of a run directory, one level up: the same settings carry on (each task run
    then resumes, starts over or is found finished by itself), other settings are refused naming
    the key, and a directory holding anything else is refused untouched."""
    saved = out / CONFIG_NAME
    if saved.is_file():
        try:
            before = yaml.safe_load(saved.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            before = None
        if not isinstance(before, dict):
            raise SelfReplayError(f"{out} holds a continual run whose {CONFIG_NAME} is unreadable: choose another out=")
        changed = [c for c in changed_settings(before, settings) if c[0] not in RESUMABLE]
        if changed:
            key, old, new = changed[0]
            raise SelfReplayError(f"{out} holds a continual run with {key}={old}, not {new}: run it with {key}={old}, "
                                  "or choose another out=")
        return (out / SUMMARY_NAME).is_file()
    if out.exists() and any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out.iterdir()):
        raise SelfReplayError(f"{out} is not empty and holds no continual run: choose another out=")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, lambda p: p.write_text(yaml.safe_dump(settings, sort_keys=False)))
    return False


def task_data(config: ContinualConfig, out: Path):
    """(tokenizer, {task: token file}) in OUT/data, written once: into a staging folder renamed when complete."""
    data, names, t = out / "data", config.task_names, config.tasks
    if not data.is_dir():
        staging = out / ".data.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        write_task_files(names, staging, t.train_examples, config.seed)
        staging.rename(data)
    files = {name: data / f"{name}.bin" for name in names}
    for name, path in files.items():  # said here in this command's keys, not the task runs' data.val_sequences
        count = read_token_meta(path).num_tokens // config.model.T
        if count <= t.val_sequences:
            raise SelfReplayError(f"task {name} makes {count} sequences of {config.model.T} tokens, too few for "
                                  f"tasks.val_sequences={t.val_sequences} plus training: raise tasks.train_examples "
                                  "or lower tasks.val_sequences")
    return load_tokenizer(data / "tokenizer"), files


def train_continual(config: ContinualConfig) -> dict:
    """Train the tasks in order, each a `train()` run under `out`; after each, measure accuracy on all
    of them. Returns the summary (also in OUT/summary.json). The same command resumes a killed run."""
    out, names = Path(config.out).resolve(), config.task_names
    directory = RunDirectory(out)  # for its strict-JSON summary
    if open_continual_dir(out, to_dict(replace(config, out=str(out)))):
        notice(f"{out} already holds this finished continual run: nothing to do")
        return directory.read_summary()
    tokenizer, files = task_data(config, out)
    exams = {name: make_exam(name, tokenizer, config.tasks.eval_examples, config.seed) for name in names}
    device = resolve_device(config.device)
    matrix, coeffs, seconds = [], [], 0.0
    for i, name in enumerate(names):
        mode, run_config = task_run(config, out, i, files)
        try:
            task_summary = train(run_config, mode)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"task {name} ({run_config.out}): {e}") from None
        seconds += task_summary["train_seconds"]
        coeffs.append(task_summary.get("replay_coeff_end"))
        model = Transformer.from_pretrained(run_config.out, device=device)
        matrix.append([accuracy(model, exams[n]) for n in names])
        if config.log.progress:
            print(f"after {name}: " + "  ".join(f"{n} {a:.0%}" for n, a in zip(names, matrix[-1])))
    summary = {"mode": "continual", "tasks": names, "runs": [run_name(names, i) for i in range(len(names))],
               "accuracy": matrix, "final_accuracy": matrix[-1], "average_accuracy": average_accuracy(matrix),
               "bwt": backward_transfer(matrix), "retention": retention(matrix), "method": config.replay.method,
               "coeff": config.replay.coeff, "budget": config.replay.budget, "replay_coeff_end": coeffs,
               "steps": config.tasks.steps * len(names), "train_seconds": seconds}
    directory.write_summary(summary)
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
