"""Running a sweep's points: each a `selfreplay` subprocess (here, or as a submitit job), several at once."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.sweep.plan import (
    SUMMARY_FILE,
    Run,
    format_value,
    read_outcome,
)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """Workers when --workers is not given: two single-threaded runs side by side finished a small
    sweep 1.5x sooner than one two-threaded run at a time on a 2-core CPU (benchmarks/sweep_workers.py);
    more than two share a GPU or memory badly, so larger machines ask for them with --workers."""
    return min(2, cores())


def choose_workers(workers: int | None) -> int:
    """--workers as given (1 or more), or the default when it is not given."""
    if workers is None:
        return default_workers()
    if workers < 1:
        raise SelfReplayError(f"--workers must be >= 1, got {workers}: the number of points run at once "
                              f"(leave it out for the default, {default_workers()})")
    return workers


def command(run: Run) -> list[str]:
    """The selfreplay command line that runs one point."""
    args = [run.mode, f"out={run.run_dir}"]
    if run.init is not None:
        args.append(f"init={run.init.run_dir}")
    args += [f"{key}={format_value(value)}" for key, value in run.settings.items()]
    if "log.progress" not in run.settings:  # a progress bar per point would interleave in the logs
        args.append("log.progress=false")
    return [sys.executable, "-m", "selfreplay.cli", *args]


def log_path(run: Run, sweep_dir: Path) -> Path:
    return sweep_dir / "logs" / run.stage / f"{run.run_dir.name}.log"


def execute(argv: list[str], log: str, threads: int) -> tuple[int, str | None]:
    """Run one point's command with `threads` threads, output into `log`; (exit code, last output line)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    return code, (lines[-1] if lines else None)


class LocalLauncher:
    """Points as subprocesses on this machine, `workers` at a time, each with cores/workers threads."""

    def __init__(self, workers: int):
        self.workers, self.threads = workers, max(1, cores() // workers)

    def launch(self, argv: list[str], log: Path) -> tuple[int, str | None]:
        return execute(argv, str(log), self.threads)


class SubmititLauncher:
    """Points as submitit jobs (Slurm on a cluster; `cluster=local` or `debug` runs them here)."""

    def __init__(self, folder: Path, cluster: str | None, parameters: dict, workers: int):
        import submitit

        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        parameters = {"timeout_min": 24 * 60, **parameters}
        self.executor.update_parameters(**parameters)
        self.threads = int(parameters.get("cpus_per_task") or max(1, cores() // workers))

    def launch(self, argv: list[str], log: Path) -> tuple[int, str | None]:
        job = self.executor.submit(execute, argv, str(log), self.threads)
        return job.result()


def make_launcher(kind: str, workers: int, sweep_dir: Path, cluster: str | None, parameters: dict):
    """A LocalLauncher, or a SubmititLauncher with the sweep file's `launcher:` parameters."""
    if kind == "local":
        return LocalLauncher(workers)
    if kind == "submitit":
        return SubmititLauncher(sweep_dir / "submitit", cluster, parameters, workers)
    raise SelfReplayError(f"unknown launcher {kind!r}: choose local or submitit")


def run_point(run: Run, launcher, sweep_dir: Path, say=print) -> Run:
    """Run one pending point; it ends done or failed with the last line of its output."""
    started = time.perf_counter()
    try:
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        code, last_line = launcher.launch(command(run), log_path(run, sweep_dir))
    except Exception as e:  # noqa: BLE001 - a point that cannot run (or a lost job) must not stop the others
        code, last_line = -1, f"could not run: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    read_outcome(run)
    if code != 0 and run.status != "failed":
        run.status, run.error = "failed", last_line or f"exit code {code}"
    elif run.status == "pending":
        run.status, run.error = "failed", f"exited without writing {SUMMARY_FILE}: {last_line}"
    say(f"  {run.name}: {run.status} in {time.perf_counter() - started:.0f} s"
        + (f" ({run.error})" if run.error else ""))
    return run


def run_stage(runs: list[Run], launcher, workers: int, sweep_dir: Path, say=print) -> None:
    """Run the pending points of one stage, `workers` at a time; each ends done or failed."""
    pending = [r for r in runs if r.status == "pending"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(run_point, r, launcher, sweep_dir, say) for r in pending]
        for future in concurrent.futures.as_completed(futures):
            future.result()
    finally:  # on Ctrl-C, start no further point
        pool.shutdown(wait=True, cancel_futures=True)
