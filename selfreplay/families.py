"""Model families: what the training loop (`selfreplay.train`) does differently for the built-in
Transformer and for a Hugging Face causal LM (init=hf:NAME_OR_PATH).

The loop, the objective (`selfreplay.objective.training_loss`) and the log lines are shared; a
family supplies only what depends on the model:

    load_data(config, mode)                 -> Data: tokenizer, new (train), old and mix rows
    load_models(config, mode, device)       -> (θ, π0 or None, trainable parameters)
    make_replay(config, reference, data, device) -> replay source with next_batch(), or None
    validation_sets(config, mode, data, reference) -> {domain: object with evaluate(model) -> dict}
    drift(model, config)                    -> ‖θ − θ0‖ / ‖θ0 − θinit‖, or None where θinit is unknown
    weights(model) / load_weights(model, weights) -> what a checkpoint keeps of θ
    save_start(directory, tokenizer) / save_final(model, tokenizer, config, directory): files at the start, at the end
    params(model, config)                   -> (parameters, non-embedding parameters) for summary.json
    benchmark_scores(model, tokenizer, eval) -> lm-eval scores {task: {metric: value}} (Hugging Face alone)

A model is anything with `hidden(tokens)` [B, t, D], `head.weight` [V, D], `parameters()`,
`train()` and `eval()`: the Transformer itself, or selfreplay.hf.model.CausalLM.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfreplay.config import RunConfig, build, is_hf, read_yaml, to_dict
from selfreplay.data import SequenceStream, TokenSequences
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate import ValidationSet, weight_drift
from selfreplay.losses import head_kl_divergence, head_next_token_loss
from selfreplay.rundir import CONFIG_NAME


@dataclass
class Data:
    """The rows of a run, read and checked before anything is written."""

    tokenizer: object
    train: TokenSequences
    old: TokenSequences | None
    mix: TokenSequences | None
    replay_format: object | None = None  # init=hf: where replay samples start (selfreplay.hf.sampling.ReplayFormat)


def family_of(config: RunConfig):
    """The family that runs `config`: Hugging Face for init=hf:..., the built-in Transformer otherwise."""
    return HuggingFaceFamily() if is_hf(config) else BuiltinFamily()


def read_init_run(run_dir: str) -> RunConfig:
    """The settings of a finished pretraining run (π0), each checked for its type."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise SelfReplayError(f"init run {run_dir} not found (no {CONFIG_NAME}): pretrain it first with selfreplay pretrain")
    try:
        return build(RunConfig, read_yaml(path))
    except SelfReplayError as e:
        raise SelfReplayError(f"the init run's {path}: {e}") from None


# ---------------------------------------------------------------- the built-in Transformer

class BuiltinFamily:
    """selfreplay's own Transformer, pretrained by `selfreplay pretrain` (init=RUN_DIR)."""

    def load_data(self, config: RunConfig, mode: str) -> Data:
        """The tokenizer and token files, each checked against the model's vocabulary."""
        from selfreplay.tokenizer import load_tokenizer

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

    def load_models(self, config: RunConfig, mode: str, device):
        """θ (fresh, or the init run's weights, with LoRA adapters when lora.rank > 0), the frozen
        π0 when finetuning, and the trainable parameters; keeps θ0 and θinit for `drift`."""
        from selfreplay.lora import add_lora
        from selfreplay.model import Transformer

        if mode != "finetune":
            model = Transformer(config.model)
            model.reset_parameters(torch.Generator().manual_seed(config.seed))
            return model.to(device).train(), None, list(model.parameters())
        model = Transformer.from_pretrained(config.init, device=device).train()
        reference = Transformer.from_pretrained(config.init, device=device).eval().requires_grad_(False)
        self.start_state = {k: v.clone() for k, v in model.state_dict().items()}
        init_model = Transformer(config.model)  # the same draw as the init run's, from its seed
        init_model.reset_parameters(torch.Generator().manual_seed(read_init_run(config.init).seed))
        self.init_state = {k: v.to(device) for k, v in init_model.state_dict().items()}
        params = add_lora(model, config.lora.rank, config.lora.alpha) if config.lora.rank > 0 else list(model.parameters())
        return model, reference, params

    def make_replay(self, config: RunConfig, reference, data: Data, device):
        """The replay source of a finetuning run, or None when its method replays nothing."""
        from selfreplay.replay import RealReplay, SelfReplayPool

        r = config.replay
        if r.method not in ("ntp", "kl", "replace"):
            return None
        rows = r.batch_size if r.method != "replace" else math.floor(r.coeff * config.optim.batch_size)
        if r.source == "self":
            sampler = decoding_model(reference, config.precision, device)
            return SelfReplayPool(sampler, replay_domains(config, data), rows, r.buffer, r.temperature, config.seed,
                                  keep_hidden=r.method == "kl", decode_batch=r.decode_batch, compile=r.compile)
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
        from selfreplay.lora import effective_weights

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
        from selfreplay.lora import merge_lora
        from selfreplay.model import save_checkpoint

        if config.lora.rank > 0:
            merge_lora(model)
        save_checkpoint(model, directory.path, to_dict(config))

    def params(self, model, config: RunConfig) -> tuple[int, int]:
        return config.model.params, config.model.non_embedding_params


