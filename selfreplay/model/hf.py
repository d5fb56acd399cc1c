"""Any `AutoModelForCausalLM` as the losses see a model: final hidden states and an output projection.

The objective (selfreplay.objective.losses) takes a model's final, normalised hidden states
[B, T, D] and its output-projection weight [V, D], and forms the logits itself a
block of rows at a time. `CausalLM` gives those two for a transformers model, or a
peft model around one, by its ordinary forward pass (so DDP and peft wrappers see
the call) with no logits computed.

π0, the frozen pretrained model, is the same network with its adapters disabled
when the model is a peft model (no second copy), and a frozen copy otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from selfreplay.errors import SelfReplayError, one_line
from selfreplay.rundir import notice

_NO_POSITIONS = torch.empty(0, dtype=torch.long)  # logits_to_keep: project no position onto the vocabulary
# config attributes of models whose logits are not hidden @ head.T (Gemma 2/3, Cohere, Granite)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def load_causal_lm(name_or_path: str, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                   trust_remote_code: bool = False):
    """(model, tokenizer) from a local directory or a hub id; one line of error when either is missing."""
    return (load_model(name_or_path, dtype, device, trust_remote_code),
            load_tokenizer(name_or_path, trust_remote_code))


def load_model(name_or_path: str, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               trust_remote_code: bool = False) -> nn.Module:
    """The AutoModelForCausalLM of a local directory, a hub id or a GGUF file (dtype None: the
    checkpoint's own; a GGUF file's weights are dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    name = _checked_name(name_or_path)
    gguf = gguf_file(name)
    if gguf is not None:
        return _dequantized(gguf, dtype).to(device)
    with _one_line_errors(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    return model.to(device)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a local model directory, a hub id or a GGUF file (its chat template included)."""
    from transformers import AutoTokenizer

    name = _checked_name(name_or_path)
    gguf = gguf_file(name)
    with _one_line_errors(name):
        if gguf is not None:
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """The transformers config of a local directory, a hub id or a GGUF file."""
    from transformers import AutoConfig

    gguf = gguf_file(_checked_name(name_or_path))
    if gguf is not None:
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def gguf_file(name: str) -> Path | None:
    """The GGUF file that `name` names (a path ending in .gguf, as llama.cpp and Ollama keep models),
    checked to be one; None for a model directory or a hub id."""
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf":
        return None
    from gguf import GGUFReader  # the hf extra: pip install selfreplay[hf]

    try:
        reader = GGUFReader(path)
        architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    except Exception as e:  # a bad magic number, a truncated file, a missing key: one line, whatever the cause
        raise SelfReplayError(f"{name} is not a readable GGUF file ({one_line(e)}): give a whole .gguf file, "
                              "as llama.cpp or Ollama keep them") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SelfReplayError(f"{name} holds a {architecture} model, which transformers cannot load from GGUF: "
                              f"use a model directory, or a GGUF of {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}")
    return path


def _dequantized(path: Path, dtype) -> nn.Module:
    """The model of a GGUF file as a plain transformers model (built from its config, given the
    dequantized weights), so that save_pretrained writes a safetensors directory of it."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    with _one_line_errors(str(path)):
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict())
    kinds = sorted({tensor.tensor_type.name for tensor in GGUFReader(path).tensors})
    notice(f"{path.name}: GGUF weights ({', '.join(kinds)}) dequantized to {str(dtype).removeprefix('torch.')}; "
           "a finetuned model is saved as a safetensors directory")
    return model.eval()


def _checked_name(name_or_path: str) -> str:
    """The name as transformers takes it; a path that names no directory (or GGUF file) is refused."""
    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    path = Path(name).expanduser()
    if looks_local and not (path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file())):
        raise SelfReplayError(f"model directory not found: {name}")
    return name


@contextlib.contextmanager
def _one_line_errors(name: str):
    try:
        yield
    except (OSError, ValueError, KeyError) as e:  # transformers reports a missing or unknown model these ways
        raise SelfReplayError(f"could not load model {name}: {one_line(e)}") from None


