"""Capacity: forgetting against pretraining length and against model size, and the mix frontier."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from selfreplay.experiments.compare import read_curve
from selfreplay.experiments.figures.common import (
    Figure,
    Finding,
    best_replay,
    finished,
    fmt,
    held,
    markdown_table,
    method_label,
    number,
    plain,
    pyplot,
    reached,
    replays,
    save,
)
from selfreplay.experiments.measures import rises

LENGTH_CLAIM = ("Forgetting with the best replay coefficient rises monotonically with tokens per parameter and is "
                "<= 0.01 nats at the smallest budget; without replay it is larger at every budget "
                "(paper: ~0 up to ~32 tokens/param, 0.18 nats at 10,000)")
SIZE_CLAIM = ("Pretrained to a common old-domain loss, larger models forget less: best-coefficient forgetting falls "
              "with size, and no replay forgets more at every size (paper: English 3.26 -> 3.005 from 6M to 46M)")
FRONTIER_CLAIM = ("An under-trained model learns the new domain with little forgetting (it moves toward the "
                  "frontier); an over-trained one on the frontier can only trade old loss for new loss "
                  "(paper: 20 tokens/param, Spanish 3.7 -> 2.75 with English 3.69 -> 3.75)")


@dataclass
class CapacityPoint:
    """The finetuning runs from one pretrained model, at that model's x (tokens/param or parameters)."""

    x: float
    plain: object | None  # the no-replay run
    best: object | None  # the fixed-coefficient replay run that forgot least at the target
    replays: list  # every fixed-coefficient replay run
    held: object | None = None  # the run that held its replay KL to a budget (replay.coeff=auto), if any


def tokens_per_param(run) -> float:
    return run.summary["tokens"] / run.summary["non_embedding_params"]


def forgetting(run) -> float | None:
    return number(run.summary.get("forgetting")) if run is not None else None


# ---------------------------------------------------------------- pretraining length and model size

def tokens_per_param_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Forgetting against pretraining tokens per parameter (log x), with and without replay."""
    points = capacity_points(finished(spec, runs), tokens_per_param)
    path = plot_capacity(points, out / f"{spec.get('name', 'tokens_per_param')}.png",
                         "pretraining tokens per non-embedding parameter", "Forgetting against pretraining length")
    measured, reproduced = capacity_finding(points, True, "tokens/param " + ", ".join(f"{p.x:.0f}" for p in points))
    if reproduced is not None:
        reproduced = reproduced and replay_of_finding(points[0]).summary["forgetting"] <= 0.01
    caption = ("A model pretrained longer is closer to saturation and must overwrite more to learn the new "
               f"domain; replay cannot remove that. Measured: {measured}." + coefficient_range_note(points))
    return Figure(path, "Forgetting against pretraining length", caption,
                  capacity_table(points, "tokens/param", "{:.0f}"), Finding(LENGTH_CLAIM, measured, reproduced))


def model_size_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Forgetting against model size (non-embedding parameters, log x), with and without replay."""
    points = capacity_points(finished(spec, runs), lambda init: init.summary["non_embedding_params"])
    path = plot_capacity(points, out / f"{spec.get('name', 'model_size')}.png", "non-embedding parameters",
                         "Forgetting against model size")
    measured, reproduced = capacity_finding(points, False, "parameters " + ", ".join(f"{p.x:,.0f}" for p in points))
    caption = f"Larger models have room for both domains. Measured: {measured}." + coefficient_range_note(points)
    return Figure(path, "Forgetting against model size", caption, capacity_table(points, "parameters", "{:,.0f}"),
                  Finding(SIZE_CLAIM, measured, reproduced))


def capacity_points(done: list, x_of) -> list[CapacityPoint]:
    """One point per pretrained (init) run, x_of(init run) its x, sorted by x."""
    by_init: dict = {}
    for r in done:
        by_init.setdefault(r.init.run_dir if r.init else None, []).append(r)
    points = [CapacityPoint(x_of(group[0].init), plain(group), best_replay(group),
                            [r for r in group if replays(r) and not held(r)], next((r for r in group if held(r)), None))
              for group in by_init.values() if group[0].init is not None and group[0].init.summary]
    return sorted(points, key=lambda p: p.x)


def best_at_largest(best, replay_runs: list) -> bool:
    """Whether the best coefficient is the largest of several tried: a larger one might forget less."""
    coeffs = {float(r.value("replay.coeff")) for r in replay_runs}
    return best is not None and len(coeffs) > 1 and float(best.value("replay.coeff")) == max(coeffs)


def replay_of_finding(point: CapacityPoint):
    """The replay run a claim is judged on: the run held to a budget where the sweep has one (a
    coefficient nobody searched for), else the best of the fixed coefficients."""
    return point.held if point.held is not None else point.best


