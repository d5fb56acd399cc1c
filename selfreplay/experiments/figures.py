"""The figures of the paper's experiments, each drawn from a sweep's runs with the claim it tests.

Every figure function takes the report entry of the sweep file (which stages feed it), the
sweep's runs (`selfreplay.experiments.sweep.Run`, summaries loaded) and the folder for the PNG, and returns
a `Figure`: the image, a caption stating the claim with the measured numbers, the table behind
it and a `Finding` (the paper's result, this sweep's, reproduced or not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.measures import Finetuned, compute_ratio, rises


@dataclass
class Finding:
    claim: str  # what the paper found, as a testable statement
    measured: str  # what these runs found
    reproduced: bool | None  # None: the runs cannot tell (too few finished)


@dataclass
class Figure:
    path: Path  # the PNG
    title: str
    caption: str  # the claim it tests, with the measured numbers
    table: str  # Markdown table of the numbers behind it
    finding: Finding | None = None


# ---------------------------------------------------------------- helpers

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = lambda row: "| " + " | ".join("-" if c is None else str(c) for c in row) + " |"  # noqa: E731
    return "\n".join([cells(header), cells(["---"] * len(header)), *(cells(r) for r in rows)])


def _stages(spec: dict) -> list[str]:
    stages = spec.get("stages", spec.get("stage"))
    if not stages:
        raise SelfReplayError(f"report entry {spec} names no stage: add stage: NAME")
    return [stages] if isinstance(stages, str) else list(stages)


def finished(spec: dict, runs: list, key: str = "stages") -> list:
    names = _stages(spec) if key == "stages" else [spec[key]]
    return [r for r in runs if r.stage in names and r.status == "done"]


def number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def method_label(run) -> str:
    """'no replay', 'self-KL c=10', 'real-NTP c=1', 'replace 1/8', 'LoRA r16', ..."""
    method, source, coeff, rank = (run.value(k) for k in ("replay.method", "replay.source", "replay.coeff", "lora.rank"))
    if rank:
        return f"LoRA r{rank}"
    if method in (None, "none"):
        return "no replay"
    if method == "replace":
        return f"replace {Fraction(float(coeff)).limit_denominator(1024)}"
    if method == "kl_new":
        return f"KL on new data c={float(coeff):g}"
    return f"{source}-{str(method).upper()} c={float(coeff):g}"


def reached(run) -> bool:
    return run.summary.get("stop_reason") == "target_loss"


def fmt(value, spec: str = "{:.3f}") -> str | None:
    return spec.format(value) if number(value) is not None else None


def best_replay(runs: list) -> object | None:
    """The replay run (any coefficient) with the least forgetting among those that reached the target."""
    candidates = [r for r in runs if r.value("replay.method") != "none" and reached(r)
                  and number(r.summary.get("forgetting")) is not None]
    return min(candidates, key=lambda r: r.summary["forgetting"], default=None)


def plain(runs: list) -> object | None:
    return next((r for r in runs if r.value("replay.method") == "none" and not r.value("lora.rank")), None)


# ---------------------------------------------------------------- method comparison

def methods_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Old-domain loss against new-domain loss along each finetuning run, one line per method."""
    from selfreplay.experiments.compare import plot_old_vs_new

    done = finished(spec, runs)
    rows = [{"method": method_label(r), "run_dir": str(r.run_dir), "old_loss_0": r.summary.get("old_loss_0")}
            for r in done]
    path = out / f"{spec.get('name', 'methods')}.png"
    plot_old_vs_new(rows, path, title="Old-domain loss along finetuning, per method")
    table = markdown_table(
        ["method", "forgetting (nats)", "new loss", "reached target", "compute multiplier", "time to target (s)"],
        [[method_label(r), fmt(r.summary.get("forgetting"), "{:+.3f}"), fmt(r.summary.get("new_loss")),
          "yes" if reached(r) else "no", fmt(r.summary.get("compute_multiplier"), "{:.2f}"),
          fmt(r.summary.get("time_to_target_seconds"), "{:.1f}")] for r in done])
    # forgetting compares at equal new-domain loss: only runs that reached the target count
    forgetting = {method_label(r): number(r.summary.get("forgetting")) for r in done if reached(r)}
    base = forgetting.get("no replay")
    replayed = {k: v for k, v in forgetting.items() if k.split("-")[0] in ("self", "real") and v is not None}
    self_kl = next((v for k, v in replayed.items() if k.startswith("self-KL")), None)
    real_kl = next((v for k, v in replayed.items() if k.startswith("real-KL")), None)
    reproduced = None
    if base and base > 0 and self_kl is not None and real_kl is not None:
        reproduced = all(v <= 0.2 * base for v in replayed.values()) and self_kl <= real_kl + 0.02
    measured = ", ".join(f"{method_label(r)} {fmt(r.summary.get('forgetting'), '{:+.3f}')}"
                         + ("" if reached(r) else " (target missed)") for r in done)
    finding = Finding("Self-generated replay removes most forgetting, as well as real replay: every replay "
                      "variant forgets <= 20% of plain finetuning's, self-KL within 0.02 nats of real-KL "
                      "(paper: 95-97% less, self = real)", f"forgetting (nats): {measured}", reproduced)
    caption = (f"Each line follows one finetuning run from its start (right) as the new-domain loss falls; "
               f"the higher it climbs, the more it forgets. Forgetting at the end: {measured}.")
    return Figure(path, "Method comparison", caption, table, finding)


