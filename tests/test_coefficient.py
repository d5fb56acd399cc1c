import json
import math
import random

import pytest

from selfreplay.errors import SelfReplayError
from selfreplay.objective import coefficient
from selfreplay.objective.coefficient import (
    MAX_FALL,
    MAX_RISE,
    CapacityBound,
    CoefficientController,
    capacity_bound_line,
    out_of_reach_line,
)

B = 0.01


def run(controller: CoefficientController, kls, steps: int = 1) -> list[float]:
    return [controller.update(kl, steps) for kl in kls]


def test_rises_when_over_budget_and_falls_when_under():
    over = run(CoefficientController(B, coeff=1.0), [2 * B] * 20)
    under = run(CoefficientController(B, coeff=1.0), [0.5 * B] * 20)
    assert all(b > a for a, b in zip([1.0] + over, over))
    assert all(b < a for a, b in zip([1.0] + under, under))


def test_holds_still_at_the_budget():
    assert run(CoefficientController(B, coeff=2.0), [B] * 10) == [2.0] * 10


def test_one_update_moves_c_at_most_by_the_clip_and_rises_faster_than_it_falls():
    for kl, error in ((1e3 * B, MAX_RISE), (0.0, -MAX_FALL), (1e-3 * B, -MAX_FALL)):  # past the clip either way
        c = CoefficientController(B, coeff=1.0, horizon=10.0)
        assert c.update(kl, steps=5) == pytest.approx(math.exp(error * 5 / 10))
    assert MAX_RISE > MAX_FALL  # over budget is the failure to correct; under it only slows learning


def test_the_error_is_the_log_ratio_inside_the_clip():
    c = CoefficientController(B, coeff=1.0, coeff_max=1e9, horizon=4.0)
    assert c.update(1.5 * B, steps=1) == pytest.approx(1.5 ** (1 / 4))


def test_a_long_update_keeps_c_positive_and_an_error_undone_returns_c():
    # 100 horizons in one update: the average holds only this update's KL, and c·(1 + e·steps/horizon)
    # would turn negative; in logs, c goes to 1.1^100 and back
    c = CoefficientController(B, coeff=1.0, coeff_min=1e-9, coeff_max=1e9, horizon=10.0)
    assert c.update(1.1 * B, steps=1000) == pytest.approx(1.1 ** 100)
    assert c.update(B / 1.1, steps=1000) == pytest.approx(1.0, rel=1e-9)
    assert c.update(0.0, steps=1000) == pytest.approx(math.exp(-20))


def test_c_stays_within_its_bounds():
    c = CoefficientController(B, coeff=1.0, coeff_min=0.5, coeff_max=4.0, horizon=5.0)
    assert max(run(c, [10 * B] * 200)) == 4.0 and c.at_ceiling
    assert min(run(c, [0.0] * 200)) == 0.5 and not c.at_ceiling


def test_deterministic():
    rng = random.Random(3)
    kls = [rng.uniform(0, 3 * B) for _ in range(100)]
    assert run(CoefficientController(B), kls) == run(CoefficientController(B), kls)


def test_a_non_finite_kl_leaves_c_and_its_average_alone():
    c = CoefficientController(B)
    run(c, [2 * B] * 5)
    before = c.state_dict()
    for bad in (math.nan, math.inf, -math.inf):
        assert c.update(bad) == before["coeff"]
    assert c.state_dict() == {**before, "skipped": 3}


