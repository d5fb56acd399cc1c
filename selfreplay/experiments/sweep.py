"""Sweeps: many runs from one file, in stages, each point a run directory; resumable.

    selfreplay sweep experiments/capacity/sweep.yaml profile=small --workers 2

A sweep file is YAML:

    description: forgetting against pretraining length     # shown at the top of the report
    vars: {lr: 3e-3}               # ${NAME} in any value; NAME=VALUE on the command line sets one
    profiles:                      # named sets of vars, chosen with profile=NAME (default: the first)
      small: {budgets: [10, 100]}
      paper: {budgets: [10, 100, 1000]}
    corpus: {words: 300000, vocab: 2048}   # the built-in synthetic corpus, made unless old/new/tokenizer are given
    stages:                        # run in order; a stage starts when every earlier one has finished
      - name: pretrain
        mode: pretrain             # pretrain | finetune | continual: the selfreplay subcommand each point runs
        settings: {model.D: 64, data.tokenizer: ${tokenizer}, data.train: ${old}, model.V: ${vocab}}
        grid: {stop.tokens_per_param: ${budgets}}     # every combination of the listed values
      - name: probe
        mode: finetune
        init: pretrain             # one point per run of stage pretrain (init=its run directory)
        settings: {data.train: ${new}, stop.patience: 3, stop.tokens: 1e6}
      - name: finetune
        mode: finetune
        init: pretrain
        settings:
          stop.target_loss: {from: probe, max: new_loss, plus: 0.05}
        list: [{replay.method: none}, {replay.method: kl, replay.coeff: 10}]   # explicit points
    report: [{figure: tokens_per_param, stage: finetune}]                   # see selfreplay.experiments.report

Settings are dotted config keys (`selfreplay pretrain --help` lists them); `grid` and `list`
combine as grid × list. Built-in vars: `old`, `new` (token files), `tokenizer` (its directory),
`vocab` (its size) and `sweep` (the sweep directory). `init` may also filter its stage's runs,
`init: {stage: pretrain, where: {stop.tokens_per_param: [10, 1000]}}`, or list several such.

A value taken from an earlier stage's finished runs:

    {from: STAGE, min: KEY}                   the least KEY over its runs (max: the greatest)
    {from: STAGE, argmin: KEY, take: KEY2}    KEY2 of the run with the least KEY (argmax: greatest)
    ... plus: X, times: Y                     then · Y + X
    ... match: [init]                         only runs whose listed keys equal this point's

A KEY is a summary key (new_loss, forgetting, ...) or a setting (replay.coeff, init, ...).

Each point runs in `SWEEP_DIR/STAGE/NAME`, NAME made from the settings it varies
(`tokens_per_param=10,coeff=1`); its output goes to `SWEEP_DIR/logs/STAGE/NAME.log`. A point is
done when its summary.json exists (and does not say `diverged`), so running the same command
again skips finished points and resumes a killed sweep; a failing point is recorded with the
last line of its output and the others go on. `SWEEP_DIR/results.csv` has one row per point:
stage, run directory, status, error, its settings and its summary.
"""

from __future__ import annotations

import concurrent.futures
import csv
import difflib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfreplay.errors import SelfReplayError

SWEEP_FILE, RESULTS_FILE, SUMMARY_FILE = "sweep.yaml", "results.csv", "summary.json"
SWEEP_FIELDS = ("description", "vars", "profiles", "corpus", "stages", "report", "launcher")
STAGE_FIELDS = ("name", "mode", "init", "settings", "grid", "list")
FROM_FIELDS = ("from", "min", "max", "argmin", "argmax", "take", "plus", "times", "match")
INIT_FIELDS = ("stage", "where")
REPORT_FIELDS = ("figure", "stage", "stages", "frontier", "name")
CORPUS_FIELDS = ("words", "vocab", "seed")
BUILTIN_VARS = ("old", "new", "tokenizer", "vocab", "sweep")
PICKS = ("min", "max", "argmin", "argmax")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def default_workers() -> int:
    """Workers when --workers is not given: two single-threaded runs side by side finished a small
    sweep 1.5x sooner than one two-threaded run at a time on a 2-core CPU (benchmarks/sweep_workers.py);
    more than two share a GPU or memory badly, so larger machines ask for them with --workers."""
    return min(2, cores())


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- the sweep file