def capacity_finding(points: list[CapacityPoint], rising_with_x: bool, what: str) -> tuple[str, bool | None]:
    """(what was measured, whether the claim holds): judged on the runs held to a budget where every
    point has one, else on the best coefficient's. None with fewer than two points or a point
    without its run."""
    if points and all(p.held is not None for p in points):
        return held_finding(points, rising_with_x, what)
    best = [forgetting(p.best) for p in points]
    none = [forgetting(p.plain) for p in points]
    if len(points) < 2 or None in best:
        return f"best-coefficient forgetting {best}", None
    text = (f"best-coefficient forgetting {', '.join(f'{b:+.3f}' for b in best)}; no replay "
            f"{', '.join(fmt(n, '{:+.3f}') or '-' for n in none)} ({what})")
    worse = all(n is not None and n > b for n, b in zip(none, best))
    return text, rises(best if rising_with_x else best[::-1]) and worse


def held_finding(points: list[CapacityPoint], rising_with_x: bool, what: str) -> tuple[str, bool | None]:
    """The capacity claim read on runs that hold one budget B: along the harder direction (longer
    pretraining, smaller width) forgetting at the target rises, and where the model cannot learn the
    new domain within B the run is capacity bound (it missed the target with c at its ceiling). So
    the claim holds when the runs that reached the target forget more the harder the point, forget
    less than no replay, and the capacity-bound runs are all at the hard end."""
    harder = points if rising_with_x else points[::-1]
    label = f"forgetting held to B={float(points[0].held.value('replay.budget')):g}"
    cells = [fmt(forgetting(p.held), "{:+.3f}") if reached(p.held)
             else "capacity bound" if p.held.summary.get("capacity_bound") else "target missed" for p in points]
    none = [forgetting(p.plain) for p in points]
    text = (f"{label} {', '.join(str(c) for c in cells)}; no replay "
            f"{', '.join(fmt(n, '{:+.3f}') or '-' for n in none)} ({what})")
    done = [p for p in harder if reached(p.held)]
    if len(points) < 2 or not done or any(forgetting(p.held) is None for p in done):
        return text, None
    bound_at_hard_end = all(not reached(p.held) and p.held.summary.get("capacity_bound") for p in harder[len(done):])
    worse = all(forgetting(p.plain) is not None and forgetting(p.plain) > forgetting(p.held) for p in done)
    return text, harder[:len(done)] == done and bound_at_hard_end and rises([forgetting(p.held) for p in done]) and worse


def coefficient_range_note(points: list[CapacityPoint]) -> str:
    """A sentence for the caption when the coefficient sweep may not contain the best coefficient."""
    edge = sum(best_at_largest(p.best, p.replays) for p in points)
    if not edge:
        return ""
    return (f" At {edge} of {len(points)} points the best coefficient is the largest tried: a larger one "
            f"might forget less, so widen the coefficient sweep.")


