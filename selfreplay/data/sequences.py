"""Token files as training batches.

A token file is cut into sequences of length T; a seeded shuffle of the
sequences splits off a validation set; the first token of every sequence is
overwritten by the file's domain id (docs/method.md, "Data conventions"), which
is what lets a model later sample a domain starting from that id. Rows already
in memory (a Hugging Face model's conversations) may carry a mask [N, T]
saying which tokens' predictions count; token files have none. Training
reads reshuffled epochs, optionally mixing in a second file at a fixed
fraction of rows. A stream's position is its whole state, so a resumed run
reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from selfreplay.data.tokens import open_tokens
from selfreplay.errors import SelfReplayError


class TokenSequences:
    """A token file as [num_sequences, T] with a seeded train/validation split; `mask` [num_sequences, T]
    (True where a token's prediction counts) for rows given with one, else None: every token counts."""

    def __init__(self, path: str, T: int, val_sequences: int, seed: int = 0, fingerprint: str | None = None):
        tokens, self.meta = open_tokens(path, fingerprint)
        self.path, self.T, self.domain_id, self.mask = str(path), T, self.meta.domain_id, None
        count = len(tokens) // T
        self._split(tokens[: count * T].reshape(count, T), val_sequences, seed)  # still memory-mapped

    @classmethod
    def from_rows(cls, rows: np.ndarray, val_sequences: int, seed: int = 0, name: str = "rows",
                  mask: np.ndarray | None = None) -> "TokenSequences":
        """Rows [N, T] already in memory (a Hugging Face tokenizer's ids, say), with the same
        seeded split; no domain id: position 0 keeps its token. mask [N, T] (bool): the tokens
        whose prediction counts (a conversation's assistant tokens), None: all of them."""
        if mask is not None and np.shape(mask) != np.shape(rows):
            raise ValueError(f"mask {np.shape(mask)} and rows {np.shape(rows)} differ in shape")
        self = cls.__new__(cls)
        self.path, self.T, self.domain_id, self.meta = name, rows.shape[1], None, None
        self.mask = np.asarray(mask, dtype=bool) if mask is not None else None
        self._split(np.asarray(rows, dtype=np.int64), val_sequences, seed)
        return self

    def _split(self, sequences: np.ndarray, val_sequences: int, seed: int) -> None:
        count = len(sequences)
        if count < val_sequences + 1:
            raise SelfReplayError(
                f"{self.path} holds {count} sequences of {self.T} tokens, too few for {val_sequences} validation "
                f"sequences plus training: give more text or lower data.val_sequences")
        self.sequences = sequences
        order = np.random.default_rng(seed).permutation(count)
        self.val_index = np.sort(order[:val_sequences])
        self.train_index = order[val_sequences:]

    def check_vocabulary(self, V: int) -> None:
        """Refuse a file holding ids the model has no embedding for (one pass over the file)."""
        largest = max(int(self.sequences.max()), self.domain_id or 0)
        if largest >= V:
            flat = np.flatnonzero(self.sequences.reshape(-1) >= V)
            where = f" at position {flat[0]:,}" if len(flat) else " (its domain id)"
            raise SelfReplayError(f"{self.path} holds token id {largest}{where}, beyond the model's vocabulary "
                                  f"(model.V={V}): tokenize it with the run's tokenizer, or raise model.V")

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Sequences [len(index), T] (int64) with the domain id (if any) at position 0."""
        rows = self.sequences[np.asarray(index)].astype(np.int64)
        if self.domain_id is not None:
            rows[:, 0] = self.domain_id
        return rows

    def row_mask(self, index: np.ndarray) -> np.ndarray:
        """Which predictions count [len(index), T] (bool): the rows' mask, or all True without one."""
        if self.mask is None:
            return np.ones((len(index), self.T), dtype=bool)
        return self.mask[np.asarray(index)]

    def validation(self) -> torch.Tensor:
        """The held-out sequences [val_sequences, T]."""
        return torch.from_numpy(self.rows(self.val_index))

    def validation_mask(self) -> torch.Tensor | None:
        """The held-out sequences' mask [val_sequences, T], or None when every token counts."""
        return torch.from_numpy(self.row_mask(self.val_index)) if self.mask is not None else None

    @property
    def train_tokens(self) -> int:
        return len(self.train_index) * self.T


class SequenceStream:
    """Endless reshuffled epochs over the training sequences of a TokenSequences."""

    def __init__(self, sequences: TokenSequences, seed: int = 0):
        self.sequences, self.seed = sequences, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.sequences.train_index)

    def take(self, n: int) -> np.ndarray:
        """The next n training sequences [n, T], moving into the next epoch when one runs out."""
        return self.sequences.rows(self.take_index(n))

    def take_index(self, n: int) -> np.ndarray:
        """The indices of the next n training sequences (the stream moves past them)."""
        parts = []
        while n > 0:
            chunk = self._order[self.cursor:self.cursor + n]
            parts.append(chunk)
            self.cursor += len(chunk)
            n -= len(chunk)
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / len(self._order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)


class BatchLoader:
    """Batches [B, T] from a primary stream, with a fraction of rows from a second stream, each
    with its mask [B, T] when a stream's rows carry one (None when no row does).

    Batch i takes floor((i+1)·f·B) − floor(i·f·B) rows from `mix`, so after n batches
    exactly floor(n·f·B) rows came from it.
    """

    def __init__(self, primary: SequenceStream, batch_size: int, mix: SequenceStream | None = None,
                 mix_fraction: float = 0.0):
        if not 0.0 <= mix_fraction <= 1.0:
            raise SelfReplayError(f"data.mix_fraction must be in [0, 1], got {mix_fraction}")
        if mix_fraction > 0 and mix is None:
            raise SelfReplayError("data.mix_fraction > 0 needs a second token file in data.mix")
        self.primary, self.mix, self.mix_fraction = primary, mix, mix_fraction
        self.batch_size, self.step = batch_size, 0

    def mix_rows(self, step: int) -> int:
        rows = lambda n: math.floor(n * self.mix_fraction * self.batch_size + 1e-9)  # noqa: E731
        return rows(step + 1) - rows(step)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows [B, T], mask [B, T]: True where a prediction counts, or None: every one counts)."""
        k = self.mix_rows(self.step) if self.mix is not None else 0
        parts = [(self.primary.sequences, self.primary.take_index(self.batch_size - k))]
        if k:
            parts.append((self.mix.sequences, self.mix.take_index(k)))
        self.step += 1
        tokens = torch.from_numpy(np.concatenate([rows.rows(index) for rows, index in parts]))
        if all(rows.mask is None for rows, _ in parts):
            return tokens, None
        return tokens, torch.from_numpy(np.concatenate([rows.row_mask(index) for rows, index in parts]))

    def state_dict(self) -> dict:
        return {"step": self.step, "primary": self.primary.state_dict(),
                "mix": self.mix.state_dict() if self.mix is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.primary.load_state_dict(state["primary"])
        if self.mix is not None and state.get("mix") is not None:
            self.mix.load_state_dict(state["mix"])


@dataclass
class Data:
    """The rows of a run, read and checked before anything is written."""

    tokenizer: object
    train: TokenSequences
    old: TokenSequences | None
    mix: TokenSequences | None
    replay_format: object | None = None  # init=hf: where replay samples start (selfreplay.replay.hf_sampling.ReplayFormat)