@dataclass
class From:
    """A setting computed from an earlier stage's finished runs."""

    stage: str
    pick: str  # min | max | argmin | argmax
    key: str  # the value picked over (min/max) or compared (argmin/argmax)
    take: str | None = None  # argmin/argmax: the key whose value is taken (default: `key`)
    plus: float = 0.0
    times: float = 1.0
    match: tuple[str, ...] = ()  # keys whose values must equal the consuming point's


@dataclass
class InitSpec:
    """The runs of an earlier stage that a stage starts from: all, or those whose settings match `where`."""

    stage: str
    where: dict[str, list] = field(default_factory=dict)


@dataclass
class Stage:
    name: str
    mode: str
    settings: dict[str, Any]  # dotted key -> value (or From)
    grid: dict[str, list]
    points: list[dict[str, Any]]  # the explicit `list`
    inits: list[InitSpec] = field(default_factory=list)  # none: the stage starts from scratch


@dataclass
class Sweep:
    description: str
    stages: list[Stage]
    report: list[dict]
    launcher: dict  # submitit parameters (timeout_min, slurm_partition, gpus_per_node, ...)


def _nearest(word: str, valid) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}"


def _check_fields(mapping, valid, where: str) -> None:
    if not isinstance(mapping, dict):
        raise SelfReplayError(f"{where} must be a mapping, got {type(mapping).__name__}: {mapping!r}")
    for key in mapping:
        if key not in valid:
            raise SelfReplayError(f"unknown field '{key}' in {where}{_nearest(str(key), valid)}")


def _number(value):
    """YAML reads 3e-3 as a string; numbers are numbers here, so names and comparisons agree."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def _flatten(mapping: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} and {'optim.lr': 1} both -> {'optim.lr': 1}; a {from: ...} mapping is a value."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and "from" not in value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _number(value)
    return flat


def _substitute(value, variables: dict, where: str):
    """${NAME} -> the var's value (its own type when it is the whole string)."""
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(match: re.Match):
        name = match.group(1)
        if name not in variables:
            raise SelfReplayError(f"{where} uses ${{{name}}}, which is not set{_nearest(name, variables)}"
                                  f" (set it on the command line: {name}=VALUE)")
        return _substitute(variables[name], variables, where)

    whole = re.fullmatch(r"\$\{([A-Za-z0-9_]+)\}", value)
    if whole:
        return lookup(whole)
    return re.sub(r"\$\{([A-Za-z0-9_]+)\}", lambda m: str(lookup(m)), value)


def choose_vars(document: dict, overrides: list[str], builtins: dict) -> dict:
    """The vars of a sweep: built-ins <- `vars` <- the chosen profile <- NAME=VALUE overrides."""
    profiles = document.get("profiles") or {}
    given = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SelfReplayError(f"sweep override {item!r} is not NAME=VALUE (for example profile=small)")
        given[name.strip()] = _number(yaml.safe_load(value)) if value.strip() else None
    profile = given.pop("profile", next(iter(profiles), None))
    if profiles and profile not in profiles:
        raise SelfReplayError(f"unknown profile {profile!r}{_nearest(str(profile), profiles)}")
    declared = {**(document.get("vars") or {}), **(profiles.get(profile) or {})}
    shadowed = [name for name in declared if name in BUILTIN_VARS]
    if shadowed:
        raise SelfReplayError(f"var {shadowed[0]!r} is built in ({', '.join(BUILTIN_VARS)}): give yours another name")
    variables = {**builtins, **declared}
    for name in given:
        if name not in variables and name not in BUILTIN_VARS:
            raise SelfReplayError(f"unknown sweep var '{name}'{_nearest(name, [*variables, 'profile'])}")
    variables.update(given)
    variables["profile"] = profile
    return {name: _number(value) for name, value in variables.items()}


