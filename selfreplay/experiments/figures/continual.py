"""Continual tasks: the accuracy matrices (after task i, on task j), one panel per run, one row per seed."""

from __future__ import annotations

from pathlib import Path

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.figures.common import (
    Figure,
    Finding,
    finished,
    markdown_table,
    pyplot,
    stage_names,
)
from selfreplay.objective.methods import NO_REPLAY

CLAIM = ("With self-replay every earlier task keeps >= 90% of the accuracy it had when its training ended; "
         "without replay at least one falls below 50% (paper: ~100% vs ~0-20%)")


def continual_figure(spec: dict, runs: list, out: Path) -> Figure:
    """The figure, table and finding of a stage of continual runs (without and with replay, per seed)."""
    by_seed = runs_by_seed(finished(spec, runs))
    if not by_seed:
        raise SelfReplayError(f"no finished continual run in stages {stage_names(spec)}")
    labels = {id(r): run_label(r, several_seeds=len(by_seed) > 1) for group in by_seed for r in group}
    path = plot_accuracy_matrices(by_seed, labels, out / f"{spec.get('name', 'continual')}.png")
    rows = [[labels[id(r)], f"{r.summary['average_accuracy']:.1%}", f"{r.summary['bwt']:+.3f}",
             ", ".join(f"{x:.0%}" if x is not None else "-" for x in r.summary["retention"])]
            for group in by_seed for r in group]
    measured = "; ".join(f"{row[0]}: average final accuracy {row[1]}, BWT {row[2]}, earlier tasks keep {row[3]}"
                         for row in rows)
    caption = ("Rows: after training on each task in turn; columns: exact-answer accuracy on every task. Below "
               f"the diagonal is what was kept. Measured: {measured}.")
    table = markdown_table(["run", "average final accuracy", "BWT", "retained (final / at end of own training)"], rows)
    finding = Finding(CLAIM, measured, continual_reproduced([r for group in by_seed for r in group]))
    return Figure(path, "Continual tasks: the accuracy matrix", caption, table, finding)


def seed(run) -> int:
    return int(run.value("seed") or 0)


def runs_by_seed(done: list) -> list[list]:
    """The runs grouped by seed (in seed order), the run without replay first in each group."""
    done = sorted(done, key=lambda r: (seed(r), r.summary.get("method") != NO_REPLAY.name))
    return [[r for r in done if seed(r) == s] for s in sorted({seed(r) for r in done})]


def run_label(run, several_seeds: bool) -> str:
    coeff = run.summary["coeff"]
    held = f"c=auto, budget {run.summary.get('budget'):g}" if coeff == "auto" else f"c={coeff:g}"
    label = "no replay" if run.summary["method"] == NO_REPLAY.name else f"self-replay {run.summary['method'].upper()} {held}"
    return label + (f" (seed {seed(run)})" if several_seeds else "")


def continual_reproduced(done: list) -> bool | None:
    """Every replay run keeps >= 90% on each earlier task and every run without replay ends < 50% on one;
    None without both kinds."""
    none = [r for r in done if r.summary["method"] == NO_REPLAY.name]
    replay = [r for r in done if r.summary["method"] != NO_REPLAY.name]
    if not none or not replay:
        return None
    kept = all(x is not None and x >= 0.9 for r in replay for x in r.summary["retention"])
    dropped = all(min(r.summary["accuracy"][-1][:-1]) < 0.5 for r in none)
    return kept and dropped


def plot_accuracy_matrices(by_seed: list[list], labels: dict, path: Path) -> Path:
    plt = pyplot()
    columns = max(len(group) for group in by_seed)
    fig, axes = plt.subplots(len(by_seed), columns, figsize=(4.4 * columns + 1, 4.2 * len(by_seed)), squeeze=False,
                             layout="constrained")
    for axes_row, group in zip(axes, by_seed):
        for ax in axes_row[len(group):]:
            ax.axis("off")
        for ax, r in zip(axes_row, group):
            image = accuracy_panel(ax, r, first=ax is axes_row[0])
            ax.set_title(labels[id(r)], fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="exact-answer accuracy", shrink=0.8)
    fig.suptitle("Accuracy after each task of the sequence", fontsize=10)
    fig.savefig(path, dpi=110)  # not save(): a constrained layout must not be tightened again
    plt.close(fig)
    return path


def accuracy_panel(ax, run, first: bool):
    """One run's accuracy matrix, each cell labelled; task names on the axes (rows only on the first panel)."""
    matrix, tasks = run.summary["accuracy"], run.summary["tasks"]
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, a in enumerate(row):
            ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8, color="white" if a < 0.6 else "black")
    names = [t.replace("_", "\n") for t in tasks]
    ax.set_xticks(range(len(tasks)), names, fontsize=7)
    ax.set_yticks(range(len(tasks)), names if first else [], fontsize=7)
    ax.set_xlabel("accuracy on task")
    if first:
        ax.set_ylabel("after training on task")
    return image
