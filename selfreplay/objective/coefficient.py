"""The replay coefficient held to a budget (docs/method.md, "The replay coefficient held to a budget").

With `replay.coeff=auto` the user states how much the model may forget, B nats per token of
KL(π0 ‖ πθ) on replay sequences, instead of a coefficient c. `CoefficientController` moves c
after every step (or every log point) so the replay KL settles at B: in the spirit of PPO's
adaptive KL controller, an error in the KL moves c by a bounded
factor per `horizon` steps. Three changes, each chosen on hand-made KL sequences and real runs:

- the update is multiplicative in log space, c ← c · exp(e · steps/horizon), not c · (1 + e ·
  steps/horizon): c stays positive whatever steps/horizon is (the linear form turns negative at
  steps/horizon > 5), and an error up then the same error down return c to where it was;
- the error is the log ratio e = log(KL/B), clipped asymmetrically to [−MAX_FALL, MAX_RISE]: the
  replay KL falls roughly as a power of c, so a step in log c against the log ratio is the same
  correction at every scale, and c rises five times faster than it falls. Over budget is the
  failure to correct (on real text PPO's ±0.2 needed over 150 steps to take c from 10 to 40);
  under budget only slows new-domain learning a little, and at the start of a run the KL is ~0
  while θ is still π0, which a fast fall would answer by throwing c away;
- the error is taken on an exponential moving average of the KL over ~horizon/4 steps: one
  replay batch's KL is noisy, and the clip turns an unsmoothed controller into one that holds
  the median KL, not the mean, at B (15 % over budget at a 50 % per-batch spread on the toy
  model KL = a/c; 1 % with the average, and no overshoot added on a model that responds slowly).

One guard against windup, found on the continual tasks: c does not rise while the KL is already
falling on its own towards the budget. The replay KL measures the drift accumulated so far, and
with Adam, whose step is about lr whatever the loss's scale, a c past the point where replay
dominates the gradient no longer speeds the KL's fall: a controller that keeps raising c until
the KL is back under B overshoots by orders of magnitude (c 10 → 348 at 1.1-1.5 × B on modular
addition, with the new task unlearned while c took 500 steps to come back down). So a rise is
held when the KL average is falling fast enough to reach B within REACH horizons and that fall
is not c's own doing (the KL falls less than DRIVEN times as fast as log c has risen: on a model
that answers c at once, KL = a/c, every rise is still taken). The trend is the difference of two
averages, the KL's over horizon/4 and over one horizon, and the same two of log c.

`CapacityBound` watches the log points for the run this cannot save: c at its ceiling, the
replay KL still over budget, and the new-domain loss still falling, so the model is forgetting
to learn the new data (the model's capacity, not the coefficient, is the limit).
"""

from __future__ import annotations

import math

from selfreplay.config import AUTO, ReplayConfig
from selfreplay.errors import SelfReplayError

MAX_RISE = 1.0  # the clip on log(KL/B) over budget: log c rises by at most 1 · steps/horizon
MAX_FALL = 0.2  # and under it (PPO's 0.2): log c falls by at most 0.2 · steps/horizon
SMOOTHING = 0.25  # the KL average's time constant, as a fraction of the horizon: well inside the controller's own
TREND = 1.0  # the slower averages' time constant, in horizons: the trend is the fast average against this one
REACH = 20.0  # horizons: a rise is held while the KL's own fall would bring it to the budget within this many
DRIVEN = 0.5  # a fall in log KL at least this fraction of log c's rise is c's doing (the rise works: keep it)
CEILING_TOLERANCE = 1e-9  # relative: c this close to coeff_max counts as at the ceiling (floating-point rounding)