def plot_capacity(points: list[CapacityPoint], path: Path, xlabel: str, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for pick, style, color, label in ((lambda p: p.plain, "o-", "tab:red", "no replay"),
                                      (lambda p: p.best, "s-", "tab:blue", "self-replay, best coefficient")):
        xy = [(p.x, forgetting(pick(p))) for p in points if forgetting(pick(p)) is not None]
        ax.plot([x for x, _ in xy], [y for _, y in xy], style, color=color, label=label)
    held_xy = [(p.x, forgetting(p.held)) for p in points if p.held is not None and forgetting(p.held) is not None]
    if held_xy:
        budget = float(next(p.held for p in points if p.held is not None).value("replay.budget"))
        ax.plot([x for x, _ in held_xy], [y for _, y in held_xy], "D--", color="tab:green",
                label=f"self-replay, KL held to B={budget:g} (c=auto)")
        for p in points:  # a held run that missed the target (capacity bound) is drawn hollow
            if p.held is not None and not reached(p.held) and forgetting(p.held) is not None:
                ax.scatter([p.x], [forgetting(p.held)], s=80, facecolors="none", edgecolors="tab:green")
    for i, p in enumerate(points):
        ys = [y for y in (forgetting(r) for r in p.replays if reached(r)) if y is not None]
        ax.scatter([p.x] * len(ys), ys, s=12, color="tab:blue", alpha=0.3,
                   label="self-replay, each coefficient" if i == 0 else None)
    ax.axhline(0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("forgetting at the target new-domain loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)


def capacity_table(points: list[CapacityPoint], xname: str, xfmt: str) -> str:
    rows, held_runs = [], any(p.held is not None for p in points)
    for p in points:
        coeffs = ", ".join(f"c={float(r.value('replay.coeff')):g}: {fmt(r.summary.get('forgetting'), '{:+.3f}')}"
                           + ("" if reached(r) else " (target missed)") for r in p.replays)
        best_c = None
        if p.best:
            best_c = f"{float(p.best.value('replay.coeff')):g}" + (" (largest tried)" if best_at_largest(p.best, p.replays) else "")
        row = [xfmt.format(p.x), fmt(forgetting(p.plain), "{:+.3f}"), fmt(forgetting(p.best), "{:+.3f}"),
               best_c, steps_to_target(p.best), coeffs or None]
        rows.append(row + (held_cells(p.held) if held_runs else []))
    header = [xname, "no replay", "best replay", "best c", "best c: steps", "every coefficient"]
    if held_runs:
        header += ["held to B: forgetting", "steps", "c at the end", "capacity bound from"]
    return markdown_table(header, rows)


def steps_to_target(run) -> str | None:
    """The steps a run took to the target loss, or '-' where it missed it."""
    return f"{run.summary['steps']}" if run is not None and reached(run) else None


def held_cells(run) -> list:
    """A held run's forgetting, steps to the target, final c and where it turned capacity bound."""
    if run is None:
        return [None] * 4
    s = run.summary
    forgot = fmt(s.get("forgetting"), "{:+.3f}")
    return [forgot if reached(run) else f"{forgot} (target missed)", steps_to_target(run),
            fmt(s.get("replay_coeff_end"), "{:.3g}"), s.get("capacity_bound_since") if s.get("capacity_bound") else None]


# ---------------------------------------------------------------- the mix frontier

def mix_frontier_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Old- against new-domain loss of pretrained mixes (the frontier), finetuning trajectories over it."""
    frontier = frontier_points(finished(spec, runs, "frontier"))
    trajectories = finished(spec, runs)
    path = plot_frontier(frontier, trajectories, out / f"{spec.get('name', 'mix_frontier')}.png")
    least = least_forgetting_by_budget(trajectories)
    measured = (", ".join(f"{t:.0f} tokens/param: {f:+.3f}" for t, f in sorted(least.items()))
                or "no replay run reached the target")
    reproduced = least[min(least)] < least[max(least)] if len(least) >= 2 else None
    finding = Finding(FRONTIER_CLAIM, f"least replay forgetting at the target: {measured}", reproduced)
    caption = ("Each black point is a model pretrained on a mix (labels: fraction of new-domain rows); together "
               f"they trace the best old/new trade-off this model size reaches. Measured: {finding.measured}.")
    return Figure(path, "The mix frontier", caption, frontier_tables(frontier, trajectories), finding)


def frontier_points(pretrained: list) -> list[tuple[float, float, float]]:
    """(old loss, new loss, mix fraction) of each pretrained mix, by mix fraction."""
    points = [(r.summary.get("old_loss"), r.summary.get("mix_loss"), float(r.value("data.mix_fraction") or 0.0))
              for r in pretrained]
    return sorted((p for p in points if number(p[0]) is not None and number(p[1]) is not None), key=lambda p: p[2])


def least_forgetting_by_budget(trajectories: list) -> dict[float, float]:
    """{tokens/param of the init: the least forgetting of its replay runs that reached the target}."""
    least: dict[float, float] = {}
    for r in trajectories:
        if replays(r) and reached(r) and forgetting(r) is not None:
            tpp = tokens_per_param(r.init)
            least[tpp] = min(least.get(tpp, math.inf), r.summary["forgetting"])
    return least


def plot_frontier(frontier: list[tuple[float, float, float]], trajectories: list, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p[1] for p in frontier], [p[0] for p in frontier], "k.-", label="pretrained mixes (frontier)")
    for old, new, fraction in frontier:
        ax.annotate(f"{fraction:g}", (new, old), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for r in trajectories:
        curve = [p for p in read_curve(r.run_dir) if number(p.get("old_loss")) and number(p.get("new_loss"))]
        ax.plot([p["new_loss"] for p in curve], [p["old_loss"] for p in curve], ".-",
                label=f"{tokens_per_param(r.init):.0f} tokens/param, {method_label(r)}")
    ax.set_xlabel("new-domain validation loss (nats/token)")
    ax.set_ylabel("old-domain validation loss (nats/token)")
    ax.set_title("Capacity frontier of pretrained mixes, finetuning over it")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, path)


def frontier_tables(frontier: list[tuple[float, float, float]], trajectories: list) -> str:
    rows = [[f"{tokens_per_param(r.init):.0f}", method_label(r), fmt(r.summary.get("old_loss_0")),
             fmt(r.summary.get("new_loss_0")), fmt(r.summary.get("new_loss")),
             fmt(r.summary.get("forgetting"), "{:+.3f}"), "yes" if reached(r) else "no"] for r in trajectories]
    table = markdown_table(["tokens/param", "method", "old loss 0", "new loss 0", "new loss", "forgetting", "reached"],
                           rows)
    return table + "\n\n" + markdown_table(["new-domain fraction", "old loss", "new loss"],
                                           [[f"{f:g}", f"{o:.3f}", f"{n:.3f}"] for o, n, f in frontier])
