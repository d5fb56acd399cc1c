"""The Hugging Face model family: any `AutoModelForCausalLM` (init=hf:NAME_OR_PATH) trained by
the same loop as the built-in Transformer (`selfreplay.training`), and replayed the same way
under the Trainer (`selfreplay.hf.trainer`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from selfreplay.config import ReplayConfig, RunConfig
from selfreplay.data.sequences import Data, TokenSequences
from selfreplay.data.text import (
    holds_conversations,
    label_mask,
    load_rows,
    pack_text,
    pad_batch,
    pad_id,
)
from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.validation import ValidationSet
from selfreplay.model.fingerprint import model_fingerprint
from selfreplay.model.hf import (
    CausalLM,
    frozen_reference,
    load_model,
    load_model_config,
    load_tokenizer,
    num_parameters,
    with_adapters,
)
from selfreplay.objective.methods import replay_method
from selfreplay.replay.hf_pool import hf_replay_pool, replay_format
from selfreplay.replay.pool import stored_replay
from selfreplay.replay.store import StoredPool
from selfreplay.rundir import notice


class HuggingFaceFamily:
    """Any `AutoModelForCausalLM` (init=hf:NAME_OR_PATH), with its own tokenizer; LoRA through peft,
    where π0 is the same network with its adapters disabled."""

    def load_data(self, config: RunConfig, mode: str) -> Data:
        """The model's tokenizer; data.train as conversations (a row each, only the assistant's
        tokens counting) or packed text, data.old_text as packed text, in rows of model.T tokens;
        and the replay format (its chat template and prompts checked before anything is written)."""
        tokenizer = load_tokenizer(model_name(config), config.model.trust_remote_code)
        T, d, r = config.model.T, config.data, config.replay
        if holds_conversations(d.old_text, d.chat_field):
            raise SelfReplayError(f"data.old_text={d.old_text} holds conversations ({d.chat_field!r}): old_text is "
                                  f"measured as plain text, give it {d.text_field!r} records")
        train = load_rows(d.train, tokenizer, T, d.text_field, d.chat_field)
        old = pack_text(d.old_text, tokenizer, T, d.text_field)
        return Data(tokenizer, row_sequences(train, tokenizer, T, d.val_sequences, d.seed, d.train),
                    measured_rows(row_sequences(old, tokenizer, T, 0, d.seed, d.old_text), d.val_sequences, d.seed),
                    None, replay_form(tokenizer, r))

    def load_models(self, config: RunConfig, mode: str, device, load_reference: bool = True):
        # float32 weights, as the built-in model's: precision=bf16 runs the matmuls under autocast
        model = load_model(model_name(config), torch.float32, device, config.model.trust_remote_code)
        # π0 as loaded, what a stored pool must have been drawn by (hashed only when a pool is replayed)
        self.pi0_fingerprint = model_fingerprint(model) if config.replay.pool is not None else None
        if config.lora.rank > 0:
            from peft import LoraConfig

            alpha = config.lora.alpha if config.lora.alpha is not None else config.lora.rank
            with torch.random.fork_rng():  # the adapters' random init, from the run's seed alone
                torch.manual_seed(config.seed)
                model = with_adapters(model, LoraConfig(r=config.lora.rank, lora_alpha=alpha,
                                                        target_modules="all-linear"))
        model.train()
        lm = CausalLM(model)
        reference = frozen_reference(lm, getattr(torch, config.model.reference_dtype)) if load_reference else None
        return lm, reference, [p for p in model.parameters() if p.requires_grad]

    def make_replay(self, config: RunConfig, reference, data: Data, device, fingerprint: str | None = None,
                    rank: int = 0, world_size: int = 1):
        """π0's samples, from BOS or inside the chat template (replay.chat), as `replay_form` set them up."""
        method = replay_method(config.replay.method)
        if not method.needs_replay:
            return None
        if reference is None:  # the run holds no π0: its stored pool, pass after pass
            return stored_replay(StoredPool(config.replay.pool, fingerprint, device),
                                 config.replay.batch_size, device, config.seed + rank, rank, world_size)
        return hf_replay_pool(reference, data.replay_format, config.replay, method.keeps_hidden, seed=config.seed,
                              rank=rank, world_size=world_size, fingerprint=fingerprint)

    def validation_sets(self, config: RunConfig, mode: str, data: Data, reference) -> dict:
        sets = {"old": ValidationSet(torch.from_numpy(data.old.sequences), reference, batch_size=8)}
        if config.data.val_sequences:
            new = ValidationSet(data.train.validation(), reference, data.train.validation_mask(), batch_size=8)
            sets = {"new": new, **sets}
        return sets

    def drift(self, model, config: RunConfig) -> None:
        return None  # θinit, the random draw pretraining started from, is unknown

    def weights(self, model) -> dict[str, torch.Tensor]:
        """The trainable weights alone (the LoRA adapters, or every weight; a tied one once):
        the frozen rest is the model as loaded."""
        return {name: p.detach() for name, p in model.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_weights(self, model, weights: dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in model.model.named_parameters() if p.requires_grad}
        if set(params) != set(weights):
            raise ValueError(f"the checkpoint holds {len(weights)} trainable weights, the model {len(params)}")
        for name, p in params.items():
            p.copy_(weights[name])

    def save_start(self, directory, tokenizer) -> None:
        pass  # the tokenizer goes with the model at the end: an unfinished run holds selfreplay's files alone

    def save_final(self, model, tokenizer, config: RunConfig, directory) -> None:
        """The finetuned model (or, with LoRA, its adapter) and the tokenizer by save_pretrained,
        loadable by AutoModelForCausalLM (or peft) alone."""
        model.model.save_pretrained(directory.path)
        tokenizer.save_pretrained(directory.path)

    def params(self, model, config: RunConfig) -> tuple[int, None]:
        return num_parameters(model), None


def replay_form(tokenizer, replay: ReplayConfig):
    """How π0's replay samples are drawn (from BOS, or inside the chat template: selfreplay.replay.hf_pool),
    its chat template and prompts checked now; None where the method replays nothing."""
    if not replay_method(replay.method).needs_replay:
        return None
    return replay_format(tokenizer, replay.chat, replay.system, replay.prompts, replay.stop_at_eos)


def measured_rows(old: TokenSequences, count: int, seed: int) -> TokenSequences:
    """`count` rows of the old-domain text (a seeded choice; all of them if it holds fewer): the
    old domain is only measured, and measuring all of a large file at each log point would cost
    more than training."""
    rows = old.sequences
    if len(rows) > count:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), count, replace=False))]
    return TokenSequences.from_rows(rows, 0, seed, name=old.path)


