"""Pretraining and finetuning: one plain loop, in named stages.

    loss = NTP(θ; x_new) + c · R        (the objective: `selfreplay.objective.methods.training_loss`)

`train` reads top to bottom: validate the settings and the data (before anything is
written), open the run directory (new, resumed or finished: `selfreplay.rundir`), `setup`
the models, data and replay, then `train_step` until a stop rule fires, with `measure` and
a log line every `log.every_tokens` and a checkpoint now and then, and `finish` with the
weights and summary.json. What depends on the model (the built-in Transformer, or a Hugging
Face causal LM with init=hf:NAME_OR_PATH) comes from its family (`selfreplay.training.families`).
A non-finite loss or gradient norm stops the run at once
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

from selfreplay.config import (
    RunConfig,
    follow_defaults,
    is_hf,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    save_config,
    to_dict,
)
from selfreplay.data.sequences import BatchLoader, Data, SequenceStream
from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.benchmark_scores import benchmark_table
from selfreplay.evaluation.fidelity import first_draw_fidelity, hf_sample_format
from selfreplay.evaluation.validation import ValidationSet, compute_multiplier, standing_for_reference
from selfreplay.model.transformer import CONFIG_NAME, ModelConfig
from selfreplay.objective.coefficient import (
    CapacityBound,
    CoefficientController,
    capacity_bound_line,
    coefficient_of,
    out_of_reach_line,
)
from selfreplay.objective.methods import (
    NO_REPLAY,
    ReplayMethod,
    budgeted_divergence,
    replay_method,
    training_loss,
)
from selfreplay.objective.reference import ReferenceHead, ReferenceUse, kept_of_reference, reference_use
from selfreplay.rundir import METRICS_NAME, POOL_NAME, RunDirectory, notice
from selfreplay.runtime import autocast, peak_memory_mib, resolve_device
from selfreplay.training.families import Family, ReplaySource, family_of, read_init_run
from selfreplay.training.validate import validate


class TrainingDiverged(SelfReplayError):
    """The loss or gradient norm stopped being finite; the run's summary says where."""


# ---------------------------------------------------------------- configuration

def resolve_config(mode: str, path: str | None, overrides: list[str] | None) -> RunConfig:
    """The run's config: defaults <- (finetuning) the init run's model and data <- YAML <- overrides."""
    config = load_config(path, overrides)
    if mode == "finetune" and not is_hf(config):  # a Hugging Face model brings its own shape and data
        if not config.init:
            raise SelfReplayError("finetuning needs the pretrained run: set init=RUN_DIR")
        init = read_init_run(config.init)
        user_model = load_config(path, overrides, base={"model": {}}).model
        if user_model != ModelConfig() and user_model != init.model:
            raise SelfReplayError(f"model.* settings differ from the init run {config.init}: "
                                  "a finetuned model keeps its pretrained shape, drop the model.* overrides")
        base = {"model": vars(init.model), "data": {"old": init.data.train, "seed": init.data.seed,
                                                    "val_sequences": init.data.val_sequences}}
        config = load_config(path, overrides, base=base)
    if is_hf(config) and mode == "finetune" and config.init != "hf:":
        from selfreplay.hf.family import fit_to_context

        given = merge(read_yaml(path) if path else {}, parse_overrides(overrides or []))
        config = fit_to_context(config, t_given="T" in (given.get("model") or {}))
    config = follow_defaults(config)
    validate(config, mode)
    return _absolute_paths(config)


