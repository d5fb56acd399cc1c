"""Typed run configuration: defaults in one place, YAML files, dotted overrides.

    selfreplay finetune ft.yaml replay.method=kl replay.coeff=10 optim.lr=1e-4

A key that does not exist is an error naming the closest valid key; a value is
converted to the field's type or rejected with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selfreplay.errors import SelfReplayError
from selfreplay.model import ModelConfig

REGULARIZERS = ("none", "ntp", "kl", "kl_new", "replace")
REPLAY_SOURCES = ("self", "real")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


@dataclass
class DataConfig:
    tokenizer: str | None = None  # tokenizer directory; a finetune run takes its init run's tokenizer
    train: str | None = None  # token file trained on: the old domain when pretraining, the new one when finetuning
    mix: str | None = None  # pretraining: a second token file mixed into every batch
    mix_fraction: float = 0.0  # fraction of each batch's rows drawn from `mix`
    old: str | None = None  # finetuning: the old domain's token file (old_loss, real replay); default: init run's data.train
    val_sequences: int = 256  # sequences held out of each token file for validation
    seed: int = 0  # seed of the train/validation split and of the epoch shuffles


@dataclass
class OptimConfig:
    lr: float = 1e-3
    batch_size: int = 32  # sequences per step
    weight_decay: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "constant"  # after warmup: constant, or cosine decay to zero at the stop budget
    grad_clip: float | None = 1.0  # max gradient norm; null to disable


@dataclass
class ReplayConfig:
    method: str = "none"  # none | ntp | kl | kl_new | replace
    source: str = "self"  # self: sampled from the frozen pretrained model; real: the old domain's data
    coeff: float = 10.0  # c in loss = NTP(new) + c·R; for replace, the fraction of rows replaced
    batch_size: int = 16  # replay sequences per step
    buffer: int = 8  # self replay: the pool holds buffer × batch_size sequences, redrawn every `buffer` steps
    temperature: float = 1.0  # sampling temperature of self replay


@dataclass
class LoraConfig:
    rank: int = 0  # 0: full finetuning; r > 0 trains rank-r adapters on every non-embedding matrix
    alpha: float | None = None  # adapter scale alpha / rank; default alpha = rank (scale 1)


@dataclass
class StopConfig:
    tokens: int | None = None  # training tokens (new-domain rows; replay rows not counted)
    tokens_per_param: float | None = None  # tokens / model parameters
    epochs: float | None = None  # passes over the training split
    target_loss: float | None = None  # stop at the first log point with validation loss <= this
    wall_seconds: float | None = None  # training wall time
    patience: int | None = None  # early stopping: log points without a new best validation loss


@dataclass
class LogConfig:
    every_tokens: int = 65536  # measure every this many training tokens
    checkpoint_every: int = 0  # checkpoint every this many log points (0: only at the end)
    progress: bool = True  # tqdm progress bar


@dataclass
class RunConfig:
    out: str | None = None  # run directory (required)
    init: str | None = None  # finetuning: the pretrained run directory
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    precision: str = "fp32"  # fp32 | bf16 (matmuls under bfloat16 autocast; softmax, losses and KL stay float32)
    compile: bool = False  # torch.compile the training forward and backward pass
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    log: LogConfig = field(default_factory=LogConfig)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, e.g. 'replay.coeff'."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, cls: type) -> SelfReplayError:
    sections = [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
    close = difflib.get_close_matches(key, all_keys(cls) + sections, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(all_keys(cls))}"
    return SelfReplayError(f"unknown config key '{key}'{hint}")


def _coerce(value, tp, key: str):
    """Convert a YAML or command-line value to the annotated type tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, options[0], key)
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if isinstance(value, bool):
                return value
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, str) else value
            if number != int(number):
                raise ValueError
            return int(number)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise SelfReplayError(f"config key '{key}' has an unsupported type {tp}")
    name = getattr(tp, "__name__", str(tp))
    raise SelfReplayError(f"config key '{key}' must be {name}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "", root: type | None = None):
    root = root or cls
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", root)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp, value, key = hints[f.name], values[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise SelfReplayError(f"config key '{key}' is a section: give it as {key}.KEY=VALUE")
            kwargs[f.name] = _build(tp, value, f"{key}.", root)
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': '1'}, 'c': 'x'} (values stay strings; typing happens later)."""
    tree: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SelfReplayError(f"override {item!r} is not KEY=VALUE (for example replay.coeff=10)")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SelfReplayError(f"override {item!r} conflicts with another override of '{part}'")
        node[leaf] = value.strip()
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SelfReplayError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SelfReplayError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SelfReplayError(f"{path} must hold a mapping of config keys, not {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Defaults <- base (e.g. an init run's settings) <- YAML file <- dotted overrides."""
    values = dict(base or {})
    if path is not None:
        values = merge(values, read_yaml(path))
    values = merge(values, parse_overrides(overrides or []))
    return _build(RunConfig, values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)
