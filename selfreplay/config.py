"""Typed run configuration: defaults in one place, YAML files, dotted overrides.

    selfreplay finetune ft.yaml replay.method=kl replay.coeff=10 optim.lr=1e-4

A key that does not exist is an error naming the closest valid key; a value is
converted to the field's type or rejected with one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selfreplay.errors import SelfReplayError, did_you_mean
from selfreplay.rundir import CONFIG_NAME, notice, write_atomic

REPLAY_SOURCES = ("self", "real")
AUTO = "auto"  # replay.coeff=auto: c is held to replay.budget (docs/method.md, "The replay coefficient held to a budget")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


def setting(default, help: str):
    """A config field with its help text (the Trainer's arguments carry it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    D: int = 256  # model width
    L: int = 6  # layers
    H: int = 64  # head dimension (heads = D / H)
    T: int = 256  # sequence length (the longest context)
    V: int = 4096  # vocabulary size
    rope_base: float = 10000.0
    trust_remote_code: bool = False  # init=hf: run the model repository's own code (only for a model you trust)
    gguf_file: str | None = None  # init=hf:DIR: the GGUF file in DIR to load (or give init=hf:FILE.gguf)
    reference_dtype: str = "float32"  # init=hf, full finetuning: dtype of π0's frozen copy (bfloat16 halves it)

    def __post_init__(self) -> None:
        for name in ("D", "L", "H", "T", "V"):
            if getattr(self, name) <= 0:
                raise SelfReplayError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.D % self.H:
            raise SelfReplayError(f"model.D={self.D} is not a multiple of the head dimension model.H={self.H}")
        if self.H % 2:
            raise SelfReplayError(f"model.H={self.H} must be even for rotary embeddings")

    @property
    def heads(self) -> int:
        return self.D // self.H

    @property
    def non_embedding_params(self) -> int:
        """12·L·D²: attention (4·D²) and MLP (8·D²) per layer."""
        return 12 * self.L * self.D**2

    @property
    def params(self) -> int:
        """All parameters: the non-embedding ones plus untied input and output embeddings."""
        return self.non_embedding_params + 2 * self.V * self.D


@dataclass
class DataConfig:
    tokenizer: str | None = None  # tokenizer directory; a finetune run takes its init run's tokenizer
    train: str | None = None  # token file trained on: the old domain when pretraining, the new one when finetuning
    mix: str | None = None  # pretraining: a second token file mixed into every batch
    mix_fraction: float = 0.0  # fraction of each batch's rows drawn from `mix`
    old: str | None = None  # finetuning: the old domain's token file (old_loss, real replay); default: init run's data.train
    old_text: str | None = None  # init=hf: held-out old-domain text (old_loss, old_kl, forgetting), packed like data.train
    text_field: str = "text"  # init=hf: the JSONL field (or dataset column) holding each document's text
    chat_field: str = "messages"  # init=hf: the field holding a conversation's {role, content} turns (data.train)
    val_sequences: int = 256  # sequences held out of each token file for validation (init=hf: of data.train, and of data.old_text)
    seed: int = 0  # seed of the train/validation split and of the epoch shuffles


@dataclass
class OptimConfig:
    lr: float = 1e-3
    batch_size: int = 32  # sequences per step
    weight_decay: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8  # AdamW's epsilon (TrainingArguments' adam_epsilon)
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "constant"  # after warmup: constant, or cosine decay to zero at the stop budget
    grad_clip: float | None = 1.0  # max gradient norm; null to disable


@dataclass
class ReplayConfig:
    """The replay settings, one schema for every front end: replay.X on the command line, replay_X in
    the Trainer's SelfReplayConfig (generated from these fields, help included)."""

    method: str = setting("none", 'the replay term R: a name in selfreplay.objective.methods.REPLAY_METHODS')
    source: str = setting("self", "self: sampled from the frozen pretrained model; real: the old domain's data")
    coeff: float | str = setting(10.0, 'c in loss = NTP(new) + c·R; auto: c moves to hold the replay KL at `budget`')
    budget: float | None = setting(None, 'coeff=auto: the replay KL held, nats per token (required with auto)')
    coeff_start: float = setting(10.0, 'coeff=auto: c at the first step')
    coeff_min: float = setting(0.01, "coeff=auto: c's floor")
    coeff_max: float = setting(1000.0, "coeff=auto: c's ceiling; held there over budget, the run is capacity bound")
    horizon: int = setting(20, 'coeff=auto: steps over which c rises by at most a factor e (falls by e^0.2)')
    fraction: float = setting(0.0, "fraction of each batch's rows taken from the replay source in place of new rows")
    batch_size: int = setting(16, 'replay sequences per step')
    buffer: int = setting(8, 'self replay: the pool holds buffer × batch_size sequences (or decode_batch), redrawn when used up')
    decode_batch: int = setting(128, 'self replay: sequences decoded together; a pool holds at least this many')
    compile: bool = setting(False, "self replay: decode through one torch.compile'd step (fuses its small operations)")
    temperature: float = setting(1.0, 'sampling temperature of self replay')
    domains: str | None = setting(None, 'self replay: comma-separated domains (names or ids) its samples start from, in turn; default: the old domain')
    length: int | None = setting(None, 'init=hf: longest replay sample in tokens; default: model.T (see DEFAULTS_FOLLOW)')
    top_p: float | None = setting(None, 'init=hf: nucleus sampling of self replay; null: the whole distribution')
    stop_at_eos: bool = setting(True, 'init=hf: a replay sample ends at EOS and the losses skip what follows')
    pool: str | None = setting(None, 'a pool directory from `selfreplay sample ... --out POOL`, replayed first (see reuse)')
    reuse: int = setting(1, 'passes over replay.pool, each in its own seeded order, before fresh draws (0: no fresh draws)')
    draw_once: int = setting(0, 'self replay: draw this many samples before the first step, into RUN_DIR/replay_pool, and replay them pass after pass (0: draw as the run goes)')
    chat: bool = setting(False, 'init=hf: sample inside the chat template: π0 writes a user turn, then its answer')
    system: str | None = setting(None, 'init=hf: a system turn that chat samples start with (needs replay.chat=true)')
    prompts: str | None = setting(None, 'init=hf: .txt or .jsonl (`prompt`) user turns; π0 writes only the answers')

    def __post_init__(self) -> None:
        """Each replay setting in its range (RANGES, CHOICES), and replay.coeff=auto's settings given
        together: a ReplayConfig that exists is a valid one, whichever front end made it."""
        check_keys(self, "replay.")
        check_budget(self)


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
    on_capacity_bound: bool = False  # replay.coeff=auto: stop when the run turns capacity bound


@dataclass
class LogConfig:
    every_tokens: int = 65536  # measure every this many training tokens (the first interval, with growth)
    growth: float = 1.0  # each interval this many times the one before (1: even; 1.05 for runs whose length spans decades)
    checkpoint_every: int = 0  # also checkpoint every this many log points (0: by time alone)
    checkpoint_seconds: float = 300.0  # checkpoint at the first log point this long after the last one (0: never)
    progress: bool = True  # tqdm progress bar


@dataclass
class EvalConfig:
    lm_eval_tasks: str | None = None  # init=hf: comma-separated lm-eval tasks scored before and after finetuning (pip install lm-eval)
    lm_eval_limit: int | None = None  # documents per lm-eval task (null: every one)
    lm_eval_include_path: str | None = None  # a folder of lm-eval task YAML files of your own
    prompts: str | None = None  # init=hf: held-out user prompts (.txt a line each, or .jsonl `prompt`), never replayed: chat_kl, answer_agreement
    answer_tokens: int = 64  # eval.prompts: the longest answer π0 and θ write to a prompt, in tokens


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
    eval: EvalConfig = field(default_factory=EvalConfig)

    def updated(self, **settings) -> "RunConfig":
        """These settings with `settings` set, in Python values by section, each checked as a YAML
        file's: config.updated(seed=1, optim={"lr": 1e-3}, replay={"method": "kl"}); paths made absolute."""
        return absolute_paths(build(RunConfig, merge(to_dict(self), settings)))

    @classmethod
    def finetune_from(cls, run_dir: str | Path, **settings) -> "RunConfig":
        """The settings that finetune the pretrained run `run_dir` (init=run_dir): its model's shape and
        its data (the old domain, the split's seed, the validation rows) as the base, then `settings`
        as in `updated`. The command line's `selfreplay finetune init=RUN_DIR ...` builds the same."""
        base = finetune_base(read_init_run(run_dir))
        return absolute_paths(build(cls, merge(merge(base, {"init": str(run_dir)}), settings)))


def read_init_run(run_dir: str | Path) -> RunConfig:
    """The settings of a finished pretraining run (π0), each checked for its type."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise SelfReplayError(f"init run {run_dir} not found (no {CONFIG_NAME}): pretrain it first with selfreplay pretrain")
    try:
        return build(RunConfig, read_yaml(path))
    except SelfReplayError as e:
        raise SelfReplayError(f"the init run's {path}: {e}") from None


def finetune_base(init: RunConfig) -> dict:
    """What a finetuning run takes from its pretrained run `init`: the model's shape, the old domain
    (init's training data), the split's seed and the validation rows."""
    return {"model": vars(init.model), "data": {"old": init.data.train, "seed": init.data.seed,
                                                "val_sequences": init.data.val_sequences}}


def absolute_paths(config: RunConfig) -> RunConfig:
    """`config` with every file and directory setting absolute (a hub id or hf:NAME left as it is),
    so a run's config.yaml names the same files from any directory."""
    absolute = lambda p: str(Path(p).resolve()) if p and not p.startswith("hf:") else p  # noqa: E731
    r, d = config.replay, config.data
    data = dataclasses.replace(d, tokenizer=absolute(d.tokenizer), train=absolute(d.train), mix=absolute(d.mix),
                               old=absolute(d.old), old_text=absolute(d.old_text))
    init = absolute(config.init)
    if is_hf(config) and Path(config.init.removeprefix("hf:")).expanduser().exists():  # a local model or GGUF file
        init = "hf:" + str(Path(config.init.removeprefix("hf:")).expanduser().resolve())
    return dataclasses.replace(
        config, out=absolute(config.out), init=init, data=data,
        replay=dataclasses.replace(r, pool=absolute(r.pool), prompts=absolute(r.prompts)),
        eval=dataclasses.replace(config.eval, lm_eval_include_path=absolute(config.eval.lm_eval_include_path)))


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
    hint = did_you_mean(key, all_keys(cls) + sections) or f"; valid keys: {', '.join(all_keys(cls))}"
    return SelfReplayError(f"unknown config key '{key}'{hint}")


def _coerce(value, tp, key: str):
    """Convert a YAML or command-line value to the annotated type tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp) and \
                (value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))):
            return None
        for option in options:  # the first type the value converts to (float | str: "10" a number, "auto" a word)
            try:
                return _coerce(value, option, key)
            except SelfReplayError:
                if len(options) == 1:
                    raise
        names = " or ".join(getattr(option, "__name__", str(option)) for option in options)
        raise SelfReplayError(f"config key '{key}' must be {names}, got {value!r}")
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
            if value is None or isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
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
    return _build(RunConfig, renamed_settings(values))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    write_atomic(Path(path), lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------- what each setting accepts

@dataclass(frozen=True)
class Range:
    """The finite numbers a numeric key accepts: low <= x <= high, or < / > where open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return self.high is None or (x < self.high or (not self.high_open and x == self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "a finite number"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, low_open=True)
BETA = Range(0, 1, high_open=True)

# Every numeric key and the values it accepts (tests check that no numeric key is missing).
RANGES = {
    "seed": AT_LEAST_0,
    "model.D": AT_LEAST_1, "model.L": AT_LEAST_1, "model.H": Range(2), "model.T": Range(2), "model.V": AT_LEAST_1,
    "model.rope_base": Range(1, low_open=True),
    "data.mix_fraction": Range(0, 1), "data.val_sequences": AT_LEAST_0, "data.seed": AT_LEAST_0,
    "optim.lr": ABOVE_0, "optim.batch_size": AT_LEAST_1, "optim.weight_decay": AT_LEAST_0,
    "optim.beta1": BETA, "optim.beta2": BETA, "optim.eps": ABOVE_0, "optim.warmup_steps": AT_LEAST_0, "optim.grad_clip": ABOVE_0,
    "replay.coeff": AT_LEAST_0, "replay.budget": ABOVE_0, "replay.coeff_start": ABOVE_0, "replay.coeff_min": ABOVE_0,
    "replay.coeff_max": ABOVE_0, "replay.horizon": AT_LEAST_1, "replay.reuse": AT_LEAST_0, "replay.draw_once": AT_LEAST_0, "replay.fraction": Range(0, 1, high_open=True), "replay.batch_size": AT_LEAST_1, "replay.buffer": AT_LEAST_1, "replay.decode_batch": AT_LEAST_1,
    "replay.temperature": ABOVE_0, "replay.length": Range(2), "replay.top_p": Range(0, 1, low_open=True),
    "lora.rank": AT_LEAST_0, "lora.alpha": ABOVE_0,
    "stop.tokens": AT_LEAST_1, "stop.tokens_per_param": ABOVE_0, "stop.epochs": ABOVE_0,
    "stop.target_loss": AT_LEAST_0, "stop.wall_seconds": ABOVE_0, "stop.patience": AT_LEAST_1,
    "log.every_tokens": AT_LEAST_1, "log.growth": AT_LEAST_1, "log.checkpoint_every": AT_LEAST_0, "log.checkpoint_seconds": AT_LEAST_0,
    "eval.lm_eval_limit": AT_LEAST_1, "eval.answer_tokens": AT_LEAST_1,
}
CHOICES = {"replay.source": REPLAY_SOURCES, "optim.schedule": SCHEDULES,
           "precision": PRECISIONS, "model.reference_dtype": ("float32", "bfloat16")}


def get_key(config, key: str):
    """The value of dotted `key` in a config dataclass ('optim.lr' -> config.optim.lr)."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


AUTO_KEYS = ("replay.coeff",)  # the numeric keys that also take `auto`
# replay.coeff=auto's settings: refused with a fixed coefficient, which would leave them unused
BUDGET_KEYS = ("budget", "coeff_start", "coeff_min", "coeff_max", "horizon")


def check_keys(config, prefix: str = "") -> None:
    """Refuse, with one line, any numeric value of `config` (the RunConfig, or its section named by
    `prefix`, e.g. "replay.") outside its range, and any unknown choice."""
    for key in [*RANGES, *CHOICES]:
        if key.startswith(prefix):
            check_value(key, get_key(config, key.removeprefix(prefix)))


def check_value(key: str, value) -> None:
    """Refuse, with one line, a value of the dotted `key` outside its range (RANGES) or its choices (CHOICES)."""
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise SelfReplayError(f"unknown {key} {value!r}: choose one of {', '.join(CHOICES[key])}")
        return
    allowed = RANGES[key]
    if isinstance(value, str):  # a key typed float | str: a number, or auto
        if key in AUTO_KEYS and value == AUTO:
            return
        raise SelfReplayError(f"{key} must be {allowed} or {AUTO}, got {value!r}")
    if value is not None and value not in allowed:
        raise SelfReplayError(f"{key} must be {allowed}, got {value}")


def check_ranges(config: RunConfig) -> None:
    """Refuse any numeric value outside its range and any unknown choice, with one line (the replay
    section checked itself when it was made)."""
    check_keys(config)


def check_budget(r: ReplayConfig) -> None:
    """replay.coeff=auto's settings, each refused with one line: a budget is required with auto and
    refused without it, as are c's bounds and horizon; c starts within its bounds."""
    if r.coeff == AUTO:
        if r.budget is None:
            raise SelfReplayError("replay.coeff=auto holds the replay KL at a budget: set replay.budget (nats per "
                                  "token of KL(π0 ‖ πθ); 0.01 to start)")
        if not r.coeff_min <= r.coeff_start <= r.coeff_max:
            raise SelfReplayError(f"replay.coeff_start={r.coeff_start:g} is outside [replay.coeff_min, replay.coeff_max]"
                                  f" = [{r.coeff_min:g}, {r.coeff_max:g}]: start c within its bounds")
        return
    given = [f"replay.{f.name}" for f in dataclasses.fields(r) if f.name in BUDGET_KEYS and getattr(r, f.name) != f.default]
    if given:
        raise SelfReplayError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to replay.coeff=auto (c held "
                              f"to a budget), and replay.coeff={r.coeff:g} is fixed: set replay.coeff=auto, or drop "
                              f"{'it' if len(given) == 1 else 'them'}")


HF_PREFIX = "hf:"  # init=hf:NAME_OR_PATH finetunes a Hugging Face model


def is_hf(config: RunConfig) -> bool:
    """Whether the run finetunes a Hugging Face model (init=hf:NAME_OR_PATH)."""
    return bool(config.init) and config.init.startswith(HF_PREFIX)


# Settings whose default is another setting's value: the one place that says which follows which.
# (init=hf: model.T also follows the model's context when it is longer than that: selfreplay.families.hf.)
DEFAULTS_FOLLOW = {"replay.length": "model.T"}


def follow_defaults(config: RunConfig) -> RunConfig:
    """`config` with each unset setting of DEFAULTS_FOLLOW set to the value it follows."""
    for key, source in DEFAULTS_FOLLOW.items():
        section, name = key.split(".")
        if getattr(getattr(config, section), name) is None:
            value = get_key(config, source)
            config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{name: value})})
    return config