def _parse_from(value: dict, where: str) -> From:
    _check_fields(value, FROM_FIELDS, f"{where} (a value from an earlier stage)")
    picks = [p for p in PICKS if p in value]
    if len(picks) != 1:
        raise SelfReplayError(f"{where}: say what to take from stage {value['from']!r} with one of "
                              f"{', '.join(PICKS)} (for example min: new_loss)")
    if "take" in value and picks[0] in ("min", "max"):
        raise SelfReplayError(f"{where}: take goes with argmin or argmax, not {picks[0]}")
    match = value.get("match") or []
    return From(stage=str(value["from"]), pick=picks[0], key=str(value[picks[0]]), take=value.get("take"),
                plus=float(value.get("plus", 0.0)), times=float(value.get("times", 1.0)),
                match=tuple([match] if isinstance(match, str) else match))


def _parse_stage(raw: dict, index: int, earlier: list[Stage], mode_keys: dict[str, list[str]]) -> Stage:
    where = f"stage {raw.get('name', index + 1)!r}" if isinstance(raw, dict) else f"stage {index + 1}"
    _check_fields(raw, STAGE_FIELDS, where)
    if "name" not in raw or "mode" not in raw:
        raise SelfReplayError(f"{where} needs a name and a mode ({', '.join(mode_keys)})")
    name, mode = str(raw["name"]), raw["mode"]
    if mode not in mode_keys:
        raise SelfReplayError(f"{where}: unknown mode {mode!r}{_nearest(str(mode), mode_keys)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in ("logs", "corpus"):
        raise SelfReplayError(f"{where}: a stage name is letters, digits, '_', '.', '-' (not logs or corpus)")
    earlier_names = [s.name for s in earlier]
    if name in earlier_names:
        raise SelfReplayError(f"two stages are named {name!r}: stage names must be unique")

    def earlier_stage(ref: str, what: str) -> str:
        if ref not in earlier_names:
            raise SelfReplayError(f"{where}: {what} names stage {ref!r}, which is not an earlier stage"
                                  f"{_nearest(ref, earlier_names) if earlier_names else ' (there is none)'}")
        return ref

    settings = _flatten(raw.get("settings") or {})
    grid = _flatten(raw.get("grid") or {})
    points = [_flatten(item) for item in raw.get("list") or []]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SelfReplayError(f"{where}: grid {key} must be a non-empty list of values, got {values!r}")
        grid[key] = [_number(v) for v in values]
    varied = [*((k, v) for k, values in grid.items() for v in values), *(kv for p in points for kv in p.items())]
    for key, value in varied:
        if isinstance(value, (dict, list)):
            raise SelfReplayError(f"{where}: {key} in grid or list takes plain values, got {value!r} "
                                  "(a value from an earlier stage goes in settings)")
    for key, value in [*settings.items(), *varied]:
        if key in ("out", "init"):
            raise SelfReplayError(f"{where}: {key} is set by the sweep (the point's directory, the stage's init)")
        if key not in mode_keys[mode]:
            raise SelfReplayError(f"{where}: unknown {mode} setting '{key}'{_nearest(key, mode_keys[mode])}")
    for key, value in list(settings.items()):
        if isinstance(value, dict):
            settings[key] = _parse_from(value, f"{where}, {key}")
            earlier_stage(settings[key].stage, f"{key}: from")
    inits = [InitSpec(earlier_stage(spec.stage, "init"), spec.where) for spec in _parse_inits(raw.get("init"), where)]
    if inits and mode != "finetune":
        raise SelfReplayError(f"{where}: init is for finetune stages, not {mode}")
    return Stage(name, mode, settings, grid, points, inits)


def _parse_inits(raw, where: str) -> list[InitSpec]:
    """init: STAGE, {stage: STAGE, where: {KEY: values}}, or a list of those."""
    specs = []
    for spec in raw if isinstance(raw, list) else [] if raw is None else [raw]:
        spec = spec if isinstance(spec, dict) else {"stage": spec}
        _check_fields(spec, INIT_FIELDS, f"{where}, init")
        where_values = {k: [_number(x) for x in (v if isinstance(v, list) else [v])]
                        for k, v in _flatten(spec.get("where") or {}).items()}
        specs.append(InitSpec(str(spec.get("stage")), where_values))
    return specs


def mode_keys() -> dict[str, list[str]]:
    """The dotted settings each mode accepts."""
    from selfreplay.config import RunConfig, all_keys
    from selfreplay.experiments.continual import ContinualConfig

    run = all_keys(RunConfig)
    return {"pretrain": run, "finetune": run, "continual": all_keys(ContinualConfig)}


def parse_sweep(document: dict, variables: dict) -> Sweep:
    """A validated Sweep from the file's mapping, ${vars} substituted."""
    _check_fields(document, SWEEP_FIELDS, "the sweep file")
    stages_raw = document.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise SelfReplayError("the sweep file needs `stages:`, a list of stages (name, mode, settings, grid, ...)")
    keys = mode_keys()
    stages: list[Stage] = []
    for i, raw in enumerate(stages_raw):
        stages.append(_parse_stage(_substitute(raw, variables, f"stage {i + 1}"), i, stages, keys))
    report = _substitute(document.get("report") or [], variables, "report")
    _check_report(report, [s.name for s in stages])
    launcher = _substitute(document.get("launcher") or {}, variables, "launcher")
    return Sweep(str(document.get("description") or ""), stages, report, launcher)


def _check_report(report: list, stage_names: list[str]) -> None:
    """Each report entry names a known figure and stages of this sweep."""
    from selfreplay.experiments.figures import FIGURES

    if not isinstance(report, list):
        raise SelfReplayError("report: must be a list of figures ({figure: KIND, stage: STAGE})")
    for i, entry in enumerate(report):
        _check_fields(entry, REPORT_FIELDS, f"report entry {i + 1}")
        if entry.get("figure") not in FIGURES:
            raise SelfReplayError(f"report entry {i + 1}: unknown figure {entry.get('figure')!r}"
                                  f"{_nearest(str(entry.get('figure')), FIGURES)}")
        if entry["figure"] == "mix_frontier" and "frontier" not in entry:
            raise SelfReplayError(f"report entry {i + 1}: mix_frontier needs frontier: STAGE, the pretrained mixes")
        named = entry.get("stages", entry.get("stage"))
        named = [named] if isinstance(named, str) else list(named or [])
        if "frontier" in entry:
            named.append(entry["frontier"])
        for name in named or [None]:
            if name not in stage_names:
                raise SelfReplayError(f"report entry {i + 1} ({entry.get('figure')}) names stage {name!r}, "
                                      f"not a stage of this sweep{_nearest(str(name), stage_names)}")


# ---------------------------------------------------------------- points

@dataclass
class Run:
    """One point of a sweep: its run directory, the settings it runs with, and how it ended."""

    stage: str
    mode: str
    run_dir: Path
    settings: dict[str, Any]  # dotted key -> value; From values until the stage runs
    init: Run | None = None
    status: str = "pending"  # pending | done | failed
    error: str | None = None
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the run's config.yaml, flattened to dotted keys

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.run_dir.name}"

    def value(self, key: str):
        """A summary key, else a setting, else a key of the run's config.yaml; `init`: the init run dir."""
        if key == "init":
            return str(self.init.run_dir) if self.init is not None else self.settings.get("init")
        for source in (self.summary, self.settings, self.config):
            if key in source and not isinstance(source[key], From):
                return source[key]
        return None