def _absolute_paths(config: RunConfig) -> RunConfig:
    absolute = lambda p: str(Path(p).resolve()) if p and not p.startswith("hf:") else p  # noqa: E731
    data = replace(config.data, tokenizer=absolute(config.data.tokenizer), train=absolute(config.data.train),
                   mix=absolute(config.data.mix), old=absolute(config.data.old), old_text=absolute(config.data.old_text))
    init = absolute(config.init)
    if is_hf(config) and Path(config.init.removeprefix("hf:")).expanduser().is_dir():  # a local model
        init = "hf:" + str(Path(config.init.removeprefix("hf:")).expanduser().resolve())
    return replace(config, out=absolute(config.out), init=init, data=data,
                   replay=replace(config.replay, pool=absolute(config.replay.pool),
                                  prompts=absolute(config.replay.prompts)),
                   eval=replace(config.eval, lm_eval_include_path=absolute(config.eval.lm_eval_include_path)))


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
    """Everything a resumed run needs besides weights, optimizer state and the replay pool."""

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
    benchmark_before: dict | None = None  # lm-eval scores of π0 {task: {metric: value}} (eval.lm_eval_tasks)
    loader: dict | None = None
    replay: dict | None = None
    coefficient: dict | None = None  # replay.coeff=auto: the CoefficientController's state
    capacity: dict | None = None  # replay.coeff=auto: the CapacityBound's state
    fidelity: dict | None = None  # the self-replay samples' fidelity, measured at the first step
    interval: Interval = field(default_factory=Interval)

    @classmethod
    def from_dict(cls, values: dict) -> "Progress":
        return cls(**{**values, "interval": Interval(**values["interval"])})


@dataclass
class Run:
    """What `setup` builds: the models, optimizer, batches, replay and validation sets."""

    config: RunConfig
    mode: str
    family: Family  # what depends on the model: selfreplay.training.families
    directory: RunDirectory
    device: torch.device
    tokenizer: object
    model: object  # θ: the Transformer, or a Hugging Face model as selfreplay.model.hf.CausalLM
    reference: object | None  # π0, frozen (finetuning); its head alone, or None, where a stored pool stands for it
    params: list[torch.nn.Parameter]
    trunk: object  # model.hidden, compiled or not
    optimizer: torch.optim.Optimizer
    loader: BatchLoader
    method: ReplayMethod  # the replay term (replay.method)
    replay: ReplaySource | None  # replay batches: a term's own, or rows mixed into the batch (replay.fraction)
    validation: dict[str, ValidationSet]  # by domain: new, old, mix
    total_steps: int | None
    tokens_per_step: int
    log_every: int
    controller: CoefficientController | None = None  # replay.coeff=auto: c, held to replay.budget
    capacity: CapacityBound | None = None  # replay.coeff=auto: whether c's ceiling cannot hold the budget
    sample_format: tuple[int | None, int, bool] | None = None  # self replay: (EOS id, prompt length, EOS stops)

    @property
    def finetune(self) -> bool:
        return self.mode == "finetune"

    @property
    def target_key(self) -> str:
        return "new_loss" if self.finetune else "old_loss"


# ---------------------------------------------------------------- setup

def load_data(config: RunConfig, mode: str) -> Data:
    """The tokenizer and the rows of each domain, checked before anything is written."""
    return family_of(config).load_data(config, mode)


def setup(config: RunConfig, mode: str, data: Data, directory: RunDirectory) -> Run:
    """Models, optimizer, batch loader, replay source and validation sets of a run, at step 0."""
    finetune = mode == "finetune"
    device = resolve_device(config.device)
    family = family_of(config)
    use = reference_use(replay_method(config.replay.method), config.replay) if finetune else None
    model, reference, params = family.load_models(config, mode, device, load_reference=use is ReferenceUse.MODEL)
    # the training forward may be compiled; evaluation and sampling run the same weights eagerly
    trunk = torch.compile(model.hidden, dynamic=False) if config.compile else model.hidden
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  weight_decay=config.optim.weight_decay)
    loader = BatchLoader(SequenceStream(data.train, config.data.seed), config.optim.batch_size,
                         SequenceStream(data.mix, config.data.seed + 1) if data.mix else None,
                         config.data.mix_fraction)
    replay = family.make_replay(config, reference, data, device) if finetune else None
    if config.replay.fraction > 0:
        loader.batch_size -= replay.batch_size  # replay rows take the place of new rows
    tokens_per_step = loader.batch_size * config.model.T
    if finetune and reference is None:  # π0 is left out (replay.pool): θ stands for it until its first step
        validation, reference = validation_without_reference(family, config, data, model, use)
    else:
        validation = family.validation_sets(config, mode, data, reference)
    controller, capacity = coefficient_of(config.replay) if finetune else (None, None)
    return Run(config, mode, family, directory, device, data.tokenizer, model, reference, params, trunk, optimizer, loader,
               replay_method(config.replay.method), replay, validation, _step_budget(config, tokens_per_step, data.train.train_tokens), tokens_per_step,
               max(1, round(config.log.every_tokens / tokens_per_step)), controller, capacity,
               sample_format(config, data) if finetune else None)


