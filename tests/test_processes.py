"""Many processes from the command line: `torchrun --nproc_per_node 2 -m selfreplay finetune init=hf:...`
trains one run with DDP over gloo, ends where one process ends with the same global batch, and a
kill -9 of one rank followed by the same command resumes it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from conftest import sentences, write_jsonl  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.training.processes import Processes  # noqa: E402
from selfreplay.training.validate import validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Two processes sum the same rows' gradients in another order (each its half, then gloo's average),
# so their float32 results may differ in the last bits, and a few steps at lr 1e-2 carry that on:
# the largest difference measured is 3.8e-7 relative; 1e-5 leaves room and still catches any rows counted
# twice, left out or weighed differently (those move the losses by 1e-2 and more).
TOLERANCE = 1e-5
# a rank that dies at its second checkpoint, as a kill -9 would: no cleanup, no exit code of its own
FAULT = '''
import os, signal, sys
from selfreplay import rundir
from selfreplay.cli import main
saved = []
def dying(self, *args, **kwargs):
    saved.append(1)
    if len(saved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
rundir.FollowingDirectory.save_checkpoint = dying
raise SystemExit(main(sys.argv[1:]))
'''


# each rank's rows at every step, written beside the run (rows counted twice or left out would show here)
SHARES = '''
import atexit, json, os, sys
from selfreplay.cli import main
from selfreplay.training import replay_run
seen, objective = [], replay_run.training_loss
def counted(model, reference, new, replay, *args, **kwargs):
    seen.append([new[:, :4].tolist(), None if replay is None else len(replay)])
    return objective(model, reference, new, replay, *args, **kwargs)
replay_run.training_loss = counted
out = next(a for a in sys.argv if a.startswith("out=")).removeprefix("out=")
atexit.register(lambda: json.dump(seen, open(os.path.join(out, "..", f"rank{os.environ['RANK']}.json"), "w")))
raise SystemExit(main(sys.argv[1:]))
'''


def _settings(model_dir, tmp_path, out):
    new = write_jsonl(tmp_path / "es.jsonl", sentences("es", 120))
    old = write_jsonl(tmp_path / "en.jsonl", sentences("en", 40))
    return [f"init=hf:{model_dir}", f"out={out}", f"data.train={new}", f"data.old_text={old}", "model.T=32",
            "data.val_sequences=8", "optim.lr=1e-2", "optim.batch_size=4", "optim.warmup_steps=0",
            "replay.method=kl", "replay.coeff=1", "replay.batch_size=4", "replay.draw_once=16",
            "replay.stop_at_eos=false", "stop.tokens=1024", "log.every_tokens=256", "log.checkpoint_every=1",
            "log.progress=false"]


def _run(processes: int, settings: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    target = [str(script)] if script else ["-m", "selfreplay"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launch, *target, "finetune", *settings], env=env, capture_output=True, text=True,
                          timeout=600)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(one: Path, two: Path) -> None:
    lines_one, lines_two = _log(one), _log(two)
    assert [line["step"] for line in lines_one] == [line["step"] for line in lines_two]
    for a, b in zip(lines_one, lines_two):
        for key in ("train_loss", "replay_loss", "new_loss", "old_loss", "old_kl", "grad_norm"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=1e-7), (a["step"], key)


def test_two_processes_under_torchrun_end_where_one_process_ends(taught_llama_dir, tmp_path):
    one = _run(1, _settings(taught_llama_dir, tmp_path, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    script = tmp_path / "shares.py"
    script.write_text(SHARES)
    two = _run(2, _settings(taught_llama_dir, tmp_path, tmp_path / "two"), script)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(len(steps) == 8 and all(len(new) == 2 and replay == 2 for new, replay in steps) for steps in ranks)
    assert all(a[0] != b[0] for a, b in zip(*ranks))  # each its own half of the global batch
    assert two.stdout.count("finetune finished") == 1 and "(2 processes)" in two.stdout  # one report, not two
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8 and summary["tokens"] == 1024
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_a_rank_killed_at_a_checkpoint_resumes_with_the_same_command(taught_llama_dir, tmp_path):
    settings = _settings(taught_llama_dir, tmp_path, tmp_path / "run")
    script = tmp_path / "dies.py"
    script.write_text(FAULT)
    killed = _run(2, settings, script)
    assert killed.returncode != 0 and not (tmp_path / "run" / "summary.json").exists()
    assert list((tmp_path / "run").glob("ckpt-*"))
    again = _run(2, settings)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    whole = _run(1, _settings(taught_llama_dir, tmp_path, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    _assert_same_run(tmp_path / "whole", tmp_path / "run")


@pytest.mark.parametrize("override, message", [
    ("optim.batch_size=5", "optim.batch_size=5 does not split over 2 processes"),
    ("replay.batch_size=3", "replay.batch_size=3 does not split over 2 processes"),
    ("replay.draw_once=0", "replay is drawn once before training"),
])
def test_settings_that_do_not_split_over_processes_are_refused_in_one_line(taught_llama_dir, tmp_path, override,
                                                                            message):
    from selfreplay.training.loop import resolve_config

    config = resolve_config("finetune", None, [*_settings(taught_llama_dir, tmp_path, tmp_path / "r"), override])
    with pytest.raises(SelfReplayError, match=message) as e:
        validate(config, "finetune", processes=2)
    assert "\n" not in str(e.value)


def test_each_process_takes_its_own_consecutive_share_of_the_global_batch():
    import torch

    from selfreplay.replay.samples import ReplaySamples

    rows = torch.arange(12).view(6, 2)
    shares = [Processes(rank, 3).share(rows) for rank in range(3)]
    assert torch.equal(torch.cat(shares), rows) and all(len(s) == 2 for s in shares)
    samples = ReplaySamples(rows, rows > 3)
    assert torch.equal(Processes(1, 2).share(samples).mask, (rows > 3)[3:])
    assert Processes(0, 1).share(rows) is rows and Processes(1, 2).share(None) is None
