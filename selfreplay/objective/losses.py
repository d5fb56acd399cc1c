"""The blockwise losses of the objective (docs/method.md, "The objective").

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


def head_next_token_loss(hidden: torch.Tensor, head_weight: torch.Tensor, tokens: torch.Tensor,
                         compile: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`next_token_loss(hidden @ head_weight.T, tokens)` for final hidden states [B, T, D].
    compile: run each block's softmax arithmetic as one `torch.compile`d kernel.
    mask [B, T] (bool): the tokens whose prediction counts (a chat's assistant tokens, a
    sample's tokens before the padding after its EOS); the mean runs over those alone."""
    D = hidden.shape[-1]
    hidden, targets = hidden[:, :-1].reshape(-1, D), tokens[:, 1:].reshape(-1)
    if mask is not None:
        keep = mask[:, 1:].reshape(-1)
        hidden, targets = hidden[keep], targets[keep]
    if len(targets) == 0:  # nothing to predict: zero, still connected to the graph
        return hidden.sum().float() * 0.0
    return _HeadLoss.apply(*_graded(hidden, head_weight), targets, None, None, _compute_dtype(hidden), compile)


def head_kl_divergence(ref_hidden: torch.Tensor, ref_head_weight: torch.Tensor, hidden: torch.Tensor,
                       head_weight: torch.Tensor, compile: bool = False,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """`kl_divergence(ref_hidden @ ref_head_weight.T, hidden @ head_weight.T)`; gradients reach
    only `hidden` and `head_weight`. mask [B, T] (bool), as for `head_next_token_loss`: the
    mean runs over the positions t-1 whose next token t has mask[t] (position T-1, which
    predicts past the sequence, is then left out)."""
    D = hidden.shape[-1]
    ref_hidden = ref_hidden.detach()
    if mask is not None:
        keep = mask[:, 1:]
        hidden, ref_hidden = hidden[:, :-1][keep], ref_hidden[:, :-1][keep]
    hidden, ref_hidden = hidden.reshape(-1, D), ref_hidden.reshape(-1, D)
    if len(hidden) == 0:
        return hidden.sum().float() * 0.0
    return _HeadLoss.apply(*_graded(hidden, head_weight), None, ref_hidden, ref_head_weight.detach(),
                           _compute_dtype(hidden), compile)


def _graded(hidden: torch.Tensor, head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs as given, or detached under no_grad: a parameter still asks for its gradient
    there, and a measurement would pay for forming it."""
    if torch.is_grad_enabled():
        return hidden, head_weight
    return hidden.detach(), head_weight.detach()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for x, or x's own dtype outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _ntp_block(logits: torch.Tensor, targets: torch.Tensor, scale: float, dtype: torch.dtype):
    """(sum of −log softmax(logits)[target], scale · (softmax − one-hot) in dtype) for one block."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    loss = -logp.gather(1, targets[:, None]).sum()
    grad = logp.exp_()  # in place: the log-probabilities are not needed any more
    grad.scatter_add_(1, targets[:, None], torch.full(targets[:, None].shape, -1.0, device=grad.device))
    return loss, grad.mul_(scale).to(dtype)


def _kl_block(logits: torch.Tensor, ref_logits: torch.Tensor, scale: float, dtype: torch.dtype):
    """(sum of KL(softmax(ref_logits) ‖ softmax(logits)), scale · (softmax − ref softmax) in dtype)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    ref_p = ref_logp.exp()
    loss = (ref_p * (ref_logp - logp)).sum()
    return loss, logp.exp_().sub_(ref_p).mul_(scale).to(dtype)


_COMPILED_BLOCKS: dict = {}


def _block_functions(compile: bool):
    if not compile:
        return _ntp_block, _kl_block
    if not _COMPILED_BLOCKS:
        _COMPILED_BLOCKS.update(ntp=torch.compile(_ntp_block, dynamic=False),
                                kl=torch.compile(_kl_block, dynamic=False))
    return _COMPILED_BLOCKS["ntp"], _COMPILED_BLOCKS["kl"]


class _HeadLoss(torch.autograd.Function):
    """Mean over rows of the next-token loss (targets given) or of KL(π0 ‖ πθ) (π0's hidden
    states and head given), computed from hidden states [N, D] and the head [V, D]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_hidden, ref_weight, dtype, compile):
        N = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ntp_block, kl_block = _block_functions(compile)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            w0 = ref_weight.to(dtype) if ref_weight is not None else None
            for lo in range(0, N, HEAD_CHUNK_ROWS):
                hi = min(lo + HEAD_CHUNK_ROWS, N)
                h = hidden[lo:hi].to(dtype)
                if targets is not None:
                    loss, grad = ntp_block(h @ w.T, targets[lo:hi], 1.0 / N, dtype)
                else:
                    loss, grad = kl_block(h @ w.T, ref_hidden[lo:hi].to(dtype) @ w0.T, 1.0 / N, dtype)
                total += loss
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
                None, None, None, None, None)
