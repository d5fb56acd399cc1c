"""Replay samples from a Hugging Face model π0, decoded one token at a time through a KV cache.

A base model starts every sample at BOS. A chat model starts inside its chat template:
the tokens before a user's text (after an empty or given system turn), then the model
writes the user's turn; when it ends that turn the template's assistant header is put in,
and the model writes the answer. Given prompts, the model writes only the answers.
A sample stops at EOS (or the end of the answer's turn): what follows is padding with
mask False, so the losses skip it. The decoding computes π0's final hidden states at
every position; `keep_hidden` keeps them for the KL penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfreplay.data.chat import ChatTurns, chat_turns, prompt_tokens
from selfreplay.data.text import pad_id
from selfreplay.errors import SelfReplayError
from selfreplay.model.hf import CausalLM
from selfreplay.replay.samples import ReplaySamples
from selfreplay.replay.sampling import next_token


@dataclass
class ReplayFormat:
    """Where samples start and what ends them. Sample i starts with prompts[i % len(prompts)];
    with `turns`, the model writes the user's turn itself and the answer follows it."""

    prompts: list[list[int]]
    stop: list[int]
    pad: int
    turns: ChatTurns | None = None

    def starts(self, count: int, offset: int = 0) -> list[list[int]]:
        return [self.prompts[(offset + i) % len(self.prompts)] for i in range(count)]


def base_format(tokenizer, stop_at_eos: bool = True) -> ReplayFormat:
    """Samples from BOS (EOS when the tokenizer has no BOS, as GPT-2); stop_at_eos=False keeps
    going past EOS to the full length, as the paper's BOS samples did."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise SelfReplayError("the tokenizer has neither a BOS nor an EOS token to start samples from")
    stop = [tokenizer.eos_token_id] if stop_at_eos and tokenizer.eos_token_id is not None else []
    return ReplayFormat(prompts=[[start]], stop=stop, pad=pad_id(tokenizer))


def chat_format(tokenizer, system: str | None = None, prompts: list[str] | None = None) -> ReplayFormat:
    """Samples inside the chat template: the model writes a user turn and its answer, or, given
    prompts, the answers to them."""
    turns = chat_turns(tokenizer, system)
    stop = sorted({turns.answer_end, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    if prompts:
        return ReplayFormat([prompt_tokens(tokenizer, p, system) for p in prompts], stop, pad_id(tokenizer))
    return ReplayFormat([turns.user_prefix], stop, pad_id(tokenizer), turns)


@torch.no_grad()  # not inference_mode: the samples and masks go on into training steps' autograd
def sample_replay(lm: CausalLM, form: ReplayFormat, num_samples: int, length: int, temperature: float = 1.0,
                  top_p: float | None = None, generator: torch.Generator | None = None, seed: int = 0,
                  batch_size: int = 64, keep_hidden: bool = False, offset: int = 0) -> ReplaySamples:
    """`num_samples` samples of at most `length` tokens (prompt included) from `lm`, in batches.
    offset: the index of the first sample, which picks the first prompt."""
    limit = getattr(lm.config, "max_position_embeddings", None) or getattr(lm.config, "n_positions", None)
    if limit is not None and length > limit:
        raise SelfReplayError(f"replay length {length} exceeds the model's context of {limit} tokens")
    if generator is None:
        generator = torch.Generator(device=lm.head.weight.device).manual_seed(seed)
    batches = [_sample_batch(lm, form, form.starts(min(batch_size, num_samples - lo), offset + lo), length,
                             temperature, top_p, generator, keep_hidden)
               for lo in range(0, num_samples, batch_size)]
    return ReplaySamples(torch.cat([b.tokens for b in batches]), torch.cat([b.mask for b in batches]),
                         torch.cat([b.hidden for b in batches]) if keep_hidden else None)


def _sample_batch(lm: CausalLM, form: ReplayFormat, starts: list[list[int]], length: int, temperature: float,
                  top_p: float | None, generator: torch.Generator, keep_hidden: bool) -> ReplaySamples:
    device, B = lm.head.weight.device, len(starts)
    forced = torch.full((B, length), -1, dtype=torch.long, device=device)  # tokens put in, not sampled
    for i, start in enumerate(starts):
        forced[i, : len(start[:length])] = torch.as_tensor(start[:length])
    shared = _shared_prefix(starts, length)
    tokens = torch.full((B, length), form.pad, dtype=torch.long, device=device)
    mask = torch.zeros(B, length, dtype=torch.bool, device=device)
    tokens[:, :shared], mask[:, :shared] = forced[:, :shared], True
    cache = lm.new_cache(length)
    h = lm.hidden(tokens[:, :shared], cache)  # the shared prompt in one pass
    hidden = torch.zeros(B, length, h.shape[-1], dtype=h.dtype, device=device) if keep_hidden else None
    if keep_hidden:
        hidden[:, :shared] = h
    h = h[:, -1]
    stop = torch.as_tensor(form.stop, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    writing_user = torch.full((B,), form.turns is not None, dtype=torch.bool, device=device)
    for pos in range(shared, length):
        drawn = next_token(lm.head(h), temperature, None, top_p, generator)
        put_in = forced[:, pos] >= 0
        token = torch.where(put_in, forced[:, pos], drawn).masked_fill(done, form.pad)
        tokens[:, pos], mask[:, pos] = token, ~done
        free = ~put_in & ~done
        if form.turns is not None:  # a user turn just ended: the template's assistant header follows
            ends_user = free & writing_user & (token == form.turns.user_end)
            for j, header_token in enumerate(form.turns.assistant_header[: length - pos - 1]):
                forced[ends_user, pos + 1 + j] = header_token
            writing_user &= ~ends_user
            free &= ~ends_user
        done |= free & torch.isin(token, stop)
        if pos == length - 1 or done.all():
            break
        h = lm.hidden(token[:, None], cache)[:, 0]
        if keep_hidden:
            hidden[:, pos] = h
    return ReplaySamples(tokens, mask, hidden)


def _shared_prefix(starts: list[list[int]], length: int) -> int:
    """Length of the prompt prefix that every row shares (at least 1, at most length)."""
    n = min(len(s) for s in starts)
    for i in range(n):
        if any(s[i] != starts[0][i] for s in starts):
            n = i
            break
    if n == 0:
        raise SelfReplayError("every replay sample needs a first token: an empty prompt was given")
    return min(n, length)
