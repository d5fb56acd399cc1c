"""The capacity grid: forgetting and compute multiplier over widths x pretraining tokens per parameter,
one pair of heatmaps per method (no replay, self-KL at a fixed c, self-KL held to a budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.figures.common import (
    Figure,
    Finding,
    finished,
    fmt,
    held,
    markdown_table,
    method_label,
    number,
    pyplot,
    reached,
    replays,
    stage_names,
)
from selfreplay.experiments.measures import rises

CLAIM = ("Without replay, forgetting at the target rises with pretraining tokens per parameter along every width; "
         "self-replay KL at a fixed c forgets less than no replay in every cell and keeps its compute multiplier "
         ">= 0.85 (paper, 13 x 13 cells: no replay up to +0.35 nats, multiplier 0.5-0.8; KL c=10 ~0, 0.85-0.92)")
NEAR_ONE = 0.85  # the paper's lowest KL-replay multiplier: "near 1" in the caption and the finding


@dataclass
class Grid:
    """The finetuning runs of a widths x tokens-per-parameter sweep, by method and by cell."""

    widths: list[int]  # model.D of the pretrained cells, ascending
    budgets: list[float]  # stop.tokens_per_param of the pretrained cells, ascending
    methods: dict[str, dict[tuple[int, float], object]]  # label -> {(width, tokens/param): run}; no replay first


# ---------------------------------------------------------------- selecting the runs

def cell_of(run) -> tuple[int, float]:
    """(width, tokens per parameter) of the pretrained model a finetuning run started from."""
    init = run.init
    width, budget = (number(init.value(k)) if init is not None else None for k in ("model.D", "stop.tokens_per_param"))
    if width is None or budget is None:
        raise SelfReplayError(f"run {run.name} does not start from a pretrained cell with model.D and "
                              "stop.tokens_per_param: the grid figure needs a stage whose init varies both")
    return int(width), float(budget)


def method_order(run) -> tuple[int, str]:
    """No replay first, then fixed coefficients, then runs held to a budget."""
    return (0 if not replays(run) else 2 if held(run) else 1), method_label(run)


def grid_runs(done: list) -> Grid:
    """The grid of the finished finetuning runs `done`; a method with two runs in one cell is an error."""
    methods: dict[str, dict] = {}
    for run in sorted(done, key=method_order):
        cells = methods.setdefault(method_label(run), {})
        cell = cell_of(run)
        if cell in cells:
            raise SelfReplayError(f"two {method_label(run)} runs start from width {cell[0]} at {cell[1]:g} tokens/param "
                                  f"({cells[cell].name}, {run.name}): the grid holds one run per method and cell")
        cells[cell] = run
    every = [cell for cells in methods.values() for cell in cells]
    return Grid(sorted({w for w, _ in every}), sorted({b for _, b in every}), methods)


def at_target(run, key: str) -> float | None:
    """A summary number of a run that reached the target loss; None where it missed it (or has none)."""
    return number(run.summary.get(key)) if run is not None and reached(run) else None


def matrix(grid: Grid, label: str, key: str) -> list[list[float | None]]:
    """[width][tokens/param] of `key` at the target for one method; None where no run reached it."""
    cells = grid.methods[label]
    return [[at_target(cells.get((w, b)), key) for b in grid.budgets] for w in grid.widths]


def plain_label(grid: Grid) -> str | None:
    return next((label for label, cells in grid.methods.items() if not replays(next(iter(cells.values())))), None)


def fixed_label(grid: Grid) -> str | None:
    """The first replay method with a fixed coefficient: the one the paper's claim is judged on."""
    return next((label for label, cells in grid.methods.items()
                 if all(replays(r) and not held(r) for r in cells.values())), None)


# ---------------------------------------------------------------- what the caption and finding say

def row_rise(values: list[float | None]) -> bool | None:
    """Whether a width row's values (along tokens/param) rise through the cells that reached the target;
    None with fewer than two."""
    present = [v for v in values if v is not None]
    return rises(present) if len(present) >= 2 else None


def below(replay: list[list], plain: list[list]) -> tuple[int, int]:
    """(cells where replay forgot less than no replay, cells where both reached the target)."""
    pairs = [(r, p) for rr, pr in zip(replay, plain) for r, p in zip(rr, pr) if r is not None and p is not None]
    return sum(r < p for r, p in pairs), len(pairs)


