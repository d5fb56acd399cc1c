"""The whole sweep: its file resolved (profile, vars, corpus), its stages run in order, results.csv after each."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from selfreplay.config import read_yaml
from selfreplay.data.tokenizer import load_tokenizer
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.corpora import synthetic_token_files
from selfreplay.experiments.packaged import sweep_path
from selfreplay.experiments.sweep.launch import choose_workers, make_launcher, run_stage
from selfreplay.experiments.sweep.plan import Run, expand, prepare_stage
from selfreplay.experiments.sweep.results import RESULTS_FILE, SWEEP_FILE, write_results
from selfreplay.experiments.sweep.sweep_file import SWEEP_FIELDS, Sweep, parse_sweep
from selfreplay.experiments.sweep.values import (
    check_fields,
    choose_vars,
    number,
    substitute,
)
from selfreplay.rundir import write_atomic

CORPUS_FIELDS = ("words", "vocab", "seed")
CORPUS_DEFAULTS = {"words": 300_000, "vocab": 2048, "seed": 0}
DATA_VARS = ("old", "new", "tokenizer")


def _synthetic_corpus(corpus: dict, sweep_dir: Path) -> dict:
    """old, new and tokenizer of the built-in synthetic corpus under SWEEP_DIR/corpus, made once."""
    check_fields(corpus, CORPUS_FIELDS, "corpus")
    sizes = {k: number(corpus.get(k, default)) for k, default in CORPUS_DEFAULTS.items()}
    if not all(isinstance(v, int) for v in sizes.values()):
        raise SelfReplayError(f"corpus words, vocab and seed must be whole numbers, got {sizes}")
    files = synthetic_token_files(sweep_dir / "corpus", num_words=sizes["words"], vocab_size=sizes["vocab"],
                                  seed=sizes["seed"])
    return {"old": str(files.old), "new": str(files.new), "tokenizer": str(files.tokenizer)}


def corpus_vars(corpus: dict | None, given: dict, sweep_dir: Path) -> dict:
    """old, new, tokenizer and vocab: given on the command line, or the synthetic corpus, made once."""
    chosen = {n: given[n] for n in DATA_VARS if given.get(n) is not None}
    if 0 < len(chosen) < len(DATA_VARS):
        raise SelfReplayError(f"set all of old=TOKEN_FILE new=TOKEN_FILE tokenizer=DIR, not only "
                              f"{', '.join(chosen)}")
    if not chosen and corpus is not None:
        chosen = _synthetic_corpus(corpus, sweep_dir)
    if not chosen:
        return {}
    chosen = {n: str(Path(v).resolve()) for n, v in chosen.items()}
    return {**chosen, "vocab": load_tokenizer(chosen["tokenizer"]).vocab_size}


def check_sweep(path: str | Path, overrides: list[str], sweep_dir: Path) -> tuple[dict, dict]:
    """(the file's mapping, its vars), the whole file checked before any corpus is made or run starts.

    `path` is a sweep file or a packaged experiment's name.
    """
    path = sweep_path(path)
    document = read_yaml(path)
    check_fields(document, SWEEP_FIELDS, f"sweep file {path}")
    variables = choose_vars(document, overrides, {"sweep": str(Path(sweep_dir).resolve())})
    placeholders = {n: f"<{n}>" for n in (*DATA_VARS, "vocab")}
    parse_sweep(document, {**placeholders, **variables})
    return document, variables


def resolve_sweep(path: str | Path, overrides: list[str], sweep_dir: Path) -> tuple[Sweep, dict]:
    """The sweep of `path` with its vars (profile, overrides, corpus) substituted; (sweep, document)."""
    document, variables = check_sweep(path, overrides, sweep_dir)
    corpus = substitute(document.get("corpus"), variables, "corpus")
    variables.update(corpus_vars(corpus, variables, sweep_dir))
    resolved = {k: substitute(v, variables, k) for k, v in document.items()
                if k in ("description", "stages", "report", "launcher")}
    return parse_sweep(resolved, variables), resolved


def sweep_directory(path: Path, out: str | Path | None) -> Path:
    """--out, or sweeps/NAME for the sweep file NAME.yaml; made if missing."""
    sweep_dir = Path(out or Path("sweeps") / path.stem).resolve()
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SelfReplayError(f"--out {sweep_dir} is a file: give a directory")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir


def run_sweep(path: str | Path, overrides: list[str], out: str | Path | None = None, workers: int | None = None,
              launcher: str = "local", cluster: str | None = None, say=print) -> list[Run]:
    """Run every stage of the sweep file (or packaged experiment) `path` into `out`; returns every point
    with its outcome."""
    workers = choose_workers(workers)
    path = sweep_path(path)
    sweep_dir = sweep_directory(path, out)
    sweep, resolved = resolve_sweep(path, overrides, sweep_dir)
    write_atomic(sweep_dir / SWEEP_FILE, lambda tmp: tmp.write_text(yaml.safe_dump(resolved, sort_keys=False)))
    runner = make_launcher(launcher, workers, sweep_dir, cluster, sweep.launcher)
    started = time.perf_counter()
    by_stage: dict[str, list[Run]] = {}
    for stage in sweep.stages:
        runs = by_stage[stage.name] = expand(stage, sweep_dir, by_stage)
        prepare_stage(runs, by_stage)
        todo = sum(r.status == "pending" for r in runs)
        say(f"stage {stage.name}: {len(runs)} points, {sum(r.status == 'done' for r in runs)} finished, "
            f"{todo} to run" + (f" on {workers} workers x {runner.threads} threads" if todo else ""))
        run_stage(runs, runner, workers, sweep_dir, say)
        write_results([r for rs in by_stage.values() for r in rs], sweep_dir / RESULTS_FILE)
    runs = [r for rs in by_stage.values() for r in rs]
    failed = [r for r in runs if r.status == "failed"]
    say(f"sweep finished in {time.perf_counter() - started:.0f} s: {len(runs) - len(failed)} done, "
        f"{len(failed)} failed -> {sweep_dir / RESULTS_FILE}")
    return runs


def sweep_cli(path: str, overrides: list[str], out: str | None, workers: int | None, launcher: str,
              cluster: str | None) -> None:
    """`selfreplay sweep`: run the sweep; an error if any point failed (each one is in results.csv)."""
    runs = run_sweep(path, overrides, out, workers, launcher, cluster)
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        raise SelfReplayError(f"{len(failed)} of {len(runs)} points failed (first: {failed[0].name}: "
                              f"{failed[0].error}); rerun the same command to retry them")
