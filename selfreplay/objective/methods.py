"""The finetuning objective, for every model family and front end (docs/method.md, "The objective"):

    loss = NTP(θ; x_new) + c · R

R is the replay method's term: the forward KL(π0 ‖ πθ) or πθ's next-token loss on replay
sequences (`kl`, `ntp`), the KL on the new batch itself (`kl_new`), or nothing (`none`).
Each method is one object below that says what it needs (replay sequences, π0, π0's hidden
states kept by the sampler) and computes its term; this module is the one place that names
them. Mixing replay rows into the new batch is not a term: it is `replay.fraction`.

A model is anything with `hidden(tokens) -> [B, t, D]` (the final, normalised hidden states)
and `head.weight` [V, D]: the built-in Transformer, or a Hugging Face model through
selfreplay.model.hf.CausalLM. The losses apply the output projection themselves, a block of
rows at a time, so the [tokens, vocabulary] logits never exist whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfreplay.errors import SelfReplayError, did_you_mean
from selfreplay.objective.losses import (
    head_kl_divergence,
    head_kl_from_topk,
    head_next_token_loss,
)
from selfreplay.replay.samples import ReplaySamples, TopKTargets


@dataclass
class PenalisedRows:
    """The rows a method's term reads: θ's hidden states on them [b, t, D], their tokens [b, t],
    the mask of the tokens that count [b, t] (None: all), and π0's answers on them where they
    were kept: its hidden states, or its stored top-K (None: π0 computes them)."""

    hidden: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None
    reference_hidden: torch.Tensor | None = None
    reference_topk: TopKTargets | None = None


@dataclass(frozen=True)
class ReplayMethod:
    """A replay method: its name (replay.method), what it needs, and its term R."""

    name: str
    description: str
    needs_replay: bool = False  # draws replay sequences (a pool or real old data)
    needs_reference: bool = False  # π0 scores rows during training
    keeps_hidden: bool = False  # a self-replay pool keeps π0's hidden states on its samples

    def term(self, rows: PenalisedRows, head: torch.Tensor, reference, compile: bool = False) -> torch.Tensor:
        """R on `rows` (nats per counted token); zero for a method without a term."""
        return torch.zeros((), device=rows.tokens.device)


@dataclass(frozen=True)
class NextTokenReplay(ReplayMethod):
    def term(self, rows: PenalisedRows, head: torch.Tensor, reference, compile: bool = False) -> torch.Tensor:
        return head_next_token_loss(rows.hidden, head, rows.tokens, compile, mask=rows.mask)


@dataclass(frozen=True)
class KLToReference(ReplayMethod):
    def term(self, rows: PenalisedRows, head: torch.Tensor, reference, compile: bool = False) -> torch.Tensor:
        """KL(π0 ‖ πθ), π0 without gradients, so the term's gradient reaches θ alone; from π0's
        stored top-K answers where a pool kept them (the (K+1)-bucket KL: docs/method.md, "Stored targets")."""
        if rows.reference_topk is not None:
            t = rows.reference_topk
            return head_kl_from_topk(t.logp, t.ids, t.rest, rows.hidden, head, compile, mask=rows.mask)
        ref_hidden = rows.reference_hidden
        if ref_hidden is None:
            with torch.no_grad():
                ref_hidden = reference.hidden(rows.tokens)
        return head_kl_divergence(ref_hidden, reference.head.weight, rows.hidden, head, compile, mask=rows.mask)


NO_REPLAY = ReplayMethod("none", "plain finetuning: no replay term")
REPLAY_NTP = NextTokenReplay("ntp", "πθ's next-token loss on replay sequences", needs_replay=True)
REPLAY_KL = KLToReference("kl", "KL(π0 ‖ πθ) on replay sequences", needs_replay=True, needs_reference=True,
                          keeps_hidden=True)
NEW_BATCH_KL = KLToReference("kl_new", "KL(π0 ‖ πθ) on the new batch itself (no replay)", needs_reference=True)

REPLAY_METHODS: dict[str, ReplayMethod] = {m.name: m for m in (NO_REPLAY, REPLAY_NTP, REPLAY_KL, NEW_BATCH_KL)}


def replay_method(name: str | ReplayMethod, key: str = "replay.method") -> ReplayMethod:
    """The method called `name` (a method passes through); an unknown name is one line naming `key`."""
    if isinstance(name, ReplayMethod):
        return name
    if name not in REPLAY_METHODS:
        raise SelfReplayError(f"unknown {key} {name!r}: choose one of {', '.join(REPLAY_METHODS)}"
                              f"{did_you_mean(str(name), REPLAY_METHODS)}")
    return REPLAY_METHODS[name]


def training_loss(model, reference, new: torch.Tensor, replay: ReplaySamples | None, method: ReplayMethod | str,
                  coeff: float, trunk=None, compile: bool = False,
                  new_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, NTP on the new batch, R) for new [B, t] rows and a replay batch.

    A method with replay runs the model once over new and replay rows together (right-padded
    to the longer of the two when their lengths differ). `trunk` computes the model's final
    hidden states (a compiled `model.hidden`, or the call through a DDP wrapper); new_mask
    [B, t] marks the new tokens whose prediction counts (None: all). compile: the losses'
    softmax arithmetic compiled.
    """
    method = replay_method(method)
    trunk = trunk or model.hidden
    head = model.head.weight
    B, t_new = new.shape
    hidden = trunk(stacked(new, replay.tokens) if method.needs_replay else new)
    ntp = head_next_token_loss(hidden[:B, :t_new], head, new, compile, mask=new_mask)
    if method.needs_replay:
        t = replay.tokens.shape[1]
        mask = replay.mask.to(new.device) if replay.mask is not None else None
        rows = PenalisedRows(hidden[B:, :t], replay.tokens.to(new.device), mask, replay.hidden, replay.topk)
    else:
        rows = PenalisedRows(hidden, new, new_mask)
    reg = method.term(rows, head, reference, compile)
    return ntp + coeff * reg, ntp, reg


def stacked(new: torch.Tensor, replay: torch.Tensor) -> torch.Tensor:
    """New and replay rows as one batch [B + b, t]: rows of different lengths right-padded to
    the longer (causal attention keeps the padding out of every real position, and the losses
    read each part at its own length)."""
    replay = replay.to(new.device)
    width = max(new.shape[1], replay.shape[1])
    return torch.cat([F.pad(rows, (0, width - rows.shape[1])) for rows in (new, replay)])


# ---------------------------------------------------------------- the replay KL a budget holds

def budgeted_divergence(method: ReplayMethod, term: torch.Tensor, reference,
                        replay: ReplaySamples | None) -> torch.Tensor:
    """What replay.budget holds, nats per token, from one step's term R (no gradient): R itself for
    a KL term (kl: KL(π0 ‖ πθ) on the replay rows; kl_new: on the new batch); for ntp, R less π0's
    next-token loss on the same replay rows, an estimate of KL(π0 ‖ πθ) there on π0's own samples
    (its expectation over them is the KL) and, on real replay, the rise of the old data's loss.
    ntp runs π0 over the replay rows for it: one forward pass a step, without gradients."""
    if method is not REPLAY_NTP:
        return term.detach()
    head = reference.head.weight
    tokens = replay.tokens.to(head.device)
    mask = replay.mask.to(head.device) if replay.mask is not None else None
    with torch.no_grad():
        pi0 = head_next_token_loss(reference.hidden(tokens), head, tokens, mask=mask)
    return term.detach() - pi0