def test_state_round_trips_through_json_and_continues_identically():
    rng = random.Random(5)
    kls = [rng.uniform(0.85 * B, 1.15 * B) for _ in range(60)]  # inside the clip: every bit counts
    whole = CoefficientController(B, coeff=1.3, horizon=7.0)
    expected = run(whole, kls)
    first = CoefficientController(B, coeff=1.3, horizon=7.0)
    run(first, kls[:25])
    resumed = CoefficientController(B, coeff=1.3, horizon=7.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run(resumed, kls[25:]) == expected[25:]


def test_a_restored_coefficient_is_clipped_into_the_resumed_runs_bounds():
    c = CoefficientController(B, coeff_max=10.0)
    c.load_state_dict({"coeff": 50.0, "kl": 0.02, "updates": 3, "skipped": 0})
    assert c.coeff == 10.0
    with pytest.raises(SelfReplayError, match="resume"):
        c.load_state_dict({"coeff": 1.0})


def test_a_checkpoint_from_before_the_windup_guard_resumes():
    c = CoefficientController(B)
    c.load_state_dict({"coeff": 4.0, "kl": 0.02, "updates": 3, "skipped": 0})
    assert (c.coeff, c.kl_slow, c.log_coeff_fast, c.log_coeff_slow) == (4.0, 0.02, math.log(4.0), math.log(4.0))
    c.update(0.02)


def test_converges_to_the_budget_on_a_toy_model():
    a = 0.37  # replay KL = a / c: the budget needs c = a / B = 37
    c = CoefficientController(B, coeff=1.0, coeff_max=1e3, horizon=20.0)
    for _ in range(3000):
        c.update(a / c.coeff)
    assert a / c.coeff == pytest.approx(B, rel=0.1)
    assert c.coeff == pytest.approx(a / B, rel=0.1)


def test_a_model_that_answers_c_at_once_is_not_slowed_by_the_windup_guard():
    a = 0.37  # KL = a / c falls exactly as fast as c rises: every rise works, none is held
    c = CoefficientController(B, coeff=1.0, coeff_max=1e3, horizon=20.0)
    ratios = [a / c.update(a / c.coeff) / B for _ in range(100)]
    assert ratios[-1] == pytest.approx(1.0, rel=0.05)


def test_c_rises_less_while_the_kl_falls_on_its_own(monkeypatch):
    # over budget, but falling 0.3 %/step by itself: at that rate it reaches B in ~135 steps
    kls = [1.5 * B * math.exp(-0.003 * t) for t in range(150)]
    guarded = max(run(CoefficientController(B, coeff=10.0), kls))
    monkeypatch.setattr(coefficient, "REACH", 0.0)
    unguarded = max(run(CoefficientController(B, coeff=10.0), kls))
    assert math.log(guarded / 10.0) < 0.7 * math.log(unguarded / 10.0)


def slow_model_peak() -> float:
    """c's peak on a model whose KL relaxes towards 0.5·B + 5·B/c over ~200 steps from 3·B: c = 10
    holds the budget in the end, and a c past ~50 barely moves the KL (Adam's step is ~lr whatever
    the loss's scale), so every rise past that is windup."""
    c, kl, peak = CoefficientController(B, coeff=10.0, horizon=20.0), 3 * B, 0.0
    for _ in range(800):
        kl += (0.5 * B + 5 * B / c.coeff - kl) / 200
        peak = max(peak, c.update(kl))
    return peak


def test_c_does_not_wind_up_on_a_model_that_answers_it_slowly(monkeypatch):
    guarded = slow_model_peak()
    monkeypatch.setattr(coefficient, "REACH", 0.0)  # the guard off: c runs to its ceiling
    assert slow_model_peak() == 1e3
    assert guarded < 300


def test_holds_the_mean_kl_at_the_budget_under_per_batch_noise():
    # one batch's KL spreads ~50 %: unsmoothed, the clip would hold its median at B (mean ~15 % over)
    rng, a, horizon = random.Random(0), 0.37, 50.0
    c = CoefficientController(B, coeff=a / B, coeff_max=1e3, horizon=horizon)
    kls = []
    for _ in range(20000):
        kls.append(a / c.coeff * math.exp(0.5 * rng.gauss(0, 1) - 0.125))  # mean a / c
        c.update(kls[-1])
    assert sum(kls[5000:]) / len(kls[5000:]) == pytest.approx(B, rel=0.05)


def test_bad_arguments_are_refused_in_one_line():
    for kwargs in ({"budget": 0.0}, {"budget": math.nan}, {"budget": B, "coeff_min": 2.0, "coeff_max": 1.0},
                   {"budget": B, "coeff": 1e4}, {"budget": B, "horizon": 0}):
        with pytest.raises(SelfReplayError) as error:
            CoefficientController(**kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(SelfReplayError):
        CoefficientController(B).update(B, steps=0)


# ---------------------------------------------------------------- the capacity bound

def observe_all(bound: CapacityBound, points) -> list[bool]:
    return [bound.observe(step, coeff, kl, loss) for step, coeff, kl, loss in points]


def test_capacity_bound_set_at_the_ceiling_over_budget_with_a_falling_loss():
    bound = CapacityBound(B, coeff_max=10.0, window=3)
    points = [(100, 5.0, 2 * B, 3.0),  # below the ceiling
              (200, 10.0, 2 * B, 2.9), (300, 10.0, 2 * B, 2.8), (400, 10.0, 2 * B, 2.7), (500, 10.0, 2 * B, 2.6)]
    assert observe_all(bound, points) == [False, False, False, True, True]
    assert bound.since == 200


def test_capacity_bound_not_set_when_the_loss_stops_falling_or_the_kl_is_under_budget():
    flat = [(s, 10.0, 2 * B, 2.5) for s in range(100, 1100, 100)]
    rising = [(s, 10.0, 2 * B, 2.0 + s / 1e4) for s in range(100, 1100, 100)]
    under = [(s, 10.0, 0.5 * B, 3.0 - s / 1e4) for s in range(100, 1100, 100)]
    off_ceiling = [(s, 9.9, 2 * B, 3.0 - s / 1e4) for s in range(100, 1100, 100)]
    for points in (flat, rising, under, off_ceiling):
        bound = CapacityBound(B, coeff_max=10.0, window=3)
        assert not any(observe_all(bound, points)) and bound.since is None


def test_capacity_bound_since_is_where_the_unbroken_stretch_began():
    bound = CapacityBound(B, coeff_max=10.0, window=3)
    points = [(100, 10.0, 2 * B, 3.0), (200, 10.0, 2 * B, 2.9),
              (300, 10.0, 0.9 * B, 2.8),  # under budget: the stretch breaks
              (400, 10.0, 2 * B, 2.7), (500, 10.0, 2 * B, 2.6), (600, 10.0, 2 * B, 2.5),
              (700, 10.0, 0.5 * B, 2.4)]  # once bound, it stays bound
    assert observe_all(bound, points) == [False] * 5 + [True, True]
    assert bound.since == 400


def test_capacity_bound_state_round_trips_mid_stretch():
    points = [(s, 10.0, 2 * B, 3.0 - s / 1e3) for s in range(1, 8)]
    whole = CapacityBound(B, coeff_max=10.0, window=4)
    expected = observe_all(whole, points)
    first = CapacityBound(B, coeff_max=10.0, window=4)
    observe_all(first, points[:2])
    resumed = CapacityBound(B, coeff_max=10.0, window=4)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert observe_all(resumed, points[2:]) == expected[2:] and resumed.since == whole.since == 1


def test_capacity_bound_min_fall_and_bad_arguments():
    points = [(s, 10.0, 2 * B, 3.0 - s * 1e-3) for s in range(1, 6)]  # falls 0.002 nats per window of 3
    assert not any(observe_all(CapacityBound(B, 10.0, window=3, min_fall=0.01), points))
    assert any(observe_all(CapacityBound(B, 10.0, window=3, min_fall=0.001), points))
    for kwargs in ({"budget": -1.0, "coeff_max": 1.0}, {"budget": B, "coeff_max": 1.0, "window": 1},
                   {"budget": B, "coeff_max": 1.0, "min_fall": -0.1}):
        with pytest.raises(SelfReplayError):
            CapacityBound(**kwargs)


def test_a_run_says_in_one_line_when_its_budget_was_out_of_reach_and_why():
    pinned = CoefficientController(B, coeff=1.0, coeff_max=4.0, horizon=1.0)
    run(pinned, [3 * B] * 10)  # c at its ceiling, the KL still over budget
    line = out_of_reach_line(pinned, CapacityBound(B, 4.0), lr=1e-3)
    assert line.startswith("replay.budget=0.01 was not held: c ended at replay.coeff_max=4") and "\n" not in line
    assert "lower optim.lr" in line and "optim.lr=0.001" in line
    assert "replay_budget=0.01" in out_of_reach_line(pinned, CapacityBound(B, 4.0), lr=1e-3, sep="_")
    assert "lower learning_rate" in out_of_reach_line(pinned, CapacityBound(B, 4.0), lr=1e-3, sep="_")
    bound = CapacityBound(B, 4.0, window=2)
    observe_all(bound, [(1, 4.0, 3 * B, 3.0), (2, 4.0, 3 * B, 2.0)])  # still learning: capacity, said apart
    assert out_of_reach_line(pinned, bound, lr=1e-3) is None
    assert capacity_bound_line(pinned, bound).startswith("capacity bound from step 1: c sits at replay.coeff_max=4")
    held = CoefficientController(B, coeff=1.0, coeff_max=4.0)
    run(held, [0.5 * B] * 10)
    assert out_of_reach_line(held, CapacityBound(B, 4.0), lr=1e-3) is None  # under budget
