"""The replay coefficient held to a budget: c and the replay KL along every run with replay.coeff=auto."""

from __future__ import annotations

import json
import math
from pathlib import Path

from selfreplay.experiments.figures.common import (
    Figure,
    finished,
    fmt,
    held,
    markdown_table,
    pyplot,
    save,
)
from selfreplay.rundir import METRICS_NAME

TOLERANCE = 1.5  # the end replay KL is read as held when within this many budgets


def _two_and_five(value: float, _) -> str:
    """A minor tick's label on a log axis: only at 2 and 5 times a power of ten, so labels never crowd."""
    leading = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(leading) in (2, 5) else ""


def coefficient_figure(spec: dict, runs: list, out: Path) -> Figure | None:
    """c (log scale) and the replay KL over its budget along each held run of the entry's stages;
    None when no run of them held a budget (a profile with fixed coefficients only)."""
    held_runs = [r for r in finished(spec, runs) if held(r)]
    if not held_runs:
        return None
    curves = {r.name: held_curve(r) for r in held_runs}
    series = [(r.name, float(r.value("replay.budget")), curves[r.name]) for r in held_runs]
    path = plot_coefficients(series, out / f"{spec.get('name', 'replay_coefficient')}.png")
    rows = [coefficient_row(r, curves[r.name]) for r in held_runs]
    within = sum(row[4] is not None and float(row[4]) <= TOLERANCE for row in rows)
    bound = sum(row[5] is not None for row in rows)
    caption = (f"Each run with replay.coeff=auto: c as the controller moved it (left) and the replay KL over its "
               f"budget (right; 1 is the budget). At the end {within} of {len(rows)} runs hold the replay KL within "
               f"{TOLERANCE:g}x their budget; {bound} turned capacity bound (c at replay.coeff_max, the KL over budget "
               "and the new-domain loss still falling).")
    table = markdown_table(["run", "budget", "c at the end", "replay KL, last interval", "KL / budget",
                            "capacity bound from step"], rows)
    return Figure(path, "The replay coefficient held to a budget", caption, table)


def held_curve(run) -> list[tuple[int, float, float | None]]:
    """(step, c, replay KL) at each log point; a continual run's tasks one after another."""
    parts = [run.run_dir / name for name in run.summary.get("runs", [])] or [run.run_dir]
    curve, offset = [], 0
    for part in parts:
        metrics = part / METRICS_NAME
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        points = [p for p in lines if p.get("replay_coeff") is not None]
        curve += [(offset + p["step"], p["replay_coeff"], p.get("replay_kl")) for p in points]
        offset += max((p.get("step", 0) for p in lines), default=0)
    return curve


def bound_since(run):
    """The step the run turned capacity bound; of a continual run, 'TASK RUN: step N' for its first
    bound task. None: never."""
    if run.summary.get("capacity_bound"):
        return run.summary.get("capacity_bound_since")
    for name in run.summary.get("runs", []):
        summary = run.run_dir / name / "summary.json"
        task = json.loads(summary.read_text()) if summary.exists() else {}
        if task.get("capacity_bound"):
            return f"{name}: step {task.get('capacity_bound_since')}"
    return None


def coefficient_row(run, curve) -> list:
    budget = float(run.value("replay.budget"))
    kls = [kl for _, _, kl in curve if kl is not None]
    end_kl = kls[-1] if kls else None
    since = bound_since(run)
    return [run.name, f"{budget:g}", fmt(curve[-1][1] if curve else None, "{:.3g}"), fmt(end_kl, "{:.4f}"),
            fmt(end_kl / budget if end_kl is not None else None, "{:.2f}"), since]


def plot_coefficients(series: list[tuple[str, float, list]], path: Path) -> Path:
    """Two panels from (label, budget, [(step, c, replay KL), ...]) per run: c, and the KL over budget."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, budget, curve in series:
        left.plot([s for s, _, _ in curve], [c for _, c, _ in curve], ".-", label=label, linewidth=1)
        kl = [(s, k / budget) for s, _, k in curve if k is not None]
        right.plot([s for s, _ in kl], [y for _, y in kl], ".-", label=label, linewidth=1)
    right.axhline(1, color="black", linewidth=1, label="the budget")
    right.axhline(TOLERANCE, color="gray", linewidth=0.8, linestyle=":", label=f"{TOLERANCE:g}x the budget")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 2, not 2x10^0
    for ax in (left, right):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(NullFormatter())  # c spans decades: its powers of ten are enough
    right.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))  # the KL over budget: 0.2, 0.5, 2, 5 too
    left.set_xlabel("step")
    right.set_xlabel("step")
    left.set_ylabel("replay coefficient c")
    right.set_ylabel("replay KL / budget (log-point mean)")
    left.set_title("c moved by the controller")
    right.set_title("replay KL against its budget")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    right.legend(fontsize=6, ncol=2)
    return save(fig, path)