def values_of(m: list[list]) -> list[float]:
    return [v for row in m for v in row if v is not None]


def span(values: list[float], spec: str) -> str:
    return f"{spec.format(min(values))} to {spec.format(max(values))}" if values else "no cell reached the target"


def steepest_rise(grid: Grid, forgot: list[list]) -> str:
    """Between which adjacent pretraining lengths no-replay forgetting rises most, averaged over the width rows."""
    steps = []
    for j, (shorter, longer) in enumerate(zip(grid.budgets, grid.budgets[1:])):
        rises_here = [row[j + 1] - row[j] for row in forgot if row[j] is not None and row[j + 1] is not None]
        if rises_here:
            steps.append((sum(rises_here) / len(rises_here), shorter, longer))
    if not steps:
        return "no two adjacent lengths to compare"
    rise, shorter, longer = max(steps)
    return f"it rises most from {shorter:g} to {longer:g} tokens/param ({rise:+.2f} nats, mean over widths)"


def plain_sentence(grid: Grid, none: str) -> tuple[str, list[bool]]:
    """What no replay did along each width row, and whether each row with two or more cells at the target rose."""
    forgot = matrix(grid, none, "forgetting")
    rows = [(w, row_rise(row), [v for v in row if v is not None]) for w, row in zip(grid.widths, forgot)]
    judged = [r for _, r, _ in rows if r is not None]
    text = (f"without replay forgetting rises with tokens per parameter along {sum(judged)} of {len(judged)} width "
            "rows (" + "; ".join(f"D={w}: {', '.join(f'{v:+.2f}' for v in vs)}" + ("" if r else " (not monotone)")
                                 for w, r, vs in rows if r is not None)
            + f"); {steepest_rise(grid, forgot)}; no-replay multiplier "
            f"{span(values_of(matrix(grid, none, 'compute_multiplier')), '{:.2f}')}")
    return text, judged


def replay_sentence(grid: Grid, label: str, none: str) -> tuple[str, bool]:
    """What one replay method did against no replay, and whether it forgot less in every cell where both
    reached the target with its multiplier near 1 in every cell it reached."""
    less, pairs = below(matrix(grid, label, "forgetting"), matrix(grid, none, "forgetting"))
    multipliers = values_of(matrix(grid, label, "compute_multiplier"))
    near = sum(m >= NEAR_ONE for m in multipliers)
    text = (f"{label}: forgets less than no replay in {less} of {pairs} cells where both reached the target "
            f"(forgetting {span(values_of(matrix(grid, label, 'forgetting')), '{:+.3f}')}), multiplier "
            f"{span(multipliers, '{:.2f}')}, >= {NEAR_ONE} in {near} of {len(multipliers)} cells, "
            f"{missed(grid, label)} of {len(grid.methods[label])} cells missed the target")
    return text, pairs > 0 and less == pairs and near == len(multipliers)


def grid_summary(grid: Grid) -> tuple[str, bool | None]:
    """(the caption's measured sentences, whether the claim holds: judged on no replay's rows and the first
    fixed-coefficient replay method) from the grid's numbers."""
    none, kl = plain_label(grid), fixed_label(grid)
    if none is None:
        return "no run without replay finished", None
    text, judged = plain_sentence(grid, none)
    sentences, holds = [text], None
    for label in grid.methods:
        if label != none:
            text, kept = replay_sentence(grid, label, none)
            sentences.append(text)
            if label == kl:
                holds = bool(judged) and all(judged) and kept
    return "; ".join(sentences), holds


def missed(grid: Grid, label: str) -> int:
    return sum(not reached(r) for r in grid.methods[label].values())


# ---------------------------------------------------------------- the figure

