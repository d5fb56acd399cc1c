"""A run directory: the files a run writes, its checkpoints, and the rule for running into it again.

Running the same command on a run directory always works:
- it holds a finished run (summary.json) with the same settings: nothing to do;
- it holds a complete checkpoint: the run resumes from the newest one that reads back whole
  (a damaged one is passed over with a notice); the budget (`stop.*`) and settings that do not
  change the result (RESUMABLE) may differ, any other change is refused naming the key;
- it holds only a run's own files and no usable checkpoint (killed before its first one): the
  run starts over, saying so;
- it holds anything else: refused, and nothing in it is touched.

Every file is written under a temporary name and renamed into place, so a kill at any moment
leaves each file either whole or absent. JSON is strict: a non-finite number is written as
null, with its value named under "non_finite".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import yaml

from selfreplay.errors import SelfReplayError

CONFIG_NAME, METRICS_NAME, SUMMARY_NAME = "config.yaml", "metrics.jsonl", "summary.json"
WEIGHTS_NAME, TOKENIZER_NAME, CHECKPOINT_POINTER = "weights.safetensors", "tokenizer.json", "checkpoint.json"
POOL_NAME = "replay_pool"  # the pool a run draws before its first step (replay.draw_once)
ANSWERS_NAME = "answers.jsonl"  # eval.prompts: each held-out prompt with π0's answer and θ's at the end
RUN_FILES = {CONFIG_NAME, METRICS_NAME, SUMMARY_NAME, WEIGHTS_NAME, TOKENIZER_NAME, CHECKPOINT_POINTER, POOL_NAME,
             ANSWERS_NAME}
KEEP_CHECKPOINTS = 2  # the newest, and one to fall back on if the newest is damaged
# Settings that may change when a run resumes: they change neither what is trained nor how.
RESUMABLE = ("log.progress", "log.checkpoint_every", "log.checkpoint_seconds")


def public(path: Path) -> None:
    """Give a written file the usual permissions (rw-r--r-- under umask 022): some writers
    (safetensors) create files readable by their owner alone."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_atomic(path: Path, write) -> None:
    """write(tmp) to a temporary sibling, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    public(tmp)
    tmp.replace(path)


def strict_json(record: dict) -> dict:
    """`record` with every non-finite float replaced by None and named under "non_finite"."""
    out, non_finite = {}, {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key], non_finite[key] = None, str(value)
        else:
            out[key] = value
    if non_finite:
        out["non_finite"] = non_finite
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every dotted key whose value differs."""
    saved, current = flatten(saved), flatten(current)
    return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def notice(message: str) -> None:
    """One line to the user on stderr; under torchrun or accelerate only the first process says it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"selfreplay: {message}", file=sys.stderr, flush=True)


@dataclass
class Checkpoint:
    """What a resumed run needs: weights, other tensors (optimizer, replay pool), progress."""

    folder: Path
    weights: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    progress: dict


class RunDirectory:
    """The files of one run under `path` (see the module docstring for the restart rule)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---------------------------------------------------------------- opening

    def open(self, config: dict, may_differ=lambda key, old, new: False) -> str:
        """Make the directory ready for a run of `config`: 'finished', 'resume' or 'new'.

        may_differ(key, old, new) says which other changed settings a resumed run accepts.
        """
        out = self.path
        if (out / SUMMARY_NAME).is_file():
            changed = self._changed(config, lambda key, old, new: key in RESUMABLE)
            if changed is None:
                raise SelfReplayError(f"{out} holds a finished run whose {CONFIG_NAME} is unreadable: "
                                      "choose another out=")
            if changed:
                key, old, new = changed[0]
                raise SelfReplayError(f"{out} already holds a finished run with {key}={old} (now {new}); a finished "
                                      "run keeps no optimizer state to continue from: choose another out=")
            self.clear_checkpoints()  # left behind if the run was killed just after its summary
            return "finished"
        if self.checkpoints():
            changed = self._changed(config, lambda key, old, new: key.startswith("stop.") or key in RESUMABLE
                                    or may_differ(key, old, new))
            if changed:
                key, old, new = changed[0]
                raise SelfReplayError(f"{out} holds a checkpoint of a run with {key}={old}, not {new}: resume with "
                                      f"{key}={old}, or choose another out=")
            if changed is not None:
                return "resume"
        self.start_over()
        return "new"

    def _changed(self, config: dict, allowed) -> list[tuple[str, object, object]] | None:
        """Settings that differ from the saved config.yaml and are not allowed to; None when
        there is no readable config.yaml."""
        try:
            saved = yaml.safe_load((self.path / CONFIG_NAME).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None
        if not isinstance(saved, dict):
            return None
        return [c for c in changed_settings(saved, config) if not allowed(*c)]

    def start_over(self) -> None:
        """Remove an unfinished run's own files (the directory must hold nothing else)."""
        out = self.path
        if out.exists():
            foreign = sorted(p.name for p in out.iterdir() if not self._is_run_file(p.name))
            if foreign:
                raise SelfReplayError(f"{out} holds files that are not a selfreplay run's ({', '.join(foreign[:3])}): "
                                      "choose another out= (an empty or new directory)")
            own = list(out.iterdir())
            if own:
                notice(f"{out} holds an unfinished run with no usable checkpoint: starting it over")
            for path in own:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SelfReplayError(f"cannot create the run directory {out} ({e.strerror}): choose another out=") from None

    @staticmethod
    def _is_run_file(name: str) -> bool:
        return name in RUN_FILES or name.startswith(("ckpt-", ".ckpt-")) or (name.startswith(".") and name.endswith(".tmp"))

    # ---------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, newest first (a folder only gets its name once complete)."""
        folders = [p for p in self.path.glob("ckpt-*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(folders, key=lambda p: int(p.name[5:]), reverse=True)

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                        progress: dict) -> None:
        """Write ckpt-STEP/ under a temporary name, rename it, point checkpoint.json at it, and
        keep only the newest KEEP_CHECKPOINTS."""
        name = f"ckpt-{step:08d}"
        folder, staging = self.path / name, self.path / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for part, file in ((weights, WEIGHTS_NAME), (tensors, "state.safetensors")):
            safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in part.items()}, str(staging / file))
        (staging / "progress.json").write_text(json.dumps(progress, allow_nan=False))
        for path in staging.iterdir():
            public(path)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        write_atomic(self.path / CHECKPOINT_POINTER, lambda p: p.write_text(json.dumps({"latest": name})))
        for old in self.checkpoints()[KEEP_CHECKPOINTS:]:
            shutil.rmtree(old, ignore_errors=True)

    def read_checkpoint(self, folder: Path, device) -> Checkpoint:
        """One checkpoint, read whole; raises on a damaged one."""
        progress = json.loads((folder / "progress.json").read_text())
        if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
            raise ValueError("progress.json does not describe a step")
        return Checkpoint(folder, safetensors.torch.load_file(str(folder / WEIGHTS_NAME), device=str(device)),
                          safetensors.torch.load_file(str(folder / "state.safetensors")), progress)

    def clear_checkpoints(self) -> None:
        (self.path / CHECKPOINT_POINTER).unlink(missing_ok=True)
        for folder in [*self.path.glob("ckpt-*"), *self.path.glob(".ckpt-*.tmp")]:
            shutil.rmtree(folder, ignore_errors=True)

    # ---------------------------------------------------------------- metrics and summary

    def append_metrics(self, line: dict) -> None:
        with open(self.path / METRICS_NAME, "a") as f:
            f.write(json.dumps(strict_json(line), allow_nan=False) + "\n")

    def read_metrics(self) -> list[dict]:
        path = self.path / METRICS_NAME
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def keep_metrics(self, count: int) -> None:
        """Drop log lines written after the checkpoint a run resumes from."""
        lines = (self.path / METRICS_NAME).read_text().splitlines()[:count]
        write_atomic(self.path / METRICS_NAME, lambda p: p.write_text("".join(line + "\n" for line in lines)))

    def reset_metrics(self) -> None:
        write_atomic(self.path / METRICS_NAME, lambda p: p.write_text(""))

    def write_summary(self, summary: dict) -> None:
        text = json.dumps(strict_json(summary), indent=2, allow_nan=False)
        write_atomic(self.path / SUMMARY_NAME, lambda p: p.write_text(text))

    def read_summary(self) -> dict:
        return json.loads((self.path / SUMMARY_NAME).read_text())


class FollowingDirectory(RunDirectory):
    """The run directory as a process other than the first sees it under torchrun: it reads
    checkpoints and the summary, and writes nothing (the first process writes)."""

    def open(self, config: dict, may_differ=lambda key, old, new: False) -> str:
        raise RuntimeError("the first process opens the run directory")

    def start_over(self) -> None:
        pass

    def save_checkpoint(self, step, weights, tensors, progress) -> None:
        pass

    def clear_checkpoints(self) -> None:
        pass

    def append_metrics(self, line: dict) -> None:
        pass

    def keep_metrics(self, count: int) -> None:
        pass

    def reset_metrics(self) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass
