"""Replay pools of a Hugging Face model: drawn on the fly from π0, after the samples of a pool
drawn once (`selfreplay sample init=hf:... --out POOL`, stored by selfreplay.replay.store), all
through the one `selfreplay.replay.pool.ReplayPool`. Each rank of a multi-process run takes
every world_size-th stored sample, and draws with its own seed (seed + rank).
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfreplay.config import ReplayConfig
from selfreplay.data.text import iter_field
from selfreplay.errors import SelfReplayError
from selfreplay.model.hf import CausalLM
from selfreplay.replay.hf_sampling import (
    ReplayFormat,
    base_format,
    chat_format,
    sample_replay,
)
from selfreplay.replay.pool import Draw, ReplayPool, pool_size
from selfreplay.replay.samples import ReplaySamples
from selfreplay.replay.store import StoredPool


def hf_draw(reference: CausalLM, form: ReplayFormat, replay: ReplayConfig, keep_hidden: bool) -> Draw:
    """How a Hugging Face model draws: from BOS, or inside the chat template as `form` says; at
    most replay.length tokens each (set by then: it follows model.T, config.DEFAULTS_FOLLOW)."""

    def draw(count: int, generator: torch.Generator, offset: int) -> ReplaySamples:
        return sample_replay(reference, form, count, replay.length, replay.temperature, replay.top_p, generator,
                             batch_size=replay.decode_batch, keep_hidden=keep_hidden, offset=offset)

    return draw


def hf_replay_pool(reference: CausalLM, form: ReplayFormat, replay: ReplayConfig, keep_hidden: bool, seed: int = 0,
                   rank: int = 0, world_size: int = 1, fingerprint: str | None = None) -> ReplayPool:
    """The pool that `replay` describes: the samples of replay.pool first (refused in one line
    when a model other than `fingerprint` drew them), then fresh draws (`hf_draw`). With
    keep_hidden (the KL's method keeps them), a batch comes with π0's hidden states: kept from
    decoding for a draw, stored or computed by one π0 pass for a stored batch, unless the pool
    stored π0's top-K answers, which the KL then reads."""
    device = reference.head.weight.device
    stored = StoredPool(replay.pool, fingerprint, device) if replay.pool is not None else None
    return ReplayPool(hf_draw(reference, form, replay, keep_hidden), replay.batch_size,
                      pool_size(replay.batch_size, replay.buffer, replay.decode_batch), device, seed + rank, stored,
                      replay.reuse, reference.hidden if keep_hidden else None, rank, world_size)


def replay_format(tokenizer, chat: bool = False, system: str | None = None, prompts: str | None = None,
                  stop_at_eos: bool = True) -> ReplayFormat:
    """Where replay samples start: inside the chat template (after `system`; answering the user
    turns of the file `prompts` when given), or at BOS."""
    if chat:
        return chat_format(tokenizer, system, read_prompts(prompts) if prompts else None)
    return base_format(tokenizer, stop_at_eos)


def read_prompts(path: str) -> list[str]:
    """User prompts: the lines of a .txt file, or the `prompt` field of a .jsonl file."""
    if str(path).endswith(".txt"):
        if not Path(path).is_file():
            raise SelfReplayError(f"prompts file not found: {path}")
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [str(value) for _, value in iter_field(path, "prompt")]
    if not prompts:
        raise SelfReplayError(f"{path} holds no prompts")
    return prompts
