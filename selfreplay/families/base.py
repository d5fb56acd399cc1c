"""What a model family supplies: a run does differently for the built-in Transformer
(`selfreplay.families.builtin`) and for a Hugging Face causal LM (init=hf:NAME_OR_PATH,
`selfreplay.families.hf`) only what `Family` says. The loop, the objective (`selfreplay.objective.methods`), the replay pool
(`selfreplay.replay.pool`), the measurements (`selfreplay.evaluation.validation`) and the log lines
are shared; a family supplies only what depends on the model, as `Family` says.

A model is anything with `hidden(tokens)` [B, t, D], `head.weight` [V, D], `parameters()`,
`train()` and `eval()`: the Transformer itself, or selfreplay.model.hf.CausalLM.
"""

from __future__ import annotations

from typing import Protocol

import torch

from selfreplay.config import RunConfig
from selfreplay.data.sequences import Data
from selfreplay.evaluation.validation import ValidationSet
from selfreplay.replay.samples import ReplaySamples
from selfreplay.rundir import RunDirectory


class ReplaySource(Protocol):
    """Where replay batches come from: a pool of π0's samples, or the old domain's data."""

    def next_batch(self) -> ReplaySamples: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Family(Protocol):
    """What a run asks of a model family (the loop all of it; the Trainer `make_replay`)."""

    def load_data(self, config: RunConfig, mode: str) -> Data:
        """The tokenizer and the rows of each domain, checked before anything is written."""

    def load_models(self, config: RunConfig, mode: str, device,
                    load_reference: bool = True) -> tuple[object, object | None, list]:
        """(θ, π0 when finetuning and load_reference or None, θ's trainable parameters); keeps
        `pi0_fingerprint`, π0's model_fingerprint, when replay.pool is set."""

    def make_replay(self, config: RunConfig, reference, data: Data, device, fingerprint: str | None = None,
                    rank: int = 0, world_size: int = 1) -> ReplaySource | None:
        """The replay source (None where the run replays nothing); with reference None (a run that
        holds no π0), the stored pool alone. fingerprint: π0's, that a stored pool must match;
        rank, world_size: this process's own samples among world_size drawing each their own."""

    def validation_sets(self, config: RunConfig, mode: str, data: Data, reference) -> dict[str, ValidationSet]: ...

    def drift(self, model, config: RunConfig) -> float | None:
        """‖θ − θ0‖ / ‖θ0 − θinit‖, or None where θinit is unknown."""

    def weights(self, model) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of θ."""

    def load_weights(self, model, weights: dict[str, torch.Tensor]) -> None: ...
    def save_start(self, directory: RunDirectory, tokenizer) -> None: ...
    def save_final(self, model, tokenizer, config: RunConfig, directory: RunDirectory) -> None: ...

    def params(self, model, config: RunConfig) -> tuple[int, int | None]:
        """(parameters, non-embedding parameters) for summary.json."""
