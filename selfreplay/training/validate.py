"""Every check a run's settings must pass before anything is written; each failure is one line
saying what to change."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

from selfreplay.config import (
    HF_PREFIX,
    RunConfig,
    check_output_dir,
    check_ranges,
    is_hf,
)
from selfreplay.errors import SelfReplayError
from selfreplay.objective.methods import NO_REPLAY, check_budgeted, replay_method
from selfreplay.runtime import resolve_device


def validate(config: RunConfig, mode: str) -> None:
    """Every check a run's settings must pass before anything is written; each failure is one
    line saying what to change."""
    check_ranges(config)
    method = replay_method(config.replay.method)
    if is_hf(config) and mode != "finetune":
        raise SelfReplayError("init=hf: names a model to finetune: run selfreplay finetune init=hf:NAME_OR_PATH")
    if is_hf(config):
        _validate_hf(config)
    r, s, o = config.replay, config.stop, config.optim
    checks = [
        (config.model.reference_dtype != "float32" and not is_hf(config),
         "model.reference_dtype sets the dtype of an init=hf: model's frozen copy: drop it for a built-in model"),
        (config.eval.lm_eval_tasks and not is_hf(config),
         "eval.lm_eval_tasks scores Hugging Face models: export the pretrained run with selfreplay export RUN --hf OUT, "
         "then finetune init=hf:OUT"),
        (config.eval.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None,
         "eval.lm_eval_tasks needs lm-eval: pip install lm-eval"),
        (not config.out, "set out=RUN_DIR, the directory the run writes to"),
        (not config.data.train, "set data.train=TOKEN_FILE, the token file to train on"),
        (mode == "pretrain" and not config.data.tokenizer, "set data.tokenizer=DIR, the tokenizer of the token files"),
        (mode == "pretrain" and (method is not NO_REPLAY or r.fraction > 0),
         "replay is for finetuning: pretraining takes replay.method=none and replay.fraction=0"),
        (mode == "pretrain" and config.lora.rank > 0, "LoRA is a finetuning baseline: pretraining takes lora.rank=0"),
        (r.pool is not None and r.source != "self", "replay.pool holds π0's own samples: set replay.source=self"),
        (r.draw_once and r.pool is not None, "replay.draw_once draws the run's own pool: drop replay.pool, or "
                                             "replay.draw_once to replay the pool given"),
        (r.draw_once and (r.source != "self" or (not method.needs_replay and r.fraction == 0)),
         "replay.draw_once draws self-replay samples: it needs replay.source=self and a method that replays "
         "(replay.method=kl or ntp) or replay.fraction > 0"),
        (r.fraction > 0 and method.needs_replay,
         f"replay.fraction mixes replay rows into the new batch; replay.method={method.name} draws a batch of its own: "
         "set one of the two"),
        (config.data.mix_fraction > 0 and not config.data.mix,
         "data.mix_fraction > 0 needs a second token file: set data.mix=TOKEN_FILE"),
        (all(v is None for v in (s.tokens, s.tokens_per_param, s.epochs, s.target_loss, s.wall_seconds)),
         "no stop rule: set stop.tokens, stop.tokens_per_param, stop.epochs, stop.target_loss or stop.wall_seconds"),
        ((s.target_loss is not None or s.patience is not None) and config.data.val_sequences == 0,
         "stop.target_loss and stop.patience need validation data: set data.val_sequences > 0"),
        (o.schedule == "cosine" and all(v is None for v in (s.tokens, s.tokens_per_param, s.epochs)),
         "optim.schedule=cosine decays to zero at the token budget: set stop.tokens, stop.tokens_per_param or stop.epochs"),
    ]
    for failed, message in checks:
        if failed:
            raise SelfReplayError(message)
    check_budgeted(method, r)
    rows = math.floor(r.fraction * o.batch_size)
    if r.fraction > 0 and not 0 < rows < o.batch_size:
        raise SelfReplayError(f"replay.fraction={r.fraction} of optim.batch_size={o.batch_size} is {rows} rows: "
                              f"choose a fraction that replaces at least one row and leaves one")
    resolve_device(config.device)
    check_output_dir(config.out, "out")


def _validate_hf(config: RunConfig) -> None:
    """The settings a Hugging Face finetuning run cannot take, each refused with one line."""
    r, hf = config.replay, "init=hf:"
    shape = [f"model.{f.name}" for f in dataclasses.fields(config.model)
             if f.name not in ("T", "trust_remote_code", "reference_dtype") and getattr(config.model, f.name) != f.default]
    checks = [
        (config.init == HF_PREFIX, "init=hf: needs a model: init=hf:NAME_OR_PATH (a hub id or a local directory)"),
        (not config.data.old_text, f"{hf} needs held-out old-domain text to measure forgetting: "
                                   "set data.old_text=FILE (.jsonl, .txt or hf:DATASET)"),
        (config.data.old or config.data.mix, f"{hf} takes text files: drop data.old and data.mix (use data.old_text)"),
        (config.data.tokenizer, f"{hf} uses the model's own tokenizer: drop data.tokenizer"),
        (r.fraction > 0, f"{hf} replays through a replay term: drop replay.fraction (mixing rows into the batch)"),
        (r.source != "self", f"{hf} replays samples of π0: replay.source=self"),
        (r.domains, f"{hf} samples replay from BOS: drop replay.domains"),
        ((r.system is not None or r.prompts) and not r.chat,
         "replay.system and replay.prompts shape chat samples: set replay.chat=true"),
        (config.stop.tokens_per_param is not None, f"{hf}: set stop.tokens or stop.epochs, not stop.tokens_per_param"),
        (config.compile, f"{hf} runs eagerly: set compile=false"),
        (r.compile, f"{hf} samples with the model's own generation code: set replay.compile=false"),
        (config.model.reference_dtype != "float32" and config.lora.rank > 0,
         "with LoRA π0 is the model with its adapters disabled, not a copy: drop model.reference_dtype"),
        (shape, f"{hf} takes its shape from the model: drop {', '.join(shape)} (model.T sets the sequence length)"),
    ]
    for failed, message in checks:
        if failed:
            raise SelfReplayError(message)
