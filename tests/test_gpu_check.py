"""benchmarks/gpu_check.py runs end to end on CPU (--tiny), so a lent GPU's run is not its first."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_on_cpu_measures_every_path(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    gc = _gpu_check()
    expected = [f"{family}/train/{precision}/{path}" for family in ("builtin", "hf") for precision in gc.PRECISIONS
                for path in gc.TRAIN_PATHS]
    expected += [f"{family}/decode/{precision}/{decoder}" for family, decoders in gc.DECODERS.items()
                 for precision in gc.PRECISIONS for decoder in decoders]
    measurements, s = result["measurements"], result["shapes"]
    assert result["errors"] == [] and sorted(measurements) == sorted(expected)
    for key, m in measurements.items():
        rate = m["tokens_per_s"] if "/train/" in key else m["seqs_per_s"]
        assert rate > 0 and m["peak_mib"] > 0, key
        if "kl_stored" in key:  # the pool drawn once: its drawing timed apart, its rows all replayed
            assert m["pool_draw_s"] > 0 and m["pool_rows"] == s["replay_batch"] * (s["warmup"] + s["steps"]), key
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"] == torch.__version__
    assert 1000 < result["parameters"]["builtin"] < 20000 and 1000 < result["parameters"]["hf"] < 20000
    assert "builtin/decode/bf16/compiled" in done.stdout  # the table


def test_a_failing_path_is_recorded_in_one_line_and_the_run_goes_on():
    gc = _gpu_check()

    def fails():
        raise ValueError("out of memory\nin some kernel")

    assert gc.measured(torch.device("cpu"), fails) == {"error": "ValueError: out of memory in some kernel"}
    assert gc.measured(torch.device("cpu"), lambda rate: {"tokens_per_s": rate}, 2.0)["tokens_per_s"] == 2.0
