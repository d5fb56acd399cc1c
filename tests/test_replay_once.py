"""benchmarks/replay_once.py reads each run at one new-domain loss, with the pool's drawing counted in."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "replay_once.py"


@pytest.fixture(scope="module")
def replay_once():
    spec = importlib.util.spec_from_file_location("replay_once", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def curve(*points):
    return [{"new_loss": new, "old_loss": old, "train_seconds": seconds} for new, old, seconds in points]


def run(points, draw_s=0.0, tokens=1000, train_seconds=10.0):
    summary = {"tokens": tokens, "train_seconds": train_seconds, "tokens_per_second": tokens / train_seconds,
               "forgetting": points[-1][1] - points[0][1], "new_loss": points[-1][0], "peak_memory_mib": 1.0}
    return {"curve": curve(*points), "summary": summary, "draw_s": draw_s}


def test_a_run_is_read_where_its_new_loss_first_reaches_the_target(replay_once):
    points = curve((5.0, 2.0, 0.0), (4.0, 2.2, 10.0), (3.0, 2.6, 20.0), (3.5, 2.7, 30.0))
    assert replay_once.at_new_loss(points, 3.5, "old_loss") == pytest.approx(2.4)  # halfway from 4 to 3
    assert replay_once.at_new_loss(points, 3.5, "train_seconds") == pytest.approx(15.0)
    assert replay_once.at_new_loss(points, 4.0, "train_seconds") == pytest.approx(10.0)
    assert replay_once.at_new_loss(points, 2.9, "old_loss") is None  # never reached


def test_runs_are_compared_at_the_highest_loss_all_reach_with_the_drawing_counted(replay_once):
    runs = {"plain": run([(5.0, 2.0, 0.0), (3.0, 3.0, 10.0)]),
            "stored": run([(5.0, 2.0, 0.0), (4.0, 2.1, 10.0), (3.5, 2.2, 20.0)], draw_s=5.0, train_seconds=20.0)}
    result = replay_once.table(runs)
    assert result["target_new_loss"] == 3.5  # the stored run gets no lower
    plain, stored = result["rows"]["plain"], result["rows"]["stored"]
    assert plain["forgetting_at_target"] == pytest.approx(0.75) and plain["time_to_target_s"] == pytest.approx(7.5)
    assert stored["forgetting_at_target"] == pytest.approx(0.2) and stored["time_to_target_s"] == pytest.approx(25.0)
    assert stored["tokens_per_s"] == pytest.approx(1000 / 25.0)  # tokens over training plus drawing seconds
    assert stored["vs_plain_tokens_per_s"] == pytest.approx((1000 / 25.0) / (1000 / 10.0))