def model_name(config: RunConfig) -> str:
    """The model init=hf: names: a directory, a hub id or a GGUF file (model.gguf_file: one in the directory)."""
    name = config.init.removeprefix("hf:")
    return str(Path(name) / config.model.gguf_file) if config.model.gguf_file else name


def row_sequences(rows: list[dict], tokenizer, T: int, val_sequences: int, seed: int, name: str) -> TokenSequences:
    """Rows {"input_ids", "labels"} right-padded to T, with the mask of the labels that count
    (None when every token counts, as in packed text)."""
    batch = pad_batch(rows, pad_id(tokenizer), width=T)
    mask = label_mask(batch["labels"])
    return TokenSequences.from_rows(batch["input_ids"].numpy(), val_sequences, seed, name=name,
                                    mask=None if mask.all() else mask.numpy())


def fit_to_context(config: RunConfig, t_given: bool) -> RunConfig:
    """`config` with model.T no longer than the model's context: cut to it, with a notice, where
    model.T was left at its default; one line where the user asked for more."""
    try:
        model_config = load_model_config(model_name(config), config.model.trust_remote_code)
    except (OSError, ValueError, SelfReplayError):
        return config  # loading the model says what is wrong, in its own words
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if context is None or config.model.T <= context:
        return config
    if t_given:
        raise SelfReplayError(f"model.T={config.model.T} exceeds the model's context of {context} tokens: "
                              f"set model.T <= {context}")
    notice(f"model.T follows the model's context: {context} tokens (the default, {config.model.T}, is longer)")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, T=context))