def sample_format(config: RunConfig, data: Data) -> tuple[int | None, int, bool] | None:
    """(EOS id or None, tokens put in before sampling, whether EOS ends a sample) of the run's
    self-replay samples (evaluation.fidelity); None without self replay. The built-in model starts
    at a domain id and samples model.T tokens of a stream whose documents EOS joins; a Hugging
    Face model's are as `hf_sample_format` says."""
    r = config.replay
    if r.source != "self" or not (replay_method(r.method).needs_replay or r.fraction > 0):
        return None
    if data.replay_format is None:
        return data.tokenizer.eos_id, 1, False
    return hf_sample_format(data.replay_format, data.tokenizer.eos_token_id)


def validation_without_reference(family: Family, config: RunConfig, data: Data, model,
                                 use: ReferenceUse) -> tuple[dict[str, ValidationSet], ReferenceHead | None]:
    """The validation sets of a run that holds no π0 (objective.reference), with what they need of π0
    taken from θ before its first step, when θ is π0; and the part of π0 the run keeps: its head, or None."""
    head = kept_of_reference(model, use)
    with standing_for_reference(model):
        validation = family.validation_sets(config, "finetune", data, model)
        for validation_set in validation.values():
            validation_set.keep_without_reference(head)
    return validation, head


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
    norm skips the update and marks the run diverged."""
    config, r = run.config, run.config.replay
    tick = time.perf_counter()
    lr = learning_rate(progress.step, config, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    new, new_mask = run.loader.next_batch()  # new_mask: None where every token counts (token files)
    new = new.to(run.device)
    new_mask = new_mask.to(run.device) if new_mask is not None else None
    replay_tick = time.perf_counter()
    replay = run.replay.next_batch() if run.replay is not None else None
    progress.replay_seconds += time.perf_counter() - replay_tick
    if progress.step == 0 and run.sample_format is not None:  # θ is π0 until this step's update
        judging = time.perf_counter()
        progress.fidelity = first_draw_fidelity(run.model, run.replay, replay, run.sample_format,
                                                (progress.start_metrics or {}).get("old_loss"))
        tick += time.perf_counter() - judging  # a measurement: not part of the step's training time
    if r.fraction > 0:  # the replay rows are part of the batch, not of a term
        if new_mask is not None:  # every replay token counts
            new_mask = torch.cat([new_mask, torch.ones_like(replay.tokens, dtype=torch.bool)])
        new, replay = torch.cat([new, replay.tokens]), None
    coeff = run.controller.coeff if run.controller is not None else r.coeff
    with autocast(run.device, config.precision):
        loss, ntp, reg = training_loss(run.model, run.reference, new, replay, run.method, coeff, run.trunk,
                                       config.compile, new_mask=new_mask)
        values = [ntp.detach(), reg.detach().float()]
        if run.controller is not None:  # the replay KL the budget holds
            values.append(budgeted_divergence(run.method, reg, run.reference, replay).float())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    ntp_value, reg_value, *kl, norm_value = torch.stack([*values, grad_norm]).tolist()
    kl_value = kl[0] if kl else 0.0
    if not math.isfinite(ntp_value + reg_value):
        progress.diverged = f"the training loss is {ntp_value + coeff * reg_value} at step {progress.step + 1} (lr {lr:g})"
    elif not math.isfinite(norm_value):
        progress.diverged = f"the gradient norm is {norm_value} at step {progress.step + 1} (lr {lr:g})"
    else:
        if config.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(run.params, config.optim.grad_clip, grad_norm)
        run.optimizer.step()
        if run.controller is not None:
            run.controller.update(kl_value)  # c for the next step
    elapsed = time.perf_counter() - tick
    progress.step += 1
    progress.tokens += run.tokens_per_step
    progress.train_seconds += elapsed
    i = progress.interval
    i.steps, i.seconds, i.tokens = i.steps + 1, i.seconds + elapsed, i.tokens + run.tokens_per_step
    i.loss, i.replay_loss, i.grad_norm = i.loss + ntp_value, i.replay_loss + reg_value, i.grad_norm + norm_value
    i.replay_kl += kl_value


# ---------------------------------------------------------------- measurements and log lines

def measure(run: Run) -> dict:
    """Validation losses (and KL to π0) on each domain, and the weights' drift when finetuning."""
    metrics = {}
    for name, validation_set in run.validation.items():
        result = validation_set.evaluate(run.model)
        metrics[f"{name}_loss"] = result["loss"]
        for key in ("loss_second_half", "kl"):  # absent where nothing counts there, or without π0
            if key in result:
                metrics[f"{name}_{key}"] = result[key]
    drift = run.family.drift(run.model, run.config) if run.finetune else None
    if drift is not None:
        metrics["drift"] = drift
    return metrics