class CausalLM:
    """A transformers causal LM (or a peft model around one) as hidden states and a head.

    hidden(tokens) -> [B, T, D], the states that `head` maps to the model's logits;
    with a KV cache (`cache=`, as `new_cache()` gives) it continues a sequence."""

    def __init__(self, model: nn.Module):
        self.model = model
        inner = _transformers_model(model)
        self.config = inner.config
        check_plain_head(inner)
        parameters = inspect.signature(inner.forward).parameters
        self._no_logits = {"logits_to_keep": _NO_POSITIONS} if "logits_to_keep" in parameters else {}
        # transformers 5.x names the KV-cache argument `cache` and warns at `past_key_values` on every
        # call (the old name goes in 5.40); 4.x models, and remote code written for them, take only the old one
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @property
    def head(self) -> nn.Module:
        """The output projection; `head.weight` is [V, D] (tied to the input embedding in GPT-2)."""
        return _transformers_model(self.model).get_output_embeddings()

    def hidden(self, tokens: torch.Tensor, cache=None, model: nn.Module | None = None) -> torch.Tensor:
        """Final hidden states [B, t, D] of tokens [B, t]; `model` runs the call instead of
        self.model (the DDP-wrapped module inside a Trainer step)."""
        out = (model or self.model)(input_ids=tokens, use_cache=cache is not None, output_hidden_states=True,
                                    **{self._cache_arg: cache}, **self._no_logits)
        return out.hidden_states[-1]

    def new_cache(self, length: int):
        """An empty KV cache for `hidden(..., cache=)` of sequences up to `length` tokens,
        preallocated: a growing cache copies itself at every token, most of the decoding time."""
        from transformers import StaticCache

        return StaticCache(config=self.config, max_cache_len=length)

    def parameters(self):
        return self.model.parameters()

    @property
    def training(self) -> bool:
        """Whether the model is in training mode (dropout on), as nn.Module says it."""
        return self.model.training

    def train(self, mode: bool = True) -> "CausalLM":
        self.model.train(mode)
        return self

    def eval(self) -> "CausalLM":
        return self.train(False)


class AdapterFreeReference(CausalLM):
    """π0 of a peft model: the very same network, run with its adapters disabled and no gradients."""

    def hidden(self, tokens: torch.Tensor, cache=None, model: nn.Module | None = None) -> torch.Tensor:
        training = self.model.training
        self.model.eval()  # π0 has no dropout, even in the middle of a training step
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return super().hidden(tokens, cache)
        finally:
            self.model.train(training)


def with_adapters(model: nn.Module, peft_config) -> nn.Module:
    """`model` wrapped by peft with the adapters of `peft_config`; without the deprecation warning
    transformers 5 raises at peft's use of `is_gradient_checkpointing` (nothing a user can change)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def frozen_reference(lm: CausalLM, dtype: torch.dtype | None = None) -> CausalLM:
    """π0 for finetuning `lm`: the adapter-disabled view of a peft model, else a frozen copy
    (in `dtype`, say bfloat16 to halve its memory; default the model's own dtype)."""
    if hasattr(lm.model, "disable_adapter"):
        return AdapterFreeReference(lm.model)
    copied = copy.deepcopy(_transformers_model(lm.model)).eval().requires_grad_(False)
    return CausalLM(copied.to(dtype) if dtype is not None else copied)


def check_plain_head(model: nn.Module) -> None:
    """Refuse a model whose logits are not `hidden @ head.weight.T`: soft-capped or scaled logits,
    or a biased output projection, which the blockwise losses would silently get wrong."""
    for name in _LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0):
            raise SelfReplayError(f"{type(model).__name__} transforms its logits ({name}={value}): "
                                  "self-replay supports models whose logits are hidden states @ lm_head.weight")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise SelfReplayError(f"{type(model).__name__} has no bias-free output projection: "
                              "self-replay supports models whose logits are hidden states @ lm_head.weight")


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def num_parameters(*models) -> int:
    """Parameters held by the given models together, a shared tensor counted once."""
    seen = {p.data_ptr(): p.numel() for m in models for p in m.parameters()}
    return sum(seen.values())
