"""Every check a run's settings must pass before anything is written, for every front end; each
failure is one line saying what to change.

A setting alone is checked where it is made (selfreplay.config: ranges and choices, ReplayConfig's
own rules); the rules between settings are the one table `RULES` below, each marked with the
front ends it binds: the command line ("cli": pretrain and finetune) and the Trainer ("trainer").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from selfreplay.config import HF_PREFIX, AUTO, RunConfig, check_output_dir, check_ranges, is_hf
from selfreplay.errors import SelfReplayError
from selfreplay.objective.methods import NO_REPLAY, REPLAY_NTP, ReplayMethod, replay_method
from selfreplay.runtime import resolve_device

CLI, TRAINER = "cli", "trainer"


@dataclass(frozen=True)
class Settings:
    """What the rules read: the settings, the mode (pretrain, finetune), the front end, the processes."""

    config: RunConfig
    mode: str = "finetune"
    front_end: str = CLI
    processes: int = 1

    @property
    def hf(self) -> bool:
        """A Hugging Face model: init=hf: on the command line, always in the Trainer."""
        return self.front_end == TRAINER or is_hf(self.config)

    @property
    def method(self) -> ReplayMethod:
        return replay_method(self.config.replay.method)

    @property
    def draws_as_it_trains(self) -> bool:
        """Self replay drawn during training (not a pool drawn once and replayed pass after pass)."""
        r = self.config.replay
        return self.mode == "finetune" and r.source == "self" and (self.method.needs_replay or r.fraction > 0) \
            and not r.draw_once and not (r.pool is not None and r.reuse == 0)


@dataclass(frozen=True)
class Rule:
    """Settings that do not go together: `broken(settings)` says so, `message` says what to change."""

    broken: Callable[[Settings], object]
    message: str | Callable[[Settings], str]
    front_ends: tuple[str, ...] = (CLI,)


def _model_shape(c: RunConfig) -> list[str]:
    """The model.* shape settings given for an init=hf: model, which brings its own."""
    return [f"model.{f.name}" for f in dataclasses.fields(c.model)
            if f.name not in ("T", "trust_remote_code", "reference_dtype", "gguf_file")
            and getattr(c.model, f.name) != f.default]


HF = "init=hf:"
BOTH = (CLI, TRAINER)
RULES: list[Rule] = [
    # replay.coeff=auto's own settings
    Rule(lambda s: s.config.stop.on_capacity_bound and s.config.replay.coeff != AUTO,
         "stop.on_capacity_bound stops a run whose replay.coeff=auto can no longer hold its budget: set "
         "replay.coeff=auto and replay.budget, or drop stop.on_capacity_bound", BOTH),
    # a Hugging Face model
    Rule(lambda s: is_hf(s.config) and s.mode != "finetune",
         "init=hf: names a model to finetune: run selfreplay finetune init=hf:NAME_OR_PATH"),
    Rule(lambda s: s.config.init == HF_PREFIX, "init=hf: needs a model: init=hf:NAME_OR_PATH (a hub id or a local directory)"),
    Rule(lambda s: is_hf(s.config) and not s.config.data.old_text,
         f"{HF} needs held-out old-domain text to measure forgetting: set data.old_text=FILE (.jsonl, .txt or hf:DATASET)"),
    Rule(lambda s: is_hf(s.config) and (s.config.data.old or s.config.data.mix),
         f"{HF} takes text files: drop data.old and data.mix (use data.old_text)"),
    Rule(lambda s: is_hf(s.config) and s.config.data.tokenizer, f"{HF} uses the model's own tokenizer: drop data.tokenizer"),
    Rule(lambda s: s.hf and s.config.replay.fraction > 0,
         "a Hugging Face model replays through a replay term (replay.fraction mixes replay rows into the built-in "
         "model's batches, selfreplay finetune init=RUN_DIR): drop replay.fraction", BOTH),
    Rule(lambda s: s.hf and s.config.replay.source != "self",
         "a Hugging Face model replays samples of π0 (real replay reads the built-in model's token files, "
         "selfreplay finetune init=RUN_DIR): replay.source=self", BOTH),
    Rule(lambda s: s.hf and s.config.replay.domains,
         "a Hugging Face model samples replay from BOS or inside its chat template (replay.domains names the built-in "
         "model's domain tokens, selfreplay finetune init=RUN_DIR): drop replay.domains", BOTH),
    Rule(lambda s: s.hf and (s.config.replay.system is not None or s.config.replay.prompts) and not s.config.replay.chat,
         "replay.system and replay.prompts shape chat samples: set replay.chat=true", BOTH),
    Rule(lambda s: is_hf(s.config) and s.config.stop.tokens_per_param is not None,
         f"{HF}: set stop.tokens or stop.epochs, not stop.tokens_per_param"),
    Rule(lambda s: is_hf(s.config) and s.config.compile, f"{HF} runs eagerly: set compile=false"),
    Rule(lambda s: s.hf and s.config.replay.compile,
         "a Hugging Face model samples with its own generation code (replay.compile fuses the built-in model's "
         "decoding step, selfreplay finetune init=RUN_DIR): set replay.compile=false", BOTH),
    Rule(lambda s: is_hf(s.config) and s.config.model.reference_dtype != "float32" and s.config.lora.rank > 0,
         "with LoRA π0 is the model with its adapters disabled, not a copy: drop model.reference_dtype"),
    Rule(lambda s: is_hf(s.config) and _model_shape(s.config),
         lambda s: f"{HF} takes its shape from the model: drop {', '.join(_model_shape(s.config))} "
                   "(model.T sets the sequence length)"),
    # the built-in model
    Rule(lambda s: s.config.model.gguf_file and not is_hf(s.config),
         "model.gguf_file names a GGUF file in an init=hf: directory: drop it for a built-in model"),
    Rule(lambda s: s.config.model.reference_dtype != "float32" and not is_hf(s.config),
         "model.reference_dtype sets the dtype of an init=hf: model's frozen copy: drop it for a built-in model"),
    Rule(lambda s: s.config.eval.lm_eval_tasks and not is_hf(s.config),
         "eval.lm_eval_tasks scores Hugging Face models: export the pretrained run with selfreplay export RUN --hf OUT, "
         "then finetune init=hf:OUT"),
    Rule(lambda s: s.config.eval.prompts and not s.hf,
         "eval.prompts measures a chat model's answers, and the built-in model has no chat template: finetune "
         "init=hf:MODEL, or drop eval.prompts"),
    Rule(lambda s: s.config.eval.prompts and s.config.replay.prompts
         and Path(s.config.eval.prompts).resolve() == Path(s.config.replay.prompts).resolve(),
         "eval.prompts are held out and never replayed, and replay.prompts names the same file: give each its own",
         BOTH),
    Rule(lambda s: s.config.eval.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None,
         "eval.lm_eval_tasks needs lm-eval: pip install lm-eval", BOTH),
    # a command-line run: its directory, data and stop rule
    Rule(lambda s: not s.config.out, "set out=RUN_DIR, the directory the run writes to"),
    Rule(lambda s: not s.config.data.train, "set data.train=TOKEN_FILE, the token file to train on"),
    Rule(lambda s: s.mode == "pretrain" and not s.config.data.tokenizer,
         "set data.tokenizer=DIR, the tokenizer of the token files"),
    Rule(lambda s: s.mode == "pretrain" and (s.method is not NO_REPLAY or s.config.replay.fraction > 0),
         "replay is for finetuning: pretraining takes replay.method=none and replay.fraction=0"),
    Rule(lambda s: s.mode == "pretrain" and s.config.lora.rank > 0,
         "LoRA is a finetuning baseline: pretraining takes lora.rank=0"),
    # where replay comes from
    Rule(lambda s: s.config.replay.pool is not None and s.config.replay.source != "self",
         "replay.pool holds π0's own samples: set replay.source=self"),
    Rule(lambda s: s.config.replay.draw_once and s.config.replay.pool is not None,
         "replay.draw_once draws the run's own pool: drop replay.pool, or replay.draw_once to replay the pool given",
         BOTH),
    Rule(lambda s: s.config.replay.draw_once and (s.config.replay.source != "self" or
                                                  (not s.method.needs_replay and s.config.replay.fraction == 0)),
         "replay.draw_once draws self-replay samples: it needs replay.source=self and a method that replays "
         "(replay.method=kl or ntp) or replay.fraction > 0", BOTH),
    Rule(lambda s: s.config.replay.fraction > 0 and s.method.needs_replay,
         lambda s: f"replay.fraction mixes replay rows into the new batch; replay.method={s.method.name} draws a batch "
                   "of its own: set one of the two"),
    # data and stop rules
    Rule(lambda s: s.config.data.mix_fraction > 0 and not s.config.data.mix,
         "data.mix_fraction > 0 needs a second token file: set data.mix=TOKEN_FILE"),
    Rule(lambda s: all(v is None for v in (s.config.stop.tokens, s.config.stop.tokens_per_param, s.config.stop.epochs,
                                           s.config.stop.target_loss, s.config.stop.wall_seconds)),
         "no stop rule: set stop.tokens, stop.tokens_per_param, stop.epochs, stop.target_loss or stop.wall_seconds"),
    Rule(lambda s: (s.config.stop.target_loss is not None or s.config.stop.patience is not None)
         and s.config.data.val_sequences == 0,
         "stop.target_loss and stop.patience need validation data: set data.val_sequences > 0"),
    Rule(lambda s: s.config.optim.schedule == "cosine" and all(
        v is None for v in (s.config.stop.tokens, s.config.stop.tokens_per_param, s.config.stop.epochs)),
         "optim.schedule=cosine decays to zero at the token budget: set stop.tokens, stop.tokens_per_param or stop.epochs"),
    # replay.coeff=auto needs a term to weigh and a way to measure what the budget holds
    Rule(lambda s: s.config.replay.coeff == AUTO and s.method is NO_REPLAY,
         "replay.coeff=auto moves the weight of a replay term, and replay.method=none has none: set "
         "replay.method=kl (or ntp, kl_new)", BOTH),
    Rule(lambda s: s.config.replay.coeff == AUTO and s.method is REPLAY_NTP and s.config.replay.pool is not None
         and s.config.replay.reuse == 0,
         "replay.coeff=auto with replay.method=ntp holds the rise of θ's next-token loss over π0's on the replay rows, "
         "and a run replaying replay.pool with replay.reuse=0 holds no π0 to measure it: set replay.method=kl, or "
         "replay.reuse >= 1", BOTH),
    Rule(lambda s: s.config.replay.fraction > 0 and not 0 < _fraction_rows(s.config) < s.config.optim.batch_size,
         lambda s: f"replay.fraction={s.config.replay.fraction} of optim.batch_size={s.config.optim.batch_size} is "
                   f"{_fraction_rows(s.config)} rows: choose a fraction that replaces at least one row and leaves one"),
    # many processes (torchrun): every batch splits into equal shares, replay is drawn before training
    Rule(lambda s: s.processes > 1 and s.config.optim.batch_size % s.processes,
         lambda s: f"optim.batch_size={s.config.optim.batch_size} does not split over {s.processes} processes: "
                   f"set a multiple of {s.processes}"),
    Rule(lambda s: s.processes > 1 and s.method.needs_replay and s.config.replay.batch_size % s.processes,
         lambda s: f"replay.batch_size={s.config.replay.batch_size} does not split over {s.processes} processes: "
                   f"set a multiple of {s.processes}"),
    Rule(lambda s: s.processes > 1 and s.config.replay.fraction > 0 and _fraction_rows(s.config) % s.processes,
         lambda s: f"replay.fraction={s.config.replay.fraction} gives {_fraction_rows(s.config)} replay rows, which do "
                   f"not split over {s.processes} processes: choose a fraction that does"),
    Rule(lambda s: s.processes > 1 and s.draws_as_it_trains,
         lambda s: f"on {s.processes} processes replay is drawn once before training, into a pool: set "
                   "replay.draw_once=N (N samples), or replay.pool=DIR with replay.reuse=0"),
    Rule(lambda s: s.processes > 1 and s.config.compile, "compile=true runs in one process: drop it, or run without torchrun"),
]


def _fraction_rows(config: RunConfig) -> int:
    return math.floor(config.replay.fraction * config.optim.batch_size)


def validate(config: RunConfig, mode: str, front_end: str = CLI, processes: int = 1) -> None:
    """Every check a run's settings must pass before anything is written (each failure is one
    line saying what to change): ranges and choices, then each rule of RULES that binds `front_end`,
    then (the command line) the device and the run directory."""
    check_ranges(config)
    replay_method(config.replay.method, key="replay_method" if front_end == TRAINER else "replay.method")
    settings = Settings(config, mode, front_end, processes)
    for rule in RULES:
        if front_end in rule.front_ends and rule.broken(settings):
            raise SelfReplayError(rule.message(settings) if callable(rule.message) else rule.message)
    if front_end == CLI:
        resolve_device(config.device)
        check_output_dir(config.out, "out")
