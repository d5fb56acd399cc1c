"""The blockwise losses of the objective (docs/method.md, "The objective").

Everything here is computed in float32, whatever precision the logits came in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selfreplay.errors import SelfReplayError


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

HEAD_CHUNK_ROWS = 512  # rows per block at most
HEAD_BLOCK_BYTES = 64 * 2**20  # and at most this much of float32 logits per block, whatever V
HEAD_MIN_ROWS = 16  # but never fewer rows than this (a block of a few rows is all call overhead)


def head_block_rows(V: int) -> int:
    """Rows per block for a vocabulary of V: HEAD_CHUNK_ROWS up to V = 32k, fewer beyond, so a
    block's logits stay within HEAD_BLOCK_BYTES (V = 128k: 128 rows). A block holds a few [rows, V]
    float32 tensors at once (the logits, π0's, the softmax, the gradient): with 512 rows at V = 128k
    they set the loss's peak memory; 128 rows took a third of it, and less time
    (benchmarks/head_blocks.py)."""
    return min(HEAD_CHUNK_ROWS, max(HEAD_MIN_ROWS, HEAD_BLOCK_BYTES // (4 * V)))


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
    N, dtype, ntp_block = len(targets), _compute_dtype(hidden), _block_function("ntp", compile)

    def block(lo, hi, logits):
        return ntp_block(logits, targets[lo:hi], 1.0 / N, dtype)
    return _HeadLoss.apply(*_graded(hidden, head_weight), block, dtype)


def head_kl_divergence(ref_hidden: torch.Tensor, ref_head_weight: torch.Tensor, hidden: torch.Tensor,
                       head_weight: torch.Tensor, compile: bool = False,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """`kl_divergence(ref_hidden @ ref_head_weight.T, hidden @ head_weight.T)`; gradients reach
    only `hidden` and `head_weight`. mask [B, T] (bool), as for `head_next_token_loss`: the
    mean runs over the positions t-1 whose next token t has mask[t] (position T-1, which
    predicts past the sequence, is then left out)."""
    hidden, ref_hidden = _kl_positions(hidden, mask), _kl_positions(ref_hidden.detach(), mask)
    if len(hidden) == 0:
        return hidden.sum().float() * 0.0
    N, dtype, kl_block = len(hidden), _compute_dtype(hidden), _block_function("kl", compile)
    ref_weight = ref_head_weight.detach().to(dtype)

    def block(lo, hi, logits):
        return kl_block(logits, ref_hidden[lo:hi].to(dtype) @ ref_weight.T, 1.0 / N, dtype)
    return _HeadLoss.apply(*_graded(hidden, head_weight), block, dtype)


def _kl_positions(x: torch.Tensor, mask: torch.Tensor | None, trailing: int = 1) -> torch.Tensor:
    """x [B, T, *rest] (rest: `trailing` dims) → [N, *rest], the positions the KL averages over:
    all B·T without a mask, else the positions t-1 whose next token t has mask[t]."""
    if mask is not None:
        x = x[:, :-1][mask[:, 1:]]
    return x.reshape(-1, *x.shape[x.dim() - trailing:])


# ---------------------------------------------------------------- π0's targets stored instead of π0
#
# π0 is frozen, so what the KL needs from it on a replay sequence can be computed once and
# stored beside the sequence. Its top-K log-probabilities, their ids and the log of the mass
# left over define a (K+1)-bucket coarsening of π0's distribution; the KL between the two
# models' coarsenings is at most the full KL (data-processing inequality) and equals it at K = V.

REST_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # ≈ −87.3: log of a mass too small to count


@torch.no_grad()
def topk_targets(ref_hidden: torch.Tensor, ref_head_weight: torch.Tensor, k: int,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """π0's stored KL targets from its final hidden states [B, T, D] and head [V, D].

    Returns (logp [N, k] float32: the k largest log-probabilities per position, in decreasing
    order; ids [N, k] int32: their token ids; rest [N] float32: log(1 − Σ top-k probabilities),
    computed as a logsumexp over the other V − k log-probabilities and clamped below at
    REST_FLOOR, so it is exactly REST_FLOOR when k = V). The N positions are those
    `head_kl_divergence` averages over: all B·T (row-major, so a [B·T, k] result views as
    [B, T, k]) without a mask, else the positions t-1 whose next token t has mask[t].
    Computed a block of `head_block_rows(V)` rows at a time, in the matmul dtype autocast would use."""
    V = ref_head_weight.shape[0]
    if not 1 <= k <= V:
        raise SelfReplayError(f"top-K targets need 1 <= K <= V = {V}, got K = {k}: pick K in that range")
    hidden = _kl_positions(ref_hidden, mask)
    N, dtype = len(hidden), _compute_dtype(hidden)
    logp = torch.empty(N, k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(N, k, dtype=torch.int32, device=hidden.device)
    rest = torch.empty(N, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        w = ref_head_weight.to(dtype)
        rows = head_block_rows(len(w))
        for lo in range(0, N, rows):
            hi = min(lo + rows, N)
            block_logp = torch.log_softmax((hidden[lo:hi].to(dtype) @ w.T).float(), dim=-1)
            top, top_ids = block_logp.topk(k, dim=-1)
            logp[lo:hi], ids[lo:hi] = top, top_ids
            # the rest mass from the other log-probabilities, not 1 − Σ top-k: no cancellation
            rest[lo:hi] = block_logp.scatter_(1, top_ids, float("-inf")).logsumexp(-1).clamp_(min=REST_FLOOR)
    return logp, ids, rest


def head_kl_from_topk(logp: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, hidden: torch.Tensor,
                      head_weight: torch.Tensor, compile: bool = False,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of the KL between π0's and πθ's (K+1)-bucket coarsenings (nats):
    Σ_top-K p0 (log p0 − log pθ) + p0_rest (log p0_rest − log pθ_rest), with pθ_rest πθ's mass
    off π0's top-K. `logp`, `ids`, `rest` are `topk_targets`' output: either per position
    ([B, T, K], [B, T, K], [B, T]; the mask then selects from them as from `hidden`) or
    already selected ([N, K], [N, K], [N], drawn with the same mask). hidden [B, T, D] and
    head_weight [V, D] are πθ's; gradients reach only them. At K = V this is
    `head_kl_divergence`; below, a lower bound on it. compile and mask: as for the other losses."""
    if logp.dim() == hidden.dim():  # per position: select as hidden is selected
        logp, ids, rest = _kl_positions(logp, mask), _kl_positions(ids, mask), _kl_positions(rest, mask, 0)
    hidden = _kl_positions(hidden, mask)
    _check_topk_targets(logp, ids, rest, len(hidden), head_weight.shape[0])
    if len(hidden) == 0:
        return hidden.sum().float() * 0.0
    N, dtype, topk_block = len(hidden), _compute_dtype(hidden), _block_function("topk_kl", compile)

    def block(lo, hi, logits):
        return topk_block(logits, logp[lo:hi], ids[lo:hi].long(), rest[lo:hi], 1.0 / N, dtype)
    return _HeadLoss.apply(*_graded(hidden, head_weight), block, dtype)


def _check_topk_targets(logp, ids, rest, positions: int, V: int) -> None:
    """One-line refusal of stored targets that do not fit the batch or the head."""
    if logp.shape != ids.shape or logp.dim() != 2 or tuple(rest.shape) != (len(logp),):
        raise SelfReplayError(f"top-K targets have shapes logp {tuple(logp.shape)}, ids {tuple(ids.shape)}, "
                              f"rest {tuple(rest.shape)}: expected [N, K], [N, K], [N] (as topk_targets returns)")
    if len(logp) != positions:
        raise SelfReplayError(f"top-K targets cover {len(logp)} positions but the batch has {positions}: "
                              "draw them from the same sequences with the same mask")
    if logp.shape[1] > V:
        raise SelfReplayError(f"top-K targets have K = {logp.shape[1]} but the head has V = {V} tokens: "
                              "they were drawn for another vocabulary")


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


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim in float32, written over `logits` when it is float32 already
    (a block's logits are a temporary nobody reads again: one [rows, V] tensor fewer at the peak)."""
    logits = logits.float()
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _ntp_block(logits: torch.Tensor, targets: torch.Tensor, scale: float, dtype: torch.dtype):
    """(sum of −log softmax(logits)[target], scale · (softmax − one-hot) in dtype) for one block."""
    logp = _log_softmax_(logits)
    loss = -logp.gather(1, targets[:, None]).sum()
    grad = logp.exp_()  # in place: the log-probabilities are not needed any more
    grad.scatter_add_(1, targets[:, None], torch.full(targets[:, None].shape, -1.0, device=grad.device))
    return loss, grad.mul_(scale).to(dtype)


def _kl_block(logits: torch.Tensor, ref_logits: torch.Tensor, scale: float, dtype: torch.dtype):
    """(sum of KL(softmax(ref_logits) ‖ softmax(logits)), scale · (softmax − ref softmax) in dtype)."""
    logp, ref_logp = _log_softmax_(logits), _log_softmax_(ref_logits)
    ref_p = ref_logp.exp()
    loss = ref_logp.sub_(logp).mul_(ref_p).sum()  # in place: no [rows, V] tensors beyond these three
    return loss, logp.exp_().sub_(ref_p).mul_(scale).to(dtype)


def _topk_kl_block(logits: torch.Tensor, ref_logp: torch.Tensor, ids: torch.Tensor, ref_rest: torch.Tensor,
                   scale: float, dtype: torch.dtype):
    """(sum of the (K+1)-bucket KL, scale · its gradient w.r.t. logits in dtype) for one block.

    With q = softmax(logits), q_rest = Σ_{j off the top-K} q_j and P = Σ p0_top + p0_rest
    (1 up to the storage's rounding), the gradient at token j is P·q_j − p0_j on the top-K and
    P·q_j − p0_rest · q_j / q_rest off it: the rest bucket is pulled up as a whole, the shape
    inside it is left as it is."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp, ref_rest = ref_logp.float(), ref_rest.float()
    ref_p = ref_logp.exp()
    off_top = logp.scatter(1, ids, float("-inf"))  # πθ's log-probabilities off π0's top-K
    rest = off_top.logsumexp(-1)  # log q_rest: stable however small, −inf when K = V
    # an empty (K = V) or negligible rest bucket takes no part (and no −inf enters the sums)
    counted = (ref_rest > REST_FLOOR) & (rest > float("-inf"))
    rest = torch.where(counted, rest, 0.0)
    ref_rest_p = torch.where(counted, ref_rest.exp(), 0.0)
    loss = (ref_p * (ref_logp - logp.gather(1, ids))).sum() + (ref_rest_p * (ref_rest - rest)).sum()
    mass = ref_p.sum(-1) + ref_rest_p
    grad = logp.exp_().mul_(mass[:, None])  # in place: the log-probabilities are not needed any more
    grad.sub_(off_top.sub_(rest[:, None]).exp_().mul_(ref_rest_p[:, None]))
    grad.scatter_add_(1, ids, -ref_p)
    return loss, grad.mul_(scale).to(dtype)


_BLOCKS = {"ntp": _ntp_block, "kl": _kl_block, "topk_kl": _topk_kl_block}
_COMPILED_BLOCKS: dict = {}


def _block_function(name: str, compile: bool):
    """The block arithmetic `name`, eager or as one `torch.compile`d kernel (compiled once)."""
    if not compile:
        return _BLOCKS[name]
    if name not in _COMPILED_BLOCKS:
        _COMPILED_BLOCKS[name] = torch.compile(_BLOCKS[name], dynamic=False)
    return _COMPILED_BLOCKS[name]


class _HeadLoss(torch.autograd.Function):
    """Mean over rows of a loss of the logits hidden @ weight.T, from hidden states [N, D] and
    the head [V, D]. `block(lo, hi, logits [hi-lo, V])` returns the loss summed over rows lo:hi
    and its gradient with respect to those logits, already scaled by 1/N, in `dtype`."""

    @staticmethod
    def forward(ctx, hidden, weight, block, dtype):
        N = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            rows = head_block_rows(len(w))
            for lo in range(0, N, rows):
                hi = min(lo + rows, N)
                h = hidden[lo:hi].to(dtype)
                loss, grad = block(lo, hi, h @ w.T)
                total += loss
                if want_hidden:
                    grad_hidden[lo:hi] = grad @ w
                if want_weight:  # accumulated in place: no [V, D] temporary when the dtypes agree
                    if grad.dtype == grad_weight.dtype:
                        grad_weight.addmm_(grad.T, h)
                    else:
                        grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.spent = weight.dtype, False
        return total / N

    @staticmethod
    def backward(ctx, grad_output):
        # The gradients were formed for this one backward: scaled in place, so the head's
        # [V, D] float32 gradient is not held twice (a second copy was the loss's peak at 128k
        # vocabularies), and handed on without a copy once autograd frees what was saved.
        if ctx.spent:
            raise SelfReplayError("a head loss was back-propagated twice (backward with retain_graph=True): "
                                  "compute the loss again for each backward")
        ctx.spent = True
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden.mul_(grad_output) if grad_hidden is not None else None,
                grad_weight.mul_(grad_output).to(ctx.weight_dtype) if grad_weight is not None else None,
                None, None)
