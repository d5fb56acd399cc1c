"""`selfreplay export RUN --hf OUT`: a selfreplay model as a transformers model directory.

The built-in model (selfreplay.model.transformer) is pre-norm with RMSNorm without a scale, RMSNorm
on each head's queries and keys before RoPE (rotate-half layout), a plain GELU MLP of
width 4·D, no biases, untied embeddings and a final RMSNorm. Of the architectures in
transformers, Apertus has every one of these: per-head q_norm/k_norm before RoPE, a
non-gated MLP with a configurable activation, untied embeddings, no biases. Its norms
carry a learned scale, written as ones, and its RoPE is set to the plain kind (its default
is Llama-3 scaling). The export loads with `AutoModelForCausalLM` alone, no remote code,
and gives the built-in model's logits (up to float rounding).

The tokenizer goes along as a `PreTrainedTokenizerFast` with EOS = <|eos|> and BOS = the
domain token of the old domain: sampling "from BOS" then starts where selfreplay's own
self-replay starts, at the domain id.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer as RustTokenizer

from selfreplay.data.tokenizer import (
    EOS_TOKEN,
    TOKENIZER_FILE,
    domain_token,
    load_tokenizer,
)
from selfreplay.data.tokens import read_token_meta
from selfreplay.errors import SelfReplayError
from selfreplay.model.transformer import ModelConfig, Transformer

RMS_EPS = 1e-6  # selfreplay.model.transformer.rms_norm


def apertus_config(config: ModelConfig, bos_id: int, eos_id: int):
    """The transformers config of the same shape as a built-in model config."""
    from transformers import ApertusConfig

    return ApertusConfig(vocab_size=config.V, hidden_size=config.D, intermediate_size=4 * config.D,
                         num_hidden_layers=config.L, num_attention_heads=config.heads,
                         num_key_value_heads=config.heads, head_dim=config.H, hidden_act="gelu",
                         max_position_embeddings=config.T, rms_norm_eps=RMS_EPS,
                         rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
                         attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                         bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def apertus_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The built-in weights under Apertus's names; every norm scale is one."""
    D = model.config.D
    ones = lambda n: torch.ones(n, dtype=model.embed.weight.dtype)  # noqa: E731
    state = {"model.embed_tokens.weight": model.embed.weight, "lm_head.weight": model.head.weight,
             "model.norm.weight": ones(D)}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(D)  # the rows are [q; k; v], each heads × H
        state.update({
            prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": block.attn.out.weight,
            prefix + "self_attn.q_norm.weight": ones(model.config.H),
            prefix + "self_attn.k_norm.weight": ones(model.config.H),
            prefix + "mlp.up_proj.weight": block.up.weight, prefix + "mlp.down_proj.weight": block.down.weight,
            prefix + "attention_layernorm.weight": ones(D), prefix + "feedforward_layernorm.weight": ones(D),
        })
    return {name: t.detach().clone().contiguous() for name, t in state.items()}


def export_hf(run_dir: str | Path, out: str | Path, domain: str | None = None) -> Path:
    """Write the run's model and tokenizer to `out` as a transformers model directory.
    domain: the domain whose token becomes BOS (default: the domain the run trained on)."""
    from transformers import ApertusForCausalLM, PreTrainedTokenizerFast

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise SelfReplayError(f"{out} is not empty: choose another --hf directory")
    model = Transformer.from_pretrained(run_dir).float().eval()
    tokenizer = load_tokenizer(run_dir)
    bos_id = tokenizer.domain_id(domain if domain is not None else _trained_domain(run_dir))
    config = apertus_config(model.config, bos_id, tokenizer.eos_id)
    hf_model = ApertusForCausalLM(config)
    hf_model.load_state_dict(apertus_state_dict(model), strict=True)
    hf_model.save_pretrained(out)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=RustTokenizer.from_file(str(run_dir / TOKENIZER_FILE)),
                                           bos_token=domain_token(tokenizer.domain_name(bos_id)),
                                           eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                           model_max_length=model.config.T)
    hf_tokenizer.save_pretrained(out)
    return out


def _trained_domain(run_dir: Path) -> int:
    """The domain id of the run's training token file (slot 0 when that file is gone)."""
    train = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data", {}).get("train")
    try:
        return read_token_meta(train).domain_id if train else 0
    except SelfReplayError:
        return 0
