"""A replay batch, as every replay source gives it and the objective reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TopKTargets:
    """π0's top-K answers at every position of a batch (docs/method.md, "Stored targets"): logp
    [b, t, K] its K largest log-probabilities, ids [b, t, K] their tokens, rest [b, t] the log of
    the mass left over (selfreplay.objective.losses.topk_targets)."""

    logp: torch.Tensor
    ids: torch.Tensor
    rest: torch.Tensor

    def map(self, f) -> "TopKTargets":
        return TopKTargets(f(self.logp), f(self.ids), f(self.rest))


@dataclass
class ReplaySamples:
    """A replay batch: tokens [b, t]; mask [b, t], True on every real token (False on padding
    after a sample stopped at EOS), or None when every token is real; and what the KL needs of
    π0 on them, where it was kept (the KL then runs no π0): hidden [b, t, D], π0's final hidden
    states (kept by the sampler, or stored), or topk, π0's stored top-K answers; None: π0 runs."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    topk: TopKTargets | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def _map(self, f) -> "ReplaySamples":
        """Every part with f applied (the same rows, columns or device for each)."""
        pick = lambda t: f(t) if t is not None else None  # noqa: E731
        return ReplaySamples(f(self.tokens), pick(self.mask), pick(self.hidden),
                             self.topk.map(f) if self.topk is not None else None)

    def rows(self, index) -> "ReplaySamples":
        """The samples at `index` (a slice or index tensor), each part alike."""
        return self._map(lambda t: t[index])

    def trimmed(self) -> "ReplaySamples":
        """The batch cut after its longest sample: padding past every stop is not worth a forward pass."""
        if self.mask is None:
            return self
        width = int(self.mask.sum(1).max())
        return self._map(lambda t: t[:, :width])

    def to(self, device) -> "ReplaySamples":
        return self._map(lambda t: t.to(device))
