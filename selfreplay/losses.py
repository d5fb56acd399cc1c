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


# ---------------------------------------------------------------- fused with the output projection
#
# The [rows, V] logits of a training batch are the largest tensors of a step (V = 4096 and
# 4k rows: 64 MiB in float32) and the cross-entropy around them is memory-bound. These
# losses take the final hidden states instead and run the output projection, the float32
# log-softmax, the loss and its gradient one block of rows at a time, so the logits never
# exist in full. The gradient is formed in the forward pass (softmax − target, the same
# expression autograd would build) and only scaled in the backward pass.

HEAD_CHUNK_ROWS = 512


def head_next_token_loss(hidden: torch.Tensor, head_weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`next_token_loss(hidden @ head_weight.T, tokens)` for final hidden states [B, T, D]."""
    D = hidden.shape[-1]
    return _HeadLoss.apply(hidden[:, :-1].reshape(-1, D), head_weight, tokens[:, 1:].reshape(-1), None, None,
                           _compute_dtype(hidden))


def head_kl_divergence(ref_hidden: torch.Tensor, ref_head_weight: torch.Tensor, hidden: torch.Tensor,
                       head_weight: torch.Tensor) -> torch.Tensor:
    """`kl_divergence(ref_hidden @ ref_head_weight.T, hidden @ head_weight.T)`; gradients reach
    only `hidden` and `head_weight`."""
    D = hidden.shape[-1]
    return _HeadLoss.apply(hidden.reshape(-1, D), head_weight, None, ref_hidden.detach().reshape(-1, D),
                           ref_head_weight.detach(), _compute_dtype(hidden))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for x, or x's own dtype outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _HeadLoss(torch.autograd.Function):
    """Mean over rows of the next-token loss (targets given) or of KL(π0 ‖ πθ) (π0's hidden
    states and head given), computed from hidden states [N, D] and the head [V, D]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_hidden, ref_weight, dtype):
        N = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            w0 = ref_weight.to(dtype) if ref_weight is not None else None
            for lo in range(0, N, HEAD_CHUNK_ROWS):
                hi = min(lo + HEAD_CHUNK_ROWS, N)
                h = hidden[lo:hi].to(dtype)
                logp = torch.log_softmax((h @ w.T).float(), dim=-1)
                if targets is not None:
                    rows = torch.arange(hi - lo, device=hidden.device)
                    total -= logp[rows, targets[lo:hi]].sum()
                    target_p = None
                else:
                    ref_logp = torch.log_softmax((ref_hidden[lo:hi].to(dtype) @ w0.T).float(), dim=-1)
                    target_p = ref_logp.exp()
                    total += (target_p * (ref_logp - logp)).sum()
                if not (want_hidden or want_weight):
                    continue
                grad = logp.exp_()  # softmax, in place of the log-probabilities
                if target_p is None:
                    grad[rows, targets[lo:hi]] -= 1.0
                else:
                    grad -= target_p
                grad = grad.mul_(1.0 / N).to(dtype)
                if want_hidden:
                    grad_hidden[lo:hi] = grad @ w
                if want_weight:
                    grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / N

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output if grad_hidden is not None else None,
                (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None,
                None, None, None, None)
