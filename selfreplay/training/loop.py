"""Pretraining and finetuning: one plain loop, in named stages.

    loss = NTP(θ; x_new) + c · R        (the objective: `selfreplay.objective.methods.training_loss`)

`train` reads top to bottom: validate the settings and the data (before anything is
written), open the run directory (new, resumed or finished: `selfreplay.rundir`), `setup`
the models, data and replay, then `train_step` until a stop rule fires, with `measure` and
a log line every `log.every_tokens` and a checkpoint now and then, and `finish` with the
weights and summary.json. What depends on the model (the built-in Transformer, or a Hugging
Face causal LM with init=hf:NAME_OR_PATH) comes from its family (`selfreplay.families`); what
replay adds around a step comes from the run's `ReplayRun` (`selfreplay.training.replay_run`),
the same one the Trainer calls. Under torchrun the loop trains with PyTorch's DDP
(`selfreplay.training.processes`). A non-finite loss or gradient norm stops the run at once
(stop_reason "diverged"); Ctrl-C stops it after the current step with a checkpoint.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from selfreplay.config import (
    RunConfig,
    absolute_paths,
    build,
    finetune_base,
    follow_defaults,
    is_hf,
    merge,
    parse_overrides,
    read_init_run,
    read_yaml,
    renamed_settings,
    save_config,
    to_dict,
)
from selfreplay.data.sequences import BatchLoader, Data, SequenceStream
from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.benchmark_scores import benchmark_table
from selfreplay.evaluation.validation import Measurements, compute_multiplier
from selfreplay.families import Family, family_of
from selfreplay.families.builtin import replay_domains
from selfreplay.families.hf import fit_to_context
from selfreplay.model.transformer import CONFIG_NAME, ModelConfig
from selfreplay.objective.methods import NO_REPLAY, replay_method, training_loss
from selfreplay.objective.reference import ReferenceUse, reference_use
from selfreplay.replay.store import HEADER_NAME, read_header
from selfreplay.rundir import (
    ANSWERS_NAME,
    METRICS_NAME,
    POOL_NAME,
    FollowingDirectory,
    RunDirectory,
    notice,
)
from selfreplay.runtime import autocast, peak_memory_mib, resolve_device
from selfreplay.training.pools import sample_run_pool
from selfreplay.training.processes import Processes, start_processes
from selfreplay.training.replay_run import STATE_KEYS, ReplayRun, start_replay_run
from selfreplay.training.validate import validate


class TrainingDiverged(SelfReplayError):
    """The loss or gradient norm stopped being finite; the run's summary says where."""


# ---------------------------------------------------------------- configuration

def resolve_config(mode: str, path: str | None, overrides: list[str] | None) -> RunConfig:
    """The run's config: defaults <- (finetuning) the init run's model and data <- YAML <- overrides;
    the command line's settings are read once (an old spelling is said once)."""
    given = renamed_settings(merge(read_yaml(path) if path else {}, parse_overrides(overrides or [])))
    config = build(RunConfig, given)
    if mode == "finetune" and not is_hf(config):  # a Hugging Face model brings its own shape and data
        if not config.init:
            raise SelfReplayError("finetuning needs the pretrained run: set init=RUN_DIR")
        init = read_init_run(config.init)
        if config.model != ModelConfig() and config.model != init.model:
            raise SelfReplayError(f"model.* settings differ from the init run {config.init}: "
                                  "a finetuned model keeps its pretrained shape, drop the model.* overrides")
        config = build(RunConfig, merge(finetune_base(init), given))
    if is_hf(config) and mode == "finetune" and config.init != "hf:":
        config = fit_to_context(config, t_given="T" in (given.get("model") or {}))
    config = follow_defaults(config)
    validate(config, mode)
    return absolute_paths(config)


def learning_rate(step: int, config: RunConfig, total_steps: int | None) -> float:
    """Linear warmup over warmup_steps, then constant or cosine decay to zero at total_steps."""
    o = config.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine" and total_steps:
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return o.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return o.lr



# ---------------------------------------------------------------- the state of a run

