"""The reference decoder-only transformer (docs/method.md, "The model").

Pre-norm blocks; RMSNorm without a learned scale; RoPE; RMSNorm on queries and
keys (QK-norm); GELU MLP of width 4·D; no biases; untied input and output
embeddings; a final RMSNorm before the output projection. `H` is the head
dimension (heads = D / H), as in the paper's configs.

A run directory holds `weights.safetensors` and `config.yaml` (its `model:`
section is a `ModelConfig`); loading never unpickles.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from selfreplay.config import ModelConfig, build
from selfreplay.errors import SelfReplayError
from selfreplay.rundir import CONFIG_NAME, WEIGHTS_NAME, write_atomic

RMS_EPS = 1e-6


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dimension, without a learned scale."""
    return F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)


def rotary_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, H/2] for rotary position embeddings."""
    inv_freq = config.rope_base ** (-torch.arange(0, config.H, 2, dtype=torch.float32, device=device) / config.H)
    angles = torch.outer(torch.arange(config.T, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension. x: [B, heads, t, H]; cos, sin: [t, H/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Matrices R [..., H, H] with x @ R = apply_rotary(x) at one position each (cos, sin:
    [..., H/2], e.g. [T, H/2] for every position). One decoding step rotates every query and
    key of a layer with one matrix product; the sampler builds the table once per draw."""
    half = cos.shape[-1]
    idx = torch.arange(half, device=cos.device)
    rotation = torch.zeros(*cos.shape[:-1], 2 * half, 2 * half, dtype=torch.float32, device=cos.device)
    cos, sin = cos.float(), sin.float()
    rotation[..., idx, idx] = rotation[..., idx + half, idx + half] = cos
    rotation[..., idx + half, idx] = -sin
    rotation[..., idx, idx + half] = sin
    return rotation


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused causal attention over [B, heads, t, H]. On CPU it runs in float32 even under bf16
    autocast: PyTorch's CPU fused attention, forward and backward, is 2-2.4x slower in bf16
    than in float32 at the `tiny` shapes (benchmarks/attention_kernels.py)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    return y.type_as(v)


