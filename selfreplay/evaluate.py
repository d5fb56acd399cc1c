"""Measurements: validation losses, KL to the pretrained model, weight drift, compute multiplier.

Forgetting = old_loss − old_loss_0 (nats), the rise of the old domain's
validation loss over finetuning (REFERENCE.md, "What is measured").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfreplay.losses import token_kl, token_losses


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
