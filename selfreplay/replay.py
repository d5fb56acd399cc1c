"""Replay sequences: sampled from the frozen pretrained model (self) or read from old data (real).

A self-replay pool holds `buffer × batch_size` fresh samples of π0 started at
the old domain id; each training step consumes one replay batch, and an empty
pool is redrawn, so the same sample is never replayed twice.
"""

from __future__ import annotations

import torch

from selfreplay.data import SequenceStream
from selfreplay.model import Transformer
from selfreplay.sampling import sample


class SelfReplayPool:
    """Replay batches [batch_size, T] sampled from the frozen model `reference`."""

    def __init__(self, reference: Transformer, domain_id: int, batch_size: int, buffer: int,
                 temperature: float = 1.0, seed: int = 0):
        self.reference, self.domain_id = reference, domain_id
        self.batch_size, self.buffer, self.temperature = batch_size, buffer, temperature
        device = next(reference.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.pool: torch.Tensor | None = None
        self.cursor = 0
        self.draws = 0  # pools sampled so far

    def refill(self) -> None:
        self.pool = sample(self.reference, self.domain_id, self.buffer * self.batch_size,
                           temperature=self.temperature, generator=self.generator)
        self.cursor, self.draws = 0, self.draws + 1

    def next_batch(self) -> torch.Tensor:
        if self.pool is None or self.cursor == len(self.pool):
            self.refill()
        batch = self.pool[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "draws": self.draws, "generator": self.generator.get_state(),
                "pool": self.pool}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.draws = int(state["cursor"]), int(state["draws"])
        self.generator.set_state(state["generator"])
        self.pool = state["pool"]


class RealReplay:
    """Replay batches read from the old domain's training sequences."""

    def __init__(self, stream: SequenceStream, batch_size: int, device: torch.device | str = "cpu"):
        self.stream, self.batch_size, self.device = stream, batch_size, device

    def next_batch(self) -> torch.Tensor:
        return torch.from_numpy(self.stream.take(self.batch_size)).to(self.device)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
