"""The sweep file's schema: stages, values from earlier stages, inits and report entries, checked."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from selfreplay.config import RunConfig, all_keys
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.continual import ContinualConfig
from selfreplay.experiments.figures import FIGURES
from selfreplay.experiments.sweep.values import (
    check_fields,
    dotted,
    nearest,
    number,
    substitute,
)

SWEEP_FIELDS = ("description", "vars", "profiles", "corpus", "stages", "report", "launcher")
STAGE_FIELDS = ("name", "mode", "init", "settings", "grid", "list")
FROM_FIELDS = ("from", "min", "max", "argmin", "argmax", "take", "plus", "times", "match")
INIT_FIELDS = ("stage", "where")
REPORT_FIELDS = ("figure", "stage", "stages", "frontier", "name")
PICKS = ("min", "max", "argmin", "argmax")
RESERVED_STAGE_NAMES = ("logs", "corpus")  # folders of the sweep directory beside the stages'


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


def mode_keys() -> dict[str, list[str]]:
    """The dotted settings each mode accepts."""
    run = all_keys(RunConfig)
    return {"pretrain": run, "finetune": run, "continual": all_keys(ContinualConfig)}


def parse_sweep(document: dict, variables: dict) -> Sweep:
    """A validated Sweep from the file's mapping, ${vars} substituted."""
    check_fields(document, SWEEP_FIELDS, "the sweep file")
    stages_raw = document.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise SelfReplayError("the sweep file needs `stages:`, a list of stages (name, mode, settings, grid, ...)")
    keys = mode_keys()
    stages: list[Stage] = []
    for i, raw in enumerate(stages_raw):
        stages.append(parse_stage(substitute(raw, variables, f"stage {i + 1}"), i, stages, keys))
    report = substitute(document.get("report") or [], variables, "report")
    check_report(report, [s.name for s in stages])
    launcher = substitute(document.get("launcher") or {}, variables, "launcher")
    return Sweep(str(document.get("description") or ""), stages, report, launcher)


def parse_stage(raw: dict, index: int, earlier: list[Stage], keys_of: dict[str, list[str]]) -> Stage:
    """One stage of the file, checked against the stages before it and its mode's settings."""
    where = f"stage {raw.get('name', index + 1)!r}" if isinstance(raw, dict) else f"stage {index + 1}"
    name, mode = _stage_name_and_mode(raw, where, [s.name for s in earlier], keys_of)
    settings, grid, points = _stage_values(raw, where)
    for key, _ in [*settings.items(), *_varied(grid, points)]:
        if key in ("out", "init"):
            raise SelfReplayError(f"{where}: {key} is set by the sweep (the point's directory, the stage's init)")
        if key not in keys_of[mode]:
            raise SelfReplayError(f"{where}: unknown {mode} setting '{key}'{nearest(key, keys_of[mode])}")
    earlier_names = [s.name for s in earlier]
    for key, value in list(settings.items()):
        if isinstance(value, dict):
            settings[key] = parse_from(value, f"{where}, {key}")
            _earlier_stage(settings[key].stage, earlier_names, where, f"{key}: from")
    inits = [InitSpec(_earlier_stage(spec.stage, earlier_names, where, "init"), spec.where)
             for spec in parse_inits(raw.get("init"), where)]
    if inits and mode != "finetune":
        raise SelfReplayError(f"{where}: init is for finetune stages, not {mode}")
    return Stage(name, mode, settings, grid, points, inits)


def _stage_name_and_mode(raw, where: str, earlier_names: list[str], keys_of: dict) -> tuple[str, str]:
    check_fields(raw, STAGE_FIELDS, where)
    if "name" not in raw or "mode" not in raw:
        raise SelfReplayError(f"{where} needs a name and a mode ({', '.join(keys_of)})")
    name, mode = str(raw["name"]), raw["mode"]
    if mode not in keys_of:
        raise SelfReplayError(f"{where}: unknown mode {mode!r}{nearest(str(mode), keys_of)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in RESERVED_STAGE_NAMES:
        raise SelfReplayError(f"{where}: a stage name is letters, digits, '_', '.', '-' "
                              f"(not {' or '.join(RESERVED_STAGE_NAMES)})")
    if name in earlier_names:
        raise SelfReplayError(f"two stages are named {name!r}: stage names must be unique")
    return name, mode


def _stage_values(raw: dict, where: str) -> tuple[dict, dict, list[dict]]:
    """(settings, grid, list) as dotted keys; grid values non-empty lists, grid and list values plain."""
    settings = dotted(raw.get("settings") or {})
    grid = dotted(raw.get("grid") or {})
    points = [dotted(item) for item in raw.get("list") or []]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SelfReplayError(f"{where}: grid {key} must be a non-empty list of values, got {values!r}")
        grid[key] = [number(v) for v in values]
    for key, value in _varied(grid, points):
        if isinstance(value, (dict, list)):
            raise SelfReplayError(f"{where}: {key} in grid or list takes plain values, got {value!r} "
                                  "(a value from an earlier stage goes in settings)")
    return settings, grid, points


def _varied(grid: dict, points: list[dict]) -> list[tuple[str, Any]]:
    return [*((k, v) for k, values in grid.items() for v in values), *(kv for p in points for kv in p.items())]


def _earlier_stage(ref: str, earlier_names: list[str], where: str, what: str) -> str:
    if ref not in earlier_names:
        raise SelfReplayError(f"{where}: {what} names stage {ref!r}, which is not an earlier stage"
                              f"{nearest(ref, earlier_names) if earlier_names else ' (there is none)'}")
    return ref


def parse_from(value: dict, where: str) -> From:
    """{from: STAGE, min: KEY, ...} -> From."""
    check_fields(value, FROM_FIELDS, f"{where} (a value from an earlier stage)")
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


def parse_inits(raw, where: str) -> list[InitSpec]:
    """init: STAGE, {stage: STAGE, where: {KEY: values}}, or a list of those."""
    specs = []
    for spec in raw if isinstance(raw, list) else [] if raw is None else [raw]:
        spec = spec if isinstance(spec, dict) else {"stage": spec}
        check_fields(spec, INIT_FIELDS, f"{where}, init")
        where_values = {k: [number(x) for x in (v if isinstance(v, list) else [v])]
                        for k, v in dotted(spec.get("where") or {}).items()}
        specs.append(InitSpec(str(spec.get("stage")), where_values))
    return specs


def check_report(report: list, stage_names: list[str]) -> None:
    """Each report entry names a known figure and stages of this sweep."""
    if not isinstance(report, list):
        raise SelfReplayError("report: must be a list of figures ({figure: KIND, stage: STAGE})")
    for i, entry in enumerate(report):
        check_fields(entry, REPORT_FIELDS, f"report entry {i + 1}")
        if entry.get("figure") not in FIGURES:
            raise SelfReplayError(f"report entry {i + 1}: unknown figure {entry.get('figure')!r}"
                                  f"{nearest(str(entry.get('figure')), FIGURES)}")
        if entry["figure"] == "mix_frontier" and "frontier" not in entry:
            raise SelfReplayError(f"report entry {i + 1}: mix_frontier needs frontier: STAGE, the pretrained mixes")
        named = entry.get("stages", entry.get("stage"))
        named = [named] if isinstance(named, str) else list(named or [])
        if "frontier" in entry:
            named.append(entry["frontier"])
        for name in named or [None]:
            if name not in stage_names:
                raise SelfReplayError(f"report entry {i + 1} ({entry.get('figure')}) names stage {name!r}, "
                                      f"not a stage of this sweep{nearest(str(name), stage_names)}")
