"""A sweep's results: results.csv written after each stage, and the points read back from a sweep directory."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import yaml

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.sweep.plan import Run, expand_all, read_outcome
from selfreplay.experiments.sweep.sweep_file import From, Sweep, parse_sweep
from selfreplay.rundir import write_atomic

SWEEP_FILE, RESULTS_FILE = "sweep.yaml", "results.csv"  # in the sweep directory: the resolved file, one row a point
FIXED_COLUMNS = ["stage", "run_dir", "status", "error", "init"]


def _cell(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else ("" if value is None else value)


def result_rows(runs: list[Run], root: Path) -> list[list]:
    """The header, then one row per run: FIXED_COLUMNS, every setting, every summary key.

    Run directories are relative to `root`, so a moved sweep still reads.
    """
    settings = list(dict.fromkeys(k for r in runs for k in r.settings))
    summary = list(dict.fromkeys(k for r in runs for k in r.summary if k not in settings))
    here = lambda p: os.path.relpath(p, root) if p else None  # noqa: E731
    rows = [FIXED_COLUMNS + settings + summary]
    for r in runs:
        values = [r.stage, here(r.run_dir), r.status, r.error, here(r.value("init"))]
        # a setting taken from an earlier stage: the value the run was given, from its config.yaml
        values += [r.config.get(k) if isinstance(r.settings.get(k), From) else r.settings.get(k) for k in settings]
        values += [r.summary.get(k) for k in summary]
        rows.append([_cell(v) for v in values])
    return rows


def write_results(runs: list[Run], path: Path) -> None:
    """results.csv at `path`: result_rows, run directories relative to its folder."""
    rows = result_rows(runs, path.parent)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)

    write_atomic(path, write)


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