# ---------------------------------------------------------------- capacity

def _capacity_points(done: list, x_of) -> list[tuple[float, object, object, list]]:
    """Per init run: (x, no-replay run, best replay run, every replay run), sorted by x."""
    by_init: dict = {}
    for r in done:
        by_init.setdefault(r.init.run_dir if r.init else None, []).append(r)
    points = []
    for group in by_init.values():
        init = group[0].init
        if init is None or not init.summary:
            continue
        points.append((x_of(init), plain(group), best_replay(group),
                       [r for r in group if r.value("replay.method") != "none"]))
    return sorted(points, key=lambda p: p[0])


def _capacity_plot(points, out: Path, name: str, xlabel: str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [p[0] for p in points]
    none = [number(p[1].summary.get("forgetting")) if p[1] else None for p in points]
    best = [number(p[2].summary.get("forgetting")) if p[2] else None for p in points]
    ax.plot([x for x, y in zip(xs, none) if y is not None], [y for y in none if y is not None], "o-",
            color="tab:red", label="no replay")
    ax.plot([x for x, y in zip(xs, best) if y is not None], [y for y in best if y is not None], "s-",
            color="tab:blue", label="self-replay, best coefficient")
    for i, (x, _, _, replays) in enumerate(points):
        ys = [y for y in (number(r.summary.get("forgetting")) for r in replays if reached(r)) if y is not None]
        ax.scatter([x] * len(ys), ys, s=12, color="tab:blue", alpha=0.3, label="self-replay, each coefficient" if i == 0 else None)
    ax.axhline(0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("forgetting at the target new-domain loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / f"{name}.png")


def best_at_largest(best, replays: list) -> bool:
    """Whether the best coefficient is the largest of several tried: a larger one might forget less."""
    coeffs = {float(r.value("replay.coeff")) for r in replays}
    return best is not None and len(coeffs) > 1 and float(best.value("replay.coeff")) == max(coeffs)


def _capacity_table(points, xname: str, xfmt: str) -> str:
    rows = []
    for x, none, best, replays in points:
        coeffs = ", ".join(f"c={float(r.value('replay.coeff')):g}: {fmt(r.summary.get('forgetting'), '{:+.3f}')}"
                           + ("" if reached(r) else " (target missed)") for r in replays)
        best_c = None
        if best:
            best_c = f"{float(best.value('replay.coeff')):g}" + (" (largest tried)" if best_at_largest(best, replays) else "")
        rows.append([xfmt.format(x), fmt(none.summary.get("forgetting"), "{:+.3f}") if none else None,
                     fmt(best.summary.get("forgetting"), "{:+.3f}") if best else None, best_c, coeffs or None])
    return markdown_table([xname, "no replay", "best replay", "best c", "every coefficient"], rows)


def _coefficient_range_note(points) -> str:
    """A sentence for the caption when the coefficient sweep may not contain the best coefficient."""
    edge = sum(best_at_largest(best, replays) for _, _, best, replays in points)
    if not edge:
        return ""
    return (f" At {edge} of {len(points)} points the best coefficient is the largest tried: a larger one "
            f"might forget less, so widen the coefficient sweep.")


def _capacity_finding(points, rising_with_x: bool, what: str) -> tuple[str, bool | None]:
    best = [number(p[2].summary.get("forgetting")) if p[2] else None for p in points]
    none = [number(p[1].summary.get("forgetting")) if p[1] else None for p in points]
    if len(points) < 2 or None in best:
        return f"best-coefficient forgetting {best}", None
    ordered = best if rising_with_x else best[::-1]
    worse = all(n is not None and n > b for n, b in zip(none, best))
    text = (f"best-coefficient forgetting {', '.join(f'{b:+.3f}' for b in best)}; no replay "
            f"{', '.join(fmt(n, '{:+.3f}') or '-' for n in none)} ({what})")
    return text, rises(ordered) and worse


def tokens_per_param_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Forgetting against pretraining tokens per parameter (log x), with and without replay."""
    points = _capacity_points(finished(spec, runs), lambda init: init.summary["tokens"] / init.summary["non_embedding_params"])
    path = _capacity_plot(points, out, spec.get("name", "tokens_per_param"),
                          "pretraining tokens per non-embedding parameter",
                          "Forgetting against pretraining length")
    measured, reproduced = _capacity_finding(points, True, "tokens/param " + ", ".join(f"{p[0]:.0f}" for p in points))
    if reproduced is not None:
        reproduced = reproduced and points[0][2].summary["forgetting"] <= 0.01
    finding = Finding("Forgetting with the best replay coefficient rises monotonically with tokens per parameter "
                      "and is <= 0.01 nats at the smallest budget; without replay it is larger at every budget "
                      "(paper: ~0 up to ~32 tokens/param, 0.18 nats at 10,000)", measured, reproduced)
    caption = ("A model pretrained longer is closer to saturation and must overwrite more to learn the new "
               f"domain; replay cannot remove that. Measured: {measured}." + _coefficient_range_note(points))
    table = _capacity_table(points, "tokens/param", "{:.0f}")
    return Figure(path, "Forgetting against pretraining length", caption, table, finding)


def model_size_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Forgetting against model size (non-embedding parameters, log x), with and without replay."""
    points = _capacity_points(finished(spec, runs), lambda init: init.summary["non_embedding_params"])
    path = _capacity_plot(points, out, spec.get("name", "model_size"), "non-embedding parameters",
                          "Forgetting against model size")
    measured, reproduced = _capacity_finding(points, False, "parameters " + ", ".join(f"{p[0]:,.0f}" for p in points))
    finding = Finding("Pretrained to a common old-domain loss, larger models forget less: best-coefficient "
                      "forgetting falls with size, and no replay forgets more at every size "
                      "(paper: English 3.26 -> 3.005 from 6M to 46M)", measured, reproduced)
    caption = f"Larger models have room for both domains. Measured: {measured}." + _coefficient_range_note(points)
    return Figure(path, "Forgetting against model size", caption, _capacity_table(points, "parameters", "{:,.0f}"),
                  finding)


def _frontier(pretrained: list) -> list[tuple[float, float, float]]:
    """(old loss, new loss, mix fraction) of each pretrained mix, by mix fraction."""
    points = [(r.summary.get("old_loss"), r.summary.get("mix_loss"), float(r.value("data.mix_fraction") or 0.0))
              for r in pretrained]
    return sorted((p for p in points if number(p[0]) is not None and number(p[1]) is not None), key=lambda p: p[2])


def mix_frontier_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Old- against new-domain loss of pretrained mixes (the frontier), finetuning trajectories over it."""
    from selfreplay.experiments.compare import read_curve

    frontier = _frontier(finished(spec, runs, "frontier"))
    trajectories = finished(spec, runs)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p[1] for p in frontier], [p[0] for p in frontier], "k.-", label="pretrained mixes (frontier)")
    for old, new, fraction in frontier:
        ax.annotate(f"{fraction:g}", (new, old), textcoords="offset points", xytext=(4, 3), fontsize=7)
    rows = []
    for r in trajectories:
        curve = [p for p in read_curve(r.run_dir) if number(p.get("old_loss")) and number(p.get("new_loss"))]
        tpp = r.init.summary["tokens"] / r.init.summary["non_embedding_params"]
        label = f"{tpp:.0f} tokens/param, {method_label(r)}"
        ax.plot([p["new_loss"] for p in curve], [p["old_loss"] for p in curve], ".-", label=label)
        rows.append([f"{tpp:.0f}", method_label(r), fmt(r.summary.get("old_loss_0")), fmt(r.summary.get("new_loss_0")),
                     fmt(r.summary.get("new_loss")), fmt(r.summary.get("forgetting"), "{:+.3f}"),
                     "yes" if reached(r) else "no"])
    ax.set_xlabel("new-domain validation loss (nats/token)")
    ax.set_ylabel("old-domain validation loss (nats/token)")
    ax.set_title("Capacity frontier of pretrained mixes, finetuning over it")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = _save(fig, out / f"{spec.get('name', 'mix_frontier')}.png")
    by_tpp = {}
    for r in trajectories:
        if r.value("replay.method") != "none" and reached(r) and number(r.summary.get("forgetting")) is not None:
            tpp = r.init.summary["tokens"] / r.init.summary["non_embedding_params"]
            by_tpp[tpp] = min(by_tpp.get(tpp, math.inf), r.summary["forgetting"])
    reproduced = None
    measured = ", ".join(f"{t:.0f} tokens/param: {f:+.3f}" for t, f in sorted(by_tpp.items())) or "no replay run reached the target"
    if len(by_tpp) >= 2:
        reproduced = by_tpp[min(by_tpp)] < by_tpp[max(by_tpp)]
    finding = Finding("An under-trained model learns the new domain with little forgetting (it moves toward the "
                      "frontier); an over-trained one on the frontier can only trade old loss for new loss "
                      "(paper: 20 tokens/param, Spanish 3.7 -> 2.75 with English 3.69 -> 3.75)",
                      f"least replay forgetting at the target: {measured}", reproduced)
    caption = ("Each black point is a model pretrained on a mix (labels: fraction of new-domain rows); together "
               f"they trace the best old/new trade-off this model size reaches. Measured: {finding.measured}.")
    table = markdown_table(["tokens/param", "method", "old loss 0", "new loss 0", "new loss", "forgetting", "reached"],
                           rows)
    table += "\n\n" + markdown_table(["new-domain fraction", "old loss", "new loss"],
                                     [[f"{f:g}", f"{o:.3f}", f"{n:.3f}"] for o, n, f in frontier])
    return Figure(path, "The mix frontier", caption, table, finding)


# ---------------------------------------------------------------- learning rate

def _finetuned(run) -> Finetuned:
    label = f"lr={float(run.value('optim.lr')):g}" if run.value("replay.method") == "none" else method_label(run)
    return Finetuned(label, run.summary.get("forgetting"), run.summary.get("time_to_target_seconds"))


def learning_rate_figure(spec: dict, runs: list, out: Path) -> Figure:
    """Old-domain loss after finetuning against wall time to the target (log x), with the compute ratio."""
    done = [r for r in finished(spec, runs) if number(r.summary.get("forgetting")) is not None]
    none = sorted((r for r in done if r.value("replay.method") == "none"), key=lambda r: -float(r.value("optim.lr")))
    replay = [r for r in done if r.value("replay.method") != "none"]
    ratios = [(r, compute_ratio([_finetuned(n) for n in none], _finetuned(r))) for r in replay]
    best = max((x for x in ratios if x[1] is not None), key=lambda x: x[1].ratio, default=None)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    seconds = lambda r: r.summary.get("time_to_target_seconds") or r.summary["train_seconds"]  # noqa: E731
    ax.plot([seconds(r) for r in none], [r.summary["old_loss"] for r in none], "o-", color="tab:red",
            label="no replay, learning rate swept")
    for r in none:
        ax.annotate(f"{float(r.value('optim.lr')):g}", (seconds(r), r.summary["old_loss"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
        if not reached(r):
            ax.scatter([seconds(r)], [r.summary["old_loss"]], s=80, facecolors="none", edgecolors="black")
    for r in replay:
        marker = "^" if r.value("replay.method") == "replace" else "s"
        ax.scatter([seconds(r)], [r.summary["old_loss"]], marker=marker, label=method_label(r))
    if best is not None:  # an arrow from the no-replay run needed to the replay run, at the replay run's loss
        result, y = best[1], best[0].summary["old_loss"]
        ax.annotate("", xy=(result.replay.seconds_to_target, y), xytext=(result.no_replay.seconds_to_target, y),
                    arrowprops={"arrowstyle": "->", "color": "black"})
        middle = (result.replay.seconds_to_target * result.no_replay.seconds_to_target) ** 0.5
        ax.text(middle, y, f"compute ratio {'> ' if result.at_least else ''}{result.ratio:.0f}x", ha="center",
                va="bottom", fontsize=8)
    if done:
        ax.axhline(done[0].summary["old_loss_0"], color="gray", linestyle=":", label="old loss before finetuning")
    ax.set_xscale("log")
    ax.set_xlabel("wall time to the target new-domain loss (s; circled: cap reached first)")
    ax.set_ylabel("old-domain loss after finetuning (nats/token)")
    ax.set_title("Learning rate against replay at a high learning rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    path = _save(fig, out / f"{spec.get('name', 'learning_rate')}.png")
    rows = [[_finetuned(r).label, fmt(r.summary.get("old_loss")), fmt(r.summary.get("forgetting"), "{:+.3f}"),
             fmt(r.summary.get("time_to_target_seconds"), "{:.1f}"), r.summary.get("time_to_target_steps"),
             "yes" if reached(r) else "no (cap)"] for r in [*none, *replay]]
    table = markdown_table(["run", "old loss", "forgetting", "time to target (s)", "steps to target", "reached"], rows)
    ratio_rows = [[_finetuned(r).label, str(x) if x else None,
                   (f"beyond the sweep (slowest that reached the target: {x.no_replay.label})" if x.at_least
                    else x.no_replay.label) if x else None] for r, x in ratios]
    table += "\n\n" + markdown_table(["replay run", "compute ratio", "no-replay run needed"], ratio_rows)
    measured = (f"compute ratio {best[1]} ({best[1].replay.label}: forgetting {best[1].replay.forgetting:+.3f} "
                f"in {best[1].replay.seconds_to_target:.1f} s; {best[1].no_replay.label}: "
                f"{best[1].no_replay.forgetting:+.3f} in {best[1].no_replay.seconds_to_target:.1f} s"
                + ("; it forgets less than every no-replay run that reached the target" if best[1].at_least else "")
                + ")" if best else "no replay run, or no no-replay run, reached the target")
    finding = Finding("At the highest learning rate, replay forgets no more than the no-replay learning rate that "
                      "needs >= 10x its wall time to reach the target: compute ratio >= 10 (paper: ~38x)",
                      measured, best[1].ratio >= 10 if best else None)
    caption = ("Without replay, a lower learning rate forgets less but takes longer to reach the target; replay "
               "at the highest rate is fast and forgets little. The compute ratio is the time to target of the "
               "fastest no-replay run that forgets no more than the replay run, over the replay run's (a lower "
               "bound, '>', where the replay run forgets less than every no-replay run that reached the target). "
               f"Measured: {measured}.")
    return Figure(path, "Learning rate and replay", caption, table, finding)


# ---------------------------------------------------------------- continual tasks

def continual_figure(spec: dict, runs: list, out: Path) -> Figure:
    """The accuracy matrices (after task i, on task j): one panel per run, a row of panels
    (without and with replay) per seed."""
    done = sorted(finished(spec, runs), key=lambda r: (_seed(r), r.summary.get("method") != "none"))
    if not done:
        raise SelfReplayError(f"no finished continual run in stages {_stages(spec)}")
    seeds = sorted({_seed(r) for r in done})
    by_seed = [[r for r in done if _seed(r) == seed] for seed in seeds]
    columns = max(len(group) for group in by_seed)
    plt = _pyplot()
    fig, axes = plt.subplots(len(seeds), columns, figsize=(4.4 * columns + 1, 4.2 * len(seeds)), squeeze=False,
                             layout="constrained")
    rows = []
    for axes_row, group in zip(axes, by_seed):
        for ax in axes_row[len(group):]:
            ax.axis("off")
        for ax, r in zip(axes_row, group):
            image = _accuracy_panel(ax, r, first=ax is axes_row[0])
            label = ("no replay" if r.summary["method"] == "none"
                     else f"self-replay {r.summary['method'].upper()} c={r.summary['coeff']:g}")
            label += f" (seed {_seed(r)})" if len(seeds) > 1 else ""
            ax.set_title(label, fontsize=9)
            rows.append([label, f"{r.summary['average_accuracy']:.1%}", f"{r.summary['bwt']:+.3f}",
                         ", ".join(f"{x:.0%}" if x is not None else "-" for x in r.summary["retention"])])
    fig.colorbar(image, ax=axes.ravel().tolist(), label="exact-answer accuracy", shrink=0.8)
    fig.suptitle("Accuracy after each task of the sequence", fontsize=10)
    path = out / f"{spec.get('name', 'continual')}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    none = [r for r in done if r.summary["method"] == "none"]
    replay = [r for r in done if r.summary["method"] != "none"]
    reproduced = None
    if none and replay:
        kept = all(x is not None and x >= 0.9 for r in replay for x in r.summary["retention"])
        dropped = all(min(r.summary["accuracy"][-1][:-1]) < 0.5 for r in none)
        reproduced = kept and dropped
    measured = "; ".join(f"{row[0]}: average final accuracy {row[1]}, BWT {row[2]}, earlier tasks keep {row[3]}"
                         for row in rows)
    finding = Finding("With self-replay every earlier task keeps >= 90% of the accuracy it had when its training "
                      "ended; without replay at least one falls below 50% (paper: ~100% vs ~0-20%)", measured,
                      reproduced)
    caption = ("Rows: after training on each task in turn; columns: exact-answer accuracy on every task. Below "
               f"the diagonal is what was kept. Measured: {measured}.")
    table = markdown_table(["run", "average final accuracy", "BWT", "retained (final / at end of own training)"], rows)
    return Figure(path, "Continual tasks: the accuracy matrix", caption, table, finding)


def _seed(run) -> int:
    return int(run.value("seed") or 0)


def _accuracy_panel(ax, run, first: bool):
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


FIGURES = {"methods": methods_figure, "tokens_per_param": tokens_per_param_figure, "model_size": model_size_figure,
           "mix_frontier": mix_frontier_figure, "learning_rate": learning_rate_figure, "continual": continual_figure}