def format_value(value) -> str:
    """A value as a command-line override: null, true/false, compact numbers, strings as they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.12g}"
    if isinstance(value, (list, dict)):
        raise SelfReplayError(f"setting value {value!r} is a {type(value).__name__}: give one value "
                              "(put alternatives in a grid)")
    return str(value)


def _name_part(value) -> str:
    text = Path(value).stem if isinstance(value, str) and "/" in value else format_value(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


def point_name(values: dict, varying: list[str]) -> str:
    """A readable, stable, filesystem-safe directory name from the settings a stage varies."""
    last = [k.rsplit(".", 1)[-1] for k in varying]
    parts = [f"{short if last.count(short) == 1 else key}={_name_part(values[key])}"
             for key, short in zip(varying, last) if key in values]
    name = ",".join(parts) or "run"
    if len(name) > 200:  # file names stop at 255 bytes
        import hashlib

        name = f"{name[:180]}..{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def expand(stage: Stage, sweep_dir: Path, earlier: dict[str, list[Run]]) -> list[Run]:
    """The points of a stage: settings <- each grid combination <- each list item, per init run."""
    combos = [dict(zip(stage.grid, values)) for values in itertools.product(*stage.grid.values())]
    items = [{**combo, **item} for combo in combos for item in (stage.points or [{}])]
    varying = list(stage.grid) + [k for item in stage.points for k in item if k not in stage.grid]
    varying = list(dict.fromkeys(varying))
    inits: list[Run | None] = [None] if not stage.inits else []
    for spec in stage.inits:
        matching = [r for r in earlier[spec.stage]
                    if all(_number(r.value(k)) in values for k, values in spec.where.items())]
        if not matching:
            raise SelfReplayError(f"stage {stage.name!r}: no run of stage {spec.stage!r} matches init where {spec.where}")
        inits += matching
    several = len({spec.stage for spec in stage.inits}) > 1  # then the init's stage is part of the name
    runs, names = [], set()
    for init in inits:
        for item in items:
            name = point_name(item, varying)
            if init is not None:
                prefix = f"{init.stage}-{init.run_dir.name}" if several else init.run_dir.name
                prefix = "" if prefix == "run" else prefix  # a one-point init stage adds nothing
                name = ",".join(p for p in (prefix, name if name != "run" else "") if p) or "run"
            if name in names:
                raise SelfReplayError(f"stage {stage.name!r} has two points named {name!r}: "
                                      "its grid or list repeats a combination")
            names.add(name)
            runs.append(Run(stage.name, stage.mode, sweep_dir / stage.name / name, {**stage.settings, **item}, init))
    return runs


def expand_all(sweep: Sweep, sweep_dir: Path) -> list[Run]:
    by_stage: dict[str, list[Run]] = {}
    for stage in sweep.stages:
        by_stage[stage.name] = expand(stage, sweep_dir, by_stage)
    return [run for runs in by_stage.values() for run in runs]


def derive(spec: From, run: Run, source: list[Run]):
    """The value `spec` computes for `run` from the finished runs of an earlier stage."""
    candidates = [r for r in source if r.status == "done"
                  and all(r.value(k) == run.value(k) for k in spec.match)
                  and isinstance(r.value(spec.key), (int, float)) and math.isfinite(r.value(spec.key))]
    if not candidates:
        matching = f" with the same {', '.join(spec.match)}" if spec.match else ""
        raise SelfReplayError(f"no finished run of stage {spec.stage!r}{matching} has a value of {spec.key}")
    if spec.pick in ("min", "max"):
        values = [r.value(spec.key) for r in candidates]
        value = min(values) if spec.pick == "min" else max(values)
    else:
        chosen = (min if spec.pick == "argmin" else max)(candidates, key=lambda r: r.value(spec.key))
        value = chosen.value(spec.take or spec.key)
    if spec.times != 1.0 or spec.plus != 0.0:
        if not isinstance(_number(value), (int, float)):
            raise SelfReplayError(f"from stage {spec.stage!r}: cannot add or multiply {value!r}, not a number")
        value = _number(value) * spec.times + spec.plus
    return value


# ---------------------------------------------------------------- running points

def read_outcome(run: Run) -> None:
    """Fill run.status, error, summary and config from its directory: done once summary.json exists."""
    summary_path = run.run_dir / SUMMARY_FILE
    config_path = run.run_dir / "config.yaml"
    if config_path.is_file():
        run.config = _flatten(yaml.safe_load(config_path.read_text()) or {})
    if not summary_path.is_file():
        return
    try:
        run.summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as e:
        run.status, run.error = "failed", f"unreadable {summary_path}: {e}"
        return
    if run.summary.get("stop_reason") == "diverged":
        run.status, run.error = "failed", f"diverged: {run.summary.get('diverged') or 'no detail in the summary'}"
    else:
        run.status, run.error = "done", None


def command(run: Run) -> list[str]:
    """The selfreplay command line that runs one point."""
    args = [run.mode, f"out={run.run_dir}"]
    if run.init is not None:
        args.append(f"init={run.init.run_dir}")
    args += [f"{key}={format_value(value)}" for key, value in run.settings.items()]
    if run.mode in ("pretrain", "finetune", "continual") and "log.progress" not in run.settings:
        args.append("log.progress=false")
    return [sys.executable, "-m", "selfreplay.cli", *args]


def log_path(run: Run, sweep_dir: Path) -> Path:
    return sweep_dir / "logs" / run.stage / f"{run.run_dir.name}.log"


def execute(argv: list[str], log: str, threads: int) -> tuple[int, str | None]:
    """Run one point's command with `threads` threads, output into `log`; (exit code, last output line)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    return code, (lines[-1] if lines else None)


