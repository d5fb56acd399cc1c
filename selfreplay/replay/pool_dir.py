"""Replay pools of a Hugging Face model: drawn on the fly from π0, or read from a pool directory.

A pool directory, written once by `selfreplay sample init=... --out POOL` (`write_pool`), holds

    samples.jsonl   one sample a line: {"ids": [token ids, padding left out], "text": "..."}
    pool.json       what drew them: model, format, temperature, top_p, length, seed, count

A run reading a pool replays its samples in order and never draws them again; when
they run out, it draws fresh ones from π0 (or, with repeat, goes through the file again),
through the one `selfreplay.replay.pool.ReplayPool`. Each rank of a multi-process run takes
every world_size-th sample of the file, and draws with its own seed (seed + rank).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from selfreplay.config import ReplayConfig
from selfreplay.errors import SelfReplayError
from selfreplay.model.hf import CausalLM
from selfreplay.replay.hf_sampling import (
    ReplayFormat,
    base_format,
    chat_format,
    sample_replay,
)
from selfreplay.replay.pool import ReplayPool, pool_size
from selfreplay.replay.samples import ReplaySamples

SAMPLES_NAME, HEADER_NAME = "samples.jsonl", "pool.json"


class PoolWriter:
    """Appends samples to a new pool directory; `close` writes pool.json, which marks it complete."""

    def __init__(self, out: str | Path, tokenizer, drawn_by: dict):
        self.out, self.tokenizer, self.drawn_by, self.count = Path(out), tokenizer, drawn_by, 0
        if (self.out / HEADER_NAME).exists() or (self.out / SAMPLES_NAME).exists():
            raise SelfReplayError(f"{out} already holds a replay pool: choose another --out or delete it")
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / SAMPLES_NAME, "w", encoding="utf-8")

    def write(self, samples: ReplaySamples) -> None:
        for row, mask in zip(samples.tokens.tolist(), samples.mask.tolist()):
            ids = [t for t, real in zip(row, mask) if real]
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            self.file.write(json.dumps({"ids": ids, "text": text}, ensure_ascii=False) + "\n")
        self.count += len(samples.tokens)

    def close(self) -> dict:
        self.file.close()
        header = {**self.drawn_by, "count": self.count, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (self.out / HEADER_NAME).write_text(json.dumps(header, indent=2))
        return header


def read_pool(pool_dir: str | Path, rank: int = 0, world_size: int = 1) -> tuple[list[list[int]], dict]:
    """(token ids of this rank's samples, in file order; the pool's header)."""
    pool_dir = Path(pool_dir)
    if not (pool_dir / HEADER_NAME).is_file():
        what = "an unfinished pool (no pool.json)" if (pool_dir / SAMPLES_NAME).is_file() else "no replay pool"
        raise SelfReplayError(f"{pool_dir} holds {what}: write one with selfreplay sample init=... --out {pool_dir}")
    header = json.loads((pool_dir / HEADER_NAME).read_text())
    with open(pool_dir / SAMPLES_NAME, encoding="utf-8") as f:
        rows = [json.loads(line)["ids"] for i, line in enumerate(f) if i % world_size == rank]
    if not rows:
        raise SelfReplayError(f"{pool_dir} holds too few samples to give rank {rank} of {world_size} any")
    return rows, header


def stored_samples(pool_dir: str | Path, pad: int, rank: int = 0, world_size: int = 1) -> ReplaySamples:
    """This rank's samples of a pool directory as one batch [N, longest], right-padded with `pad`."""
    rows = read_pool(pool_dir, rank, world_size)[0]
    tokens = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], mask[i, : len(row)] = torch.as_tensor(row), True
    return ReplaySamples(tokens, mask)


def hf_replay_pool(reference: CausalLM, form: ReplayFormat, replay: ReplayConfig, keep_hidden: bool, seed: int = 0,
                   rank: int = 0, world_size: int = 1, repeat: bool = False) -> ReplayPool:
    """The pool of a Hugging Face model's samples that `replay` describes (from BOS, or inside
    the chat template as `form` says; at most replay.length tokens each): first those of the
    directory replay.pool when given (every world_size-th, from `rank`), then fresh draws. Each
    rank draws with its own seed (seed + rank). With keep_hidden (the KL's method keeps them),
    each batch comes with π0's hidden states: kept from decoding for a draw, computed by one π0
    pass for a stored batch."""
    length = replay.length  # set by then: it follows model.T (config.DEFAULTS_FOLLOW)

    def draw(count: int, generator: torch.Generator, offset: int) -> ReplaySamples:
        return sample_replay(reference, form, count, length, replay.temperature, replay.top_p, generator,
                             batch_size=replay.decode_batch, keep_hidden=keep_hidden, offset=offset)

    stored = stored_samples(replay.pool, form.pad, rank, world_size) if replay.pool is not None else None
    size = pool_size(replay.batch_size, replay.buffer, replay.decode_batch)
    return ReplayPool(draw, replay.batch_size, size, reference.head.weight.device, seed + rank, stored, repeat,
                      reference.hidden if keep_hidden else None)


def sample_pool(init: str, out: str | Path, count: int, length: int, temperature: float = 1.0,
                top_p: float | None = None, seed: int = 0, chat: bool = False, system: str | None = None,
                prompts: str | None = None, stop_at_eos: bool = True, batch_size: int = 64,
                device: str = "cpu", trust_remote_code: bool = False) -> dict:
    """`selfreplay sample init=hf:MODEL --out POOL`: draw `count` samples of π0 into a pool
    directory, a batch at a time; returns the pool's header. prompts: a .txt file (one prompt
    a line) or a .jsonl file with a `prompt` field; chat sampling answers them."""
    from selfreplay.model.hf import load_causal_lm

    if count < 1 or length < 2:
        raise SelfReplayError(f"a pool needs count >= 1 and length >= 2, got count={count}, length={length}")
    name = init[len("hf:"):] if init.startswith("hf:") else init
    model, tokenizer = load_causal_lm(name, device=device, trust_remote_code=trust_remote_code)
    lm = CausalLM(model.eval())
    chat = chat or system is not None or prompts is not None
    form = replay_format(tokenizer, chat, system, prompts, stop_at_eos)
    drawn_by = {"model": name, "format": "chat" if chat else "base", "system": system, "prompts": prompts,
                "stop_at_eos": stop_at_eos or chat, "temperature": temperature, "top_p": top_p,
                "length": length, "seed": seed, "pad_id": form.pad}
    writer = PoolWriter(out, tokenizer, drawn_by)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for lo in range(0, count, batch_size):
        writer.write(sample_replay(lm, form, min(batch_size, count - lo), length, temperature, top_p, generator,
                                   batch_size=batch_size, offset=lo))
    return writer.close()


def replay_format(tokenizer, chat: bool = False, system: str | None = None, prompts: str | None = None,
                  stop_at_eos: bool = True) -> ReplayFormat:
    """Where replay samples start: inside the chat template (after `system`; answering the user
    turns of the file `prompts` when given), or at BOS."""
    if chat:
        return chat_format(tokenizer, system, read_prompts(prompts) if prompts else None)
    return base_format(tokenizer, stop_at_eos)


def read_prompts(path: str) -> list[str]:
    """User prompts: the lines of a .txt file, or the `prompt` field of a .jsonl file."""
    from selfreplay.data.text import iter_field

    if str(path).endswith(".txt"):
        if not Path(path).is_file():
            raise SelfReplayError(f"prompts file not found: {path}")
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [str(value) for _, value in iter_field(path, "prompt")]
    if not prompts:
        raise SelfReplayError(f"{path} holds no prompts")
    return prompts