def decoding_model(reference, precision: str, device: torch.device):
    """The copy of π0 that draws self-replay: on a GPU a bf16 run decodes with bf16 weights (a
    copy of π0); on CPU every run decodes with π0's float32 weights, which sample faster there
    than bf16 ones (benchmarks/speed.py: the bf16 sampler was 17% slower on the 2-core CPU)."""
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


# ---------------------------------------------------------------- a Hugging Face causal LM

class HuggingFaceFamily:
    """Any `AutoModelForCausalLM` (init=hf:NAME_OR_PATH), with its own tokenizer; LoRA through peft,
    where π0 is the same network with its adapters disabled."""

    def load_data(self, config: RunConfig, mode: str) -> Data:
        """The model's tokenizer; data.train as conversations (a row each, only the assistant's
        tokens counting) or packed text, data.old_text as packed text, in rows of model.T tokens;
        and the replay format (its chat template and prompts checked before anything is written)."""
        from selfreplay.hf.data import holds_conversations, load_rows, pack_text
        from selfreplay.hf.model import load_tokenizer
        from selfreplay.hf.pool import replay_format

        tokenizer = load_tokenizer(model_name(config), config.model.trust_remote_code)
        T, d, r = config.model.T, config.data, config.replay
        if holds_conversations(d.old_text, d.chat_field):
            raise SelfReplayError(f"data.old_text={d.old_text} holds conversations ({d.chat_field!r}): old_text is "
                                  f"measured as plain text, give it {d.text_field!r} records")
        train = load_rows(d.train, tokenizer, T, d.text_field, d.chat_field)
        old = pack_text(d.old_text, tokenizer, T, d.text_field)
        replays = r.method in ("ntp", "kl")
        form = replay_format(tokenizer, r.chat, r.system, r.prompts, r.stop_at_eos) if replays else None
        return Data(tokenizer, row_sequences(train, tokenizer, T, d.val_sequences, d.seed, d.train),
                    measured_rows(row_sequences(old, tokenizer, T, 0, d.seed, d.old_text), d.val_sequences, d.seed),
                    None, form)

    def load_models(self, config: RunConfig, mode: str, device):
        from selfreplay.hf.model import CausalLM, frozen_reference, load_model

        # float32 weights, as the built-in model's: precision=bf16 runs the matmuls under autocast
        model = load_model(model_name(config), torch.float32, device, config.model.trust_remote_code)
        if config.lora.rank > 0:
            from peft import LoraConfig

            from selfreplay.hf.model import with_adapters

            alpha = config.lora.alpha if config.lora.alpha is not None else config.lora.rank
            with torch.random.fork_rng():  # the adapters' random init, from the run's seed alone
                torch.manual_seed(config.seed)
                model = with_adapters(model, LoraConfig(r=config.lora.rank, lora_alpha=alpha,
                                                        target_modules="all-linear"))
        model.train()
        lm = CausalLM(model)
        reference = frozen_reference(lm, getattr(torch, config.model.reference_dtype))
        return lm, reference, [p for p in model.parameters() if p.requires_grad]

    def make_replay(self, config: RunConfig, reference, data: Data, device):
        """π0's samples, from BOS or inside the chat template (replay.chat), as `load_data` set them up."""
        from selfreplay.hf.pool import ReplayPool

        r = config.replay
        if r.method not in ("ntp", "kl"):
            return None
        return ReplayPool(reference, data.replay_format, r.batch_size, r.buffer, r.length, r.temperature, r.top_p,
                          seed=config.seed, keep_hidden=r.method == "kl", pool_dir=r.pool, decode_batch=r.decode_batch)

    def validation_sets(self, config: RunConfig, mode: str, data: Data, reference) -> dict:
        sets = {"old": HeadValidationSet(torch.from_numpy(data.old.sequences), reference)}
        if config.data.val_sequences:
            new = HeadValidationSet(data.train.validation(), reference, data.train.validation_mask())
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

    def benchmark_scores(self, model, tokenizer, e) -> dict[str, dict[str, float]]:
        """lm-eval scores of the model as it is now (eval.lm_eval_tasks), {task: {metric: value}}."""
        from selfreplay.hf.scores import benchmark_scores

        tasks = [task.strip() for task in e.lm_eval_tasks.split(",") if task.strip()]
        return benchmark_scores(model.model, tokenizer, tasks, e.lm_eval_limit, include_path=e.lm_eval_include_path)

    def params(self, model, config: RunConfig) -> tuple[int, None]:
        from selfreplay.hf.model import num_parameters

        return num_parameters(model), None