@dataclass
class Interval:
    """Sums since the last log point (kept in checkpoints, so a resumed run logs the same line)."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    loss: float = 0.0
    replay_loss: float = 0.0
    replay_kl: float = 0.0  # replay.coeff=auto: what the budget holds (objective.methods.budgeted_divergence)
    grad_norm: float = 0.0


@dataclass
class Progress:
    """Everything a resumed run needs besides weights, optimizer state, the replay pool and the
    replay run's own state (kept beside these in progress.json: training.replay_run.STATE_KEYS)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    replay_seconds: float = 0.0
    metric_lines: int = 0
    start_metrics: dict | None = None  # the first log point's measurements
    last_line: dict | None = None  # the latest log line written
    best_loss: float | None = None
    evals_since_best: int = 0
    time_to_target_seconds: float | None = None
    time_to_target_steps: int | None = None
    stop_reason: str | None = None
    diverged: str | None = None  # what stopped being finite, and where
    loader: dict | None = None
    replay: dict | None = None  # the replay source's state, less its tensors (in state.safetensors)
    interval: Interval = field(default_factory=Interval)

    @classmethod
    def from_dict(cls, values: dict) -> "Progress":
        values = {k: v for k, v in values.items() if k not in STATE_KEYS}
        return cls(**{**values, "interval": Interval(**values["interval"])})


@dataclass
class Run:
    """What `setup` builds: the models, optimizer, batches, and the replay run with its measurements."""

    config: RunConfig
    mode: str
    family: Family  # what depends on the model: selfreplay.families
    directory: RunDirectory
    processes: Processes  # this process among those training the run (torchrun)
    device: torch.device
    tokenizer: object
    model: object  # θ: the Transformer, or a Hugging Face model as selfreplay.model.hf.CausalLM
    params: list[torch.nn.Parameter]
    trunk: object  # model.hidden: compiled, or called through DDP, or as it is
    optimizer: torch.optim.Optimizer
    loader: BatchLoader
    measurements: Measurements  # by domain: new, old, mix
    total_steps: int | None
    tokens_per_step: int
    log_every: int
    replay: ReplayRun | None = None  # finetuning: π0, the replay source, c, the measurements against π0

    @property
    def finetune(self) -> bool:
        return self.mode == "finetune"

    @property
    def reference(self):
        """π0 as the run holds it (its model, its head, or None): the replay run's."""
        return self.replay.reference if self.replay is not None else None

    @property
    def target_key(self) -> str:
        return "new_loss" if self.finetune else "old_loss"


# ---------------------------------------------------------------- setup

def load_data(config: RunConfig, mode: str) -> Data:
    """The tokenizer and the rows of each domain, checked before anything is written."""
    return family_of(config).load_data(config, mode)


def setup(config: RunConfig, mode: str, data: Data, directory: RunDirectory,
          processes: Processes = Processes()) -> Run:
    """Models, optimizer, batch loader, replay run and validation sets of a run, at step 0."""
    finetune = mode == "finetune"
    device = processes.device_of(resolve_device(config.device))
    family = family_of(config)
    use = reference_use(replay_method(config.replay.method), config.replay) if finetune else None
    model, reference, params = family.load_models(config, mode, device, load_reference=use is ReferenceUse.MODEL)
    # the training forward may be compiled, or run through DDP; evaluation and sampling run the same weights eagerly
    trunk = processes.trunk(model) if processes.many else \
        torch.compile(model.hidden, dynamic=False) if config.compile else model.hidden
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  eps=config.optim.eps, weight_decay=config.optim.weight_decay)
    loader = BatchLoader(SequenceStream(data.train, config.data.seed), config.optim.batch_size,
                         SequenceStream(data.mix, config.data.seed + 1) if data.mix else None,
                         config.data.mix_fraction)
    validation_sets = lambda pi0: family.validation_sets(config, mode, data, pi0)  # noqa: E731
    replay = start_replay_run(config, family, data, model, reference, validation_sets, device,
                              getattr(family, "pi0_fingerprint", None), main_process=processes.main) if finetune else None
    if replay is not None and config.replay.fraction > 0:
        loader.batch_size -= replay.source.batch_size  # replay rows take the place of new rows
    tokens_per_step = loader.batch_size * config.model.T
    measurements = replay.measurements if replay is not None else Measurements(validation_sets(None))
    return Run(config, mode, family, directory, processes, device, data.tokenizer, model, params, trunk, optimizer,
               loader, measurements, _step_budget(config, tokens_per_step, data.train.train_tokens), tokens_per_step,
               max(1, round(config.log.every_tokens / tokens_per_step)), replay)


