"""Measurements across runs: time to a target loss and the compute ratio of the learning-rate experiment.

Both are pure functions of a run's curve (metrics.jsonl lines) or of a few numbers per run, so
they can be checked on hand-made cases and recomputed for any sweep.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


def at_new_loss(curve: list[dict], target: float) -> dict | None:
    """Forgetting and train_seconds where a logged curve first reaches new_loss = target,
    interpolated linearly in new_loss between the two log points around it; None if it never does."""
    return interpolate_at(curve, "new_loss", target, ("forgetting", "train_seconds"))


def interpolate_at(curve: list[dict], key: str, value: float, read: tuple[str, ...]) -> dict | None:
    """The `read` values where a logged curve's `key` first falls to `value`, linear in `key` between
    the two log points around it (a point already at or below it is read as it is); None if it never does."""
    for before, after in itertools.pairwise(curve):
        if before[key] <= value:
            return {name: before[name] for name in read}
        if after[key] <= value:
            share = (before[key] - value) / (before[key] - after[key])
            return {name: before[name] + share * (after[name] - before[name]) for name in read}
    return None


def time_to_target(curve: list[dict], target: float, key: str = "new_loss") -> tuple[float, int] | None:
    """(training seconds, steps) at the first log point whose `key` is at or below `target`;
    None when the run never got there. The same rule as the `stop.target_loss` stop."""
    for point in curve:
        value = point.get(key)
        if value is not None and value <= target:
            return point["train_seconds"], point["step"]
    return None


@dataclass
class Finetuned:
    """What the learning-rate experiment needs of one finetuning run."""

    label: str  # e.g. "lr=1e-4" or "replace 1/8"
    forgetting: float  # old_loss - old_loss_0 at the end (nats/token)
    seconds_to_target: float | None  # training wall time to the target new-domain loss; None: not reached


@dataclass
class ComputeRatio:
    """How much longer plain finetuning takes to reach the target while forgetting no more than replay."""

    ratio: float  # no_replay.seconds_to_target / replay.seconds_to_target
    replay: Finetuned
    no_replay: Finetuned  # the fastest no-replay run that reached the target forgetting <= replay's
    at_least: bool = False  # no such run: the replay run forgets less than every no-replay run that reached
    #                         the target, and `no_replay` is the slowest of them (the ratio is a lower bound)

    def __str__(self) -> str:
        return f"{'> ' if self.at_least else ''}{self.ratio:.1f}"


def compute_ratio(no_replay: list[Finetuned], replay: Finetuned) -> ComputeRatio | None:
    """The wall time to target of the no-replay learning rate needed for the replay run's
    forgetting, over the replay run's own time to target.

    Among no-replay runs that reached the target with forgetting <= the replay run's, the fastest
    is the one needed (a slower one only adds time: the ratio is not inflated by how far down the
    learning-rate grid goes). When none forgets as little, the rate needed lies beyond the sweep:
    the ratio is at least the slowest run that reached the target's time over the replay run's
    (`at_least`; lower rates forget less and take longer). None when the replay run or every
    no-replay run missed the target.
    """
    if replay.seconds_to_target is None or replay.seconds_to_target <= 0:
        return None
    reached = [run for run in no_replay if run.seconds_to_target is not None]
    qualifying = [run for run in reached if run.forgetting <= replay.forgetting]
    if qualifying:
        needed = min(qualifying, key=lambda run: run.seconds_to_target)
        return ComputeRatio(needed.seconds_to_target / replay.seconds_to_target, replay, needed)
    if not reached:
        return None
    slowest = max(reached, key=lambda run: run.seconds_to_target)
    return ComputeRatio(slowest.seconds_to_target / replay.seconds_to_target, replay, slowest, at_least=True)


def rises(values: list[float], tolerance: float = 0.0) -> bool:
    """True when each value is at least the one before it, less `tolerance` (noise allowed)."""
    return all(b >= a - tolerance for a, b in zip(values, values[1:]))
