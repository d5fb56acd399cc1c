"""The finetuning objective: loss = NTP(θ; x_new) + c · R (REFERENCE.md, "Finetuning objective").

Everything here is computed in float32, whatever precision the logits came in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token loss per prediction [B, T-1] (nats) for logits [B, T, V] of tokens [B, T]."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), tokens[:, 1:].reshape(-1),
                           reduction="none").view(tokens.shape[0], -1)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss (nats per token) over the B·(T-1) predictions."""
    return token_losses(logits, tokens).mean()


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(π0 ‖ πθ) per position [B, T] (nats) over the full vocabulary, from logits [B, T, V]
    (π0's may also be given as log-probabilities: log_softmax leaves those unchanged)."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(π0(·|x<t) ‖ πθ(·|x<t)) (nats); gradients reach only `logits`."""
    ref_logp = F.log_softmax(ref_logits.detach().float(), dim=-1).flatten(0, -2)
    logp = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")
