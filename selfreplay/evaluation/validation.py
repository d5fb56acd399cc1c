"""Measurements: validation losses, KL to the pretrained model, weight drift, compute multiplier.

Forgetting = old_loss − old_loss_0 (nats), the rise of the old domain's
validation loss over finetuning (docs/method.md, "What is measured"), for every front end: `Measurements`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from selfreplay.objective.losses import head_kl_divergence, head_next_token_loss


class ValidationSet:
    """Held-out rows [N, T] of one domain, measured through the final hidden states and the head,
    a batch at a time with the blockwise losses (a 128k vocabulary's logits never exist whole),
    for every model family and front end. mask [N, T]: the tokens whose prediction counts (a
    conversation's assistant tokens); None: every one. π0 is frozen, so its hidden states on
    the rows are kept once when they fit in `cache_bytes`."""

    def __init__(self, tokens: torch.Tensor, reference=None, mask: torch.Tensor | None = None, batch_size: int = 64,
                 cache_bytes: int = 1 << 30):
        self.tokens, self.reference, self.mask, self.batch_size = tokens, reference, mask, batch_size
        self.reference_hidden: list[torch.Tensor] | None = None
        self._reference_loss: float | None = None
        if reference is not None and tokens.numel() * reference.head.weight.shape[1] * 4 <= cache_bytes:
            self.reference_hidden = [self._hidden(reference, batch) for _, batch, _ in self._batches(reference)]

    def _batches(self, model):
        device = model.head.weight.device
        for lo in range(0, len(self.tokens), self.batch_size):
            mask = self.mask[lo:lo + self.batch_size].to(device) if self.mask is not None else None
            yield lo // self.batch_size, self.tokens[lo:lo + self.batch_size].to(device), mask

    @staticmethod
    @torch.no_grad()
    def _hidden(model, batch: torch.Tensor) -> torch.Tensor:
        return model.hidden(batch)

    def _reference_hidden_of(self, i: int, batch: torch.Tensor) -> torch.Tensor:
        if self.reference_hidden is None:
            return self._hidden(self.reference, batch)
        return self.reference_hidden[i].to(batch.device)

    def keep_without_reference(self, head=None) -> None:
        """Keep what the measurements need of π0 now, while `self.reference` is still π0 (θ before
        its first step, say), and never run it again: its hidden states on the rows (on the CPU
        where they exceed the cache) and its own loss. The KL is then measured against `head`
        (anything with `head.weight` [V, D]: π0's output head), or not at all when head is None."""
        if self.reference is None:
            return
        if self.reference_hidden is None:
            self.reference_hidden = [self._hidden(self.reference, batch).cpu()
                                     for _, batch, _ in self._batches(self.reference)]
        self.reference_loss()
        self.reference = head

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """loss (every counted prediction), loss_second_half (those of positions ≥ T/2; left out
        when none counts there) and, with π0, kl = KL(π0 ‖ πθ) (every position; with a mask, the
        positions predicting a counted token); nats."""
        was_training = model.training
        model.eval()
        T = self.tokens.shape[1]
        sums, counts = dict.fromkeys(("loss", "loss_second_half", "kl"), 0.0), dict.fromkeys(("loss", "loss_second_half", "kl"), 0)
        for i, batch, mask in self._batches(model):
            counted = mask if mask is not None else torch.ones_like(batch, dtype=torch.bool)
            second_half = counted.clone()
            second_half[:, : T // 2] = False
            hidden, head = model.hidden(batch), model.head.weight
            terms = {"loss": (counted, lambda: head_next_token_loss(hidden, head, batch, mask=mask)),
                     "loss_second_half": (second_half, lambda: head_next_token_loss(hidden, head, batch, mask=second_half))}
            if self.reference is not None:
                ref_hidden = self._reference_hidden_of(i, batch)
                kl = lambda: head_kl_divergence(ref_hidden, self.reference.head.weight, hidden, head, mask=mask)  # noqa: E731
                terms["kl"] = (counted if mask is not None else None, kl)  # unmasked: position T-1 too
            for key, (where, term) in terms.items():
                n = int(where[:, 1:].sum()) if where is not None else batch.numel()
                if n:
                    sums[key] += n * term().item()
                    counts[key] += n
        model.train(was_training)
        return {key: sums[key] / counts[key] for key in sums if counts[key]}

    @torch.no_grad()
    def reference_loss(self) -> float:
        """π0's own loss on the rows (nats): forgetting is the rise of the finetuned model's over it."""
        if self._reference_loss is None:
            if self.reference is None:
                raise RuntimeError("π0's loss is measured where π0 is given (ValidationSet(tokens, reference))")
            total = count = 0.0
            for i, batch, mask in self._batches(self.reference):
                counted = mask if mask is not None else torch.ones_like(batch, dtype=torch.bool)
                n = int(counted[:, 1:].sum())
                if n:
                    ref_hidden = self._reference_hidden_of(i, batch)
                    total += n * head_next_token_loss(ref_hidden, self.reference.head.weight, batch, mask=mask).item()
                    count += n
            self._reference_loss = total / count
        return self._reference_loss


class Measurements:
    """The validation sets of a run, by domain (new, old, mix), measured together, with forgetting
    against one baseline for every front end: old_loss_0, the old domain's loss of the model before
    its first step (θ is π0 then; the same weights and precision as every later measurement).
    The first measurement at step 0 sets it; a run resumed later brings it back with `old_loss_0`."""

    def __init__(self, sets: dict[str, ValidationSet], old_loss_0: float | None = None):
        self.sets, self.old_loss_0 = sets, old_loss_0

    def measure(self, model, step: int) -> dict[str, float]:
        """{domain}_loss, {domain}_loss_second_half, {domain}_kl (where measured) and forgetting
        = old_loss − old_loss_0 (nats), once the baseline is known."""
        metrics = {}
        for name, validation_set in self.sets.items():
            result = validation_set.evaluate(model)
            metrics[f"{name}_loss"] = result["loss"]
            for key in ("loss_second_half", "kl"):  # absent where nothing counts there, or without π0
                if key in result:
                    metrics[f"{name}_{key}"] = result[key]
        if "old_loss" in metrics:
            if self.old_loss_0 is None and step == 0:
                self.old_loss_0 = metrics["old_loss"]
            if self.old_loss_0 is not None:
                metrics["forgetting"] = metrics["old_loss"] - self.old_loss_0
        return metrics


@contextlib.contextmanager
def standing_for_reference(model):
    """θ before its first step, measured as π0: in eval mode (π0's measurements take no dropout),
    back in its own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate(model, tokens: torch.Tensor, reference=None, batch_size: int = 64) -> dict[str, float]:
    """`ValidationSet(tokens, reference).evaluate(model)` for sequences [N, T], once."""
    return ValidationSet(tokens, reference, batch_size=batch_size, cache_bytes=0).evaluate(model)


@torch.no_grad()
def weight_drift(weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                 init: dict[str, torch.Tensor]) -> float:
    """‖θ − θ0‖ / ‖θ0 − θinit‖ over all weights: finetuning's move relative to pretraining's."""
    moved = pretrained = 0.0
    for name, w in weights.items():
        if name in start and name in init:
            moved += (w.float() - start[name].float()).pow(2).sum().item()
            pretrained += (start[name].float() - init[name].float()).pow(2).sum().item()
    return (moved / pretrained) ** 0.5 if pretrained > 0 else float("nan")


def compute_multiplier(pretrain_metrics: str | Path, old_loss: float) -> float | None:
    """Fraction of pretraining whose checkpoint already had an old-domain loss ≤ old_loss:
    tokens at the first such log point over the run's total tokens (1.0: nothing lost)."""
    path = Path(pretrain_metrics)
    if not path.is_file():
        return None
    curve = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curve = [p for p in curve if p.get("old_loss") is not None]
    if not curve or curve[-1]["tokens"] <= 0:
        return None
    total = curve[-1]["tokens"]
    for point in curve:
        if point["old_loss"] <= old_loss:
            return point["tokens"] / total
    return 1.0