class LocalLauncher:
    """Points as subprocesses on this machine, `workers` at a time, each with cores/workers threads."""

    def __init__(self, workers: int):
        self.workers, self.threads = workers, max(1, cores() // workers)

    def launch(self, argv: list[str], log: Path) -> tuple[int, str | None]:
        return execute(argv, str(log), self.threads)


class SubmititLauncher:
    """Points as submitit jobs (Slurm on a cluster; `cluster=local` or `debug` runs them here)."""

    def __init__(self, folder: Path, cluster: str | None, parameters: dict, workers: int):
        import submitit

        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        parameters = {"timeout_min": 24 * 60, **parameters}
        self.executor.update_parameters(**parameters)
        self.threads = int(parameters.get("cpus_per_task") or max(1, cores() // workers))

    def launch(self, argv: list[str], log: Path) -> tuple[int, str | None]:
        job = self.executor.submit(execute, argv, str(log), self.threads)
        return job.result()


def run_stage(runs: list[Run], launcher, workers: int, sweep_dir: Path, say=print) -> None:
    """Run the pending points of one stage, `workers` at a time; each ends done or failed."""
    pending = [r for r in runs if r.status == "pending"]

    def one(run: Run) -> Run:
        started = time.perf_counter()
        try:
            run.run_dir.parent.mkdir(parents=True, exist_ok=True)
            code, last_line = launcher.launch(command(run), log_path(run, sweep_dir))
        except Exception as e:  # noqa: BLE001 - a point that cannot run (or a lost job) must not stop the others
            code, last_line = -1, f"could not run: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        read_outcome(run)
        if code != 0 and run.status != "failed":
            run.status, run.error = "failed", last_line or f"exit code {code}"
        elif run.status == "pending":
            run.status, run.error = "failed", f"exited without writing {SUMMARY_FILE}: {last_line}"
        say(f"  {run.name}: {run.status} in {time.perf_counter() - started:.0f} s"
            + (f" ({run.error})" if run.error else ""))
        return run

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        for future in concurrent.futures.as_completed([pool.submit(one, r) for r in pending]):
            future.result()
    finally:  # on Ctrl-C, start no further point
        pool.shutdown(wait=True, cancel_futures=True)


def prepare_stage(runs: list[Run], by_stage: dict[str, list[Run]]) -> None:
    """Read finished points, fail those whose init failed, compute settings from earlier stages."""
    for run in runs:
        read_outcome(run)
        if run.status == "pending" and run.init is not None and run.init.status != "done":
            run.status, run.error = "failed", f"its init run {run.init.name} did not finish"
        if run.status == "failed":
            continue
        try:
            run.settings = {k: derive(v, run, by_stage[v.stage]) if isinstance(v, From) else v
                            for k, v in run.settings.items()}
        except SelfReplayError as e:
            if run.status == "pending":
                run.status, run.error = "failed", str(e)
        if run.status == "done" and (changed := stale_setting(run)):
            run.status, run.error = "failed", f"finished with other settings ({changed}): delete {run.run_dir} to rerun it"


def stale_setting(run: Run) -> str | None:
    """'KEY: was -> now' when a finished run's config.yaml disagrees with the sweep file's setting."""
    for key, value in run.settings.items():
        if isinstance(value, From) or key not in run.config:
            continue
        was = run.config[key]
        now = str(Path(value).resolve()) if key.startswith("data.") and isinstance(value, str) else _number(value)
        if was != now and not (isinstance(was, float) and isinstance(now, (int, float)) and math.isclose(was, now)):
            return f"{key}: {was} -> {now}"
    return None


# ---------------------------------------------------------------- results

def write_results(runs: list[Run], path: Path) -> None:
    """results.csv: stage, run_dir, status, error, init, then every setting, then every summary key.

    Run directories are relative to the sweep directory (path's folder), so a moved sweep still reads.
    """
    settings = list(dict.fromkeys(k for r in runs for k in r.settings))
    summary = list(dict.fromkeys(k for r in runs for k in r.summary if k not in settings))
    fixed = ["stage", "run_dir", "status", "error", "init"]
    cell = lambda v: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)  # noqa: E731
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fixed + settings + summary)
        for r in runs:
            here = lambda p: os.path.relpath(p, path.parent) if p else None  # noqa: E731
            values = [r.stage, here(r.run_dir), r.status, r.error, here(r.value("init"))]
            values += [r.config.get(k) if isinstance(r.settings.get(k), From) else r.settings.get(k) for k in settings]
            values += [r.summary.get(k) for k in summary]
            writer.writerow([cell(v) for v in values])
    tmp.replace(path)


def load_runs(sweep_dir: str | Path) -> tuple[Sweep, list[Run]]:
    """A sweep directory's points and how each ended, from its sweep.yaml and run directories."""
    sweep_dir = Path(sweep_dir).resolve()
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise SelfReplayError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE}): run selfreplay sweep")
    sweep = parse_sweep(yaml.safe_load(path.read_text()), {})
    runs = expand_all(sweep, sweep_dir)
    recorded = {}  # failures leave no summary.json: results.csv holds their status and error
    if (sweep_dir / RESULTS_FILE).is_file():
        with open(sweep_dir / RESULTS_FILE, newline="") as f:
            recorded = {row["run_dir"]: row for row in csv.DictReader(f)}
    for run in runs:
        read_outcome(run)
        row = recorded.get(os.path.relpath(run.run_dir, sweep_dir))
        if run.status == "pending" and row is not None and row["status"] == "failed":
            run.status, run.error = "failed", row["error"] or None
    return sweep, runs


