"""A `transformers.Trainer` that finetunes without forgetting: loss = NTP(new) + c · R(replay).

    trainer = SelfReplayTrainer(model="path/or/hub-id", args=SelfReplayConfig(output_dir="out"),
                                train_dataset=dataset, peft_config=LoraConfig(r=16))
    trainer.train()

R is the forward KL(π0 ‖ πθ) (or πθ's next-token loss) on sequences that π0, the model as
it was before finetuning, samples from itself (selfreplay.replay.hf_pool). Both terms go through
the blockwise losses of selfreplay.objective.losses, so the [tokens, vocabulary] logits never exist
whole. With a peft model π0 is the same network with its adapters disabled. Under torchrun
or accelerate every rank draws its own replay with its own seed (seed + rank).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import Trainer, TrainingArguments

from selfreplay.errors import SelfReplayError
from selfreplay.data.text import label_mask, pad_batch, pad_id, rows_from_dataset
from selfreplay.model.hf import CausalLM, frozen_reference, load_causal_lm, with_adapters
from selfreplay.replay.hf_pool import ReplayPool, replay_format
from selfreplay.objective.losses import head_kl_divergence, head_next_token_loss
from selfreplay.objective.methods import training_loss

REPLAY_METHODS = ("none", "kl", "ntp")


@dataclass
class SelfReplayConfig(TrainingArguments):
    """TrainingArguments plus the replay settings (per device: each rank draws its own replay)."""

    replay_method: str = field(default="kl", metadata={"help": "none | kl: KL(π0‖πθ) on replay | ntp: NTP on replay"})
    replay_coeff: float = field(default=10.0, metadata={"help": "c in loss = NTP(new) + c·R"})
    replay_batch_size: int = field(default=8, metadata={"help": "replay sequences per device per step"})
    replay_buffer: int = field(default=8, metadata={"help": "a draw holds buffer × replay_batch_size samples"})
    replay_decode_batch: int = field(default=128, metadata={"help": "replay samples decoded together (faster when "
                                                                    "larger, in more memory)"})
    replay_length: int = field(default=256, metadata={"help": "longest replay sample in tokens, prompt included"})
    replay_temperature: float = 1.0
    replay_top_p: float | None = None
    replay_chat: bool = field(default=False, metadata={"help": "sample conversations inside the chat template"})
    replay_system: str | None = field(default=None, metadata={"help": "system turn of chat samples"})
    replay_prompts: str | None = field(default=None, metadata={"help": ".txt/.jsonl of user prompts to answer"})
    replay_stop_at_eos: bool = True
    replay_pool: str | None = field(default=None, metadata={"help": "a pool directory from `selfreplay sample`"})
    max_length: int = field(default=1024, metadata={"help": "sequence length of packed text and conversations"})
    reference_dtype: str | None = field(default=None, metadata={"help": "dtype of π0's copy (full finetuning)"})
    lm_eval_tasks: list[str] | None = field(default=None, metadata={"help": "lm-eval tasks scored before and after"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "documents per lm-eval task"})
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "folder of lm-eval task YAML files"})
    remove_unused_columns: bool = False  # rows are already input_ids and labels


class SelfReplayTrainer(Trainer):
    """`Trainer` with the replay term; takes the model (or its name), `args`, `train_dataset`
    (text, messages or input_ids rows), `processing_class` (the tokenizer), an optional
    `peft_config` and `ref_model` (π0 when it is not the model itself), and
    `old_eval_dataset`: old-domain text on which evaluation reports old_loss, old_kl, forgetting."""

    def __init__(self, model, args: SelfReplayConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, ref_model=None, old_eval_dataset=None, **kwargs):
        args = args or SelfReplayConfig(output_dir="selfreplay-output")
        if args.replay_method not in REPLAY_METHODS:
            raise SelfReplayError(f"unknown replay_method {args.replay_method!r}: "
                                  f"choose one of {', '.join(REPLAY_METHODS)}")
        if isinstance(model, str):
            model, tokenizer = load_causal_lm(model)
            processing_class = processing_class or tokenizer
        if processing_class is None:
            raise SelfReplayError("pass the model's tokenizer as processing_class")
        if peft_config is not None:
            model = with_adapters(model, peft_config)
        tokenizer, T = processing_class, args.max_length
        rows = rows_from_dataset(train_dataset, tokenizer, T) if train_dataset is not None else None
        evals = rows_from_dataset(eval_dataset, tokenizer, T) if eval_dataset is not None else None
        self.old_rows = rows_from_dataset(old_eval_dataset, tokenizer, T) if old_eval_dataset is not None else None
        if evals is None and self.old_rows is not None:
            evals = {}  # old-domain measurement alone: Trainer wants some eval_dataset to schedule evaluation
        super().__init__(model=model, args=args, train_dataset=rows, eval_dataset=evals,
                         processing_class=tokenizer, data_collator=partial(pad_batch, pad_id=pad_id(tokenizer)),
                         **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a mean: Trainer scales it for accumulation
        self.lm = CausalLM(self.model)
        dtype = getattr(torch, args.reference_dtype) if args.reference_dtype else None
        self.reference = CausalLM(ref_model.eval().requires_grad_(False)) if ref_model is not None \
            else frozen_reference(self.lm, dtype)
        self.replay = self._replay_source(tokenizer) if args.replay_method != "none" else None
        self.old_loss_0: float | None = None
        self._logged: dict[str, list[float]] = {"ntp_loss": [], "replay_loss": [], "replay_seconds": []}

    def _replay_source(self, tokenizer) -> ReplayPool:
        a = self.args
        chat = a.replay_chat or a.replay_system is not None or a.replay_prompts is not None
        form = replay_format(tokenizer, chat, a.replay_system, a.replay_prompts, a.replay_stop_at_eos)
        return ReplayPool(self.reference, form, a.replay_batch_size, a.replay_buffer, a.replay_length,
                          a.replay_temperature, a.replay_top_p, seed=a.seed, keep_hidden=a.replay_method == "kl",
                          pool_dir=a.replay_pool, rank=a.process_index, world_size=a.world_size,
                          decode_batch=a.replay_decode_batch)

    def train(self, *args, **kwargs):
        """Trainer.train, with the lm-eval tasks of `args.lm_eval_tasks` scored before and after
        (on the main process) and logged as lm_eval_TASK_METRIC_before/_after."""
        tasks = self.args.lm_eval_tasks
        before = self._benchmark_scores(tasks) if tasks else None
        output = super().train(*args, **kwargs)
        if tasks:
            after = self._benchmark_scores(tasks)
            self.benchmark_scores = {"before": before, "after": after}
            if self.is_world_process_zero():
                self.log({f"lm_eval_{task}_{metric}_{when}": value for when, scores in self.benchmark_scores.items()
                          for task, metrics in scores.items() for metric, value in metrics.items()})
        return output

    def _benchmark_scores(self, tasks: list[str]) -> dict | None:
        from selfreplay.evaluation.benchmark_scores import benchmark_scores

        scores = None
        if self.is_world_process_zero():
            scores = benchmark_scores(self.model, self.processing_class, tasks, self.args.lm_eval_limit,
                                      self.args.per_device_eval_batch_size, self.args.lm_eval_include_path)
        self.accelerator.wait_for_everyone()
        return scores

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        new = inputs["input_ids"]
        new_mask = label_mask(inputs["labels"]) if "labels" in inputs else None
        method = self.args.replay_method if self.replay is not None and model.training else "none"
        replay = None
        if method != "none":
            start = time.perf_counter()
            replay = self.replay.next_batch()
            self._logged["replay_seconds"].append(time.perf_counter() - start)
        # the objective of every front end (selfreplay.objective.methods), run through the wrapped model
        loss, ntp, reg = training_loss(self.lm, self.reference, new, replay, method, self.args.replay_coeff,
                                       trunk=partial(self.lm.hidden, model=model), new_mask=new_mask)
        if model.training:
            self._logged["ntp_loss"].append(ntp.item())
            self._logged["replay_loss"].append(reg.item())
        return (loss, {"ntp_loss": ntp.detach(), "replay_loss": reg.detach()}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean of ntp_loss, replay_loss and replay_seconds since the last log, over all ranks."""
        if "loss" in logs:  # a training log point
            for key, values in self._logged.items():
                if values:
                    mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                    logs[key] = self.accelerator.reduce(mean, reduction="mean").item()
                    values.clear()
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation (when there is an eval_dataset) plus, on the old-domain rows,
        old_loss, old_kl = KL(π0 ‖ πθ) and forgetting = old_loss − π0's old_loss (nats)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix) \
            if eval_dataset is not None or self.eval_dataset else {}
        if self.old_rows is not None:
            old = self.measure_old()
            self.log({f"{metric_key_prefix}_{k}": v for k, v in old.items()})
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in old.items()})
        return metrics

    @torch.no_grad()
    def measure_old(self, batch_size: int = 8) -> dict[str, float]:
        """old_loss, old_kl and forgetting on the old-domain rows, a batch at a time with the blockwise losses."""
        was_training = self.model.training
        self.model.eval()
        head, ref_head, device = self.lm.head.weight, self.reference.head.weight, self.args.device
        sums = {"loss": 0.0, "kl": 0.0, "loss_0": 0.0}
        count = 0
        for lo in range(0, len(self.old_rows), batch_size):
            batch = pad_batch(self.old_rows[lo:lo + batch_size], pad_id=0)
            tokens, mask = batch["input_ids"].to(device), label_mask(batch["labels"]).to(device)
            n = int(mask[:, 1:].sum())
            hidden, ref_hidden = self.lm.hidden(tokens), self.reference.hidden(tokens)
            sums["loss"] += n * head_next_token_loss(hidden, head, tokens, mask=mask).item()
            sums["kl"] += n * head_kl_divergence(ref_hidden, ref_head, hidden, head, mask=mask).item()
            if self.old_loss_0 is None:
                sums["loss_0"] += n * head_next_token_loss(ref_hidden, ref_head, tokens, mask=mask).item()
            count += n
        self.model.train(was_training)
        if self.old_loss_0 is None:
            self.old_loss_0 = sums["loss_0"] / count
        old_loss = sums["loss"] / count
        return {"old_loss": old_loss, "old_kl": sums["kl"] / count, "forgetting": old_loss - self.old_loss_0}

