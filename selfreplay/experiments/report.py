"""`selfreplay report DIR`: a Markdown report with PNG figures for a run or a sweep.

For a sweep directory, the figures are the ones its sweep file lists under `report:`

    report:
      - {figure: methods, stage: finetune}                    # old vs new loss along each run
      - {figure: tokens_per_param, stage: finetune}           # forgetting vs pretraining tokens/param
      - {figure: model_size, stage: finetune}                 # forgetting vs non-embedding parameters
      - {figure: mix_frontier, frontier: mixes, stage: traj}  # pretrained mixes, finetuning over them
      - {figure: learning_rate, stages: [lr, replay]}         # old loss vs time to target, compute ratio
      - {figure: continual, stage: tasks}                     # accuracy matrices

each with the claim it tests and the measured numbers under it, then a table of every run.
For a single run directory: its curve (old- against new-domain loss when finetuning, validation
loss against tokens when pretraining, the accuracy matrix of a continual run) and its summary.
DIR/report.md references the images in DIR/figures/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.figures import (
    FIGURES,
    Figure,
    Finding,
    fmt,
    markdown_table,
    pretraining_figure,
)
from selfreplay.experiments.sweep import (
    SUMMARY_FILE,
    SWEEP_FILE,
    Run,
    load_runs,
    read_outcome,
)
from selfreplay.rundir import write_atomic

REPORT_NAME, FIGURES_DIR = "report.md", "figures"


@dataclass
class Section:
    """What one run or sweep contributes to a report."""

    title: str
    description: str
    figures: list[Figure]
    runs: list[Run]


def sweep_section(sweep_dir: Path, figures_dir: Path) -> Section:
    sweep, runs = load_runs(sweep_dir)
    figures = []
    for spec in sweep.report:
        figure = FIGURES[spec["figure"]](spec, runs, figures_dir)
        if figure is not None:  # a figure with nothing to draw in this sweep (coefficient, without held runs)
            figures.append(figure)
    return Section(sweep_dir.name, sweep.description, figures, runs)


def run_section(run_dir: Path, figures_dir: Path) -> Section:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    run = Run("run", summary.get("mode", "finetune"), run_dir, {})
    read_outcome(run)
    spec = {"stage": "run", "name": run_dir.name}
    if run.mode == "continual":
        figure = FIGURES["continual"](spec, [run], figures_dir)
    elif run.mode == "finetune":
        figure = FIGURES["methods"](spec, [run], figures_dir)
        figure.finding = None  # one run compares nothing
    else:
        figure = pretraining_figure(run, figures_dir)
    scalars = [[k, fmt(v, "{:.4g}") if isinstance(v, float) else v] for k, v in summary.items()
               if not isinstance(v, (list, dict))]
    figure.table = (figure.table + "\n\n" if figure.table else "") + markdown_table(["summary", "value"], scalars)
    return Section(run_dir.name, "", [figure], [])


def runs_table(runs: list[Run], root: Path) -> str:
    rows = []
    for r in runs:
        s = r.summary
        rows.append([r.stage, r.run_dir.name, r.status, fmt(s.get("old_loss")), fmt(s.get("forgetting"), "{:+.3f}"),
                     fmt(s.get("new_loss")), s.get("stop_reason"), fmt(s.get("train_seconds"), "{:.0f}"),
                     (r.error or "").replace("|", "/")[:120] or None])
    return markdown_table(["stage", "run", "status", "old loss", "forgetting", "new loss", "stop", "train s", "error"],
                          rows)


def claims_table(findings: list[tuple[str, Finding]]) -> str:
    verdict = {True: "**yes**", False: "**no**", None: "cannot tell"}
    return markdown_table(["experiment", "the paper's finding", "this run", "reproduced"],
                          [[name, f.claim, f.measured, verdict[f.reproduced]] for name, f in findings])


def render(title: str, sections: list[Section], root: Path, preface: str = "") -> str:
    """The Markdown of a report whose figure paths are relative to `root`."""
    findings = [(f"{s.title}: {f.title}" if len(sections) > 1 else f.title, f.finding)
                for s in sections for f in s.figures if f.finding is not None]
    lines = [f"# {title}", ""]
    if preface:
        lines += [preface, ""]
    if findings:
        lines += ["## Claims", "", claims_table(findings), ""]
    for section in sections:
        if len(sections) > 1:
            lines += [f"## {section.title}", ""]
        if section.description:
            lines += [section.description.strip(), ""]
        for figure in section.figures:
            lines += [f"### {figure.title}", "", f"![{figure.title}]({figure.path.relative_to(root).as_posix()})", "",
                      f"*{figure.caption}*", ""]
            if figure.table:
                lines += [figure.table, ""]
        if section.runs:
            done = sum(r.status == "done" for r in section.runs)
            lines += [f"#### Runs ({done} of {len(section.runs)} finished)", "", runs_table(section.runs, root), ""]
    return "\n".join(lines)


def write_report(directory: str | Path) -> Path:
    """Write DIR/report.md and DIR/figures/*.png for a sweep or run directory; returns the report's path."""
    return report_directory(directory)[0]


def report_directory(directory: str | Path) -> tuple[Path, Section]:
    """write_report's work: (the report's path, the section it rendered)."""
    root = Path(directory).resolve()
    figures_dir = root / FIGURES_DIR
    if (root / SWEEP_FILE).is_file():
        figures_dir.mkdir(exist_ok=True)
        section = sweep_section(root, figures_dir)
    elif (root / SUMMARY_FILE).is_file():
        figures_dir.mkdir(exist_ok=True)
        section = run_section(root, figures_dir)
    else:
        raise SelfReplayError(f"{root} is neither a sweep directory ({SWEEP_FILE}) nor a finished run "
                              f"({SUMMARY_FILE}): run selfreplay sweep, pretrain or finetune first")
    path = root / REPORT_NAME
    text = render(f"Report: {root.name}", [section], root)
    write_atomic(path, lambda tmp: tmp.write_text(text))
    return path, section
