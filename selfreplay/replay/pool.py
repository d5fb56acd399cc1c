"""Replay sequences: sampled from the frozen pretrained model (self) or read from old data (real).

A self-replay pool holds `buffer × batch_size` fresh samples of π0 started at
the old domain id, or `decode_batch` when that is more (π0 is frozen, so one large draw
has the distribution of several small ones, and decodes faster); each training step
consumes one replay batch, and an empty pool is redrawn, so the same sample is never
replayed twice. Decoding the pool
computes π0's final hidden states at every position of every sample; the pool
keeps them, so the KL penalty needs no second forward pass of π0 over its own
samples.

Both sources give `next_batch() -> ReplaySamples` (tokens [b, T], and π0's hidden states
[b, T, D] when the pool kept them).
"""

from __future__ import annotations

import math

import torch

from selfreplay.data.sequences import SequenceStream
from selfreplay.model.transformer import Transformer
from selfreplay.objective.methods import ReplaySamples
from selfreplay.replay.sampling import sample


class SelfReplayPool:
    """Replay batches [batch_size, T] sampled from the frozen model `reference`, with its hidden
    states on them when keep_hidden (what the KL penalty needs; NTP replay needs only tokens).

    Samples start at `domain_id`, or, given several ids, at each in turn (replay of every
    earlier task in continual learning, say). compile: decode through a torch.compile'd step
    (`sample`)."""

    def __init__(self, reference: Transformer, domain_id: int | list[int], batch_size: int, buffer: int,
                 temperature: float = 1.0, seed: int = 0, keep_hidden: bool = True, decode_batch: int | None = None,
                 compile: bool = False):
        self.reference, self.keep_hidden, self.compile = reference, keep_hidden, compile
        self.batch_size, self.temperature = batch_size, temperature
        self.decode_batch = decode_batch or buffer * batch_size
        # a pool is a whole number of replay batches: buffer of them, or enough for decode_batch
        self.size = batch_size * max(buffer, math.ceil(self.decode_batch / batch_size))
        device = next(reference.parameters()).device
        ids = torch.as_tensor(domain_id, dtype=torch.long).reshape(-1)
        self.first_tokens = ids.repeat(self.size // len(ids) + 1)[:self.size].to(device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.pool: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.cursor = 0
        self.draws = 0  # pools sampled so far

    def refill(self) -> None:
        drawn = sample(self.reference, self.first_tokens, self.size, temperature=self.temperature,
                       generator=self.generator, batch_size=self.decode_batch, return_hidden=self.keep_hidden,
                       compile=self.compile)
        self.pool, self.hidden = drawn if self.keep_hidden else (drawn, None)
        self.cursor, self.draws = 0, self.draws + 1

    def next_batch(self) -> ReplaySamples:
        if self.pool is None or self.cursor == len(self.pool):
            self.refill()
        rows = slice(self.cursor, self.cursor + self.batch_size)
        self.cursor += self.batch_size
        return ReplaySamples(self.pool[rows], hidden=self.hidden[rows] if self.hidden is not None else None)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "draws": self.draws, "generator": self.generator.get_state(),
                "pool": self.pool, "hidden": self.hidden}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.draws = int(state["cursor"]), int(state["draws"])
        self.generator.set_state(state["generator"])
        self.pool, self.hidden = state["pool"], state.get("hidden")


class RealReplay:
    """Replay batches read from the old domain's training sequences."""

    def __init__(self, stream: SequenceStream, batch_size: int, device: torch.device | str = "cpu"):
        self.stream, self.batch_size, self.device = stream, batch_size, device

    def next_batch(self) -> ReplaySamples:
        return ReplaySamples(torch.from_numpy(self.stream.take(self.batch_size)).to(self.device))

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
