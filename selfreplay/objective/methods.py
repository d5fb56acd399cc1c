"""The finetuning objective, for every model family and front end:

    loss = NTP(θ; x_new) + c · R

R is the forward KL(π0 ‖ πθ) or πθ's next-token loss on replay sequences (`kl`, `ntp`), the
KL on the new batch itself (`kl_new`), or nothing (`none`; `replace` puts its replay rows
inside the new batch). A model is anything with `hidden(tokens) -> [B, t, D]` (the final,
normalised hidden states) and `head.weight` [V, D]: the built-in Transformer, or a Hugging
Face model through selfreplay.model.hf.CausalLM. The losses apply the output projection
themselves, a block of rows at a time, so the [tokens, vocabulary] logits never exist whole.

`selfreplay.training.loop` (the CLI's loop) and `selfreplay.hf.trainer.SelfReplayTrainer` (the
transformers Trainer) both call `training_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfreplay.objective.losses import head_kl_divergence, head_next_token_loss


@dataclass
class ReplaySamples:
    """A replay batch: tokens [b, t]; mask [b, t], True on every real token (False on padding
    after a sample stopped at EOS), or None when every token is real; hidden [b, t, D]: π0's
    final hidden states on the tokens when the sampler kept them (the KL then needs no second
    pass of π0), or None."""

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def training_loss(model, reference, new: torch.Tensor, replay: ReplaySamples | None, method: str, coeff: float,
                  trunk=None, compile: bool = False,
                  new_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, NTP on the new batch, R) for new [B, t] rows and a replay batch.

    ntp and kl run the model once over new and replay rows together (right-padded to the
    longer of the two when their lengths differ); the frozen reference only ever runs
    without gradients, so R's gradient reaches θ alone. `trunk` computes the model's final
    hidden states (a compiled `model.hidden`, or the call through a DDP wrapper); new_mask
    [B, t] marks the new tokens whose prediction counts (None: all). compile: the losses'
    softmax arithmetic compiled.
    """
    trunk = trunk or model.hidden
    head = model.head.weight
    B = len(new)
    if method in ("ntp", "kl"):
        hidden = trunk(stacked(new, replay.tokens))
        t_new, t_replay = new.shape[1], replay.tokens.shape[1]
        replay_mask = replay.mask.to(new.device) if replay.mask is not None else None
        ntp = head_next_token_loss(hidden[:B, :t_new], head, new, compile, mask=new_mask)
        replay_hidden = hidden[B:, :t_replay]
        if method == "ntp":
            reg = head_next_token_loss(replay_hidden, head, replay.tokens, compile, mask=replay_mask)
        else:
            ref_hidden = replay.hidden
            if ref_hidden is None:
                with torch.no_grad():
                    ref_hidden = reference.hidden(replay.tokens)
            reg = head_kl_divergence(ref_hidden, reference.head.weight, replay_hidden, head, compile, mask=replay_mask)
    else:
        hidden = trunk(new)
        ntp = head_next_token_loss(hidden, head, new, compile, mask=new_mask)
        if method == "kl_new":
            with torch.no_grad():
                ref_hidden = reference.hidden(new)
            reg = head_kl_divergence(ref_hidden, reference.head.weight, hidden, head, compile, mask=new_mask)
        else:  # none, replace (replay rows are already inside `new`)
            reg = torch.zeros((), device=new.device)
    return ntp + coeff * reg, ntp, reg


def stacked(new: torch.Tensor, replay: torch.Tensor) -> torch.Tensor:
    """New and replay rows as one batch [B + b, t]: rows of different lengths right-padded to
    the longer (causal attention keeps the padding out of every real position, and the losses
    read each part at its own length)."""
    replay = replay.to(new.device)
    width = max(new.shape[1], replay.shape[1])
    return torch.cat([F.pad(rows, (0, width - rows.shape[1])) for rows in (new, replay)])
