"""Pretraining and finetuning: one plain loop.

    loss = NTP(θ; x_new) + c · R        (the regulariser R is chosen in `training_loss`)

A run directory holds config.yaml (the resolved config), tokenizer.json,
metrics.jsonl (one line per log point), summary.json and weights.safetensors;
while the run is going, checkpoint.json names the latest complete checkpoint
folder, from which a killed run resumes exactly.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from selfreplay.config import (PRECISIONS, REGULARIZERS, REPLAY_SOURCES, SCHEDULES, RunConfig, load_config,
                               read_yaml, save_config, to_dict)
from selfreplay.data import BatchLoader, SequenceStream, TokenSequences
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate import ValidationSet, compute_multiplier, weight_drift
from selfreplay.lora import add_lora, effective_weights, merge_lora
from selfreplay.losses import head_kl_divergence, head_next_token_loss
from selfreplay.model import CONFIG_NAME, ModelConfig, Transformer, load_model_config, save_checkpoint
from selfreplay.replay import RealReplay, SelfReplayPool
from selfreplay.runtime import autocast, resolve_device

METRICS_NAME, SUMMARY_NAME, CHECKPOINT_POINTER = "metrics.jsonl", "summary.json", "checkpoint.json"


# ---------------------------------------------------------------- configuration

def resolve_config(mode: str, path: str | None, overrides: list[str] | None) -> RunConfig:
    """The run's config: defaults <- (finetuning) the init run's model and data <- YAML <- overrides."""
    config = load_config(path, overrides)
    if mode == "finetune":
        if not config.init:
            raise SelfReplayError("finetuning needs the pretrained run: set init=RUN_DIR")
        init_config = _read_run_config(config.init)
        user_model = load_config(path, overrides, base={"model": {}}).model
        model = load_model_config(config.init)
        if user_model != ModelConfig() and user_model != model:
            raise SelfReplayError(f"model.* settings differ from the init run {config.init}: "
                                  "a finetuned model keeps its pretrained shape, drop the model.* overrides")
        init_data = init_config.get("data", {})
        base = {"model": vars(model), "data": {"old": init_data.get("train"), "seed": init_data.get("seed", 0),
                                               "val_sequences": init_data.get("val_sequences", 256)}}
        config = load_config(path, overrides, base=base)
    validate(config, mode)
    return _absolute_paths(config)


def _read_run_config(run_dir: str) -> dict:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise SelfReplayError(f"init run {run_dir} not found (no {CONFIG_NAME}): pretrain it first with selfreplay pretrain")
    return read_yaml(path)


def _absolute_paths(config: RunConfig) -> RunConfig:
    absolute = lambda p: str(Path(p).resolve()) if p else p  # noqa: E731
    data = replace(config.data, tokenizer=absolute(config.data.tokenizer), train=absolute(config.data.train),
                   mix=absolute(config.data.mix), old=absolute(config.data.old))
    return replace(config, out=absolute(config.out), init=absolute(config.init), data=data)


def validate(config: RunConfig, mode: str) -> None:
    """Reject settings that cannot run, each with one line saying what to change."""
    r, s, o = config.replay, config.stop, config.optim
    checks = [
        (not config.out, "set out=RUN_DIR, the directory the run writes to"),
        (not config.data.train, "set data.train=TOKEN_FILE, the token file to train on"),
        (mode == "pretrain" and not config.data.tokenizer, "set data.tokenizer=DIR, the tokenizer of the token files"),
        (mode == "pretrain" and r.method != "none", "replay is for finetuning: pretraining takes replay.method=none"),
        (mode == "pretrain" and config.lora.rank > 0, "LoRA is a finetuning baseline: pretraining takes lora.rank=0"),
        (r.method not in REGULARIZERS, f"unknown replay.method {r.method!r}: choose one of {', '.join(REGULARIZERS)}"),
        (r.source not in REPLAY_SOURCES, f"unknown replay.source {r.source!r}: choose self or real"),
        (r.coeff < 0, f"replay.coeff must be >= 0, got {r.coeff}"),
        (r.method == "replace" and r.coeff > 1, f"replay.method=replace takes replay.coeff as a fraction of rows in [0, 1], got {r.coeff}"),
        (r.batch_size < 1 or r.buffer < 1, "replay.batch_size and replay.buffer must be at least 1"),
        (r.temperature <= 0, f"replay.temperature must be > 0, got {r.temperature}"),
        (o.lr <= 0, f"optim.lr must be > 0, got {o.lr}"),
        (o.batch_size < 1, f"optim.batch_size must be at least 1, got {o.batch_size}"),
        (o.warmup_steps < 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}"),
        (o.schedule not in SCHEDULES, f"unknown optim.schedule {o.schedule!r}: choose constant or cosine"),
        (config.precision not in PRECISIONS, f"unknown precision {config.precision!r}: choose fp32 or bf16"),
        (config.lora.rank < 0, f"lora.rank must be >= 0, got {config.lora.rank}"),
        (config.log.every_tokens < 1, "log.every_tokens must be at least 1"),
        (config.data.val_sequences < 0, "data.val_sequences must be >= 0"),
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
    if r.method == "replace" and math.floor(r.coeff * o.batch_size) >= o.batch_size:
        raise SelfReplayError("replay.method=replace would replace every row of the batch: lower replay.coeff")


# ---------------------------------------------------------------- the objective

def training_loss(model, reference, new: torch.Tensor, replay: torch.Tensor | None, method: str,
                  coeff: float, trunk=None, replay_hidden: torch.Tensor | None = None,
                  compile: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, NTP on the new batch, R) for new [B, T] and replay [b, T] sequences.

    ntp and kl run the model once over new and replay rows together; the frozen
    reference model only ever runs without gradients, so R's gradient reaches θ alone.
    `trunk` computes the model's final hidden states (a compiled `model.hidden`, say);
    the losses apply the output projection themselves, a block of rows at a time.
    `replay_hidden`, π0's hidden states on the replay rows when the sampler kept them,
    spares π0's forward pass over those rows. compile: the losses' softmax arithmetic compiled.
    """
    trunk = trunk or model.hidden
    head = model.head.weight
    B = len(new)
    if method in ("ntp", "kl"):
        hidden = trunk(torch.cat([new, replay]))
        ntp = head_next_token_loss(hidden[:B], head, new, compile)
        if method == "ntp":
            reg = head_next_token_loss(hidden[B:], head, replay, compile)
        else:
            ref_hidden = replay_hidden
            if ref_hidden is None:
                with torch.no_grad():
                    ref_hidden = reference.hidden(replay)
            reg = head_kl_divergence(ref_hidden, reference.head.weight, hidden[B:], head, compile)
    else:
        hidden = trunk(new)
        ntp = head_next_token_loss(hidden, head, new, compile)
        if method == "kl_new":
            with torch.no_grad():
                ref_hidden = reference.hidden(new)
            reg = head_kl_divergence(ref_hidden, reference.head.weight, hidden, head, compile)
        else:  # none, replace (replay rows are already inside `new`)
            reg = torch.zeros((), device=new.device)
    return ntp + coeff * reg, ntp, reg