def _finite(x) -> bool:
    """x is a finite number (a Python or NumPy float, or a one-element tensor)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


class CoefficientController:
    """The replay coefficient c (dimensionless) that holds the replay KL at `budget` (nats per
    token of KL(π0 ‖ πθ) on replay sequences), kept in [coeff_min, coeff_max].

    horizon (steps): at the largest errors c rises by a factor e^MAX_RISE ≈ 2.7 per horizon steps
    and falls by e^−MAX_FALL ≈ 0.82. Deterministic: the same KL sequence gives the same c."""

    def __init__(self, budget: float, coeff: float = 1.0, coeff_min: float = 1e-2, coeff_max: float = 1e3,
                 horizon: float = 20.0):
        if not _finite(budget) or budget <= 0:
            raise SelfReplayError(f"replay.budget must be a positive number of nats per token, got {budget}")
        if not _finite(coeff_min) or not _finite(coeff_max) or not 0 < coeff_min <= coeff_max:
            raise SelfReplayError(f"replay coefficient bounds must satisfy 0 < coeff_min <= coeff_max, "
                                  f"got coeff_min={coeff_min}, coeff_max={coeff_max}")
        if not _finite(coeff) or not coeff_min <= coeff <= coeff_max:
            raise SelfReplayError(f"the starting replay coefficient {coeff} is outside [coeff_min, coeff_max] = "
                                  f"[{coeff_min}, {coeff_max}]: start inside the bounds")
        if not _finite(horizon) or horizon <= 0:
            raise SelfReplayError(f"the replay coefficient's horizon must be a positive number of steps, got {horizon}")
        self.budget, self.horizon = float(budget), float(horizon)
        self.coeff_min, self.coeff_max, self.coeff = float(coeff_min), float(coeff_max), float(coeff)
        self.kl: float | None = None  # the moving average of the replay KL (nats per token); None before the first
        self.kl_slow: float | None = None  # its average over a whole horizon: the KL's trend is kl against it
        self.log_coeff_fast = self.log_coeff_slow = math.log(self.coeff)  # the same two averages of log c
        self.updates = 0  # updates applied
        self.skipped = 0  # non-finite KLs left out

    def update(self, replay_kl: float, steps: int = 1) -> float:
        """Take the replay KL (nats per token) measured over the last `steps` training steps (one
        step's, or the mean over a log interval) and return the new c. A non-finite KL (a step that
        overflowed) leaves c and the average as they were."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise SelfReplayError(f"a replay coefficient update covers a positive whole number of steps, got {steps}")
        replay_kl = float(replay_kl)
        if not math.isfinite(replay_kl):
            self.skipped += 1
            return self.coeff
        # average over ~SMOOTHING·horizon steps (and TREND·horizon), however many steps one update covers
        keep, keep_slow = math.exp(-steps / (SMOOTHING * self.horizon)), math.exp(-steps / (TREND * self.horizon))
        self.kl = replay_kl if self.kl is None else keep * self.kl + (1 - keep) * replay_kl
        self.kl_slow = replay_kl if self.kl_slow is None else keep_slow * self.kl_slow + (1 - keep_slow) * replay_kl
        ratio = self.kl / self.budget
        error = -MAX_FALL if ratio <= 0 else min(MAX_RISE, max(-MAX_FALL, math.log(ratio)))
        if error > 0 and self._falling_on_its_own(math.log(ratio)):
            error = 0.0
        log_coeff = math.log(self.coeff) + error * steps / self.horizon  # in logs: no overflow at any steps
        if log_coeff >= math.log(self.coeff_max):
            self.coeff = self.coeff_max
        elif log_coeff <= math.log(self.coeff_min):
            self.coeff = self.coeff_min
        else:
            self.coeff = math.exp(log_coeff)
        log_coeff = math.log(self.coeff)
        self.log_coeff_fast = keep * self.log_coeff_fast + (1 - keep) * log_coeff
        self.log_coeff_slow = keep_slow * self.log_coeff_slow + (1 - keep_slow) * log_coeff
        self.updates += 1
        return self.coeff

    def _falling_on_its_own(self, log_ratio: float) -> bool:
        """The KL average falls, not because c rose, fast enough to reach the budget within REACH
        horizons from `log_ratio` = log(KL/B) > 0: raising c now would only wind it up."""
        if self.kl <= 0 or self.kl_slow <= 0 or self.kl >= self.kl_slow:
            return False
        fall = math.log(self.kl_slow / self.kl)  # in logs, over the (TREND − SMOOTHING)·horizon steps between the averages
        rise = self.log_coeff_fast - self.log_coeff_slow
        if rise > 0 and fall >= DRIVEN * rise:  # the fall keeps pace with c's rise: the rise is working
            return False
        return log_ratio <= fall * REACH / (TREND - SMOOTHING)

    @property
    def at_ceiling(self) -> bool:
        return self.coeff >= self.coeff_max * (1 - CEILING_TOLERANCE)

    def state_dict(self) -> dict:
        """Plain floats and ints (JSON round-trips them exactly): resuming gives the same c after."""
        return {"coeff": self.coeff, "kl": self.kl, "kl_slow": self.kl_slow, "log_coeff_fast": self.log_coeff_fast,
                "log_coeff_slow": self.log_coeff_slow, "updates": self.updates, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output. A coefficient outside this run's bounds (the ceiling was
        raised or lowered for the resumed run) is clipped into them."""
        try:
            coeff, kl, updates, skipped = state["coeff"], state["kl"], state["updates"], state["skipped"]
            # the trend's averages; a checkpoint from before the windup guard starts them where c and the KL stand
            kl_slow = state.get("kl_slow", kl)
            log_fast = state.get("log_coeff_fast", math.log(coeff) if _finite(coeff) and coeff > 0 else None)
            log_slow = state.get("log_coeff_slow", log_fast)
        except (KeyError, TypeError, AttributeError):
            raise SelfReplayError("the checkpoint's replay coefficient state is not one CoefficientController "
                                  "wrote: resume from a checkpoint of a run with replay.coeff=auto") from None
        if (not _finite(coeff) or coeff <= 0 or any(x is not None and not _finite(x) for x in (kl, kl_slow))
                or not _finite(log_fast) or not _finite(log_slow)):
            raise SelfReplayError(f"the checkpoint's replay coefficient state is damaged (coeff={coeff}, kl={kl}): "
                                  "resume from an earlier checkpoint")
        self.coeff = min(self.coeff_max, max(self.coeff_min, float(coeff)))
        self.kl = None if kl is None else float(kl)
        self.kl_slow = None if kl_slow is None else float(kl_slow)
        self.log_coeff_fast, self.log_coeff_slow = float(log_fast), float(log_slow)
        self.updates, self.skipped = int(updates), int(skipped)


class CapacityBound:
    """Detects, one log point at a time, that the budget costs new-domain learning: c has sat at
    `coeff_max` with the replay KL over `budget` (nats per token) for at least `window`
    consecutive log points, and over the last `window` of them the new-domain loss fell by more
    than `min_fall` nats. `since` is then the step where that stretch began, and stays set (the
    run was capacity bound from there, whatever follows)."""

    def __init__(self, budget: float, coeff_max: float, window: int = 3, min_fall: float = 0.0):
        if not _finite(budget) or budget <= 0:
            raise SelfReplayError(f"replay.budget must be a positive number of nats per token, got {budget}")
        if not _finite(coeff_max) or coeff_max <= 0:
            raise SelfReplayError(f"replay.coeff_max must be positive, got {coeff_max}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise SelfReplayError(f"the capacity-bound window must be at least 2 log points (a loss must fall "
                                  f"between them), got {window}")
        if not _finite(min_fall) or min_fall < 0:
            raise SelfReplayError(f"the capacity-bound min_fall must be a non-negative number of nats, got {min_fall}")
        self.budget, self.coeff_max = float(budget), float(coeff_max)
        self.window, self.min_fall = window, float(min_fall)
        self.since: int | None = None  # the step where the capacity-bound stretch began; None: not (yet) bound
        self.start: int | None = None  # the step where the current stretch at the ceiling and over budget began
        self.losses: list[float] = []  # the new-domain losses of the current stretch's last `window` log points

    @property
    def bound(self) -> bool:
        return self.since is not None

    def observe(self, step: int, coeff: float, replay_kl: float, new_loss: float) -> bool:
        """Take one log point: the step, c at it, the replay KL (nats per token; the controller's
        average is steadier than one batch's) and the new-domain loss (nats). Returns `bound`."""
        pinned = (_finite(coeff) and coeff >= self.coeff_max * (1 - CEILING_TOLERANCE)
                  and _finite(replay_kl) and replay_kl > self.budget and _finite(new_loss))
        if not pinned:  # the stretch is broken: c came off the ceiling, the KL fell under budget, or a NaN
            self.start, self.losses = None, []
            return self.bound
        if self.start is None:
            self.start = int(step)
        self.losses = (self.losses + [float(new_loss)])[-self.window:]  # float(): a tensor's value, not the tensor
        if self.since is None and len(self.losses) == self.window and self.losses[0] - self.losses[-1] > self.min_fall:
            self.since = self.start
        return self.bound

    def state_dict(self) -> dict:
        return {"since": self.since, "start": self.start, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        try:
            since, start, losses = state["since"], state["start"], [float(x) for x in state["losses"]]
        except (KeyError, TypeError, ValueError):
            raise SelfReplayError("the checkpoint's capacity-bound state is not one CapacityBound wrote: "
                                  "resume from a checkpoint of a run with replay.coeff=auto") from None
        self.since = None if since is None else int(since)
        self.start = None if start is None else int(start)
        self.losses = losses[-self.window:]


def capacity_bound_line(controller: CoefficientController, capacity: CapacityBound, sep: str = ".",
                        stopping: bool = False) -> str:
    """The one line a run says when it turns capacity bound; `sep` spells the settings as the front
    end does (replay.coeff_max for the command line, replay_coeff_max for the Trainer)."""
    stop = f": stopping (stop{sep}on_capacity_bound)" if stopping else ""
    return (f"capacity bound from step {capacity.since}: c sits at replay{sep}coeff_max={controller.coeff_max:g}, the "
            f"replay KL ({controller.kl:.3g} nats/token) stays over replay{sep}budget={controller.budget:g} and the "
            f"new-domain loss still falls: at this learning rate this model must forget more than the budget allows "
            f"to learn this data (a larger budget, a larger model or a lower learning rate lifts it){stop}")


def out_of_reach_line(controller: CoefficientController, capacity: CapacityBound, lr: float,
                      sep: str = ".") -> str | None:
    """The one line a run ends with when c reached its ceiling and the replay KL is still over
    budget though the run is not capacity bound (the new-domain loss no longer falls): no c holds
    this budget at this learning rate, since every Adam step moves each weight by about lr whatever
    the loss's scale, and that step noise alone keeps θ this far from π0. None when the budget held."""
    if controller.kl is None or controller.kl <= controller.budget or not controller.at_ceiling or capacity.bound:
        return None
    lr_key = "optim.lr" if sep == "." else "learning_rate"
    return (f"replay{sep}budget={controller.budget:g} was not held: c ended at replay{sep}coeff_max="
            f"{controller.coeff_max:g} with the replay KL at {controller.kl:.3g} nats/token and the new-domain loss "
            f"no longer falling, so the optimizer's own steps at {lr_key}={lr:g} move the model more than the budget: "
            f"lower {lr_key}, or raise replay{sep}budget")


def coefficient_of(replay: ReplayConfig) -> tuple[CoefficientController | None, CapacityBound | None]:
    """replay.coeff=auto's controller of c and its capacity-bound detector, as `replay` sets them
    (config.check_budget has checked them); (None, None) for a fixed c."""
    if replay.coeff != AUTO:
        return None, None
    return (CoefficientController(replay.budget, replay.coeff_start, replay.coeff_min, replay.coeff_max,
                                  replay.horizon), CapacityBound(replay.budget, replay.coeff_max))