# ---------------------------------------------------------------- the whole sweep

def corpus_vars(corpus: dict | None, given: dict, sweep_dir: Path) -> dict:
    """old, new, tokenizer and vocab: given on the command line, or the synthetic corpus, made once."""
    names = ("old", "new", "tokenizer")
    chosen = {n: given[n] for n in names if given.get(n) is not None}
    if 0 < len(chosen) < 3:
        raise SelfReplayError(f"set all of old=TOKEN_FILE new=TOKEN_FILE tokenizer=DIR, not only "
                              f"{', '.join(chosen)}")
    if not chosen and corpus is not None:
        from selfreplay.experiments.corpora import synthetic_token_files

        _check_fields(corpus, CORPUS_FIELDS, "corpus")
        sizes = {k: _number(corpus.get(k, default)) for k, default in (("words", 300_000), ("vocab", 2048), ("seed", 0))}
        if not all(isinstance(v, int) for v in sizes.values()):
            raise SelfReplayError(f"corpus words, vocab and seed must be whole numbers, got {sizes}")
        files = synthetic_token_files(sweep_dir / "corpus", num_words=sizes["words"], vocab_size=sizes["vocab"],
                                      seed=sizes["seed"])
        chosen = {"old": str(files.old), "new": str(files.new), "tokenizer": str(files.tokenizer)}
    if not chosen:
        return {}
    from selfreplay.data.tokenizer import load_tokenizer

    chosen = {n: str(Path(v).resolve()) for n, v in chosen.items()}
    return {**chosen, "vocab": load_tokenizer(chosen["tokenizer"]).vocab_size}