def renamed(settings: dict) -> dict:
    """Dotted settings ({"replay.method": ...}) with the spellings of the last release read into
    today's: replay.method=replace replay.coeff=F is now replay.fraction=F. The one place that
    knows an old spelling (runs, sweep files and run records of the last release still hold it)."""
    if settings.get("replay.method") != "replace":
        return settings
    if settings.get("replay.coeff") is None:
        raise SelfReplayError("replay.method=replace is now replay.fraction=F (the fraction of each batch's rows "
                              "taken from the replay source): set replay.fraction and drop replay.method=replace")
    rest = {k: v for k, v in settings.items() if k != "replay.coeff"}
    return {**rest, "replay.method": "none", "replay.fraction": settings["replay.coeff"]}


def renamed_settings(values: dict) -> dict:
    """Raw nested settings read by `renamed`, with a one-line notice where an old spelling was read."""
    replay = values.get("replay")
    if not isinstance(replay, dict) or replay.get("method") != "replace":
        return values
    new = renamed({f"replay.{k}": v for k, v in replay.items()})
    notice(f"replay.method=replace replay.coeff={replay.get('coeff')} is read as replay.fraction="
           f"{new['replay.fraction']}: write it that way, the old spelling goes in the next release")
    return {**values, "replay": {k.removeprefix("replay."): v for k, v in new.items()}}


def check_output_dir(path: str | Path, key: str) -> None:
    """Refuse an output directory that names a file, lies under a file, or cannot be written."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise SelfReplayError(f"{key}={path} is a file, not a directory: choose another {key}=")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SelfReplayError(f"{key}={path} lies under the file {parent}: choose another {key}=")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SelfReplayError(f"{key}={path} cannot be written ({parent} is not writable): choose another {key}=")


def build(cls: type, values: dict, prefix: str = ""):
    """A config dataclass from plain values (a YAML section, say), each converted to its field's type."""
    if not isinstance(values, dict):
        raise SelfReplayError(f"config section '{prefix.rstrip('.')}' must be a mapping of keys, got {values!r}")
    return _build(cls, renamed_settings(values), prefix)