def log_point(run: Run, progress: Progress, metrics: dict) -> None:
    """Append one metrics line (the interval's means and `metrics`), then apply the stop rules
    that look at measurements: divergence, target loss, patience."""
    i = progress.interval
    mean = lambda total: total / i.steps if i.steps else None  # noqa: E731
    line = {"step": progress.step, "tokens": progress.tokens, "epochs": round(run.loader.primary.epochs_done, 4),
            "train_seconds": round(progress.train_seconds, 3), "replay_seconds": round(progress.replay_seconds, 3),
            "lr": learning_rate(max(0, progress.step - 1), run.config, run.total_steps),
            "train_loss": mean(i.loss), "grad_norm": mean(i.grad_norm),
            "replay_loss": mean(i.replay_loss) if run.method is not NO_REPLAY else None,
            "tokens_per_second": i.tokens / i.seconds if i.seconds > 0 else None, **metrics}
    start = progress.start_metrics
    if run.finetune and start is not None and "old_loss" in metrics:
        line["forgetting"] = metrics["old_loss"] - start["old_loss"]
    if run.controller is not None:  # c now (for the next step), and the replay KL over the interval
        line["replay_coeff"], line["replay_kl"] = run.controller.coeff, mean(i.replay_kl)
        if i.steps:
            watch_capacity(run, progress.step, line.get("new_loss", line["train_loss"]))
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
        ("capacity_bound" if run.capacity is not None and run.capacity.bound and run.config.stop.on_capacity_bound
         else None)


def watch_capacity(run: Run, step: int, new_loss: float) -> None:
    """Give the log point to the capacity-bound detector (with the controller's averaged replay
    KL, steadier than the interval's); say in one line when the run first turns capacity bound."""
    was_bound = run.capacity.bound
    if not run.capacity.observe(step, run.controller.coeff, run.controller.kl, new_loss) or was_bound:
        return
    notice(capacity_bound_line(run.controller, run.capacity, stopping=run.config.stop.on_capacity_bound))


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
    """The complete state after `progress.step`: weights, optimizer, batch stream, replay pool."""
    progress.loader = run.loader.state_dict()
    keep_coefficient(run, progress)
    tensors = _optimizer_tensors(run.optimizer)
    if run.replay is not None:
        state = run.replay.state_dict()
        for key in ("generator", "pool", "mask", "hidden"):  # a self-replay pool's tensors
            value = state.pop(key, None)
            if value is not None:
                tensors[f"replay.{key}"] = value
        progress.replay = state
    run.directory.save_checkpoint(progress.step, run.family.weights(run.model), tensors, asdict(progress))


def keep_coefficient(run: Run, progress: Progress) -> None:
    """The controller's and the capacity detector's states into `progress` (plain numbers: JSON
    keeps them exactly, so a resumed run moves c as an uninterrupted one)."""
    if run.controller is not None:
        progress.coefficient, progress.capacity = run.controller.state_dict(), run.capacity.state_dict()


