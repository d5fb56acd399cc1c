"""Batched sampling with a KV cache from a given first token (a domain id or BOS).

Replay sequences are drawn here: temperature 1 and no truncation by default,
fixed length, deterministic given a seed, under `torch.inference_mode`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from selfreplay.data.tokenizer import load_tokenizer
from selfreplay.errors import SelfReplayError
from selfreplay.model.transformer import KVCache, Transformer, rotation_matrices
from selfreplay.runtime import resolve_device


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from logits [B, V]; returns [B] (int64). temperature 0 is greedy.
    At temperature 1 without truncation (replay's setting) the weights come from one softmax
    call, one fused multithreaded pass instead of separate max, subtract and exp passes."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    if temperature == 1.0 and top_k is None and (top_p is None or top_p >= 1.0):
        return inverse_cdf_draw(logits.softmax(-1), generator)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the ones before it already reach top_p (the most likely always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return inverse_cdf_draw((logits - logits.amax(-1, keepdim=True)).exp_(), generator)


CDF_BLOCK = 64  # vocabulary entries per block of the two-level inverse CDF


def inverse_cdf_draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs [B, V] (non-negative, any positive total), drawn with
    probability proportional to its entry, from one uniform number per row (drawing noise per
    entry would cost V random numbers per row).

    The inverse CDF is found in two levels: the cumulative sums of blocks of CDF_BLOCK entries
    pick the block the uniform falls in, then the cumulative sum within that block alone picks
    the entry, so no running sum is taken along the whole vocabulary. An entry of probability 0
    is never drawn."""
    B, V = probs.shape
    pad = -V % CDF_BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(B, -1, CDF_BLOCK)
    block_cdf = blocks.sum(-1).cumsum(-1)  # [B, V / CDF_BLOCK]
    u = below(torch.rand(B, 1, device=probs.device, generator=generator, dtype=probs.dtype)
              * block_cdf[:, -1:], block_cdf[:, -1:])
    block = torch.searchsorted(block_cdf, u, right=True)  # [B, 1]: block_cdf[block-1] <= u < block_cdf[block]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), 0.0)
    inner_cdf = blocks.gather(1, block[:, :, None].expand(B, 1, CDF_BLOCK))[:, 0].cumsum(-1)  # [B, CDF_BLOCK]
    # where u falls within the block, rescaled to the within-block sums (rounding may differ)
    u_inner = below((u - before) / (block_cdf.gather(1, block) - before) * inner_cdf[:, -1:], inner_cdf[:, -1:])
    return (block * CDF_BLOCK + torch.searchsorted(inner_cdf, u_inner, right=True)).squeeze(1)


def below(u: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """u kept strictly below total (a uniform draw times the total can round up to it)."""
    return torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))


