"""What every figure shares: the Figure and Finding it returns, the runs it selects, labels and number formats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from selfreplay.errors import SelfReplayError
from selfreplay.objective.methods import NEW_BATCH_KL, NO_REPLAY


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


# ---------------------------------------------------------------- drawing and tables

def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = lambda row: "| " + " | ".join("-" if c is None else str(c) for c in row) + " |"  # noqa: E731
    return "\n".join([cells(header), cells(["---"] * len(header)), *(cells(r) for r in rows)])


def number(value) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def fmt(value, spec: str = "{:.3f}") -> str | None:
    return spec.format(value) if number(value) is not None else None


# ---------------------------------------------------------------- selecting runs

def stage_names(spec: dict) -> list[str]:
    """The stages a report entry draws from (`stage` or `stages`)."""
    stages = spec.get("stages", spec.get("stage"))
    if not stages:
        raise SelfReplayError(f"report entry {spec} names no stage: add stage: NAME")
    return [stages] if isinstance(stages, str) else list(stages)


def finished(spec: dict, runs: list, key: str = "stages") -> list:
    """The finished runs of the entry's stages (key="stages"), or of the one stage under `key`."""
    names = stage_names(spec) if key == "stages" else [spec[key]]
    return [r for r in runs if r.stage in names and r.status == "done"]


def reached(run) -> bool:
    return run.summary.get("stop_reason") == "target_loss"


def replay_fraction(run) -> float:
    """The fraction of each batch's rows taken from the replay source (replay.fraction)."""
    return float(run.value("replay.fraction") or 0.0)


def replays(run) -> bool:
    """Whether a run replays at all: a regularising method, or replay rows mixed into its batches."""
    return run.value("replay.method") not in (None, NO_REPLAY.name) or replay_fraction(run) > 0


def plain(runs: list) -> object | None:
    """The run without replay and without LoRA, if any."""
    return next((r for r in runs if not replays(r) and not r.value("lora.rank")), None)


def held(run) -> bool:
    """Whether a run held its replay KL to a budget (replay.coeff=auto) rather than fixing c."""
    return run.value("replay.coeff") == "auto"


def best_replay(runs: list) -> object | None:
    """The fixed-coefficient replay run with the least forgetting among those that reached the target."""
    candidates = [r for r in runs if replays(r) and not held(r) and reached(r)
                  and number(r.summary.get("forgetting")) is not None]
    return min(candidates, key=lambda r: r.summary["forgetting"], default=None)


def method_label(run) -> str:
    """'no replay', 'self-KL c=10', 'real-NTP c=1', 'replay rows 1/8', 'LoRA r16', ..."""
    method, source, coeff, rank = (run.value(k) for k in ("replay.method", "replay.source", "replay.coeff", "lora.rank"))
    if rank:
        return f"LoRA r{rank}"
    if replay_fraction(run) > 0:  # rows mixed into the batch: no term, so no coefficient
        return f"replay rows {Fraction(replay_fraction(run)).limit_denominator(1024)}"
    if method in (None, NO_REPLAY.name):
        return "no replay"
    weight = f"B={float(run.value('replay.budget')):g}" if held(run) else f"c={float(coeff):g}"
    if method == NEW_BATCH_KL.name:
        return f"KL on new data {weight}"
    return f"{source}-{str(method).upper()} {weight}"
