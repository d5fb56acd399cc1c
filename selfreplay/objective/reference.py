"""What finetuning keeps of π0 once training starts (docs/method.md, "Stored targets").

π0 runs during training to draw replay samples and to score rows whose answers were not kept.
A run that replays a pool drawn once (replay.pool=DIR with replay.reuse=0: it never draws) with
π0's answers stored beside the samples needs neither: with `hidden` targets the KL needs only
π0's output head [V, D]; with `topk:K` targets, or next-token replay, it needs nothing of π0.
Such a run does not load π0 at all: θ is π0 until the first step, so what the measurements keep
of π0 (its hidden states on the validation rows, its own loss there) is taken from θ before it
moves, and full finetuning then holds one model.
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
    HEAD = "π0's output head alone: the KL reads π0's stored hidden states"
    NOTHING = "nothing of π0: the KL reads π0's stored top-K answers, or the replay term needs no π0"


def reference_use(method: ReplayMethod, replay: ReplayConfig) -> ReferenceUse:
    """What of π0 a finetuning run with `method` and `replay` needs once it trains: only a run that
    replays a stored self-replay pool pass after pass (never drawing) can leave π0 out, and a KL
    can do so only when the pool carries π0's targets. A method without replay keeps π0 whole, for
    its own term (kl_new) or for measuring the KL to π0 on validation text."""
    if not method.needs_replay or replay.source != "self" or replay.pool is None or replay.reuse != 0:
        return ReferenceUse.MODEL
    if method is not REPLAY_KL:
        return ReferenceUse.NOTHING  # next-token replay reads the stored tokens alone
    targets = read_header(Path(replay.pool))["targets"]
    if targets == "none":
        return ReferenceUse.MODEL  # π0 scores the stored tokens at every step
    return ReferenceUse.HEAD if targets == "hidden" else ReferenceUse.NOTHING


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

