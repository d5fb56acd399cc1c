"""How faithful a self-replay pool is to the old domain (docs/method.md, "The replay coefficient
held to a budget"): replay protects only what π0's samples cover, so a pool of repetition loops,
of samples that stop at once, or of text π0 itself finds unlike its training data protects little.

`replay_fidelity` measures a pool of π0's samples: distinct-2/3-gram ratios, EOS rate, mean
sample length, and π0's per-token loss on its samples next to its loss on the old domain's
validation text; `ReplayFidelity.warnings()` says in one line each what looks degenerate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from selfreplay.errors import SelfReplayError
from selfreplay.objective.losses import head_next_token_loss
from selfreplay.replay.pool import ReplayPool
from selfreplay.replay.samples import ReplaySamples
from selfreplay.rundir import notice

# Repetition: loops of a k-token phrase give distinct-3 ≈ k/t (0.04 for 10 tokens in 256), a pool
# of one sample over and over 1/n; healthy text far more, though the pooled ratio falls slowly with
# pool size: 0.46–0.88 for real text (fortunes, manpages) at a 4k BPE vocabulary and 0.35–0.72 for
# the built-in synthetic language at 1k–4k, over pools of 256–1024 samples of 128–1024 tokens.
REPETITION_DISTINCT_3 = 0.1
# Collapsed length: the mean sample is shorter than a short sentence, and than a quarter of
# the room it had. Both, so a domain of short documents (quotes of ~25 tokens) in a long
# context does not warn; a sample stopping after a word or two does.
COLLAPSED_MEAN_TOKENS = 8.0
COLLAPSED_LENGTH_FRACTION = 0.25
# Early stops: most samples (> half) end within a few tokens (EOS included): no document is that short.
SHORT_SAMPLE_TOKENS = 4
SHORT_RATE_LIMIT = 0.5
# π0's loss on its samples vs on old-domain text, as a ratio (scale-free across vocabularies). At
# temperature 1 the two are close (a calibrated model's samples are as surprising as its data);
# 1.5× higher means samples π0 itself finds unlike its data (broken decoding, a wrong start
# token); under half means far more predictable text than the domain (loops, a very low temperature).
NLL_HIGH_RATIO = 1.5
NLL_LOW_RATIO = 0.5
FIRST_DRAW_SAMPLES = 256  # a run judges π0's first draw, up to this many of its samples


@dataclass(frozen=True)
class ReplayFidelity:
    """Fidelity of a pool of `samples` samples with `width` sampled positions each (after the prompt).

    distinct_2, distinct_3: distinct n-grams / all n-grams over the pool's sampled real tokens
    (None when no sample has n of them); eos_rate: fraction of samples with an EOS among them
    (None without an EOS id); mean_length: sampled real tokens per sample; short_rate: fraction
    of samples whose first stop (EOS included, or their last real token) is within
    SHORT_SAMPLE_TOKENS; nll_samples, nll_old: π0's per-token loss (nats) on its samples and on
    old-domain validation text (None where not measured)."""

    samples: int
    width: int
    distinct_2: float | None
    distinct_3: float | None
    eos_rate: float | None
    mean_length: float
    short_rate: float
    nll_samples: float | None = None
    nll_old: float | None = None

    def warnings(self) -> list[str]:
        """One line per sign of a degenerate pool or one far from the old domain; [] for a healthy one."""
        found = []
        if self.distinct_3 is not None and self.distinct_3 < REPETITION_DISTINCT_3:
            found.append(f"replay samples repeat themselves: distinct-3 = {self.distinct_3:.3f} < "
                         f"{REPETITION_DISTINCT_3} (repetition loops); check π0 and the sampling temperature")
        if self.mean_length < min(COLLAPSED_MEAN_TOKENS, COLLAPSED_LENGTH_FRACTION * self.width):
            found.append(f"replay samples are collapsed: {self.mean_length:.1f} tokens on average of "
                         f"{self.width} possible; they protect little of the old domain")
        if self.short_rate > SHORT_RATE_LIMIT:
            found.append(f"{self.short_rate:.0%} of replay samples stop within {SHORT_SAMPLE_TOKENS} tokens; "
                         "check the start token and the EOS id")
        if self.nll_samples is not None and self.nll_old is not None and self.nll_old > 0:
            ratio = self.nll_samples / self.nll_old
            if ratio > NLL_HIGH_RATIO:
                found.append(f"replay samples are far from the old domain: π0's loss on them is {self.nll_samples:.3f} "
                             f"nats, {ratio:.2f}× its {self.nll_old:.3f} on old-domain text; check the decoding")
            elif ratio < NLL_LOW_RATIO:
                found.append(f"replay samples are far more predictable than the old domain: π0's loss on them is "
                             f"{self.nll_samples:.3f} nats, {ratio:.2f}× its {self.nll_old:.3f} on old-domain text "
                             "(repetition, or a low temperature)")
        return found

    def as_dict(self) -> dict:
        """Plain numbers for summary.json, with the warnings."""
        return {**asdict(self), "warnings": self.warnings()}


def replay_fidelity(tokens: torch.Tensor, mask: torch.Tensor | None = None, eos_id: int | None = None,
                    nll_samples: float | None = None, nll_old: float | None = None,
                    prompt_length: int = 1, eos_stops: bool = True) -> ReplayFidelity:
    """Fidelity of π0's samples tokens [n, t] (mask [n, t] bool: True on real tokens, None: all).

    prompt_length: the tokens at the start of every sample that the sampler put in rather than
    drew (BOS or a domain id: 1); they are left out of every count, so a GPT-2 sample that starts
    at EOS is not counted as stopped. eos_stops=False: an EOS is counted (eos_rate) but ends no
    sample, as in the built-in model's samples, windows of a stream of documents joined by EOS.
    nll_samples, nll_old (nats per token): see `sample_nll` and ValidationSet.reference_loss."""
    if tokens.dim() != 2 or len(tokens) == 0 or tokens.is_floating_point():
        raise SelfReplayError(f"replay fidelity needs integer sample tokens [n, t] with n >= 1, got shape "
                              f"{tuple(tokens.shape)} of {tokens.dtype}")
    if mask is not None and (mask.shape != tokens.shape or mask.dtype != torch.bool):
        raise SelfReplayError(f"the samples' mask has shape {tuple(mask.shape)} of {mask.dtype}: expected bool "
                              f"{tuple(tokens.shape)}, as the tokens")
    if not 0 <= prompt_length < tokens.shape[1]:
        raise SelfReplayError(f"prompt_length {prompt_length} leaves no sampled positions in samples of "
                              f"{tokens.shape[1]} tokens: pass the number of tokens put in before sampling")
    for name, value in (("nll_samples", nll_samples), ("nll_old", nll_old)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SelfReplayError(f"{name} must be a non-negative loss in nats, got {value}")
    tokens = tokens[:, prompt_length:].cpu()
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask[:, prompt_length:].cpu()
    lengths = real.sum(1)
    stops, eos_rate = lengths, None
    if eos_id is not None:
        is_eos = (tokens == eos_id) & real
        has_eos = is_eos.any(1)
        if eos_stops:
            stops = torch.where(has_eos, is_eos.int().argmax(1) + 1, lengths)  # the first EOS, counted
        eos_rate = has_eos.float().mean().item()
    return ReplayFidelity(
        samples=len(tokens), width=tokens.shape[1],
        distinct_2=distinct_ngrams(tokens, real, 2), distinct_3=distinct_ngrams(tokens, real, 3),
        eos_rate=eos_rate,
        mean_length=lengths.float().mean().item(),
        short_rate=(stops <= SHORT_SAMPLE_TOKENS).float().mean().item(),
        nll_samples=None if nll_samples is None else float(nll_samples),
        nll_old=None if nll_old is None else float(nll_old))


def distinct_ngrams(tokens: torch.Tensor, real: torch.Tensor, n: int) -> float | None:
    """Distinct n-grams / all n-grams of tokens [n_samples, t], counting only n-grams whose n
    tokens are all real (real [n_samples, t] bool), pooled over the samples; None when there is none."""
    if tokens.shape[1] < n:
        return None
    grams = tokens.unfold(1, n, 1)  # [n_samples, t-n+1, n]
    kept = grams[real.unfold(1, n, 1).all(-1)]  # [N, n]
    if len(kept) == 0:
        return None
    return len(torch.unique(kept, dim=0)) / len(kept)


@torch.no_grad()
def sample_nll(model, tokens: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 64) -> float:
    """π0's mean next-token loss (nats per predicted token) on its samples tokens [n, t] (mask
    [n, t]: the real tokens, None: all). model: anything with `hidden(tokens) -> [b, t, D]` and
    `head.weight` [V, D]; the mean runs over every counted prediction of the pool, a batch at a time."""
    device, was_training = model.head.weight.device, model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(tokens), batch_size):
        batch = tokens[lo:lo + batch_size].to(device)
        part = mask[lo:lo + batch_size].to(device) if mask is not None else None
        predicted = int(part[:, 1:].sum()) if part is not None else batch.shape[0] * (batch.shape[1] - 1)
        if predicted:
            loss = head_next_token_loss(model.hidden(batch), model.head.weight, batch, mask=part)
            total, count = total + predicted * loss.item(), count + predicted
    model.train(was_training)
    if not count:
        raise SelfReplayError("the replay samples hold no token to predict: their loss under π0 is undefined")
    return total / count


# ---------------------------------------------------------------- a finetuning run's pool, judged once

def hf_sample_format(form, eos_id: int | None) -> tuple[int | None, int, bool]:
    """(EOS id or None, tokens put in before sampling, whether EOS ends a sample) of a Hugging Face
    model's samples in `form` (replay.hf_sampling.ReplayFormat): from BOS or inside the chat template
    (its shortest prompt); a chat sample's stop, its turn's end, shows in its length alone."""
    return (eos_id if form.turns is None else None), min(len(p) for p in form.prompts), eos_id in form.stop


def first_draw_fidelity(model, source, batch: ReplaySamples, sample_format: tuple[int | None, int, bool],
                        nll_old: float | None) -> dict | None:
    """A finetuning run's replay judged at its first step, while θ (`model`) is still π0: π0's first
    draw (up to FIRST_DRAW_SAMPLES of it), or the first batch `batch` where `source` replays a stored
    pool; π0's loss on them is θ's, so a run that holds no π0 measures it too. nll_old: π0's loss on
    the old domain's validation rows. Each warning is said once; samples with nothing sampled in
    them are said too, and give None."""
    eos_id, prompt_length, eos_stops = sample_format
    drawn = source.pool if isinstance(source, ReplayPool) and not source.replaying_stored else None
    samples = drawn.rows(slice(0, FIRST_DRAW_SAMPLES)) if drawn is not None else batch
    try:
        nll = sample_nll(model, samples.tokens, samples.mask)
        fidelity = replay_fidelity(samples.tokens, samples.mask, eos_id, nll, nll_old, prompt_length, eos_stops)
    except SelfReplayError as e:
        notice(f"replay fidelity not measured: {e}")
        return None
    for warning in fidelity.warnings():
        notice(warning)
    return fidelity.as_dict()