def check_sweep(path: str | Path, overrides: list[str], sweep_dir: Path) -> tuple[dict, dict]:
    """(the file's mapping, its vars), the whole file checked before any corpus is made or run starts."""
    from selfreplay.config import read_yaml

    document = read_yaml(path)
    _check_fields(document, SWEEP_FIELDS, f"sweep file {path}")
    variables = choose_vars(document, overrides, {"sweep": str(Path(sweep_dir).resolve())})
    placeholders = {n: f"<{n}>" for n in ("old", "new", "tokenizer", "vocab")}
    parse_sweep(document, {**placeholders, **variables})
    return document, variables


def resolve_sweep(path: str | Path, overrides: list[str], sweep_dir: Path) -> tuple[Sweep, dict]:
    """The sweep of `path` with its vars (profile, overrides, corpus) substituted; (sweep, document)."""
    document, variables = check_sweep(path, overrides, sweep_dir)
    corpus = _substitute(document.get("corpus"), variables, "corpus")
    variables.update(corpus_vars(corpus, variables, sweep_dir))
    resolved = {k: _substitute(v, variables, k) for k, v in document.items()
                if k in ("description", "stages", "report", "launcher")}
    return parse_sweep(resolved, variables), resolved


def run_sweep(path: str | Path, overrides: list[str], out: str | Path | None = None, workers: int | None = None,
              launcher: str = "local", cluster: str | None = None, say=print) -> list[Run]:
    """Run every stage of the sweep file `path` into `out`; returns every point with its outcome."""
    sweep_dir = Path(out or Path("sweeps") / Path(path).stem).resolve()
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SelfReplayError(f"--out {sweep_dir} is a file: give a directory")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or default_workers()
    if workers < 1:
        raise SelfReplayError(f"--workers must be at least 1, got {workers}")
    sweep, resolved = resolve_sweep(path, overrides, sweep_dir)
    saved = sweep_dir / SWEEP_FILE
    saved.write_text(yaml.safe_dump(resolved, sort_keys=False))
    if launcher == "submitit":
        runner = SubmititLauncher(sweep_dir / "submitit", cluster, sweep.launcher, workers)
    elif launcher == "local":
        runner = LocalLauncher(workers)
    else:
        raise SelfReplayError(f"unknown launcher {launcher!r}: choose local or submitit")

    started = time.perf_counter()
    by_stage: dict[str, list[Run]] = {}
    for stage in sweep.stages:
        runs = by_stage[stage.name] = expand(stage, sweep_dir, by_stage)
        prepare_stage(runs, by_stage)
        todo = sum(r.status == "pending" for r in runs)
        say(f"stage {stage.name}: {len(runs)} points, {sum(r.status == 'done' for r in runs)} finished, "
            f"{todo} to run" + (f" on {workers} workers x {runner.threads} threads" if todo else ""))
        run_stage(runs, runner, workers, sweep_dir, say)
        write_results([r for rs in by_stage.values() for r in rs], sweep_dir / RESULTS_FILE)
    runs = [r for rs in by_stage.values() for r in rs]
    failed = [r for r in runs if r.status == "failed"]
    say(f"sweep finished in {time.perf_counter() - started:.0f} s: {len(runs) - len(failed)} done, "
        f"{len(failed)} failed -> {sweep_dir / RESULTS_FILE}")
    return runs


def sweep_cli(path: str, overrides: list[str], out: str | None, workers: int | None, launcher: str,
              cluster: str | None) -> None:
    """`selfreplay sweep`: run the sweep; an error if any point failed (each one is in results.csv)."""
    runs = run_sweep(path, overrides, out, workers, launcher, cluster)
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        raise SelfReplayError(f"{len(failed)} of {len(runs)} points failed (first: {failed[0].name}: "
                              f"{failed[0].error}); rerun the same command to retry them")
