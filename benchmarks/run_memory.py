"""Where a run's memory goes: the peak resident memory of each phase of one finetuning run.

    python benchmarks/run_memory.py finetune init=hf:DIR out=runs/mem data.train=... stop.tokens=4096

Runs `selfreplay finetune` (or any subcommand) in this process, with a thread that samples the
process's resident memory (VmRSS) every 50 ms and charges it to the phase running then: the setup
(loading, data, π0's answers), drawing a pool once, a training step, a log point's measurements, a
checkpoint, the end of the run. Memory is not timing: the run may share the CPU. Prints each phase's
peak; writes them to --json (default benchmarks/results/run_memory.json).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import selfreplay.training.loop as loop  # noqa: E402
from selfreplay.cli import main as selfreplay_main  # noqa: E402

PHASES = {"setup": "setup (loading, data, π0's answers)", "with_drawn_pool": "drawing the pool once",
          "train_step": "training steps", "measure": "log points' measurements",
          "save_checkpoint_of": "checkpoints", "finish": "the end (answers, saving)"}


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PhasePeaks:
    """The peak resident memory of each phase, sampled by a daemon thread."""

    def __init__(self, every: float = 0.05):
        self.phase, self.peaks, self.every = "between phases", {}, every
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), resident_mib())
            time.sleep(self.every)

    def charge(self, name: str, label: str) -> None:
        """Charge the time inside loop.`name` to `label` (the loop looks its functions up at each call)."""
        function = getattr(loop, name)

        def charged(*args, **kwargs):
            before, self.phase = self.phase, label
            try:
                return function(*args, **kwargs)
            finally:
                self.phase = before

        setattr(loop, name, charged)


def main() -> None:
    args = sys.argv[1:]
    out = HERE / "results" / "run_memory.json"
    if "--json" in args:
        i = args.index("--json")
        out, args = Path(args[i + 1]), args[:i] + args[i + 2:]
    peaks = PhasePeaks()
    for name, label in PHASES.items():
        peaks.charge(name, label)
    sys.argv = ["selfreplay", *args]
    try:
        selfreplay_main()
    finally:
        print(f"\n{'phase':40s} {'peak MiB':>9s}")
        for label, mib in peaks.peaks.items():
            print(f"{label:40s} {mib:9.0f}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": args, "phase_peak_mib": peaks.peaks}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
