"""Time to target and the learning-rate experiment's compute ratio, on hand-made curves and runs."""

import pytest

from selfreplay.experiments.measures import Finetuned, compute_ratio, rises, time_to_target

CURVE = [{"step": 0, "train_seconds": 0.0, "new_loss": 5.0},
         {"step": 10, "train_seconds": 2.0, "new_loss": 4.1},
         {"step": 20, "train_seconds": 4.5, "new_loss": None},  # a log point without a measurement
         {"step": 30, "train_seconds": 6.0, "new_loss": 3.9},
         {"step": 40, "train_seconds": 8.0, "new_loss": 3.5}]


def test_time_to_target_is_the_first_log_point_at_or_below_the_target():
    assert time_to_target(CURVE, 4.1) == (2.0, 10)  # "at or below", as the stop rule
    assert time_to_target(CURVE, 4.0) == (6.0, 30)
    assert time_to_target(CURVE, 5.0) == (0.0, 0)
    assert time_to_target(CURVE, 3.0) is None


def test_compute_ratio_takes_the_fastest_no_replay_run_that_forgets_no_more():
    sweep = [Finetuned("lr=1e-3", 0.60, 2.0), Finetuned("lr=1e-4", 0.30, 20.0),
             Finetuned("lr=1e-5", 0.10, 200.0), Finetuned("lr=1e-6", 0.05, 2000.0),
             Finetuned("lr=1e-7", 0.01, None)]  # hit the time cap: cannot count
    replay = Finetuned("replace 1/8", 0.12, 2.5)
    result = compute_ratio(sweep, replay)
    assert result.no_replay.label == "lr=1e-5" and result.ratio == pytest.approx(80.0)
    assert compute_ratio(sweep, Finetuned("kl c=10", 0.30, 4.0)).ratio == pytest.approx(5.0)  # equal counts


def test_compute_ratio_is_a_lower_bound_when_replay_forgets_less_than_every_run_that_reached_the_target():
    sweep = [Finetuned("lr=1e-3", 0.60, 2.0), Finetuned("lr=1e-4", 0.40, 30.0), Finetuned("lr=1e-6", 0.01, None)]
    result = compute_ratio(sweep, Finetuned("kl", 0.02, 1.5))  # only a run that missed the target forgets less
    assert result.at_least and result.no_replay.label == "lr=1e-4" and result.ratio == pytest.approx(20.0)
    assert str(result) == "> 20.0" and str(compute_ratio(sweep, Finetuned("kl", 0.5, 1.5))) == "20.0"


def test_compute_ratio_is_none_when_a_side_missed_the_target():
    sweep = [Finetuned("lr=1e-3", 0.60, 2.0), Finetuned("lr=1e-6", 0.01, None)]
    assert compute_ratio(sweep, Finetuned("kl", 0.9, None)) is None  # the replay run missed the target
    assert compute_ratio(sweep[1:], Finetuned("kl", 0.02, 3.0)) is None  # no no-replay run reached it


def test_rises_allows_a_tolerance():
    assert rises([0.0, 0.01, 0.05, 0.2]) and not rises([0.0, 0.05, 0.01])
    assert rises([0.0, 0.05, 0.045], tolerance=0.01)


def test_interpolate_at_reads_a_curve_where_its_key_first_falls_to_a_value():
    from selfreplay.experiments.measures import interpolate_at

    curve = [{"new_loss": 4.0, "chat_kl": 0.0, "train_seconds": 0.0},
             {"new_loss": 3.0, "chat_kl": 0.2, "train_seconds": 10.0},
             {"new_loss": 2.0, "chat_kl": 0.4, "train_seconds": 20.0}]
    assert interpolate_at(curve, "new_loss", 3.5, ("chat_kl", "train_seconds")) == pytest.approx(
        {"chat_kl": 0.1, "train_seconds": 5.0})
    assert interpolate_at(curve, "new_loss", 4.0, ("chat_kl",)) == {"chat_kl": 0.0}
    assert interpolate_at(curve, "new_loss", 1.0, ("chat_kl",)) is None
