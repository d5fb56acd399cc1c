"""`selfreplay sweep`, `report` and `reproduce`: grids of runs from sweep files, and their reports."""

from __future__ import annotations

import argparse

from selfreplay.experiments.report import write_report
from selfreplay.experiments.reproduce import reproduce as run_all
from selfreplay.experiments.sweep import sweep_cli


def register(sub) -> None:
    """Add `sweep`, `report` and `reproduce` to `sub` (the top parser's subparsers)."""
    add_sweep(sub)
    report_parser = sub.add_parser(
        "report", help="write a Markdown report with figures for a run or a sweep",
        description="Write DIR/report.md and PNG figures under DIR/figures/ for a run directory or a sweep "
                    "directory: the figures its sweep file lists, the claim each tests with the measured numbers, "
                    "and a table of every run.")
    report_parser.add_argument("directory", help="a sweep directory (holds sweep.yaml) or a finished run directory")
    report_parser.set_defaults(func=report)
    add_reproduce(sub)


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of runs in stages from a sweep file",
        description="Run every point of a sweep file (stages of pretrain/finetune grids), each in its own run "
                    "directory under --out, several at a time; finished points are skipped, so the same command "
                    "resumes a killed sweep. Writes OUT/results.csv. The sweep file format is documented in "
                    "docs/experiments.md.")
    p.add_argument("sweep_file", help="a packaged experiment's name (for example capacity) or a sweep YAML file")
    p.add_argument("overrides", nargs="*", help="NAME=VALUE: profile=small|paper, or a var of the sweep file "
                                                "(old=TOKEN_FILE new=TOKEN_FILE tokenizer=DIR for your own data)")
    p.add_argument("--out", default=None, help="sweep directory (default: sweeps/<sweep file name>)")
    p.add_argument("--workers", type=int, default=None,
                   help="points run at once, 1 or more (default: 2, or 1 on one core); "
                        "each gets cores/workers threads")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local subprocesses, or submitit jobs (Slurm on a cluster)")
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                   help="submitit: where jobs run (default: Slurm when available, else this machine)")
    p.set_defaults(func=sweep)


def add_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="run every experiment of a profile and write one report of the paper's claims",
        description="Run each packaged experiment (selfreplay/experiments/sweeps/NAME.yaml) with the chosen profile into OUT/NAME (finished points "
                    "are kept, so the same command resumes), then write OUT/report.md: every figure and a table "
                    "of the paper's claims, what this run found, and whether it reproduced.")
    p.add_argument("overrides", nargs="*",
                   help="VAR=VALUE for every experiment (old=, new=, tokenizer= for your own token files), "
                        "or NAME:VAR=VALUE for one")
    p.add_argument("--profile", default="small", help="small (a 2-core CPU) or paper (a GPU); default small")
    p.add_argument("--out", default="reproduce", help="output directory (default: reproduce)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run only these experiments")
    p.add_argument("--experiments", default=None,
                   help="a folder of NAME.yaml sweep files (default: the packaged experiments)")
    p.add_argument("--workers", type=int, default=None,
                   help="points run at once, 1 or more (default: 2, or 1 on one core)")
    p.set_defaults(func=reproduce)


def sweep(args: argparse.Namespace) -> None:
    sweep_cli(args.sweep_file, args.overrides, args.out, args.workers, args.launcher, args.cluster)


def report(args: argparse.Namespace) -> None:
    print(f"report -> {write_report(args.directory)}")


def reproduce(args: argparse.Namespace) -> None:
    only = [name for name in args.only.split(",") if name] if args.only else None
    run_all(args.profile, args.out, args.experiments, only, args.overrides, args.workers)
