"""A replay batch, as every replay source gives it and the objective reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReplaySamples:
    """A replay batch: tokens [b, t]; mask [b, t], True on every real token (False on padding
    after a sample stopped at EOS), or None when every token is real; hidden [b, t, D]: π0's
    final hidden states on the tokens when the sampler kept them (the KL then needs no second
    pass of π0), or None."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, index) -> "ReplaySamples":
        """The samples at `index` (a slice or index tensor), each part alike."""
        pick = lambda t: t[index] if t is not None else None  # noqa: E731
        return ReplaySamples(self.tokens[index], pick(self.mask), pick(self.hidden))

    def trimmed(self) -> "ReplaySamples":
        """The batch cut after its longest sample: padding past every stop is not worth a forward pass."""
        if self.mask is None:
            return self
        width = int(self.mask.sum(1).max())
        return ReplaySamples(self.tokens[:, :width], self.mask[:, :width],
                             self.hidden[:, :width] if self.hidden is not None else None)

    def to(self, device) -> "ReplaySamples":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return ReplaySamples(self.tokens.to(device), move(self.mask), move(self.hidden))