def check_sampling(num_samples: int, length: int, T: int, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    """Refuse sampling settings outside their ranges, with one line each."""
    checks = [
        (num_samples < 1, f"the number of samples must be at least 1, got {num_samples}"),
        (not 1 <= length <= T, f"sample length must be between 1 and the model's T={T}, got {length}"),
        (not (math.isfinite(temperature) and temperature >= 0), f"temperature must be >= 0, got {temperature}"),
        (top_k is not None and top_k < 1, f"top-k must be at least 1, got {top_k}"),
        (top_p is not None and not 0 < top_p <= 1, f"top-p must be in (0, 1], got {top_p}"),
    ]
    for failed, message in checks:
        if failed:
            raise SelfReplayError(message)


@torch.inference_mode()
def sample(model: Transformer, first_token: int | torch.Tensor, num_samples: int, length: int | None = None,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, generator: torch.Generator | None = None,
           batch_size: int = 128, return_hidden: bool = False,
           compile: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequences [num_samples, length] that start with first_token (an id, or one per sample).

    Each batch decodes one token at a time through a KV cache: one forward pass over the
    first token, then one single-token pass per position. length defaults to the model's T.
    With return_hidden, also the model's final hidden states [num_samples, length, D] at every
    position of the samples (what `model.hidden` gives on them; `model.head` maps them to the
    model's logits), which the decoding computes anyway but for the last position.

    Per draw rather than per step: every position's rotation matrix, the output projection
    transposed to [D, V] (a contiguous right operand: the largest matrix product of a step runs
    faster), and one logits buffer [batch_size, V] that each step's product writes into.

    compile: run each step's transformer through torch.compile (dynamic shapes: one compilation
    serves every position after the first, and is reused by later draws from the same model),
    which fuses the step's many small operations; the draw itself stays eager. The same
    distribution, but not the same samples as eager decoding for a seed: fused arithmetic
    rounds differently, and a rare draw lands on the other side of a boundary.
    """
    config = model.config
    length = config.T if length is None else length
    check_sampling(num_samples, length, config.T, temperature, top_k, top_p)
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    first = torch.as_tensor(first_token, dtype=torch.long, device=device).expand(num_samples)
    out = torch.empty(num_samples, length, dtype=torch.long, device=device)
    dtype = next(model.parameters()).dtype
    hidden = torch.empty(num_samples, length, config.D, dtype=dtype, device=device) if return_hidden else None
    rotations = rotation_matrices(model.rope_cos[:length], model.rope_sin[:length])  # [length, H, H]
    head = model.head.weight.t().contiguous()  # [D, V]
    logits = torch.empty(min(batch_size, num_samples), config.V, dtype=dtype, device=device)
    step = functools.partial(compiled_decode_step(), model) if compile else model.decode_step
    for lo in range(0, num_samples, batch_size):
        hi = min(lo + batch_size, num_samples)
        cache = KVCache(config, hi - lo, device=device, dtype=KVCache.storage_dtype(dtype, device), length=length)
        tokens = out[lo:hi]
        tokens[:, 0] = first[lo:hi]
        for pos in range(length - 1):
            h = step(tokens[:, pos], *cache.through(pos), rotations[pos])
            if hidden is not None:
                hidden[lo:hi, pos] = h
            step_logits = torch.mm(h, head, out=logits[:hi - lo])
            tokens[:, pos + 1] = next_token(step_logits, temperature, top_k, top_p, generator)
        if hidden is not None:
            hidden[lo:hi, length - 1] = step(tokens[:, -1], *cache.through(length - 1), rotations[length - 1])
    return (out, hidden) if return_hidden else out


@functools.cache
def compiled_decode_step():
    """Transformer.decode_step through torch.compile with dynamic shapes, made once per process:
    each model gets its compiled code on its first draw and keeps it for every later one (a new
    torch.compile wrapper per draw would compile again)."""
    return torch.compile(Transformer.decode_step, dynamic=True)


def sample_cli(run_dir: str, domain: str, num_samples: int, length: int | None, temperature: float,
               top_k: int | None, top_p: float | None, seed: int, device: str) -> None:
    """`selfreplay sample`: print decoded samples, one block each, EOS shown as a line of its own."""
    if seed < 0:
        raise SelfReplayError(f"--seed must be >= 0, got {seed}")
    model = Transformer.from_pretrained(run_dir, device=resolve_device(device)).eval()
    check_sampling(num_samples, model.config.T if length is None else length, model.config.T, temperature,
                   top_k, top_p)
    tokenizer = load_tokenizer(Path(run_dir))
    domain_id = tokenizer.domain_id(domain)
    tokens = sample(model, domain_id, num_samples, length, temperature, top_k, top_p, seed=seed).tolist()
    for i, row in enumerate(tokens):
        print(f"--- sample {i + 1} (domain {tokenizer.domain_name(domain_id)}) ---")
        documents, current = [], []
        for token in row[1:]:
            if token == tokenizer.eos_id:
                documents.append(current)
                current = []
            else:
                current.append(token)
        documents.append(current)
        print("\n<|eos|>\n".join(tokenizer.decode(doc) for doc in documents))
