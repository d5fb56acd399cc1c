"""Replay sequences: sampled from the frozen pretrained model π0 (self) or read from old data (real).

One `ReplayPool` serves every model family (docs/method.md, "The replay pool"). It holds `size`
samples of π0, drawn together by a family's `draw` callable (the built-in KV-cache sampler,
or a Hugging Face model's decoding), and gives them out `batch_size` at a time; an empty pool
is drawn again, so no sample is replayed twice. π0 is frozen, so one large draw has the
distribution of several small ones, and decodes faster. Where the KL needs them, the draw
keeps π0's final hidden states on its samples, and the KL then needs no second pass of π0.
Samples stored beforehand (a pool directory from `selfreplay sample`) are replayed first.

Every source gives `next_batch() -> ReplaySamples` and round-trips `state_dict()`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from selfreplay.config import ReplayConfig
from selfreplay.data.sequences import SequenceStream
from selfreplay.errors import SelfReplayError
from selfreplay.replay.samples import ReplaySamples
from selfreplay.replay.sampling import sample
from selfreplay.replay.store import ReuseOrder, StoredPool

# draw(count, generator, offset) -> count fresh samples of π0; offset: samples drawn before
# (a chat pool takes its prompts in turn from there)
Draw = Callable[[int, torch.Generator, int], ReplaySamples]


def pool_size(batch_size: int, buffer: int, decode_batch: int) -> int:
    """Samples a pool holds: `buffer` replay batches, or enough whole batches for one decode
    batch of `decode_batch` samples when that is more."""
    return batch_size * max(buffer, math.ceil(decode_batch / batch_size))


class ReplayPool:
    """Replay batches [batch_size, t] of π0's samples: first those of `stored`, a pool drawn once
    (selfreplay.replay.store), replayed for `reuse` passes, each pass in its own seeded order (0:
    pass after pass, never drawing), then fresh draws of `size` samples. Of a stored pool, a rank
    of `world_size` takes every world_size-th sample from `rank`. `score(tokens)` gives π0's
    hidden states [b, t, D] for stored samples that carry no targets (the KL), or is None."""

    def __init__(self, draw: Draw | None, batch_size: int, size: int, device, seed: int = 0,
                 stored: StoredPool | None = None, reuse: int = 1, score=None, rank: int = 0, world_size: int = 1):
        self.draw, self.batch_size, self.size, self.device = draw, batch_size, size, device
        self.stored, self.reuse, self.score = stored, reuse, score
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.pool: ReplaySamples | None = None
        self.cursor = 0
        self.draws = 0  # pools drawn from π0 so far
        self.stored_rows = torch.arange(rank, len(stored), world_size) if stored is not None else None
        if stored is not None and not len(self.stored_rows):
            raise SelfReplayError(f"{stored.dir} holds too few samples to give rank {rank} of {world_size} any")
        self.order = ReuseOrder(len(self.stored_rows), batch_size, seed) if stored is not None else None

    @property
    def replaying_stored(self) -> bool:
        return self.order is not None and (self.reuse == 0 or self.order.pass_ < self.reuse)

    def next_batch(self) -> ReplaySamples:
        if self.replaying_stored:
            return self._from_stored()
        if self.pool is None or self.cursor >= len(self.pool):
            self.refill()
        batch = self.pool.rows(slice(self.cursor, self.cursor + self.batch_size))
        self.cursor += self.batch_size
        return batch.trimmed()

    def refill(self) -> None:
        """Draw `size` fresh samples from π0."""
        if self.draw is None:
            raise SelfReplayError("the stored replay pool is used up and this run cannot draw from π0: "
                                  "set replay.reuse=0 to replay it pass after pass")
        self.pool = self.draw(self.size, self.generator, self.draws * self.size)
        self.cursor, self.draws = 0, self.draws + 1

    def _from_stored(self) -> ReplaySamples:
        batch = self.stored.take(self.stored_rows[self.order.next_indices()])[0].to(self.device).trimmed()
        if batch.hidden is None and batch.topk is None and self.score is not None:
            with torch.no_grad():
                batch.hidden = self.score(batch.tokens)
        return batch

    def state_dict(self) -> dict:
        """Positions and counts, and as tensors (None where absent) the generator's state and the
        current draw: pool (tokens), mask and hidden."""
        pool = self.pool or ReplaySamples(None)
        return {"cursor": self.cursor, "draws": self.draws, "order": self.order.state_dict() if self.order else None,
                "generator": self.generator.get_state(), "pool": pool.tokens, "mask": pool.mask, "hidden": pool.hidden}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.draws = int(state["cursor"]), int(state["draws"])
        if self.order is not None and state.get("order") is not None:
            self.order.load_state_dict(state["order"])
        self.generator.set_state(state["generator"])
        tokens = state.get("pool")
        self.pool = ReplaySamples(tokens, state.get("mask"), state.get("hidden")).to(self.device) \
            if tokens is not None else None


def builtin_draw(reference, domain_id: int | list[int], replay: ReplayConfig, keep_hidden: bool) -> Draw:
    """How the built-in Transformer `reference` draws: samples [count, T], each started at
    `domain_id`, or, given several ids, at each in turn (replay of every earlier task in
    continual learning, say); with π0's hidden states when keep_hidden (what the KL needs; NTP
    replay needs only tokens). replay.compile: decode through a torch.compile'd step."""
    device = next(reference.parameters()).device
    ids = torch.as_tensor(domain_id, dtype=torch.long).reshape(-1)

    def draw(count: int, generator: torch.Generator, offset: int) -> ReplaySamples:
        first_tokens = ids.repeat(count // len(ids) + 1)[:count].to(device)
        drawn = sample(reference, first_tokens, count, temperature=replay.temperature, generator=generator,
                       batch_size=replay.decode_batch, return_hidden=keep_hidden, compile=replay.compile)
        return ReplaySamples(drawn[0], hidden=drawn[1]) if keep_hidden else ReplaySamples(drawn)

    return draw


def self_replay_pool(reference, domain_id: int | list[int], replay: ReplayConfig, keep_hidden: bool, seed: int = 0,
                     batch_size: int | None = None, stored: StoredPool | None = None) -> ReplayPool:
    """The pool of the built-in Transformer `reference`'s samples that `replay` describes
    (`builtin_draw`), after the samples of `stored` when given. batch_size: rows a batch, when
    not replay.batch_size (rows mixed into the new batch: replay.fraction)."""
    batch_size = batch_size or replay.batch_size
    return ReplayPool(builtin_draw(reference, domain_id, replay, keep_hidden), batch_size,
                      pool_size(batch_size, replay.buffer, replay.decode_batch), next(reference.parameters()).device,
                      seed, stored, replay.reuse, reference.hidden if keep_hidden else None)


def stored_replay(stored: StoredPool, batch_size: int, device, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> ReplayPool:
    """The samples of `stored` pass after pass, each pass in its own seeded order, never drawing
    (replay.reuse=0): the pool of a run that holds no π0 (selfreplay.objective.reference)."""
    return ReplayPool(None, batch_size, batch_size, device, seed, stored, reuse=0, rank=rank, world_size=world_size)


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