def resume(run: Run) -> Progress | None:
    """Load the newest checkpoint that reads back whole into `run`; None when none does."""
    for folder in run.directory.checkpoints():
        try:
            checkpoint = run.directory.read_checkpoint(folder, run.device)
            progress = Progress.from_dict(checkpoint.progress)
            run.family.load_weights(run.model, checkpoint.weights)
            _load_optimizer(run.optimizer, checkpoint.tensors)
            run.loader.load_state_dict(progress.loader)
            if run.controller is not None:
                run.controller.load_state_dict(progress.coefficient)
                run.capacity.load_state_dict(progress.capacity)
            if run.replay is not None:
                run.replay.load_state_dict({**progress.replay, **{k.removeprefix("replay."): v for k, v in
                                                                  checkpoint.tensors.items() if k.startswith("replay.")}})
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

    Raises TrainingDiverged (after writing the summary) when the loss or gradients stop being finite.
    """
    config = follow_defaults(config)
    validate(config, mode)
    data = load_data(config, mode)
    directory = RunDirectory(config.out)
    status = directory.open(to_dict(config), may_differ=_same_device)
    if status == "finished":
        notice(f"{config.out} already holds this finished run: nothing to do")
        return _raise_if_diverged(directory.read_summary())
    run = setup(with_drawn_pool(config, mode, data, directory), mode, data, directory)
    progress = resume(run) if status == "resume" else None
    if progress is None:
        if status == "resume":  # every checkpoint was damaged: start over from fresh weights
            directory.start_over()
            run = setup(with_drawn_pool(config, mode, data, directory), mode, data, directory)
        progress = Progress()
        save_config(config, directory.path / CONFIG_NAME)
        run.family.save_start(directory, data.tokenizer)
        directory.reset_metrics()

    wall_start = time.perf_counter()
    if config.eval.lm_eval_tasks and progress.benchmark_before is None:
        progress.benchmark_before = run.family.benchmark_scores(run.model, run.tokenizer, config.eval)
    if progress.start_metrics is None:
        progress.start_metrics = measure(run)
        log_point(run, progress, progress.start_metrics)
    _loop(run, progress)
    return finish(run, progress, time.perf_counter() - wall_start)


def with_drawn_pool(config: RunConfig, mode: str, data: Data, directory: RunDirectory) -> RunConfig:
    """`config` replaying the run's own pool pass after pass where replay.draw_once asks for one:
    drawn now into RUN_DIR/replay_pool, unless a finished one is there (a resumed run's); a drawing
    that was killed midway is drawn again."""
    from selfreplay.replay.store import HEADER_NAME
    from selfreplay.training.families import replay_domains
    from selfreplay.training.pools import sample_run_pool

    r = config.replay
    if mode != "finetune" or not r.draw_once:
        return config
    out = directory.path / POOL_NAME
    if out.exists() and not (out / HEADER_NAME).is_file():
        shutil.rmtree(out)
    if not out.exists():
        header = sample_run_pool(config, None if is_hf(config) else replay_domains(config, data), out)
        notice(f"drew {header['rows']} replay samples once, into {out}, in {header['seconds']:.1f} s")
    return replace(config, replay=replace(r, pool=str(out), reuse=0))


def _loop(run: Run, progress: Progress) -> None:
    from tqdm.auto import tqdm

    config, s = run.config, run.config.stop
    last_checkpoint = time.monotonic()
    bar = tqdm(total=run.total_steps, initial=progress.step, unit="step", disable=not config.log.progress,
               desc=f"{run.mode} {run.directory.path.name}", dynamic_ncols=True)
    with StopRequest() as stop_request:
        while progress.stop_reason is None:
            if run.total_steps is not None and progress.step >= run.total_steps:
                progress.stop_reason = "budget"
                break
            if s.wall_seconds is not None and progress.train_seconds >= s.wall_seconds:
                progress.stop_reason = "wall_seconds"
                break
            train_step(run, progress)
            bar.update(1)
            at_end = run.total_steps is not None and progress.step >= run.total_steps
            if is_log_step(progress.step, run.log_every, config.log.growth) or at_end or progress.diverged:
                log_point(run, progress, measure(run))
                bar.set_postfix({"loss": f"{progress.last_line['train_loss']:.3f}",
                                 run.target_key: f"{progress.last_line.get(run.target_key, float('nan')):.3f}"})
                every, seconds = config.log.checkpoint_every, config.log.checkpoint_seconds
                due = (every and (progress.metric_lines - 1) % every == 0) or \
                      (seconds and time.monotonic() - last_checkpoint >= seconds)
                if due and progress.stop_reason is None and not at_end:
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
        log_point(run, progress, measure(run))
    if progress.diverged is None:
        run.family.save_final(run.model, run.tokenizer, run.config, run.directory)
    keep_coefficient(run, progress)
    if run.controller is not None and (line := out_of_reach_line(run.controller, run.capacity, run.config.optim.lr)):
        notice(line)
    summary = _summary(run.config, run.mode, progress, wall_seconds, run.family.params(run.model, run.config))
    summary["peak_memory_mib"], summary["peak_memory_of"] = peak_memory_mib(run.device)
    if run.config.replay.draw_once:  # the drawing of the run's own pool, before its first step
        from selfreplay.replay.store import read_header

        summary["replay_pool_seconds"] = read_header(Path(run.config.replay.pool))["seconds"]
    if run.config.eval.lm_eval_tasks and progress.diverged is None:
        after = run.family.benchmark_scores(run.model, run.tokenizer, run.config.eval)
        summary["lm_eval"] = benchmark_table(progress.benchmark_before, after)
    run.directory.write_summary(summary)
    run.directory.clear_checkpoints()
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


def _summary(config: RunConfig, mode: str, progress: Progress, wall_seconds: float, params: tuple) -> dict:
    first, last = progress.start_metrics, progress.last_line
    summary = {"mode": mode, "steps": progress.step, "tokens": progress.tokens,
               "epochs": last.get("epochs"), "train_seconds": progress.train_seconds, "wall_seconds": wall_seconds,
               "tokens_per_second": progress.tokens / progress.train_seconds if progress.train_seconds else None,
               "replay_seconds": progress.replay_seconds,
               "stop_reason": progress.stop_reason or "budget", "diverged": progress.diverged,
               "time_to_target_seconds": progress.time_to_target_seconds,
               "time_to_target_steps": progress.time_to_target_steps,
               "params": params[0], "non_embedding_params": params[1]}
    if mode == "finetune":
        summary.update({
            "method": config.replay.method, "source": config.replay.source, "coeff": config.replay.coeff,
            "budget": config.replay.budget, "lora_rank": config.lora.rank, **_coefficient_summary(config, progress),
            "old_loss_0": first.get("old_loss"), "old_loss": last.get("old_loss"),
            "forgetting": last.get("old_loss", math.nan) - first.get("old_loss", math.nan),
            "new_loss_0": first.get("new_loss"), "new_loss": last.get("new_loss"),
            "old_kl": last.get("old_kl"), "new_kl": last.get("new_kl"), "drift": last.get("drift"),
            "old_loss_second_half": last.get("old_loss_second_half"),
            "new_loss_second_half": last.get("new_loss_second_half"),
            "compute_multiplier": compute_multiplier(Path(config.init) / METRICS_NAME, last["old_loss"])
            if last.get("old_loss") is not None and math.isfinite(last["old_loss"]) else None,
        })
    else:
        summary.update({"old_loss": last.get("old_loss"), "mix_loss": last.get("mix_loss")})
    return summary


def _coefficient_summary(config: RunConfig, progress: Progress) -> dict:
    """c at the end (None without a replay term), whether and from which step the run was
    capacity bound (None where c is fixed), and the self-replay samples' fidelity (None without)."""
    r, auto = config.replay, progress.coefficient is not None
    fixed = r.coeff if replay_method(r.method) is not NO_REPLAY else None
    return {"replay_coeff_end": progress.coefficient["coeff"] if auto else fixed,
            "replay_kl_end": progress.coefficient["kl"] if auto else None,  # the controller's average at the end
            "capacity_bound": progress.capacity["since"] is not None if auto else None,
            "capacity_bound_since": progress.capacity["since"] if auto else None,
            "replay_fidelity": progress.fidelity}


def run_from_cli(mode: str, config_path: str | None, overrides: list[str]) -> dict:
    config = resolve_config(mode, config_path, overrides)
    summary = train(config, mode)
    keys = ("old_loss_0", "old_loss", "forgetting", "new_loss", "old_kl", "replay_coeff_end", "capacity_bound",
            "capacity_bound_since", "steps", "tokens", "train_seconds", "tokens_per_second", "time_to_target_seconds",
            "stop_reason")
    print(f"{mode} finished -> {config.out}")
    for key in keys:
        if key in summary and summary[key] is not None:
            value = summary[key]
            print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
    for task, metrics in summary.get("lm_eval", {}).items():
        for metric, score in metrics.items():
            before = "?" if score["before"] is None else f"{score['before']:.4f}"
            print(f"  {f'{task} {metric}':24s} {before} -> {score['after']:.4f}")
    return summary
