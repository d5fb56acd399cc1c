"""Model families, side by side: the built-in Transformer (`builtin`) and any Hugging Face causal
LM (`hf`, init=hf:NAME_OR_PATH), each supplying what `base.Family` says; the loop, the replay run,
the objective, the replay pool and the measurements are shared."""

from __future__ import annotations

from selfreplay.config import RunConfig, is_hf
from selfreplay.families.base import Family, ReplaySource
from selfreplay.families.builtin import BuiltinFamily
from selfreplay.families.hf import (
    HuggingFaceFamily,  # transformers itself is imported only when a model is loaded
)

__all__ = ["Family", "ReplaySource", "family_of"]


def family_of(config: RunConfig) -> Family:
    """The family that runs `config`: Hugging Face for init=hf:..., the built-in Transformer otherwise."""
    return HuggingFaceFamily() if is_hf(config) else BuiltinFamily()
