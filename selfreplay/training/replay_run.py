"""One replay run behind every front end: what finetuning with replay adds around the optimizer's
step, written once for the command line's loop (`selfreplay.training.loop`) and the Trainer
(`selfreplay.hf.trainer`), which call it as thin adapters:

    run = start_replay_run(config, family, data, model, reference, validation_sets, device)
    replay = run.next_replay(step, model)                    # before a step
    loss, ntp, reg, kl = run.loss_terms(model, new, replay)  # the loss terms
    run.after_step(kl)                                       # after the optimizer's step
    run.measure(model, step); run.at_log_point(step, loss)   # at a log point
    run.state_dict(); run.load_state_dict(state)             # in and out of checkpoints

It owns π0 (its whole model, its head, or nothing: `selfreplay.objective.reference`), the replay
source, the coefficient controller and capacity detector (replay.coeff=auto), the fidelity of π0's
first draw, the measurements with forgetting against one baseline, and lm-eval before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from selfreplay.config import RunConfig
from selfreplay.data.sequences import Data
from selfreplay.evaluation.answers import HeldOutPrompts, held_out_prompts
from selfreplay.evaluation.benchmark_scores import benchmark_scores
from selfreplay.evaluation.fidelity import first_draw_fidelity, hf_sample_format
from selfreplay.evaluation.validation import Measurements, ValidationSet, standing_for_reference
from selfreplay.families import Family, ReplaySource
from selfreplay.objective.coefficient import (
    CapacityBound,
    CoefficientController,
    capacity_bound_line,
    coefficient_of,
    out_of_reach_line,
)
from selfreplay.objective.methods import NO_REPLAY, ReplayMethod, budgeted_divergence, replay_method, training_loss
from selfreplay.objective.reference import kept_of_reference, reference_use
from selfreplay.replay.samples import ReplaySamples
from selfreplay.rundir import notice

# what a replay run keeps in a checkpoint (plain numbers: JSON keeps them exactly)
STATE_KEYS = ("coefficient", "capacity", "fidelity", "old_loss_0", "benchmark_before", "agreement_0")


@dataclass
class ReplayRun:
    """The replay side of one finetuning run; `sep` spells settings as its front end does
    ('.': replay.coeff_max on the command line, '_': replay_coeff_max in the Trainer)."""

    config: RunConfig
    method: ReplayMethod
    reference: object | None  # π0, its head (ReferenceHead), or None where the run keeps nothing of it
    source: ReplaySource | None  # replay batches: a term's own, or rows mixed into the batch (replay.fraction)
    measurements: Measurements
    sample_format: tuple[int | None, int, bool] | None  # self replay: (EOS id, prompt length, EOS stops)
    controller: CoefficientController | None = None  # replay.coeff=auto: c, held to replay.budget
    capacity: CapacityBound | None = None  # replay.coeff=auto: whether c's ceiling cannot hold the budget
    sep: str = "."
    main_process: bool = True  # the process that says things (one line, not one per rank)
    fidelity: dict | None = None  # π0's first draw, judged at the first step (evaluation.fidelity)
    benchmark_before: dict | None = None  # lm-eval scores of π0 {task: {metric: value}}
    prompts: HeldOutPrompts | None = None  # eval.prompts: the held-out prompts and π0's answers to them
    agreement_0: dict | None = None  # eval.prompts: θ's answers against π0's before the first step
    replay_seconds: float = 0.0  # drawing and reading replay batches
    fidelity_seconds: float = 0.0  # judging the first draw: a measurement, not training

    # ------------------------------------------------------------ before a step and the loss terms

    @property
    def coeff(self) -> float:
        return self.controller.coeff if self.controller is not None else self.config.replay.coeff

    def next_replay(self, step: int, model) -> ReplaySamples | None:
        """The step's replay batch (None without replay); at the first step, while θ (`model`) is
        still π0, the fidelity of π0's first draw."""
        if self.source is None:
            return None
        tick = time.perf_counter()
        replay = self.source.next_batch()
        self.replay_seconds += time.perf_counter() - tick
        if step == 0 and self.sample_format is not None and self.fidelity is None:
            tick = time.perf_counter()
            self.fidelity = first_draw_fidelity(model, self.source, replay, self.sample_format,
                                                self.measurements.old_loss_0) if self.main_process else None
            self.fidelity_seconds += time.perf_counter() - tick
        return replay

    def loss_terms(self, model, new: torch.Tensor, replay: ReplaySamples | None, trunk=None, compile: bool = False,
                   new_mask: torch.Tensor | None = None, method: ReplayMethod | None = None):
        """(loss, NTP on new, R, what replay.budget holds or None) of `objective.methods.training_loss`;
        `method` overrides the run's (NO_REPLAY for an evaluation batch)."""
        method = method or self.method
        loss, ntp, reg = training_loss(model, self.reference, new, replay, method, self.coeff, trunk, compile,
                                       new_mask=new_mask)
        kl = budgeted_divergence(method, reg, self.reference, replay).float() \
            if self.controller is not None and method is not NO_REPLAY else None
        return loss, ntp, reg, kl

    def after_step(self, replay_kl: float | None) -> None:
        """c for the next step, from the step's replay KL (a mean over micro-batches and ranks)."""
        if self.controller is not None and replay_kl is not None:
            self.controller.update(replay_kl)

    # ------------------------------------------------------------ measurements and log points

    def measure(self, model, step: int) -> dict[str, float]:
        """Each domain's loss and KL to π0, and forgetting against old_loss_0 (evaluation.validation)."""
        return self.measurements.measure(model, step)

    def at_log_point(self, step: int, new_loss: float | None) -> dict[str, float]:
        """What a log line adds (c now, for the next step); gives the detector the log point, with
        the controller's averaged replay KL, and says in one line when the run first turns capacity bound."""
        if self.controller is None:
            return {}
        if new_loss is not None:
            was_bound = self.capacity.bound
            if self.capacity.observe(step, self.controller.coeff, self.controller.kl, new_loss) and not was_bound \
                    and self.main_process:
                notice(capacity_bound_line(self.controller, self.capacity, sep=self.sep,
                                           stopping=self.config.stop.on_capacity_bound))
        return {"replay_coeff": self.controller.coeff}

    @property
    def stop_requested(self) -> bool:
        """stop.on_capacity_bound, and the run has turned capacity bound."""
        return self.capacity is not None and self.capacity.bound and self.config.stop.on_capacity_bound

    def benchmarks(self, model, tokenizer, batch_size: int = 8, tasks: list[str] | None = None) -> dict | None:
        """lm-eval scores of the model as it is now (of `tasks`, default eval.lm_eval_tasks; None
        without tasks or off the main process); the first call's are π0's, kept as benchmark_before."""
        tasks = tasks or [t.strip() for t in (self.config.eval.lm_eval_tasks or "").split(",") if t.strip()]
        if not tasks or not self.main_process:
            return None
        e = self.config.eval
        scores = benchmark_scores(getattr(model, "model", model), tokenizer, tasks, e.lm_eval_limit, batch_size,
                                  e.lm_eval_include_path)
        if self.benchmark_before is None:
            self.benchmark_before = scores
        return scores

    def answer_agreement(self, model, tokenizer=None, side_by_side: Path | None = None) -> dict:
        """eval.prompts: answer_agreement and answers_identical of θ (`model`) now ({} without prompts,
        or off the main process); the first call's are kept as agreement_0. With `side_by_side`,
        the prompts with π0's and θ's answers are written there (evaluation.answers.ANSWERS_NAME)."""
        if self.prompts is None or not self.main_process:
            return {}
        agreement, answers = self.prompts.agreement(model)
        if self.agreement_0 is None:
            self.agreement_0 = agreement
        if side_by_side is not None:
            self.prompts.write_side_by_side(side_by_side, tokenizer, answers)
        return agreement

    # ------------------------------------------------------------ the end of a run

    def end_lines(self) -> list[str]:
        """What the run says at its end: that its budget was out of reach of c, where it was."""
        if self.controller is None:
            return []
        lr = self.config.optim.lr
        line = out_of_reach_line(self.controller, self.capacity, lr, sep=self.sep)
        return [line] if line else []

    def summary(self) -> dict:
        """c at the end (None without a replay term), whether and from which step the run was
        capacity bound (None where c is fixed), and the self-replay samples' fidelity (None without)."""
        auto = self.controller is not None
        fixed = self.config.replay.coeff if self.method is not NO_REPLAY else None
        return {"replay_coeff_end": self.controller.coeff if auto else fixed,
                "replay_kl_end": self.controller.kl if auto else None,  # the controller's average at the end
                "capacity_bound": self.capacity.since is not None if auto else None,
                "capacity_bound_since": self.capacity.since if auto else None,
                "replay_fidelity": self.fidelity,
                **{f"{key}_0": value for key, value in (self.agreement_0 or {}).items()}}

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """STATE_KEYS: the controller's and detector's states, the fidelity, old_loss_0, π0's lm-eval scores."""
        auto = self.controller is not None
        return {"coefficient": self.controller.state_dict() if auto else None,
                "capacity": self.capacity.state_dict() if auto else None,
                "fidelity": self.fidelity, "old_loss_0": self.measurements.old_loss_0,
                "benchmark_before": self.benchmark_before, "agreement_0": self.agreement_0}

    def load_state_dict(self, state: dict) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(state["coefficient"])
            self.capacity.load_state_dict(state["capacity"])
        self.fidelity = state.get("fidelity")
        self.benchmark_before = state.get("benchmark_before")
        self.agreement_0 = state.get("agreement_0")
        if state.get("old_loss_0") is not None:
            self.measurements.old_loss_0 = state["old_loss_0"]


