"""LoRA baseline for the built-in model: rank-r adapters on every non-embedding matrix.

W x + (alpha / r) · B A x with A ~ N(0, 1/in) and B = 0, so the adapted model
starts exactly at the pretrained one. Only A and B train.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTED = ("qkv", "out", "up", "down")  # the non-embedding matrices of a block


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) * base.in_features**-0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.A.t()) @ self.B.t())

    def merged(self) -> nn.Linear:
        """The plain linear layer with the adapter folded into its weight."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.B @ self.A)
        self.base.weight.requires_grad_(True)
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze `model` and wrap its block matrices in adapters; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name in ADAPTED:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return [p for p in model.parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving a plain model (same state-dict keys as before)."""
    for module in list(model.modules()):
        for name in ADAPTED:
            child = getattr(module, name, None)
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every adapter folded in, under the plain model's keys."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.base.weight + module.scale * (module.B @ module.A)
    for name, tensor in model.state_dict().items():
        if not any(name.endswith(s) for s in (".base.weight", ".A", ".B")):
            state[name] = tensor
    return state