def is_log_step(step: int, every: int, growth: float) -> bool:
    """Whether a log point falls after `step` steps: every `every` steps, or with `growth` > 1 at
    intervals growing geometrically from `every` (each at least one step longer than the last).
    A function of the step alone, so a resumed run measures where an uninterrupted one does."""
    if growth == 1:
        return step % every == 0
    point, interval = 0, float(every)
    while point < step:
        point += max(1, round(interval))
        interval *= growth
    return point == step


def _step_budget(config: RunConfig, tokens_per_step: int, train_tokens: int) -> int | None:
    """Steps allowed by the token, tokens-per-parameter and epoch budgets (None: no budget)."""
    s = config.stop
    budgets = [s.tokens, s.tokens_per_param * config.model.non_embedding_params if s.tokens_per_param else None,
               s.epochs * train_tokens if s.epochs else None]
    tokens = min((b for b in budgets if b is not None), default=None)
    return max(1, math.ceil(tokens / tokens_per_step)) if tokens is not None else None


# ---------------------------------------------------------------- one step

def train_step(run: Run, progress: Progress) -> None:
    """One optimizer step on a new batch (and a replay batch); a non-finite loss or gradient
    norm skips the update and marks the run diverged. Under many processes each takes its
    share of the global batch's rows, and DDP averages the gradients."""
    config, r, processes = run.config, run.config.replay, run.processes
    tick = time.perf_counter()
    lr = learning_rate(progress.step, config, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    new, new_mask = run.loader.next_batch()  # new_mask: None where every token counts (token files)
    new, new_mask = processes.share(new).to(run.device), processes.share(new_mask)
    new_mask = new_mask.to(run.device) if new_mask is not None else None
    replay, judged = None, 0.0
    if run.replay is not None:
        judged = run.replay.fidelity_seconds
        replay = processes.share(run.replay.next_replay(progress.step, run.model))
        judged = run.replay.fidelity_seconds - judged  # a measurement: not part of the step's training time
        progress.replay_seconds = run.replay.replay_seconds
    if r.fraction > 0:  # the replay rows are part of the batch, not of a term
        if new_mask is not None:  # every replay token counts
            new_mask = torch.cat([new_mask, torch.ones_like(replay.tokens, dtype=torch.bool)])
        new, replay = torch.cat([new, replay.tokens]), None
    with autocast(run.device, config.precision):
        if run.replay is not None:
            loss, ntp, reg, kl = run.replay.loss_terms(run.model, new, replay, run.trunk, config.compile, new_mask)
        else:
            loss, ntp, reg, kl = *pretraining_loss(run, new), None
        values = [ntp.detach(), reg.detach().float(), *([kl] if kl is not None else [])]
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    ntp_value, reg_value, *kl, norm_value = processes.mean(torch.stack([*values, grad_norm])).tolist()
    kl_value = kl[0] if kl else None
    if not math.isfinite(ntp_value + reg_value):
        coeff = run.replay.coeff if run.replay is not None else 0.0
        progress.diverged = f"the training loss is {ntp_value + coeff * reg_value} at step {progress.step + 1} (lr {lr:g})"
    elif not math.isfinite(norm_value):
        progress.diverged = f"the gradient norm is {norm_value} at step {progress.step + 1} (lr {lr:g})"
    else:
        if config.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(run.params, config.optim.grad_clip, grad_norm)
        run.optimizer.step()
        if run.replay is not None:
            run.replay.after_step(kl_value)  # c for the next step
    elapsed = time.perf_counter() - tick - judged
    progress.step += 1
    progress.tokens += run.tokens_per_step
    progress.train_seconds += elapsed
    i = progress.interval
    i.steps, i.seconds, i.tokens = i.steps + 1, i.seconds + elapsed, i.tokens + run.tokens_per_step
    i.loss, i.replay_loss, i.grad_norm = i.loss + ntp_value, i.replay_loss + reg_value, i.grad_norm + norm_value
    i.replay_kl += kl_value or 0.0


def pretraining_loss(run: Run, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, NTP, a zero term) of a pretraining step: the objective without replay."""
    return training_loss(run.model, None, new, None, NO_REPLAY, 0.0, run.trunk, run.config.compile)


# ---------------------------------------------------------------- measurements and log lines

def measure(run: Run, step: int) -> dict:
    """Validation losses (and KL to π0, and forgetting) on each domain, and the weights' drift when finetuning."""
    metrics = run.measurements.measure(run.model, step)
    drift = run.family.drift(run.model, run.config) if run.finetune else None
    if drift is not None:
        metrics["drift"] = drift
    return metrics


def log_point(run: Run, progress: Progress, metrics: dict) -> None:
    """Append one metrics line (the interval's means and `metrics`), then apply the stop rules
    that look at measurements: divergence, target loss, patience, capacity bound."""
    i = progress.interval
    mean = lambda total: total / i.steps if i.steps else None  # noqa: E731
    line = {"step": progress.step, "tokens": progress.tokens, "epochs": round(run.loader.primary.epochs_done, 4),
            "train_seconds": round(progress.train_seconds, 3), "replay_seconds": round(progress.replay_seconds, 3),
            "lr": learning_rate(max(0, progress.step - 1), run.config, run.total_steps),
            "train_loss": mean(i.loss), "grad_norm": mean(i.grad_norm),
            "replay_loss": mean(i.replay_loss) if run.replay is not None and run.replay.method is not NO_REPLAY else None,
            "tokens_per_second": i.tokens / i.seconds if i.seconds > 0 else None, **metrics}
    if run.replay is not None and run.replay.controller is not None:  # c now (for the next step), the interval's replay KL
        observed = line.get("new_loss", line["train_loss"]) if i.steps else None
        line.update(run.replay.at_log_point(progress.step, observed))
        line["replay_kl"] = mean(i.replay_kl)
    run.directory.append_metrics(line)
    progress.metric_lines += 1
    progress.last_line = line
    progress.interval = Interval()
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad and progress.diverged is None:
        progress.diverged = f"{bad[0]} is {metrics[bad[0]]} at step {progress.step} (lr {line['lr']:g})"
    # a stop the loop already chose (the wall-time cap) stands unless this measurement finds the target
    progress.stop_reason = "diverged" if progress.diverged else \
        _target_or_patience(run, progress, metrics) or progress.stop_reason or \
        ("capacity_bound" if run.replay is not None and run.replay.stop_requested else None)


def _target_or_patience(run: Run, progress: Progress, metrics: dict) -> str | None:
    s, value = run.config.stop, metrics.get(run.target_key)
    if value is None:
        return None
    if s.target_loss is not None and value <= s.target_loss:
        if progress.time_to_target_steps is None:
            progress.time_to_target_seconds, progress.time_to_target_steps = progress.train_seconds, progress.step
        return "target_loss"
    if progress.best_loss is None or value < progress.best_loss:
        progress.best_loss, progress.evals_since_best = value, 0
    else:
        progress.evals_since_best += 1
        if s.patience is not None and progress.evals_since_best >= s.patience:
            return "early_stopping"
    return None


# ---------------------------------------------------------------- checkpoints

def save_checkpoint_of(run: Run, progress: Progress) -> None:
    """The complete state after `progress.step`: weights, optimizer, batch stream, replay run and pool."""
    progress.loader = run.loader.state_dict()
    tensors = _optimizer_tensors(run.optimizer)
    replay_run = {}
    if run.replay is not None:
        replay_run = run.replay.state_dict()
        if run.replay.source is not None:
            state = run.replay.source.state_dict()
            for key in ("generator", "pool", "mask", "hidden"):  # a self-replay pool's tensors
                value = state.pop(key, None)
                if value is not None:
                    tensors[f"replay.{key}"] = value
            progress.replay = state
    run.directory.save_checkpoint(progress.step, run.family.weights(run.model), tensors,
                                  {**asdict(progress), **replay_run})


def resume(run: Run) -> Progress | None:
    """Load the newest checkpoint that reads back whole into `run`; None when none does."""
    for folder in run.directory.checkpoints():
        try:
            checkpoint = run.directory.read_checkpoint(folder, run.device)
            progress = Progress.from_dict(checkpoint.progress)
            run.family.load_weights(run.model, checkpoint.weights)
            _load_optimizer(run.optimizer, checkpoint.tensors)
            run.loader.load_state_dict(progress.loader)
            if run.replay is not None:
                run.replay.load_state_dict(checkpoint.progress)
                run.replay.replay_seconds = progress.replay_seconds
                if run.replay.source is not None:
                    tensors = {k.removeprefix("replay."): v for k, v in checkpoint.tensors.items() if k.startswith("replay.")}
                    run.replay.source.load_state_dict({**progress.replay, **tensors})
            run.directory.keep_metrics(progress.metric_lines)
        except Exception as e:  # any damage: a truncated file, garbage JSON, a missing tensor
            notice(f"checkpoint {folder.name} in {run.directory.path} is damaged ({type(e).__name__}: "
                   f"{' '.join(str(e).split())[:120]}): passing over it")
            continue
        notice(f"resuming {run.directory.path} from step {progress.step} ({progress.tokens:,} tokens, {folder.name})")
        return progress
    return None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = value
    if len(state) != len(state_dict["state"]) and state_dict["state"]:
        raise ValueError(f"optimizer state for {len(state)} parameters, expected {len(state_dict['state'])}")
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


class StopRequest:
    """Ctrl-C (SIGINT) while training: the current step finishes, a checkpoint is written and
    the run stops; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------- the loop

def train(config: RunConfig, mode: str) -> dict:
    """Run `mode` ('pretrain' or 'finetune') as configured; returns the summary (also in summary.json).
    Under torchrun every process runs this; the first (rank 0) writes the run directory.

    Raises TrainingDiverged (after writing the summary) when the loss or gradients stop being finite.
    """
    config = follow_defaults(config)
    validate(config, mode, processes=Processes.of_environment().world_size)
    processes = start_processes(config)
    data = load_data(config, mode)
    directory = RunDirectory(config.out) if processes.main else FollowingDirectory(config.out)
    status = processes.broadcast(directory.open(to_dict(config), may_differ=_same_device) if processes.main else None)
    if status == "finished":
        notice(f"{config.out} already holds this finished run: nothing to do")
        return _raise_if_diverged(directory.read_summary())
    run = setup(with_drawn_pool(config, mode, data, directory, processes), mode, data, directory, processes)
    progress = resume(run) if status == "resume" else None
    if processes.broadcast(progress is None):
        if status == "resume":  # every checkpoint was damaged: start over from fresh weights
            if processes.main:
                directory.start_over()
            processes.barrier()
            run = setup(with_drawn_pool(config, mode, data, directory, processes), mode, data, directory, processes)
        progress = Progress()
        if processes.main:
            save_config(config, directory.path / CONFIG_NAME)
            run.family.save_start(directory, data.tokenizer)
        directory.reset_metrics()

    wall_start = time.perf_counter()
    if run.replay is not None and run.replay.benchmark_before is None:
        run.replay.benchmarks(run.model, run.tokenizer)  # π0's lm-eval scores (eval.lm_eval_tasks)
    if progress.start_metrics is None:
        progress.start_metrics = measure(run, progress.step)
        log_point(run, progress, progress.start_metrics)
        if run.replay is not None:
            run.replay.answer_agreement(run.model)  # eval.prompts: θ's answers before its first step
    _loop(run, progress)
    return finish(run, progress, time.perf_counter() - wall_start)


def with_drawn_pool(config: RunConfig, mode: str, data: Data, directory: RunDirectory,
                    processes: Processes = Processes()) -> RunConfig:
    """`config` replaying the run's own pool pass after pass where replay.draw_once asks for one:
    drawn now into RUN_DIR/replay_pool, unless a finished one is there (a resumed run's); a drawing
    that was killed midway is drawn again. Under many processes the first draws, the rest wait."""
    r = config.replay
    if mode != "finetune" or not r.draw_once:
        return config
    out = directory.path / POOL_NAME
    if processes.main:
        if out.exists() and not (out / HEADER_NAME).is_file():
            shutil.rmtree(out)
        if not out.exists():
            header = sample_run_pool(config, None if is_hf(config) else replay_domains(config, data), out)
            notice(f"drew {header['rows']} replay samples once, into {out}, in {header['seconds']:.1f} s")
    processes.barrier()
    return replace(config, replay=replace(r, pool=str(out), reuse=0))


def _loop(run: Run, progress: Progress) -> None:
    config, s = run.config, run.config.stop
    last_checkpoint = time.monotonic()
    bar = tqdm(total=run.total_steps, initial=progress.step, unit="step",
               disable=not config.log.progress or not run.processes.main,
               desc=f"{run.mode} {run.directory.path.name}", dynamic_ncols=True)
    with StopRequest() as stop_request:
        while progress.stop_reason is None:
            if run.total_steps is not None and progress.step >= run.total_steps:
                progress.stop_reason = "budget"
                break
            if s.wall_seconds is not None and run.processes.broadcast(progress.train_seconds >= s.wall_seconds):
                progress.stop_reason = "wall_seconds"
                break
            train_step(run, progress)
            bar.update(1)
            at_end = run.total_steps is not None and progress.step >= run.total_steps
            if is_log_step(progress.step, run.log_every, config.log.growth) or at_end or progress.diverged:
                log_point(run, progress, measure(run, progress.step))
                bar.set_postfix({"loss": f"{progress.last_line['train_loss']:.3f}",
                                 run.target_key: f"{progress.last_line.get(run.target_key, float('nan')):.3f}"})
                every, seconds = config.log.checkpoint_every, config.log.checkpoint_seconds
                due = (every and (progress.metric_lines - 1) % every == 0) or \
                      (seconds and time.monotonic() - last_checkpoint >= seconds)
                if run.processes.broadcast(due) and progress.stop_reason is None and not at_end:
                    save_checkpoint_of(run, progress)
                    last_checkpoint = time.monotonic()
            if stop_request.requested and progress.stop_reason is None:
                save_checkpoint_of(run, progress)
                bar.close()
                notice(f"interrupted at step {progress.step}: checkpoint saved; run the same command to resume")
                raise KeyboardInterrupt
    bar.close()


def finish(run: Run, progress: Progress, wall_seconds: float) -> dict:
    """The final log line (if the last step was not a log point), weights and summary.json;
    checkpoints are removed once the summary is in place."""
    if progress.last_line["step"] != progress.step:
        log_point(run, progress, measure(run, progress.step))
    if progress.diverged is None and run.processes.main:
        run.family.save_final(run.model, run.tokenizer, run.config, run.directory)
    for line in run.replay.end_lines() if run.replay is not None else []:
        notice(line)
    summary = _summary(run, progress, wall_seconds)
    summary["peak_memory_mib"], summary["peak_memory_of"] = peak_memory_mib(run.device)
    if run.config.replay.draw_once:  # the drawing of the run's own pool, before its first step
        summary["replay_pool_seconds"] = read_header(Path(run.config.replay.pool))["seconds"]
    if run.replay is not None and progress.diverged is None:  # eval.prompts: θ's answers at the end, side by side
        summary.update(run.replay.answer_agreement(run.model, run.tokenizer, run.directory.path / ANSWERS_NAME))
    if run.replay is not None and run.config.eval.lm_eval_tasks and progress.diverged is None:
        before = run.replay.benchmark_before
        after = run.replay.benchmarks(run.model, run.tokenizer)
        if after is not None:
            summary["lm_eval"] = benchmark_table(before, after)
    run.directory.write_summary(summary)
    run.directory.clear_checkpoints()
    run.processes.barrier()  # every process returns once the summary is in place
    return _raise_if_diverged(summary)


def _raise_if_diverged(summary: dict) -> dict:
    if summary.get("stop_reason") == "diverged":
        raise TrainingDiverged(f"training diverged: {summary.get('diverged')}: lower optim.lr "
                               "(summary.json says stop_reason: diverged)")
    return summary


def _same_device(key: str, old, new) -> bool:
    """`device` may change on resume where it names the same device (auto and cpu on a CPU machine)."""
    try:
        return key == "device" and resolve_device(old) == resolve_device(new)
    except SelfReplayError:
        return False


def _summary(run: Run, progress: Progress, wall_seconds: float) -> dict:
    config, mode, first, last = run.config, run.mode, progress.start_metrics, progress.last_line
    params = run.family.params(run.model, config)
    summary = {"mode": mode, "steps": progress.step, "tokens": progress.tokens,
               "epochs": last.get("epochs"), "train_seconds": progress.train_seconds, "wall_seconds": wall_seconds,
               "tokens_per_second": progress.tokens / progress.train_seconds if progress.train_seconds else None,
               "replay_seconds": progress.replay_seconds,
               "stop_reason": progress.stop_reason or "budget", "diverged": progress.diverged,
               "time_to_target_seconds": progress.time_to_target_seconds,
               "time_to_target_steps": progress.time_to_target_steps,
               "params": params[0], "non_embedding_params": params[1], "processes": run.processes.world_size}
    if mode == "finetune":
        summary.update({
            "method": config.replay.method, "source": config.replay.source, "coeff": config.replay.coeff,
            "budget": config.replay.budget, "lora_rank": config.lora.rank, **run.replay.summary(),
            "old_loss_0": run.measurements.old_loss_0, "old_loss": last.get("old_loss"),
            "forgetting": last.get("forgetting", math.nan),
            "new_loss_0": first.get("new_loss"), "new_loss": last.get("new_loss"),
            "old_kl": last.get("old_kl"), "new_kl": last.get("new_kl"), "drift": last.get("drift"),
            "chat_kl": last.get("chat_kl"), "chat_loss": last.get("chat_loss"),
            "old_loss_second_half": last.get("old_loss_second_half"),
            "new_loss_second_half": last.get("new_loss_second_half"),
            "compute_multiplier": compute_multiplier(Path(config.init) / METRICS_NAME, last["old_loss"])
            if last.get("old_loss") is not None and math.isfinite(last["old_loss"]) else None,
        })
    else:
        summary.update({"old_loss": last.get("old_loss"), "mix_loss": last.get("mix_loss")})
    return summary


def run_from_cli(mode: str, config_path: str | None, overrides: list[str]) -> dict:
    config = resolve_config(mode, config_path, overrides)
    processes = Processes.of_environment()
    try:
        summary = train(config, mode)
    finally:
        processes.close()
    if not processes.main:
        return summary
    keys = ("old_loss_0", "old_loss", "forgetting", "new_loss", "old_kl", "chat_kl", "answer_agreement_0",
            "answer_agreement", "answers_identical", "replay_coeff_end", "capacity_bound",
            "capacity_bound_since", "steps", "tokens", "train_seconds", "tokens_per_second", "time_to_target_seconds",
            "stop_reason")
    print(f"{mode} finished -> {config.out}" + (f" ({summary['processes']} processes)" if summary.get("processes", 1) > 1 else ""))
    for key in keys:
        if key in summary and summary[key] is not None:
            value = summary[key]
            print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
    for task, metrics in summary.get("lm_eval", {}).items():
        for metric, score in metrics.items():
            before = "?" if score["before"] is None else f"{score['before']:.4f}"
            print(f"  {f'{task} {metric}':24s} {before} -> {score['after']:.4f}")
    return summary
