"""`selfreplay reproduce`: run every experiment of a profile and assemble one report.

    selfreplay reproduce --profile small                     # the built-in synthetic corpus
    selfreplay reproduce --profile small old=en.bin new=es.bin tokenizer=tok
    selfreplay reproduce --only capacity 'capacity:budgets=[10,100,1000]'

The experiments are the packaged sweep files (`selfreplay/experiments/sweeps/NAME.yaml`), or those
of a folder given with --experiments (NAME.yaml, or NAME/sweep.yaml). Each runs as
`selfreplay sweep` into OUT/NAME (finished points are kept, so the same command resumes), gets
its own report, and OUT/report.md gathers every figure under a table of the paper's claims:
what the paper found, what this run found, reproduced or not. An override NAME:VAR=VALUE goes
to one experiment only; VAR=VALUE to all of them.
"""

from __future__ import annotations

import time
from pathlib import Path

from selfreplay.errors import SelfReplayError, did_you_mean
from selfreplay.experiments.figures import markdown_table
from selfreplay.experiments.packaged import packaged_sweeps
from selfreplay.experiments.report import render, report_directory
from selfreplay.experiments.sweep import check_sweep, run_sweep
from selfreplay.experiments.sweep.launch import choose_workers
from selfreplay.rundir import write_atomic


def folder_sweeps(directory: Path) -> dict[str, Path]:
    """{name: sweep file} of a folder: NAME.yaml, or NAME/sweep.yaml (the layout before they were packaged)."""
    if not directory.is_dir():
        raise SelfReplayError(f"no experiments folder at {directory}: give a folder of NAME.yaml sweep files, "
                              "or leave --experiments out for the packaged ones")
    found = {p.stem: p for p in directory.glob("*.yaml")}
    found.update({p.parent.name: p for p in directory.glob("*/sweep.yaml")})
    if not found:
        raise SelfReplayError(f"{directory} holds no NAME.yaml (or NAME/sweep.yaml) sweep file")
    return dict(sorted(found.items()))


def experiment_files(directory: Path | None = None, only: list[str] | None = None) -> dict[str, Path]:
    """{name: sweep file} of the packaged experiments (or those under `directory`), in name order."""
    found = packaged_sweeps() if directory is None else folder_sweeps(Path(directory))
    for name in only or []:
        if name not in found:
            raise SelfReplayError(f"unknown experiment {name!r}{did_you_mean(name, found)} "
                                  f"(choose from {', '.join(found)})")
    return {name: path for name, path in found.items() if not only or name in only}


def overrides_for(name: str, overrides: list[str]) -> list[str]:
    """The overrides that go to experiment `name`: VAR=VALUE, and NAME:VAR=VALUE without its prefix."""
    chosen = []
    for item in overrides:
        target, sep, rest = item.partition(":")
        if sep and "=" not in target:
            if target == name:
                chosen.append(rest)
        else:
            chosen.append(item)
    return chosen


def _preface(profile: str, overrides: list[str], timings: list[list]) -> str:
    return (f"Profile `{profile}`; overrides: {' '.join(overrides) or 'none'}. Each experiment's own "
            f"report is in its folder (`NAME/report.md`).\n\n"
            "Wall time is this command's; the runs' time adds up each run's own wall time, however many "
            "commands ran them (a resumed reproduce keeps finished runs) and however many ran at once.\n\n"
            + markdown_table(["experiment", "wall time (s)", "runs' time (s)", "runs finished", "runs failed"],
                             timings))


def _timing_row(name: str, runs: list, seconds: float) -> list:
    """[name, this command's wall time, the runs' own time, finished, failed] for the preface's table."""
    run_seconds = sum(r.summary.get("wall_seconds") or r.summary.get("train_seconds") or 0.0  # continual: train
                      for r in runs if r.status == "done")
    return [name, f"{seconds:.0f}", f"{run_seconds:.0f}", sum(r.status == "done" for r in runs),
            sum(r.status == "failed" for r in runs)]


def reproduce(profile: str = "small", out: str | Path = "reproduce", experiments: str | Path | None = None,
              only: list[str] | None = None, overrides: list[str] | None = None, workers: int | None = None,
              say=print) -> Path:
    """Run the experiments' sweeps with `profile`, write each one's report and OUT/report.md."""
    workers = choose_workers(workers)
    out = Path(out).resolve()
    files = experiment_files(Path(experiments) if experiments else None, only)
    settings = {name: [f"profile={profile}", *overrides_for(name, overrides or [])] for name in files}
    for name, path in files.items():  # every sweep file checked before anything runs
        check_sweep(path, settings[name], out / name)
    sections, timings = [], []
    for name, path in files.items():
        say(f"== {name} ({path})")
        started = time.perf_counter()
        runs = run_sweep(path, settings[name], out / name, workers, say=say)
        timings.append(_timing_row(name, runs, time.perf_counter() - started))
        sections.append(report_directory(out / name)[1])
    path = out / "report.md"
    text = render(f"Reproducing the paper's findings ({profile} profile)", sections, out,
                  _preface(profile, overrides or [], timings))
    write_atomic(path, lambda tmp: tmp.write_text(text))
    say(f"report -> {path}")
    return path
