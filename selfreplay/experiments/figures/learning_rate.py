"""Learning rate: old-domain loss after finetuning against wall time to the target, and the compute ratio."""

from __future__ import annotations

from pathlib import Path

from selfreplay.experiments.figures.common import (
    Figure,
    Finding,
    finished,
    fmt,
    markdown_table,
    method_label,
    number,
    pyplot,
    reached,
    replay_fraction,
    replays,
    save,
)
from selfreplay.experiments.measures import ComputeRatio, Finetuned, compute_ratio

CLAIM = ("At the highest learning rate, replay forgets no more than the no-replay learning rate that needs >= 10x "
         "its wall time to reach the target: compute ratio >= 10 (paper: ~38x)")
EXPLANATION = ("Without replay, a lower learning rate forgets less but takes longer to reach the target; replay at "
               "the highest rate is fast and forgets little. The compute ratio is the time to target of the "
               "fastest no-replay run that forgets no more than the replay run, over the replay run's (a lower "
               "bound, '>', where the replay run forgets less than every no-replay run that reached the target).")


def learning_rate_figure(spec: dict, runs: list, out: Path) -> Figure:
    """The figure, tables and finding of the learning-rate stages (no replay at several rates, replay at one)."""
    done = [r for r in finished(spec, runs) if number(r.summary.get("forgetting")) is not None]
    no_replay = sorted((r for r in done if not replays(r)), key=lambda r: -float(r.value("optim.lr")))
    replay = [r for r in done if replays(r)]
    ratios = [(r, compute_ratio([finetuned(n) for n in no_replay], finetuned(r))) for r in replay]
    best = max((x for x in ratios if x[1] is not None), key=lambda x: x[1].ratio, default=None)
    path = plot_learning_rate(no_replay, replay, best, out / f"{spec.get('name', 'learning_rate')}.png")
    measured = describe_ratio(best[1]) if best else "no replay run, or no no-replay run, reached the target"
    finding = Finding(CLAIM, measured, best[1].ratio >= 10 if best else None)
    return Figure(path, "Learning rate and replay", f"{EXPLANATION} Measured: {measured}.",
                  learning_rate_tables(no_replay, replay, ratios), finding)


def finetuned(run) -> Finetuned:
    label = method_label(run) if replays(run) else f"lr={float(run.value('optim.lr')):g}"
    return Finetuned(label, run.summary.get("forgetting"), run.summary.get("time_to_target_seconds"))


def seconds(run) -> float:
    """Wall time to the target, or the whole run's when it stopped at the cap first."""
    return run.summary.get("time_to_target_seconds") or run.summary["train_seconds"]


def describe_ratio(result: ComputeRatio) -> str:
    return (f"compute ratio {result} ({result.replay.label}: forgetting {result.replay.forgetting:+.3f} "
            f"in {result.replay.seconds_to_target:.1f} s; {result.no_replay.label}: "
            f"{result.no_replay.forgetting:+.3f} in {result.no_replay.seconds_to_target:.1f} s"
            + ("; it forgets less than every no-replay run that reached the target" if result.at_least else "")
            + ")")


def plot_learning_rate(no_replay: list, replay: list, best: tuple | None, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([seconds(r) for r in no_replay], [r.summary["old_loss"] for r in no_replay], "o-", color="tab:red",
            label="no replay, learning rate swept")
    for r in no_replay:
        ax.annotate(f"{float(r.value('optim.lr')):g}", (seconds(r), r.summary["old_loss"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
        if not reached(r):
            ax.scatter([seconds(r)], [r.summary["old_loss"]], s=80, facecolors="none", edgecolors="black")
    for r in replay:
        marker = "^" if replay_fraction(r) > 0 else "s"
        ax.scatter([seconds(r)], [r.summary["old_loss"]], marker=marker, label=method_label(r))
    if best is not None:
        _ratio_arrow(ax, best[1], best[0].summary["old_loss"])
    if no_replay or replay:
        ax.axhline((no_replay or replay)[0].summary["old_loss_0"], color="gray", linestyle=":",
                   label="old loss before finetuning")
    ax.set_xscale("log")
    ax.set_xlabel("wall time to the target new-domain loss (s; circled: cap reached first)")
    ax.set_ylabel("old-domain loss after finetuning (nats/token)")
    ax.set_title("Learning rate against replay at a high learning rate")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)


def _ratio_arrow(ax, result: ComputeRatio, y: float) -> None:
    """An arrow from the no-replay run needed to the replay run, at the replay run's loss, labelled."""
    fast, slow = result.replay.seconds_to_target, result.no_replay.seconds_to_target
    ax.annotate("", xy=(fast, y), xytext=(slow, y), arrowprops={"arrowstyle": "->", "color": "black"})
    ax.text((fast * slow) ** 0.5, y, f"compute ratio {'> ' if result.at_least else ''}{result.ratio:.0f}x",
            ha="center", va="bottom", fontsize=8)


def learning_rate_tables(no_replay: list, replay: list, ratios: list[tuple]) -> str:
    rows = [[finetuned(r).label, fmt(r.summary.get("old_loss")), fmt(r.summary.get("forgetting"), "{:+.3f}"),
             fmt(r.summary.get("time_to_target_seconds"), "{:.1f}"), r.summary.get("time_to_target_steps"),
             "yes" if reached(r) else "no (cap)"] for r in [*no_replay, *replay]]
    table = markdown_table(["run", "old loss", "forgetting", "time to target (s)", "steps to target", "reached"], rows)
    ratio_rows = [[finetuned(r).label, str(x) if x else None,
                   (f"beyond the sweep (slowest that reached the target: {x.no_replay.label})" if x.at_least
                    else x.no_replay.label) if x else None] for r, x in ratios]
    return table + "\n\n" + markdown_table(["replay run", "compute ratio", "no-replay run needed"], ratio_rows)
