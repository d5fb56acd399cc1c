"""The method comparison: old- against new-domain loss along each finetuning run, one line per method."""

from __future__ import annotations

from pathlib import Path

from selfreplay.experiments.compare import plot_old_vs_new
from selfreplay.experiments.figures.common import (
    Figure,
    Finding,
    finished,
    fmt,
    markdown_table,
    method_label,
    number,
    reached,
)
from selfreplay.objective.methods import NO_REPLAY, REPLAY_KL, replay_method

CLAIM = ("Self-generated replay removes most forgetting, as well as real replay: every replay variant forgets "
         "<= 20% of plain finetuning's, self-KL within 0.02 nats of real-KL (paper: 95-97% less, self = real)")


def methods_figure(spec: dict, runs: list, out: Path) -> Figure:
    """The figure, table and finding of a method-comparison stage."""
    done = finished(spec, runs)
    path = plot_methods(done, out / f"{spec.get('name', 'methods')}.png")
    measured = ", ".join(f"{method_label(r)} {fmt(r.summary.get('forgetting'), '{:+.3f}')}"
                         + ("" if reached(r) else " (target missed)") for r in done)
    caption = (f"Each line follows one finetuning run from its start (right) as the new-domain loss falls; "
               f"the higher it climbs, the more it forgets. Forgetting at the end: {measured}.")
    finding = Finding(CLAIM, f"forgetting (nats): {measured}", methods_reproduced(done))
    return Figure(path, "Method comparison", caption, methods_table(done), finding)


def methods_reproduced(done: list) -> bool | None:
    """Every replay run forgets <= 20% of plain finetuning's and self-KL <= real-KL + 0.02 nats;
    None without a plain, a self-KL and a real-KL run that reached the target."""
    # forgetting compares at equal new-domain loss: only runs that reached the target count
    at_target = [r for r in done if reached(r) and number(r.summary.get("forgetting")) is not None]
    method = lambda r: (r.value("replay.method") or NO_REPLAY.name, r.value("replay.source"))  # noqa: E731
    base = next((r.summary["forgetting"] for r in at_target
                 if method(r)[0] == NO_REPLAY.name and not r.value("lora.rank")), None)
    replayed = [r for r in at_target if replay_method(method(r)[0]).needs_replay and method(r)[1] in ("self", "real")]
    self_kl = next((r.summary["forgetting"] for r in replayed if method(r) == (REPLAY_KL.name, "self")), None)
    real_kl = next((r.summary["forgetting"] for r in replayed if method(r) == (REPLAY_KL.name, "real")), None)
    if not base or base <= 0 or self_kl is None or real_kl is None:
        return None
    return all(r.summary["forgetting"] <= 0.2 * base for r in replayed) and self_kl <= real_kl + 0.02


def plot_methods(done: list, path: Path) -> Path:
    rows = [{"method": method_label(r), "run_dir": str(r.run_dir), "old_loss_0": r.summary.get("old_loss_0")}
            for r in done]
    plot_old_vs_new(rows, path, title="Old-domain loss along finetuning, per method")
    return path


def methods_table(done: list) -> str:
    return markdown_table(
        ["method", "forgetting (nats)", "new loss", "reached target", "compute multiplier", "time to target (s)"],
        [[method_label(r), fmt(r.summary.get("forgetting"), "{:+.3f}"), fmt(r.summary.get("new_loss")),
          "yes" if reached(r) else "no", fmt(r.summary.get("compute_multiplier"), "{:.2f}"),
          fmt(r.summary.get("time_to_target_seconds"), "{:.1f}")] for r in done])
