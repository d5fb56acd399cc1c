"""The points of a sweep: each stage expanded into runs, their names, their outcomes, and the
settings they take from earlier stages' finished runs."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfreplay.config import renamed
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.sweep.sweep_file import From, Stage, Sweep
from selfreplay.experiments.sweep.values import dotted, number
from selfreplay.rundir import CONFIG_NAME, SUMMARY_NAME

SUMMARY_FILE = SUMMARY_NAME  # a point is done once its run directory holds this


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
        for source in (self.summary, renamed(self.settings), self.config):
            if key in source and not isinstance(source[key], From):
                return source[key]
        return None


# ---------------------------------------------------------------- names

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
        name = f"{name[:180]}..{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def _with_init(name: str, init: Run | None, several_stages: bool) -> str:
    """A point's name prefixed by its init run's (and that run's stage when inits come from several)."""
    if init is None:
        return name
    prefix = f"{init.stage}-{init.run_dir.name}" if several_stages else init.run_dir.name
    prefix = "" if prefix == "run" else prefix  # a one-point init stage adds nothing
    return ",".join(p for p in (prefix, name if name != "run" else "") if p) or "run"


# ---------------------------------------------------------------- expansion

def _init_runs(stage: Stage, earlier: dict[str, list[Run]]) -> list[Run | None]:
    """The runs a stage starts from, in order; [None] for a stage that starts from scratch."""
    if not stage.inits:
        return [None]
    inits: list[Run | None] = []
    for spec in stage.inits:
        matching = [r for r in earlier[spec.stage]
                    if all(number(r.value(k)) in values for k, values in spec.where.items())]
        if not matching:
            raise SelfReplayError(f"stage {stage.name!r}: no run of stage {spec.stage!r} matches init where {spec.where}")
        inits += matching
    return inits


def expand(stage: Stage, sweep_dir: Path, earlier: dict[str, list[Run]]) -> list[Run]:
    """The points of a stage: settings <- each grid combination <- each list item, per init run."""
    combos = [dict(zip(stage.grid, values)) for values in itertools.product(*stage.grid.values())]
    items = [{**combo, **item} for combo in combos for item in (stage.points or [{}])]
    varying = list(dict.fromkeys([*stage.grid, *(k for item in stage.points for k in item)]))
    several = len({spec.stage for spec in stage.inits}) > 1
    runs, names = [], set()
    for init in _init_runs(stage, earlier):
        for item in items:
            name = _with_init(point_name(item, varying), init, several)
            if name in names:
                raise SelfReplayError(f"stage {stage.name!r} has two points named {name!r}: "
                                      "its grid or list repeats a combination")
            names.add(name)
            runs.append(Run(stage.name, stage.mode, sweep_dir / stage.name / name, {**stage.settings, **item}, init))
    return runs


def expand_all(sweep: Sweep, sweep_dir: Path) -> list[Run]:
    """Every point of every stage, in stage order."""
    by_stage: dict[str, list[Run]] = {}
    for stage in sweep.stages:
        by_stage[stage.name] = expand(stage, sweep_dir, by_stage)
    return [run for runs in by_stage.values() for run in runs]


# ---------------------------------------------------------------- outcomes and derived settings

def read_outcome(run: Run) -> None:
    """Fill run.status, error, summary and config from its directory: done once summary.json exists."""
    summary_path = run.run_dir / SUMMARY_FILE
    config_path = run.run_dir / CONFIG_NAME
    if config_path.is_file():
        run.config = renamed(dotted(yaml.safe_load(config_path.read_text()) or {}))
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
        if not isinstance(number(value), (int, float)):
            raise SelfReplayError(f"from stage {spec.stage!r}: cannot add or multiply {value!r}, not a number")
        value = number(value) * spec.times + spec.plus
    return value


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
    for key, value in renamed(run.settings).items():
        if isinstance(value, From) or key not in run.config:
            continue
        was = run.config[key]
        now = str(Path(value).resolve()) if key.startswith("data.") and isinstance(value, str) else number(value)
        if was != now and not (isinstance(was, float) and isinstance(now, (int, float)) and math.isclose(was, now)):
            return f"{key}: {was} -> {now}"
    return None
