"""Measurements: validation losses, KL to the pretrained model, weight drift, compute multiplier.

Forgetting = old_loss − old_loss_0 (nats), the rise of the old domain's
validation loss over finetuning (docs/method.md, "What is measured").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfreplay.objective.losses import head_kl_divergence, head_next_token_loss, token_kl, token_losses


@torch.inference_mode()
def evaluate(model, tokens: torch.Tensor, reference=None, batch_size: int = 64,
             reference_logprobs: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Mean next-token loss, its second half (predictions of positions ≥ T/2) and, given the
    frozen reference model (or its log-probabilities per batch), the mean KL(π0 ‖ πθ) over
    positions, on sequences [N, T]; nats."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = half_sum = kl_sum = 0.0
    half = tokens.shape[1] // 2
    for i, lo in enumerate(range(0, len(tokens), batch_size)):
        batch = tokens[lo:lo + batch_size].to(device)
        logits = model(batch)
        losses = token_losses(logits, batch)  # [b, T-1]; column j predicts position j+1
        loss_sum += losses.sum().item()
        half_sum += losses[:, half - 1:].sum().item()
        if reference_logprobs is not None:
            kl_sum += token_kl(reference_logprobs[i], logits).sum().item()
        elif reference is not None:
            kl_sum += token_kl(reference(batch), logits).sum().item()
    model.train(was_training)
    N, T = tokens.shape
    out = {"loss": loss_sum / (N * (T - 1)), "loss_second_half": half_sum / (N * (T - half))}
    if reference is not None or reference_logprobs is not None:
        out["kl"] = kl_sum / (N * T)
    return out


class ValidationSet:
    """Held-out sequences [N, T] of one domain. π0's log-probabilities on them never change
    during finetuning, so they are computed once when they fit in `cache_bytes`."""

    def __init__(self, tokens: torch.Tensor, reference=None, batch_size: int = 64, cache_bytes: int = 1 << 30):
        self.tokens, self.reference, self.batch_size = tokens, reference, batch_size
        self.reference_logprobs = None
        vocab = reference.config.V if reference is not None else 0
        if reference is not None and tokens.numel() * vocab * 4 <= cache_bytes:
            device = next(reference.parameters()).device
            with torch.inference_mode():
                self.reference_logprobs = [
                    torch.log_softmax(reference(tokens[lo:lo + batch_size].to(device)).float(), dim=-1)
                    for lo in range(0, len(tokens), batch_size)]

    def evaluate(self, model) -> dict[str, float]:
        return evaluate(model, self.tokens, self.reference, self.batch_size, self.reference_logprobs)


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


class HeadValidationSet:
    """Held-out rows [N, T] measured through hidden states and the head, a batch at a time with
    the blockwise losses (a 128k vocabulary's logits never exist whole); nats. mask [N, T]: the
    tokens whose prediction counts (a conversation's assistant tokens), None: every one."""

    def __init__(self, tokens: torch.Tensor, reference, mask: torch.Tensor | None = None, batch_size: int = 8):
        self.tokens, self.reference, self.mask, self.batch_size = tokens, reference, mask, batch_size

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """loss (every counted prediction), loss_second_half (those of positions ≥ T/2; left out
        when none counts there) and kl = KL(π0 ‖ πθ) (every position; with a mask, the positions
        predicting a counted token)."""
        model.eval()
        device = model.head.weight.device
        N, T = self.tokens.shape
        sums, counts = {"loss": 0.0, "loss_second_half": 0.0, "kl": 0.0}, {"loss": 0, "loss_second_half": 0, "kl": 0}
        for lo in range(0, N, self.batch_size):
            batch = self.tokens[lo:lo + self.batch_size].to(device)
            mask = self.mask[lo:lo + self.batch_size].to(device) if self.mask is not None else None
            counted = mask if mask is not None else torch.ones_like(batch, dtype=torch.bool)
            second_half = counted.clone()
            second_half[:, : T // 2] = False
            hidden, ref_hidden = model.hidden(batch), self.reference.hidden(batch)
            head, ref_head = model.head.weight, self.reference.head.weight
            n = {"loss": int(counted[:, 1:].sum()), "loss_second_half": int(second_half[:, 1:].sum())}
            n["kl"] = n["loss"] if mask is not None else batch.numel()  # unmasked: position T-1 too
            sums["loss"] += n["loss"] * head_next_token_loss(hidden, head, batch, mask=mask).item()
            sums["loss_second_half"] += n["loss_second_half"] * head_next_token_loss(hidden, head, batch,
                                                                                    mask=second_half).item()
            sums["kl"] += n["kl"] * head_kl_divergence(ref_hidden, ref_head, hidden, head, mask=mask).item()
            counts = {key: counts[key] + n[key] for key in counts}
        model.train()
        return {key: sums[key] / counts[key] for key in sums if counts[key]}