def start_replay_run(config: RunConfig, family: Family, data: Data, model, reference,
                     validation_sets: Callable[[object], dict[str, ValidationSet]], device, fingerprint: str | None = None,
                     rank: int = 0, world_size: int = 1, sep: str = ".", main_process: bool | None = None) -> ReplayRun:
    """The replay run of a finetuning run at step 0. `reference`: π0 where the run loaded it, else
    None (a run that replays a stored pool, or none: objective.reference), and then what the
    measurements need of π0 is taken from θ (`model`) now, before its first step; what is kept of
    π0 is its head, or nothing. validation_sets(π0) builds the sets measured at each log point.
    rank, world_size: this process's own replay among world_size drawing each their own (the
    Trainer); main_process (default: rank 0) says what there is to say."""
    method = replay_method(config.replay.method)
    source = family.make_replay(config, reference, data, device, fingerprint, rank, world_size)
    e, held = config.eval, reference is None
    pi0 = model if held else reference  # θ stands for π0 before its first step where the run holds no π0
    with standing_for_reference(model):
        prompts = held_out_prompts(e.prompts, data.tokenizer, pi0, e.answer_tokens) if e.prompts else None
        sets = {**validation_sets(pi0), **({"chat": prompts.validation_set(pi0)} if prompts else {})}
        if held:
            reference = kept_of_reference(model, reference_use(method, config.replay))
            for validation_set in sets.values():
                validation_set.keep_without_reference(reference)
    controller, capacity = coefficient_of(config.replay)
    return ReplayRun(config, method, reference, source, Measurements(sets), sample_format(config, data), controller,
                     capacity, sep, rank == 0 if main_process is None else main_process, prompts=prompts)


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
