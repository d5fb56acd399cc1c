"""The built-in Transformer's family: selfreplay's own model, pretrained by `selfreplay pretrain`
(init=RUN_DIR), its token files, its replay sampled from domain tokens."""

from __future__ import annotations

import copy
import math

import torch

from selfreplay.config import RunConfig, read_init_run, to_dict
from selfreplay.data.sequences import Data, SequenceStream, TokenSequences
from selfreplay.data.tokenizer import load_tokenizer
from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.validation import ValidationSet, weight_drift
from selfreplay.model.fingerprint import model_fingerprint
from selfreplay.model.lora import add_lora, effective_weights, merge_lora
from selfreplay.model.transformer import Transformer, save_checkpoint
from selfreplay.objective.methods import replay_method
from selfreplay.replay.pool import RealReplay, self_replay_pool, stored_replay
from selfreplay.replay.store import StoredPool


class BuiltinFamily:
    """selfreplay's own Transformer, pretrained by `selfreplay pretrain` (init=RUN_DIR)."""

    def load_data(self, config: RunConfig, mode: str) -> Data:
        """The tokenizer and token files, each checked against the model's vocabulary."""
        tokenizer = load_tokenizer(config.data.tokenizer or config.init)
        if tokenizer.vocab_size > config.model.V:
            raise SelfReplayError(f"the tokenizer has {tokenizer.vocab_size} ids but model.V={config.model.V}: "
                                  f"set model.V >= {tokenizer.vocab_size}")
        split = dict(T=config.model.T, val_sequences=config.data.val_sequences, seed=config.data.seed,
                     fingerprint=tokenizer.fingerprint)
        read = lambda path: TokenSequences(path, **split) if path else None  # noqa: E731
        data = Data(tokenizer, read(config.data.train), read(config.data.old) if mode == "finetune" else None,
                    read(config.data.mix))
        if mode == "finetune" and data.old is None:
            raise SelfReplayError("finetuning needs the old domain's token file: set data.old=TOKEN_FILE")
        for sequences in (data.train, data.old, data.mix):
            if sequences is not None:
                sequences.check_vocabulary(config.model.V)
        if mode == "finetune":
            replay_domains(config, data)  # names the tokenizer does not know are refused here, before any write
        return data

    def load_models(self, config: RunConfig, mode: str, device, load_reference: bool = True):
        """θ (fresh, or the init run's weights, with LoRA adapters when lora.rank > 0), the frozen
        π0 when finetuning (and load_reference), and the trainable parameters; keeps θ0 and θinit
        for `drift`."""
        if mode != "finetune":
            model = Transformer(config.model)
            model.reset_parameters(torch.Generator().manual_seed(config.seed))
            return model.to(device).train(), None, list(model.parameters())
        model = Transformer.from_pretrained(config.init, device=device).train()
        self.pi0_fingerprint = model_fingerprint(model) if config.replay.pool is not None else None
        reference = Transformer.from_pretrained(config.init, device=device).eval().requires_grad_(False) \
            if load_reference else None
        self.start_state = {k: v.clone() for k, v in model.state_dict().items()}
        init_model = Transformer(config.model)  # the same draw as the init run's, from its seed
        init_model.reset_parameters(torch.Generator().manual_seed(read_init_run(config.init).seed))
        self.init_state = {k: v.to(device) for k, v in init_model.state_dict().items()}
        params = add_lora(model, config.lora.rank, config.lora.alpha) if config.lora.rank > 0 else list(model.parameters())
        return model, reference, params

    def make_replay(self, config: RunConfig, reference, data: Data, device, fingerprint: str | None = None,
                    rank: int = 0, world_size: int = 1):
        """The replay source of a finetuning run, or None when its method replays nothing."""
        r, method = config.replay, replay_method(config.replay.method)
        if not method.needs_replay and r.fraction == 0:
            return None
        rows = r.batch_size if method.needs_replay else math.floor(r.fraction * config.optim.batch_size)
        if r.source == "self":
            stored = StoredPool(r.pool, fingerprint, device) if r.pool is not None else None
            if reference is None:
                return stored_replay(stored, rows, device, config.seed + rank, rank, world_size)
            sampler = decoding_model(reference, config.precision, device)
            return self_replay_pool(sampler, replay_domains(config, data), r, method.keeps_hidden, config.seed, rows,
                                    stored)
        return RealReplay(SequenceStream(data.old, config.data.seed + 2), rows, device)

    def validation_sets(self, config: RunConfig, mode: str, data: Data, reference) -> dict:
        sets = {}
        if config.data.val_sequences:
            sets["new" if mode == "finetune" else "old"] = ValidationSet(data.train.validation(), reference)
            if mode == "finetune":
                sets["old"] = ValidationSet(data.old.validation(), reference)
            if data.mix is not None:
                sets["mix"] = ValidationSet(data.mix.validation(), reference)
        return sets

    def drift(self, model, config: RunConfig) -> float | None:
        weights = effective_weights(model) if config.lora.rank > 0 else model.state_dict()
        return weight_drift(weights, self.start_state, self.init_state)

    def weights(self, model) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def load_weights(self, model, weights: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(weights)

    def save_start(self, directory, tokenizer) -> None:
        tokenizer.save(directory.path)

    def save_final(self, model, tokenizer, config: RunConfig, directory) -> None:
        """weights.safetensors (LoRA adapters merged) and config.yaml."""
        if config.lora.rank > 0:
            merge_lora(model)
        save_checkpoint(model, directory.path, to_dict(config))

    def params(self, model, config: RunConfig) -> tuple[int, int]:
        return config.model.params, config.model.non_embedding_params


def decoding_model(reference, precision: str, device: torch.device):
    """The copy of π0 that draws self-replay: on a GPU a bf16 run decodes with bf16 weights (a
    copy of π0); on CPU every run decodes with π0's float32 weights, which sample faster there
    than bf16 ones (benchmarks/speed.py measures both; docs/performance.md)."""
    if precision == "bf16" and torch.device(device).type != "cpu":
        return copy.deepcopy(reference).to(torch.bfloat16)
    return reference


def replay_domains(config: RunConfig, data: Data) -> list[int]:
    """The domain ids self-replay samples start from: replay.domains, else the old domain's."""
    if not config.replay.domains:
        return [data.old.domain_id]
    names = [name.strip() for name in config.replay.domains.split(",") if name.strip()]
    try:
        return [data.tokenizer.domain_id(name) for name in names]
    except SelfReplayError as e:
        raise SelfReplayError(f"replay.domains: {e}") from None
