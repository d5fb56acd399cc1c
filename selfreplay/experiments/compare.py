"""Finetune one pretrained model several ways and compare forgetting at a common target loss."""

from __future__ import annotations

import json
from pathlib import Path

from selfreplay.config import RunConfig, merge
from selfreplay.training.loop import METRICS_NAME, train

COLUMNS = (("method", "{}"), ("old_loss_0", "{:.3f}"), ("old_loss", "{:.3f}"), ("forgetting", "{:+.3f}"),
           ("new_loss", "{:.3f}"), ("time_to_target_seconds", "{:.1f}"), ("time_to_target_steps", "{}"),
           ("tokens_per_second", "{:,.0f}"), ("stop_reason", "{}"))


def finetune_methods(init: str, new_tokens: str, methods: dict[str, dict], out_dir: str | Path,
                     common: dict) -> list[dict]:
    """Run `finetune` once per method (label -> settings by section, e.g. {"replay": {"method": "kl"}})
    from the pretrained run `init`.

    Every run gets the `common` settings (the target loss and budget, say); a run directory that
    already holds a finished run is read rather than run again.
    """
    rows = []
    for label, settings in methods.items():
        out = Path(out_dir) / label
        summary_path = out / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
        else:
            config = RunConfig.finetune_from(init, **merge(merge(common, settings),
                                                           {"out": str(out), "data": {"train": str(new_tokens)}}))
            summary = train(config, "finetune")
        rows.append({**summary, "method": label, "run_dir": str(out)})
    return rows


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    """A plain-text table with one row per run; missing values print as '-'."""
    header = [name for name, _ in columns]
    body = [[fmt.format(row[name]) if row.get(name) is not None else "-" for name, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def read_curve(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_old_vs_new(rows: list[dict], path: str | Path, title: str = "") -> None:
    """The method-comparison figure: old-domain loss against new-domain loss along each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for row in rows:
        curve = [p for p in read_curve(row["run_dir"]) if "new_loss" in p and "old_loss" in p]
        ax.plot([p["new_loss"] for p in curve], [p["old_loss"] for p in curve], marker=".", label=row["method"])
    if rows:
        ax.axhline(rows[0]["old_loss_0"], color="gray", linestyle=":", linewidth=1, label="old loss before finetuning")
    ax.set_xlabel("new-domain validation loss (nats/token)")
    ax.set_ylabel("old-domain validation loss (nats/token)")
    ax.invert_xaxis()  # finetuning moves left to right
    ax.set_title(title or "Forgetting along finetuning")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
