"""One pretraining run's curve: validation loss against training tokens."""

from __future__ import annotations

from pathlib import Path

from selfreplay.experiments.compare import read_curve
from selfreplay.experiments.figures.common import Figure, fmt, pyplot, save


def pretraining_figure(run, out: Path) -> Figure:
    """Validation loss against training tokens (log x) of a pretraining run."""
    curve = [p for p in read_curve(run.run_dir) if p.get("old_loss") is not None and p["tokens"] > 0]
    path = plot_pretraining(curve, out / "pretraining.png")
    s = run.summary
    caption = (f"Validation loss {fmt(s.get('old_loss'))} after {s.get('tokens'):,} tokens in "
               f"{s.get('train_seconds', 0):.0f} s.")
    return Figure(path, "Pretraining curve", caption, "")


def plot_pretraining(curve: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([p["tokens"] for p in curve], [p["old_loss"] for p in curve], ".-", label="old domain")
    if any(p.get("mix_loss") is not None for p in curve):
        ax.plot([p["tokens"] for p in curve], [p.get("mix_loss") for p in curve], ".-", label="mixed-in domain")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Pretraining")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)