def plus_linear(residual: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """residual + layer(x) for x [B, in], residual [B, out]: for a plain bias-free nn.Linear the
    matrix product adds the residual itself (addmm), one pass and one allocation fewer; any
    other layer (a LoRA adapter) is called as it is."""
    if type(layer) is nn.Linear and layer.bias is None:
        return torch.addmm(residual, x, layer.weight.t())
    return residual + layer(x)


class KVCache:
    """Preallocated keys and values for incremental decoding: [L, B, heads, T, H] each. Entries
    past the positions written so far are never read, so they start uninitialised."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32, length: int | None = None):
        shape = (config.L, batch_size, config.heads, length or config.T, config.H)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @staticmethod
    def storage_dtype(model_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
        """float32 on CPU whatever the model's dtype, the model's dtype elsewhere. On CPU, bf16
        matmuls over cache slices go through oneDNN, which builds (and caches) kernels for each
        of the T slice lengths: that held 3.4 GB while sampling `small` at batch 128, and decoded
        slower than float32 does."""
        return torch.float32 if torch.device(device).type == "cpu" else model_dtype

    def through(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of keys and values [L, B, heads, pos + 1, H] through position `pos`: what one
        decoding step at `pos` reads, and writes at its last position (Transformer.decode_step)."""
        return self.k[:, :, :, :pos + 1], self.v[:, :, :, :pos + 1]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values [B, heads, t, H] of positions start..start+t-1."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.H
        self.qkv = nn.Linear(config.D, 3 * config.D, bias=False)
        self.out = nn.Linear(config.D, config.D, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        B, t, D = x.shape
        q, k, v = self.qkv(x).view(B, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, h, t, H]
        q, k = apply_rotary(rms_norm(q), cos, sin), apply_rotary(rms_norm(k), cos, sin)
        if cache is None:
            y = causal_attention(q, k, v)
        else:
            end = start + t
            cache.write(layer, start, k, v)
            keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # [B, h, end, H] each
            q = q.to(keys.dtype)  # the cache may be kept in float32 for a bf16 model (see KVCache)
            if t == 1:  # one new query attends to every cached position: two small matmuls, with
                # the softmax in float32 (as fast as the fused kernel or faster: benchmarks/attention_kernels.py)
                scores = (q @ keys.transpose(-1, -2)).float() * self.head_dim**-0.5
                y = scores.softmax(-1).type_as(values) @ values
            else:  # new queries at positions start..end-1 see the cache and each other causally
                mask = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            y = y.type_as(x)
        return self.out(y.transpose(1, 2).reshape(B, t, D))

    def decode(self, x: torch.Tensor, rotation: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               layer: int, residual: torch.Tensor) -> torch.Tensor:
        """residual + the attention output [B, D] of one new position per row (x: [B, D],
        normalised; rotation: [H, H] from rotation_matrices at that position; keys, values:
        [L, B, heads, pos + 1, H], the cache through the new position, which this step writes
        at `layer`), the same as residual + forward(x[:, None], ..., cache, layer, pos) up to
        rounding, in fewer operations:
        - a rotation preserves norms, so queries and keys are normalised and then rotated by one
          matrix product, and the query scale H^-1/2 rides on the queries' normalising factors;
        - the residual is added by the output projection itself (plus_linear)."""
        B, D = x.shape
        h, H = self.heads, self.head_dim
        qkv = self.qkv(x).view(B, 3, h, H)
        qk = qkv[:, :2]
        scale = qk.square().mean(-1, keepdim=True).add_(RMS_EPS).rsqrt_()  # [B, 2, h, 1]: 1 / rms
        scale[:, 0] *= H**-0.5
        qk = ((qk * scale).view(-1, H).to(rotation.dtype) @ rotation).view(B, 2, h, H).to(keys.dtype)
        attend = torch.ops.selfreplay.attend_new_position if torch.compiler.is_compiling() else attend_new_position
        y = attend(qk[:, 0], qk[:, 1], qkv[:, 2], keys, values, layer)
        return plus_linear(residual, y.reshape(B, D).type_as(x), self.out)


def attend_new_position(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor, layer: int) -> torch.Tensor:
    """One decoding step's attention in one layer: store the new position's key and value
    [B, heads, H] as the last position of keys[layer], values[layer] (keys, values:
    [L, B, heads, t, H], views of the cache), then attend from the query q [B, heads, H]
    (scaled) over all t positions. Returns [B, heads, H]. Two small batched matrix products
    with the softmax in float32, faster here than the fused kernel at one query
    (benchmarks/attention_kernels.py)."""
    keys, values = keys[layer], values[layer]
    keys[:, :, -1] = k
    values[:, :, -1] = v
    scores = q[:, :, None] @ keys.transpose(-1, -2)  # [B, heads, 1, t]
    return (scores.float().softmax(-1).type_as(values) @ values).squeeze(2)


# attend_new_position as one opaque operator inside a compiled decoding step: the compiler fuses
# the step's small operations around it, while the cache products stay the library's batched
# matrix products (on CPU, a step compiled with them left to Inductor decoded 3x slower). It
# mutates the whole cache views it is given, not views of one layer: PyTorch 2.13 wrote a mutated
# per-layer view back at the wrong layer. Defined through torch.library.Library rather than
# torch.library.custom_op, whose Python wrapper costs more per call (one call per layer and
# step; docs/performance.md has the measurement).
_OPERATORS = torch.library.Library("selfreplay", "DEF")
_OPERATORS.define("attend_new_position(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, "
                  "int layer) -> Tensor")
_OPERATORS.impl("attend_new_position", attend_new_position, "CompositeExplicitAutograd")


@torch.library.register_fake("selfreplay::attend_new_position")
def _(q, k, v, keys, values, layer):
    return torch.empty_like(q, dtype=values.dtype)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = Attention(config)
        self.up = nn.Linear(config.D, 4 * config.D, bias=False)
        self.down = nn.Linear(4 * config.D, config.D, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0):
        x = x + self.attn(rms_norm(x), cos, sin, cache, layer, start)
        return x + self.down(F.gelu(self.up(rms_norm(x))))

    def decode(self, x: torch.Tensor, rotation: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               layer: int) -> torch.Tensor:
        """forward() at one position per row, x: [B, D] (keys, values: the cache through that
        position, written at `layer`: Attention.decode); both residual additions ride on the
        projections' matrix products (plus_linear)."""
        x = self.attn.decode(rms_norm(x), rotation, keys, values, layer, residual=x)
        return plus_linear(x, F.gelu(self.up(rms_norm(x))), self.down)


class Transformer(nn.Module):
    """Decoder-only language model: tokens [B, t] -> logits [B, t, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.V, config.D)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.L))
        self.head = nn.Linear(config.D, config.V, bias=False)
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Reference init: normal with std D^-1/2 for every matrix, (4D)^-1/2 for the MLP down-projection."""
        D = self.config.D
        for name, p in self.named_parameters():
            std = (4 * D) ** -0.5 if name.endswith("down.weight") else D**-0.5
            p.normal_(0.0, std, generator=generator)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits [B, t, V] for tokens [B, t] at positions start..start+t-1 (start > 0 needs a cache)."""
        return self.head(self.hidden(tokens, cache, start))

    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """The normalised final hidden states [B, t, D] that the output projection `head` maps to logits."""
        t = tokens.shape[1]
        if start + t > self.config.T:
            raise ValueError(f"positions up to {start + t} exceed the model's context T={self.config.T}")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, start)
        return rms_norm(x)

    def decode(self, tokens: torch.Tensor, cache: KVCache, pos: int, rotation: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step: the final hidden states [B, D] after tokens [B] at position `pos`,
        with the cache holding positions < pos (this step writes `pos`). The same numbers as
        hidden(tokens[:, None], cache, pos)[:, 0] up to rounding, in fewer and larger operations:
        what the sampler runs once per position. rotation: rotation_matrices at `pos` [H, H]
        (the sampler builds every position's once per draw), else built here."""
        if pos >= self.config.T:
            raise ValueError(f"position {pos} is beyond the model's context T={self.config.T}")
        if rotation is None:
            rotation = rotation_matrices(self.rope_cos[pos], self.rope_sin[pos])
        return self.decode_step(tokens, *cache.through(pos), rotation)

    def decode_step(self, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    rotation: torch.Tensor) -> torch.Tensor:
        """decode() on views of the cache through the new position, keys and values
        [L, B, heads, pos + 1, H]: the position is their length, not an argument, so one
        compiled step (torch.compile with dynamic shapes) serves every position."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, rotation, keys, values, i)
        return rms_norm(x)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - self.head.weight.numel()

    def save_pretrained(self, run_dir: str | Path, extra_config: dict | None = None) -> None:
        """Write weights.safetensors and config.yaml (extra_config adds other sections) atomically."""
        save_checkpoint(self, run_dir, extra_config)

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> "Transformer":
        config = load_model_config(run_dir)
        model = cls(config).to(device)
        model.load_state_dict(load_weights(run_dir, device))
        return model


def save_checkpoint(model: nn.Module, run_dir: str | Path, extra_config: dict | None = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {**(extra_config or {}), "model": asdict(model.config)}
    write_atomic(run_dir / WEIGHTS_NAME, lambda p: save_file(state, str(p)))
    write_atomic(run_dir / CONFIG_NAME, lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)))


def load_model_config(run_dir: str | Path) -> ModelConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise SelfReplayError(f"{run_dir} has no {CONFIG_NAME}: pass a run directory written by selfreplay pretrain/finetune")
    try:
        section = (yaml.safe_load(path.read_text()) or {}).get("model")
    except yaml.YAMLError as e:
        raise SelfReplayError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(section, dict):
        raise SelfReplayError(f"{path} has no 'model:' section: it does not describe a selfreplay model")

    try:
        return build(ModelConfig, section, "model.")
    except SelfReplayError as e:
        raise SelfReplayError(f"{path}: {e}") from None


def load_weights(run_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(run_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise SelfReplayError(f"{run_dir} has no {WEIGHTS_NAME}: the run did not finish saving, or this is not a run directory")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise SelfReplayError(f"{path} is not a readable safetensors file ({e})") from None


def flops_per_token(config: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward) of the matrix multiplies: 6 × (the block
    matrices + the output projection) plus attention's 6·L·T·D (causal average). The input
    embedding is a table lookup and counts nothing."""
    return 6 * (config.non_embedding_params + config.V * config.D) + 6 * config.L * config.T * config.D


__all__ = ["ModelConfig", "Transformer", "KVCache", "save_checkpoint", "load_model_config", "load_weights",
           "flops_per_token", "rms_norm"]
