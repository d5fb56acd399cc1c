"""Fault injection: a run killed (SIGKILL, by its own PID) at random moments, inside checkpoint
writes included, or stopped with Ctrl-C (SIGINT), and then re-run with the same command, ends
with the metrics and weights of an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import finetune_overrides
from test_rundir import assert_same_run

SETTINGS = ("replay.method=kl", "replay.source=self", "log.checkpoint_every=1", "stop.tokens=4096",
            "log.every_tokens=256")

# Runs the CLI with safetensors' writer patched to write half of its k-th file and then SIGKILL
# the process: a kill inside a checkpoint (or the final weights) write.
DIE_INSIDE_WRITE = """
import os, signal, sys
import safetensors.torch
real, calls = safetensors.torch.save_file, [0]
def save_file(tensors, path, *args, **kwargs):
    calls[0] += 1
    real(tensors, path, *args, **kwargs)
    if calls[0] == int(sys.argv[1]):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_file
from selfreplay.cli import main
sys.exit(main(sys.argv[2:]))
"""


def finetune_command(corpus, pretrained, out):
    return [sys.executable, "-m", "selfreplay.cli", "finetune", *finetune_overrides(corpus, pretrained, out, *SETTINGS)]


def log_lines(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(corpus, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "whole"
    subprocess.run(finetune_command(corpus, pretrained, out), check=True, capture_output=True)
    return out


def test_kills_inside_checkpoint_writes_then_the_same_command(corpus, pretrained, uninterrupted, tmp_path):
    out = tmp_path / "run"
    command = finetune_command(corpus, pretrained, out)
    # 2 files per checkpoint: write 1 is the first checkpoint's weights (nothing usable yet),
    # 4 the second's optimizer state, 7 the fourth's weights
    for k in (1, 4, 7):
        killed = subprocess.run([sys.executable, "-c", DIE_INSIDE_WRITE, str(k), *command[3:]],
                                capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    assert_same_run(out, uninterrupted)


def test_kills_at_random_moments_then_the_same_command(corpus, pretrained, uninterrupted, tmp_path):
    out = tmp_path / "run"
    command = finetune_command(corpus, pretrained, out)
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_lines = log_lines(out)
        deadline = time.monotonic() + 60
        while log_lines(out) <= start_lines and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # wait for training to be under way
        time.sleep(rng.uniform(0, 0.1))
        if process.poll() is None:  # a resumed run may already have finished its few remaining steps
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 1
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert_same_run(out, uninterrupted)


def test_ctrl_c_checkpoints_then_the_same_command_resumes(corpus, pretrained, uninterrupted, tmp_path):
    out = tmp_path / "run"
    command = finetune_command(corpus, pretrained, out)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while log_lines(out) < 3 and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    assert_same_run(out, uninterrupted)
