"""A model's fingerprint: a short digest of its weights, so that a replay pool knows which π0 drew it.

The digest covers every tensor of the state dict: its name, shape, dtype and a deterministic
sample of its bytes. A tensor of at most SAMPLE_BYTES × 3 bytes is hashed whole; a larger one
through its first and last SAMPLE_BYTES and SAMPLE_BYTES more read at a fixed stride across it.

The trade-off: hashing every byte of a 1B-parameter model reads 2-4 GB (seconds on a CPU);
the sample reads at most 192 KiB a tensor, so a model of a few hundred tensors hashes in
milliseconds wherever it lives. Any training step, a different checkpoint, a different dtype
or a different init changes sampled elements, and every change of a tensor under 192 KiB (a
norm, a bias) is seen; what the sample cannot see is a hand edit of a few elements in the
unsampled part of a large matrix.

Adapters are left out: π0 is the network with its adapters disabled, so a peft model (or the
built-in model with LoRA) has the fingerprint of its base model.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from selfreplay.model.lora import LoRALinear

SAMPLE_BYTES = 64 * 1024  # bytes read from each end of a tensor, and again at a stride across it
DIGEST_CHARS = 16  # 64 bits of sha256: ample to tell models apart, short enough for a message


def model_fingerprint(model: nn.Module) -> str:
    """A 16-character hex digest of `model`'s weights (built-in Transformer, transformers model,
    or a peft model around one, whose adapters are left out). Equal for a model, its copy and
    its reload (any device); different after a training step or in another dtype."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_weights(model).items()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sampled_bytes(tensor))
    return digest.hexdigest()[:DIGEST_CHARS]


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of π0: `model`'s without adapter weights, under the base model's names."""
    get_base = getattr(model, "get_base_model", None)  # a peft model
    if get_base is not None:
        adapters = set(getattr(model, "peft_config", {}) or {"default"})
        state = {}
        for name, tensor in get_base().state_dict().items():
            parts = name.split(".")
            if adapters.isdisjoint(parts):  # lora_A.default.weight, modules_to_save.default.weight
                state[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = tensor
        return state
    lora = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if not lora:
        return model.state_dict()
    adapter_names = {f"{name}.{part}" for name in lora for part in ("A", "B")}
    renamed = {f"{name}.base.weight": f"{name}.weight" for name in lora}
    return {renamed.get(k, k): v for k, v in model.state_dict().items() if k not in adapter_names}


def sampled_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of `tensor` that the fingerprint reads: all of a small tensor; of a large one, the
    first and last SAMPLE_BYTES and SAMPLE_BYTES at a stride that shares no factor with the last
    dimension (so the strided sample moves across columns rather than reading one column)."""
    flat = tensor.detach().reshape(-1)
    count = max(1, SAMPLE_BYTES // flat.element_size())  # elements in each part
    if flat.numel() <= 3 * count:
        return _bytes(flat)
    stride = max(1, (flat.numel() - 2 * count) // count)
    width = tensor.shape[-1] if tensor.dim() else 1
    while math.gcd(stride, width) != 1:
        stride += 1
    middle = flat[count:-count:stride][:count]
    return b"".join(_bytes(part) for part in (flat[:count], middle, flat[-count:]))


def _bytes(part: torch.Tensor) -> bytes:
    """The raw bytes of a 1-d tensor, copied to the CPU (bfloat16 included: no numpy dtype needed)."""
    return part.contiguous().view(torch.uint8).cpu().numpy().tobytes()