def grid_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Two heatmaps per method over widths x tokens per parameter: forgetting and compute multiplier at the target."""
    done = finished(spec, runs)
    if not done:
        raise SelfReplayError(f"no finished run in stages {stage_names(spec)}")
    grid = grid_runs(done)
    path = plot_grid(grid, out / f"{spec.get('name', 'grid')}.png")
    measured, reproduced = grid_summary(grid)
    caption = ("Each cell is a model of one width pretrained for one number of tokens per non-embedding "
               "parameter, then finetuned to the common new-domain target; left, its forgetting there (nats/token), "
               "right, its compute multiplier (the share of its pretraining its old-domain loss is still worth, "
               "docs/method.md); one colour scale per quantity for every method; a grey cell missed the target. "
               f"Measured: {measured}.")
    return Figure(path, "The capacity grid: widths x tokens per parameter", caption, grid_table(grid),
                  Finding(CLAIM, measured, reproduced))


def edges(values: list[float]) -> list[float]:
    """Cell edges on a log axis: geometric midpoints between values, and as far again past each end."""
    if len(values) == 1:
        return [values[0] / math.sqrt(2), values[0] * math.sqrt(2)]
    mids = [math.sqrt(a * b) for a, b in zip(values, values[1:])]
    return [values[0] ** 2 / mids[0], *mids, values[-1] ** 2 / mids[-1]]


def plot_grid(grid: Grid, path: Path) -> Path:
    plt = pyplot()
    labels = list(grid.methods)
    forgot = [matrix(grid, label, "forgetting") for label in labels]
    reach = max((abs(v) for m in forgot for v in values_of(m)), default=1.0) or 1.0  # symmetric: 0 is white
    quantities = [("forgetting at the target (nats/token)", forgot, ("RdBu_r", -reach, reach), "{:+.2f}"),
                  ("compute multiplier", [matrix(grid, label, "compute_multiplier") for label in labels],
                   ("viridis", 0.0, 1.0), "{:.2f}")]
    fig, axes = plt.subplots(len(labels), 2, figsize=(11, 3.6 * len(labels)), squeeze=False, layout="constrained")
    for column, (name, matrices, colours, spec) in enumerate(quantities):
        for row, label in enumerate(labels):
            image = heatmap(axes[row][column], grid, matrices[row], grid.methods[label], colours, spec)
            axes[row][column].set_title(f"{label}: {name}", fontsize=9)
        fig.colorbar(image, ax=[axes[r][column] for r in range(len(labels))], label=name, shrink=0.8)
    fig.suptitle("Finetuned to a common target from every width x pretraining length", fontsize=10)
    fig.savefig(path, dpi=110)  # not save(): a constrained layout must not be tightened again
    plt.close(fig)
    return path


def heatmap(ax, grid: Grid, values: list[list], cells: dict, colours: tuple[str, float, float], spec: str):
    """One quantity of one method on log axes, each cell annotated (or 'missed', grey); colours (map, low, high)."""
    cmap, low, high = colours
    shown = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float))
    ax.set_facecolor("0.85")
    image = ax.pcolormesh(edges(grid.budgets), edges([float(w) for w in grid.widths]), shown, cmap=cmap,
                          vmin=low, vmax=high)
    for i, w in enumerate(grid.widths):
        for j, b in enumerate(grid.budgets):
            value, run = values[i][j], cells.get((w, b))
            text = "-" if run is None else spec.format(value) if value is not None else "missed"
            dark = value is not None and (abs(value) / high > 0.6 if low < 0 else (value - low) / (high - low) < 0.45)
            ax.text(b, w, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(grid.budgets, [f"{b:g}" for b in grid.budgets])
    ax.set_yticks(grid.widths, [str(w) for w in grid.widths])
    ax.minorticks_off()
    ax.set_xlabel("pretraining tokens per non-embedding parameter")
    ax.set_ylabel("width D")
    return image


def grid_table(grid: Grid) -> str:
    """One row per cell: for each method its forgetting, compute multiplier, steps, and plain's steps over them."""
    none = plain_label(grid)
    header, rows = ["width", "tokens/param"], []
    for label in grid.methods:
        header += [f"{label}: forgetting", "multiplier", "steps", "plain steps / steps"]
    for w in grid.widths:
        for b in grid.budgets:
            row = [w, f"{b:g}"]
            plain_run = grid.methods[none].get((w, b)) if none else None
            for cells in grid.methods.values():
                row += cell_cells(cells.get((w, b)), plain_run)
            rows.append(row)
    return markdown_table(header, rows)


def cell_cells(run, plain_run) -> list:
    if run is None:
        return [None] * 4
    forgot = fmt(run.summary.get("forgetting"), "{:+.3f}")
    steps = at_target(run, "steps")
    plain_steps = at_target(plain_run, "steps")
    ratio = f"{plain_steps / steps:.2f}" if steps and plain_steps else None
    return [forgot if reached(run) else f"{forgot} (missed)", fmt(at_target(run, "compute_multiplier"), "{:.2f}"),
            steps, ratio]