def learning_rate(step: int, config: RunConfig, total_steps: int | None) -> float:
    """Linear warmup over warmup_steps, then constant or cosine decay to zero at total_steps."""
    o = config.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine" and total_steps:
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return o.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return o.lr


# ---------------------------------------------------------------- checkpoints

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
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def save_training_state(out: Path, model, optimizer, progress: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ckpt-STEP/ completely, then point checkpoint.json at it (an atomic rename), then drop older ones.

    A kill at any moment leaves checkpoint.json naming a complete folder.
    """
    from safetensors.torch import save_file

    name = f"ckpt-{progress['step']:08d}"
    folder, staging = out / name, out / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(staging / "weights.safetensors"))
    save_file({**_optimizer_tensors(optimizer), **{k: v.cpu().contiguous() for k, v in tensors.items()}},
              str(staging / "state.safetensors"))
    (staging / "progress.json").write_text(json.dumps(progress))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    pointer = out / f".{CHECKPOINT_POINTER}.tmp"
    pointer.write_text(json.dumps({"latest": name}))
    pointer.replace(out / CHECKPOINT_POINTER)
    for old in out.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(out: Path, device) -> tuple[dict, dict, dict] | None:
    """(weights, tensors, progress) of the latest complete checkpoint, or None."""
    from safetensors.torch import load_file

    pointer = out / CHECKPOINT_POINTER
    if not pointer.is_file():
        return None
    folder = out / json.loads(pointer.read_text())["latest"]
    weights = load_file(str(folder / "weights.safetensors"), device=str(device))
    tensors = load_file(str(folder / "state.safetensors"))
    progress = json.loads((folder / "progress.json").read_text())
    return weights, tensors, progress


def _clear_checkpoints(out: Path) -> None:
    (out / CHECKPOINT_POINTER).unlink(missing_ok=True)
    for folder in [*out.glob("ckpt-*"), *out.glob(".ckpt-*.tmp")]:
        shutil.rmtree(folder, ignore_errors=True)


def _prepare_run_dir(config: RunConfig) -> bool:
    """Create the run directory; True when a checkpoint of this same config is there to resume."""
    out = Path(config.out)
    if (out / SUMMARY_NAME).exists():
        raise SelfReplayError(f"{out} already holds a finished run: choose another out= or delete it")
    if (out / CHECKPOINT_POINTER).exists():
        saved = read_yaml(out / CONFIG_NAME)
        if saved != to_dict(config):
            changed = sorted(k for k in to_dict(config) if saved.get(k) != to_dict(config)[k])
            raise SelfReplayError(f"{out} holds a checkpoint of a run with other settings ({', '.join(changed)}): "
                                  "resume with the same config, or choose another out=")
        return True
    if out.exists() and any(out.iterdir()):
        raise SelfReplayError(f"{out} is not empty and holds no checkpoint to resume: choose another out=")
    out.mkdir(parents=True, exist_ok=True)
    return False


# ---------------------------------------------------------------- the loop

def train(config: RunConfig, mode: str) -> dict:
    """Run `mode` ('pretrain' or 'finetune') as configured; returns the summary (also in summary.json)."""
    from selfreplay.tokenizer import load_tokenizer

    validate(config, mode)
    finetune = mode == "finetune"
    device = resolve_device(config.device)
    out = Path(config.out)
    tokenizer = load_tokenizer(config.data.tokenizer or config.init)
    if tokenizer.vocab_size > config.model.V:
        raise SelfReplayError(f"the tokenizer has {tokenizer.vocab_size} ids but model.V={config.model.V}: "
                              f"set model.V >= {tokenizer.vocab_size}")
    split = dict(T=config.model.T, val_sequences=config.data.val_sequences, seed=config.data.seed,
                 fingerprint=tokenizer.fingerprint)
    train_data = TokenSequences(config.data.train, **split)
    old_data = TokenSequences(config.data.old, **split) if finetune and config.data.old else None
    mix_data = TokenSequences(config.data.mix, **split) if config.data.mix else None
    if finetune and old_data is None:
        raise SelfReplayError("finetuning needs the old domain's token file: set data.old=TOKEN_FILE")
    resuming = _prepare_run_dir(config)

    model, reference, start_state, init_state = _load_models(config, finetune, device)
    params = add_lora(model, config.lora.rank, config.lora.alpha) if config.lora.rank > 0 else list(model.parameters())
    # the training forward may be compiled; evaluation and sampling run the same weights eagerly
    trunk = torch.compile(model.hidden, dynamic=False) if config.compile else model.hidden
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  weight_decay=config.optim.weight_decay)

    # data: new-domain batches (old-domain when pretraining), and replay
    r, s = config.replay, config.stop
    loader = BatchLoader(SequenceStream(train_data, config.data.seed), config.optim.batch_size,
                         SequenceStream(mix_data, config.data.seed + 1) if mix_data else None,
                         config.data.mix_fraction)
    replay = _make_replay(config, reference, old_data, device) if finetune else None
    if r.method == "replace":
        loader.batch_size -= replay.batch_size  # replay rows take the place of new rows
    tokens_per_step = loader.batch_size * config.model.T
    total_steps = _step_budget(config, tokens_per_step, train_data.train_tokens)
    log_every = max(1, round(config.log.every_tokens / tokens_per_step))

    validation = {}
    if config.data.val_sequences:
        validation["new" if finetune else "old"] = ValidationSet(train_data.validation(), reference)
        if finetune:
            validation["old"] = ValidationSet(old_data.validation(), reference)
        if mix_data is not None:
            validation["mix"] = ValidationSet(mix_data.validation(), reference)

    def measure() -> dict:
        metrics = {}
        for name, validation_set in validation.items():
            result = validation_set.evaluate(model)
            metrics[f"{name}_loss"] = result["loss"]
            metrics[f"{name}_loss_second_half"] = result["loss_second_half"]
            if "kl" in result:
                metrics[f"{name}_kl"] = result["kl"]
        if finetune:
            weights = effective_weights(model) if config.lora.rank > 0 else model.state_dict()
            metrics["drift"] = weight_drift(weights, start_state, init_state)
        return metrics

    # progress: everything a resumed run needs besides weights, optimizer and replay pool
    progress = {"step": 0, "tokens": 0, "train_seconds": 0.0, "replay_seconds": 0.0, "metric_lines": 0,
                "start_metrics": None,
                "best_loss": None, "evals_since_best": 0, "time_to_target_seconds": None,
                "time_to_target_steps": None, "loader": None, "replay": None, "stop_reason": None}
    if resuming and (state := load_training_state(out, device)) is not None:
        weights, tensors, progress = state
        progress.setdefault("replay_seconds", 0.0)
        model.load_state_dict(weights)
        _load_optimizer(optimizer, tensors)
        loader.load_state_dict(progress["loader"])
        if replay is not None:
            replay_state = dict(progress["replay"])
            if isinstance(replay, SelfReplayPool):
                replay_state["generator"] = tensors["replay.generator"]
                replay_state["pool"] = tensors.get("replay.pool")
                replay_state["hidden"] = tensors.get("replay.hidden")
            replay.load_state_dict(replay_state)
        lines = (out / METRICS_NAME).read_text().splitlines()[: progress["metric_lines"]]
        (out / METRICS_NAME).write_text("".join(line + "\n" for line in lines))
    else:
        save_config(config, out / CONFIG_NAME)
        tokenizer.save(out)
        (out / METRICS_NAME).write_text("")

    target_key = "new_loss" if finetune else "old_loss"

    def log_point(metrics: dict, interval_seconds: float, interval_tokens: int, train_loss: float | None,
                  reg: float | None) -> dict:
        start = progress["start_metrics"]
        line = {"step": progress["step"], "tokens": progress["tokens"],
                "epochs": round(loader.primary.epochs_done, 4), "train_seconds": round(progress["train_seconds"], 3),
                "lr": learning_rate(max(0, progress["step"] - 1), config, total_steps),
                "train_loss": train_loss, "replay_loss": reg,
                "tokens_per_second": interval_tokens / interval_seconds if interval_seconds > 0 else None, **metrics}
        if finetune and start is not None and "old_loss" in metrics:
            line["forgetting"] = metrics["old_loss"] - start["old_loss"]
        with open(out / METRICS_NAME, "a") as f:
            f.write(json.dumps(line) + "\n")
        progress["metric_lines"] += 1
        return line

    def check_target(metrics: dict) -> str | None:
        value = metrics.get(target_key)
        if value is None:
            return None
        if s.target_loss is not None and value <= s.target_loss:
            if progress["time_to_target_steps"] is None:
                progress["time_to_target_seconds"] = progress["train_seconds"]
                progress["time_to_target_steps"] = progress["step"]
            return "target_loss"
        if progress["best_loss"] is None or value < progress["best_loss"]:
            progress["best_loss"], progress["evals_since_best"] = value, 0
        else:
            progress["evals_since_best"] += 1
            if s.patience is not None and progress["evals_since_best"] >= s.patience:
                return "early_stopping"
        return None

    wall_start = time.perf_counter()
    if progress["start_metrics"] is None:
        progress["start_metrics"] = measure()
        log_point(progress["start_metrics"], 0.0, 0, None, None)
        progress["stop_reason"] = check_target(progress["start_metrics"])

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=progress["step"], unit="step", disable=not config.log.progress,
               desc=f"{mode} {out.name}", dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    reg_sum = torch.zeros((), device=device)
    interval_steps, interval_seconds, interval_tokens = 0, 0.0, 0
    while progress["stop_reason"] is None:
        if total_steps is not None and progress["step"] >= total_steps:
            progress["stop_reason"] = "budget"
            break
        if s.wall_seconds is not None and progress["train_seconds"] >= s.wall_seconds:
            progress["stop_reason"] = "wall_seconds"
            break
        tick = time.perf_counter()
        lr = learning_rate(progress["step"], config, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        new = loader.next_batch().to(device)
        replay_tick = time.perf_counter()
        replay_batch, replay_hidden = replay.next_batch() if replay is not None else (None, None)
        progress["replay_seconds"] += time.perf_counter() - replay_tick
        if r.method == "replace":
            new = torch.cat([new, replay_batch])
        with autocast(device, config.precision):
            loss, ntp, reg = training_loss(model, reference, new, replay_batch, r.method, r.coeff, trunk,
                                           replay_hidden, config.compile)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        loss_sum += ntp.detach()
        reg_sum += reg.detach()
        progress["step"] += 1
        progress["tokens"] += tokens_per_step
        elapsed = time.perf_counter() - tick
        progress["train_seconds"] += elapsed
        interval_steps, interval_seconds = interval_steps + 1, interval_seconds + elapsed
        interval_tokens += tokens_per_step
        bar.update(1)

        at_end = total_steps is not None and progress["step"] >= total_steps
        if progress["step"] % log_every == 0 or at_end:
            metrics = measure()
            train_loss = loss_sum.item() / interval_steps
            reg_mean = reg_sum.item() / interval_steps if r.method not in ("none", "replace") else None
            log_point(metrics, interval_seconds, interval_tokens, train_loss, reg_mean)
            progress["stop_reason"] = check_target(metrics)
            bar.set_postfix({"loss": f"{train_loss:.3f}", target_key: f"{metrics.get(target_key, float('nan')):.3f}"})
            loss_sum.zero_(), reg_sum.zero_()
            interval_steps, interval_seconds, interval_tokens = 0, 0.0, 0
            every = config.log.checkpoint_every
            if every and (progress["metric_lines"] - 1) % every == 0 and progress["stop_reason"] is None and not at_end:
                _checkpoint(out, model, optimizer, progress, loader, replay)
    bar.close()

    # the end: final measurements (if the last step was not a log point), weights, summary
    lines = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    if lines[-1]["step"] != progress["step"]:
        metrics = measure()
        lines.append(log_point(metrics, interval_seconds, interval_tokens,
                               loss_sum.item() / interval_steps if interval_steps else None, None))
        check_target(metrics)
    if config.lora.rank > 0:
        merge_lora(model)
    save_checkpoint(model, out, to_dict(config))
    summary = _summary(config, mode, lines, progress, time.perf_counter() - wall_start)
    tmp = out / f".{SUMMARY_NAME}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / SUMMARY_NAME)
    _clear_checkpoints(out)
    return summary


def _load_models(config: RunConfig, finetune: bool, device):
    """θ (fresh, or the init run's weights), and for finetuning the frozen π0 and the
    state dicts of θ0 (start of finetuning) and θinit (pretraining's random init)."""
    if not finetune:
        model = Transformer(config.model)
        model.reset_parameters(torch.Generator().manual_seed(config.seed))
        return model.to(device).train(), None, None, None
    model = Transformer.from_pretrained(config.init, device=device).train()
    reference = Transformer.from_pretrained(config.init, device=device).eval().requires_grad_(False)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    init_model = Transformer(config.model)  # the same draw as the init run's, from its seed
    init_model.reset_parameters(torch.Generator().manual_seed(_read_run_config(config.init).get("seed", 0)))
    init_state = {k: v.to(device) for k, v in init_model.state_dict().items()}
    return model, reference, start_state, init_state


def _make_replay(config: RunConfig, reference, old_data: TokenSequences, device):
    """The replay source of a finetuning run, or None when its method replays nothing."""
    r = config.replay
    if r.method not in ("ntp", "kl", "replace"):
        return None
    rows = r.batch_size if r.method != "replace" else math.floor(r.coeff * config.optim.batch_size)
    if r.source == "self":
        # bf16 runs decode with bf16 weights (a copy of π0), as their training matmuls run in bf16
        sampler = copy.deepcopy(reference).to(torch.bfloat16) if config.precision == "bf16" else reference
        return SelfReplayPool(sampler, old_data.domain_id, rows, r.buffer, r.temperature, config.seed,
                              keep_hidden=r.method == "kl")
    return RealReplay(SequenceStream(old_data, config.data.seed + 2), rows, device)


def _step_budget(config: RunConfig, tokens_per_step: int, train_tokens: int) -> int | None:
    """Steps allowed by the token, tokens-per-parameter and epoch budgets (None: no budget)."""
    s = config.stop
    budgets = [s.tokens, s.tokens_per_param * config.model.non_embedding_params if s.tokens_per_param else None,
               s.epochs * train_tokens if s.epochs else None]
    tokens = min((b for b in budgets if b is not None), default=None)
    return max(1, math.ceil(tokens / tokens_per_step)) if tokens is not None else None


def _checkpoint(out: Path, model, optimizer, progress: dict, loader: BatchLoader, replay) -> None:
    progress["loader"] = loader.state_dict()
    tensors = {}
    if replay is not None:
        state = replay.state_dict()
        if isinstance(replay, SelfReplayPool):
            tensors["replay.generator"] = state.pop("generator")
            for key in ("pool", "hidden"):
                value = state.pop(key)
                if value is not None:
                    tensors[f"replay.{key}"] = value
        progress["replay"] = state
    save_training_state(out, model, optimizer, progress, tensors)


def _summary(config: RunConfig, mode: str, lines: list[dict], progress: dict, wall_seconds: float) -> dict:
    first, last = lines[0], lines[-1]
    summary = {"mode": mode, "steps": progress["step"], "tokens": progress["tokens"],
               "epochs": last.get("epochs"), "train_seconds": progress["train_seconds"], "wall_seconds": wall_seconds,
               "tokens_per_second": progress["tokens"] / progress["train_seconds"] if progress["train_seconds"] else None,
               "replay_seconds": progress["replay_seconds"],
               "stop_reason": progress["stop_reason"] or "budget",
               "time_to_target_seconds": progress["time_to_target_seconds"],
               "time_to_target_steps": progress["time_to_target_steps"],
               "params": config.model.params, "non_embedding_params": config.model.non_embedding_params}
    if mode == "finetune":
        summary.update({
            "method": config.replay.method, "source": config.replay.source, "coeff": config.replay.coeff,
            "lora_rank": config.lora.rank,
            "old_loss_0": first.get("old_loss"), "old_loss": last.get("old_loss"),
            "forgetting": last.get("old_loss", math.nan) - first.get("old_loss", math.nan),
            "new_loss_0": first.get("new_loss"), "new_loss": last.get("new_loss"),
            "old_kl": last.get("old_kl"), "new_kl": last.get("new_kl"), "drift": last.get("drift"),
            "old_loss_second_half": last.get("old_loss_second_half"),
            "new_loss_second_half": last.get("new_loss_second_half"),
            "compute_multiplier": compute_multiplier(Path(config.init) / METRICS_NAME, last["old_loss"])
            if last.get("old_loss") is not None else None,
        })
    else:
        summary.update({"old_loss": last.get("old_loss"), "mix_loss": last.get("mix_loss")})
    return summary


def run_from_cli(mode: str, config_path: str | None, overrides: list[str]) -> dict:
    config = resolve_config(mode, config_path, overrides)
    summary = train(config, mode)
    keys = ("old_loss_0", "old_loss", "forgetting", "new_loss", "old_kl", "steps", "tokens",
            "train_seconds", "tokens_per_second", "time_to_target_seconds", "stop_reason")
    print(f"{mode} finished -> {config.out}")
    for key in keys:
        if key in summary and summary[key] is not None:
            value = summary[key]
            print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
    return summary
