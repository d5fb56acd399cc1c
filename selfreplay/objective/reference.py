"""What finetuning keeps of π0 once training starts (docs/method.md, "Stored targets").

π0 runs during training to draw replay samples and to score rows whose answers were not kept.
Where it does neither, a run does not load it: θ is π0 until the first step, so what the
measurements need of π0 (its hidden states on the validation rows, its own loss there) is taken
from θ before it moves, and full finetuning then holds one model. So it is with plain
finetuning, and with a pool drawn once (replay.pool=DIR with replay.reuse=0: it never draws)
whose samples carry π0's answers: with `hidden` targets the KL needs π0's output head [V, D],
which is kept, as it is wherever the KL to π0 is measured; with `topk:K` targets it needs
nothing of π0, and the run keeps nothing (no KL is measured then, forgetting is).
"""

from __future__ import annotations

import enum
from pathlib import Path

import torch
from torch import nn

from selfreplay.config import ReplayConfig
from selfreplay.objective.methods import REPLAY_KL, ReplayMethod
from selfreplay.replay.store import read_header


class ReferenceUse(enum.Enum):
    """How much of π0 a finetuning run holds while it trains."""

    MODEL = "π0's whole model: it draws replay samples or scores rows"
    HEAD = "π0's output head alone: the KL reads π0's stored hidden states, or is only measured"
    NOTHING = "nothing of π0: the KL reads π0's stored top-K answers"


def reference_use(method: ReplayMethod, replay: ReplayConfig) -> ReferenceUse:
    """What of π0 a finetuning run with `method` and `replay` needs once it trains: its whole
    model where it draws replay (a self-replay pool that is not a stored one replayed pass after
    pass) or scores rows (kl_new; the KL on real replay or on a stored pool without targets);
    nothing where a stored pool carries its top-K answers; else its head, to measure the KL."""
    if method.needs_reference and not method.needs_replay:
        return ReferenceUse.MODEL  # kl_new: π0 scores every new batch
    replays = method.needs_replay or replay.fraction > 0
    if replays and replay.source == "self" and (replay.pool is None or replay.reuse != 0):
        return ReferenceUse.MODEL  # it draws samples
    if method is REPLAY_KL:
        if replay.source != "self":
            return ReferenceUse.MODEL  # π0 scores the old domain's rows
        targets = read_header(Path(replay.pool))["targets"]
        if targets == "none":
            return ReferenceUse.MODEL  # π0 scores the stored tokens at every step
        if targets.startswith("topk:"):
            return ReferenceUse.NOTHING
    return ReferenceUse.HEAD


def kept_of_reference(model, use: ReferenceUse) -> "ReferenceHead | None":
    """What a run that does not load π0 keeps of it: its head, copied from θ (`model`, anything with
    `head.weight`) before the first step, where `use` is HEAD; else nothing."""
    return ReferenceHead(model.head.weight) if use is ReferenceUse.HEAD else None


class ReferenceHead(nn.Module):
    """π0 reduced to its output head: `head.weight` [V, D], a frozen copy of the weight given
    (θ's head before its first step: with a tied embedding, θ's own changes as it trains)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("π0's body is not loaded in this run: its stored pool carries π0's answers, "
                           "and nothing should ask π0 for hidden states")

