"""`selfreplay reproduce`: run every experiment of a profile and assemble one report.

    selfreplay reproduce --profile small                     # the built-in synthetic corpus
    selfreplay reproduce --profile small old=en.bin new=es.bin tokenizer=tok
    selfreplay reproduce --only capacity 'capacity:budgets=[10,100,1000]'

Each folder of `experiments/` holding a sweep.yaml is one experiment; it runs as
`selfreplay sweep` into OUT/NAME (finished points are kept, so the same command resumes), gets
its own report, and OUT/report.md gathers every figure under a table of the paper's claims:
what the paper found, what this run found, reproduced or not. An override NAME:VAR=VALUE goes
to one experiment only; VAR=VALUE to all of them.
"""

from __future__ import annotations

import time
from pathlib import Path

from selfreplay.errors import SelfReplayError

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"  # the repository's experiments/ folder


def experiment_files(directory: Path, only: list[str] | None = None) -> dict[str, Path]:
    """{name: sweep file} of the experiments under `directory`, in name order."""
    if not directory.is_dir():
        raise SelfReplayError(f"no experiments folder at {directory}: pass --experiments DIR")
    found = {p.parent.name: p for p in sorted(directory.glob("*/sweep.yaml"))}
    if not found:
        raise SelfReplayError(f"{directory} holds no NAME/sweep.yaml")
    for name in only or []:
        if name not in found:
            import difflib

            close = difflib.get_close_matches(name, list(found), n=1)
            raise SelfReplayError(f"unknown experiment {name!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                                    f": choose from {', '.join(found)}"))
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


def reproduce(profile: str = "small", out: str | Path = "reproduce", experiments: str | Path | None = None,
              only: list[str] | None = None, overrides: list[str] | None = None, workers: int | None = None,
              say=print) -> Path:
    """Run the experiments' sweeps with `profile`, write each one's report and OUT/report.md."""
    from selfreplay.experiments.figures import markdown_table
    from selfreplay.experiments.report import render, report_directory
    from selfreplay.experiments.sweep import check_sweep, run_sweep

    out = Path(out).resolve()
    files = experiment_files(Path(experiments) if experiments else EXPERIMENTS, only)
    settings = {name: [f"profile={profile}", *overrides_for(name, overrides or [])] for name in files}
    for name, path in files.items():  # every sweep file checked before anything runs
        check_sweep(path, settings[name], out / name)
    sections, timings = [], []
    for name, path in files.items():
        say(f"== {name} ({path})")
        started = time.perf_counter()
        runs = run_sweep(path, settings[name], out / name, workers, say=say)
        run_seconds = sum(r.summary.get("wall_seconds") or r.summary.get("train_seconds") or 0.0  # continual: train
                          for r in runs if r.status == "done")
        timings.append([name, f"{time.perf_counter() - started:.0f}", f"{run_seconds:.0f}",
                        sum(r.status == "done" for r in runs), sum(r.status == "failed" for r in runs)])
        sections.append(report_directory(out / name)[1])
    preface = (f"Profile `{profile}`; overrides: {' '.join(overrides or []) or 'none'}. Each experiment's own "
               f"report is in its folder (`NAME/report.md`).\n\n"
               + "Wall time is this command's; the runs' time adds up each run's own wall time, however many "
                 "commands ran them (a resumed reproduce keeps finished runs) and however many ran at once.\n\n"
               + markdown_table(["experiment", "wall time (s)", "runs' time (s)", "runs finished", "runs failed"],
                                timings))
    path = out / "report.md"
    path.write_text(render(f"Reproducing the paper's findings ({profile} profile)", sections, out, preface))
    say(f"report -> {path}")
    return path