def measured_rows(old: TokenSequences, count: int, seed: int) -> TokenSequences:
    """`count` rows of the old-domain text (a seeded choice; all of them if it holds fewer): the
    old domain is only measured, and measuring all of a large file at each log point would cost
    more than training."""
    rows = old.sequences
    if len(rows) > count:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), count, replace=False))]
    return TokenSequences.from_rows(rows, 0, seed, name=old.path)


def model_name(config: RunConfig) -> str:
    return config.init.removeprefix("hf:")


def row_sequences(rows: list[dict], tokenizer, T: int, val_sequences: int, seed: int, name: str) -> TokenSequences:
    """Rows {"input_ids", "labels"} right-padded to T, with the mask of the labels that count
    (None when every token counts, as in packed text)."""
    from selfreplay.hf.data import label_mask, pad_batch, pad_id

    batch = pad_batch(rows, pad_id(tokenizer), width=T)
    mask = label_mask(batch["labels"])
    return TokenSequences.from_rows(batch["input_ids"].numpy(), val_sequences, seed, name=name,
                                    mask=None if mask.all() else mask.numpy())


class HeadValidationSet:
    """Held-out rows [N, T] measured through hidden states and the head, a batch at a time with
    the blockwise losses (a 128k vocabulary's logits never exist whole); nats. mask [N, T]: the
    tokens whose prediction counts (a conversation's assistant tokens), None: every one."""

    def __init__(self, tokens: torch.Tensor, reference, mask: torch.Tensor | None = None, batch_size: int = 8):
        self.tokens, self.reference, self.mask, self.batch_size = tokens, reference, mask, batch_size

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """loss (every counted prediction), loss_second_half (those of positions ≥ T/2; left out
        when none counts there) and kl = KL(π0 ‖ πθ) (every position; with a mask, the positions
        predicting a counted token)."""
        model.eval()
        device = model.head.weight.device
        N, T = self.tokens.shape
        sums, counts = {"loss": 0.0, "loss_second_half": 0.0, "kl": 0.0}, {"loss": 0, "loss_second_half": 0, "kl": 0}
        for lo in range(0, N, self.batch_size):
            batch = self.tokens[lo:lo + self.batch_size].to(device)
            mask = self.mask[lo:lo + self.batch_size].to(device) if self.mask is not None else None
            counted = mask if mask is not None else torch.ones_like(batch, dtype=torch.bool)
            second_half = counted.clone()
            second_half[:, : T // 2] = False
            hidden, ref_hidden = model.hidden(batch), self.reference.hidden(batch)
            head, ref_head = model.head.weight, self.reference.head.weight
            n = {"loss": int(counted[:, 1:].sum()), "loss_second_half": int(second_half[:, 1:].sum())}
            n["kl"] = n["loss"] if mask is not None else batch.numel()  # unmasked: position T-1 too
            sums["loss"] += n["loss"] * head_next_token_loss(hidden, head, batch, mask=mask).item()
            sums["loss_second_half"] += n["loss_second_half"] * head_next_token_loss(hidden, head, batch,
                                                                                    mask=second_half).item()
            sums["kl"] += n["kl"] * head_kl_divergence(ref_hidden, ref_head, hidden, head, mask=mask).item()
            counts = {key: counts[key] + n[key] for key in counts}
        model.train()
        return {key: sums[key] / counts[key] for key in sums if counts[key]}
