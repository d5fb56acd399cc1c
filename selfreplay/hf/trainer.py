"""A `transformers.Trainer` that finetunes without forgetting: loss = NTP(new) + c · R(replay).

    trainer = SelfReplayTrainer(model="path/or/hub-id", args=SelfReplayConfig(output_dir="out"),
                                train_dataset=dataset, peft_config=LoraConfig(r=16))
    trainer.train()

R is the forward KL(π0 ‖ πθ) (or πθ's next-token loss) on sequences that π0, the model as
it was before finetuning, samples from itself (selfreplay.replay.hf_pool). Both terms go through
the blockwise losses of selfreplay.objective.losses, so the [tokens, vocabulary] logits never exist
whole. With a peft model π0 is the same network with its adapters disabled. Under torchrun
or accelerate every rank draws its own replay with its own seed (seed + rank).
replay_coeff="auto" with replay_budget=B moves c to hold the replay KL at B nats per token
(docs/method.md, "The replay coefficient held to a budget").
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from selfreplay.config import ReplayConfig, RunConfig, StopConfig, check_ranges
from selfreplay.data.text import label_mask, pad_batch, pad_id, rows_from_dataset
from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.benchmark_scores import benchmark_table
from selfreplay.evaluation.fidelity import first_draw_fidelity, hf_sample_format
from selfreplay.evaluation.validation import ValidationSet, standing_for_reference
from selfreplay.model.fingerprint import model_fingerprint
from selfreplay.model.hf import (
    CausalLM,
    frozen_reference,
    load_causal_lm,
    with_adapters,
)
from selfreplay.objective.coefficient import capacity_bound_line, coefficient_of, out_of_reach_line
from selfreplay.objective.methods import (
    NO_REPLAY,
    REPLAY_KL,
    REPLAY_METHODS,
    budgeted_divergence,
    check_budgeted,
    replay_method,
    training_loss,
)
from selfreplay.objective.reference import ReferenceHead, ReferenceUse, kept_of_reference, reference_use
from selfreplay.replay.hf_pool import hf_replay_pool, replay_format
from selfreplay.replay.pool import ReplayPool, stored_replay
from selfreplay.replay.store import StoredPool
from selfreplay.rundir import notice, write_atomic

# ReplayConfig's settings that only the command line's loop takes (the rest are replay_X here);
# the Trainer replays a pool drawn beforehand with replay_pool and replay_reuse=0 instead of draw_once
BUILTIN_ONLY = ("source", "fraction", "domains", "compile", "draw_once")
COEFFICIENT_NAME = "replay_coefficient.json"  # replay_coeff="auto": c's controller and detector, in each checkpoint


@dataclass
class SelfReplayConfig(TrainingArguments):
    """TrainingArguments plus the replay settings (per device: each rank draws its own replay)."""

    replay_method: str = field(default=REPLAY_KL.name, metadata={"help": " | ".join(f"{m.name}: {m.description}"
                                                                         for m in REPLAY_METHODS.values())})
    replay_coeff: float | str = field(default=10.0, metadata={"help": "c in loss = NTP(new) + c·R; \"auto\" (in "
                                                                     "Python): c held to replay_budget"})
    replay_budget: float | None = field(default=None, metadata={"help": "replay_coeff=auto: the replay KL held, "
                                                                        "nats per token (0.01 to start)"})
    replay_coeff_start: float = field(default=10.0, metadata={"help": "replay_coeff=auto: c at the first step"})
    replay_coeff_min: float = field(default=0.01, metadata={"help": "replay_coeff=auto: c's floor"})
    replay_coeff_max: float = field(default=1000.0, metadata={"help": "replay_coeff=auto: c's ceiling"})
    replay_horizon: int = field(default=20, metadata={"help": "replay_coeff=auto: over budget c rises by at most a "
                                                               "factor e per horizon steps, under it falls by e^0.2"})
    stop_on_capacity_bound: bool = field(default=False, metadata={"help": "replay_coeff=auto: stop training where "
                                                                          "the run turns capacity bound"})
    replay_batch_size: int = field(default=8, metadata={"help": "replay sequences per device per step"})
    replay_buffer: int = field(default=8, metadata={"help": "a draw holds buffer × replay_batch_size samples"})
    replay_decode_batch: int = field(default=128, metadata={"help": "replay samples decoded together (faster when "
                                                                    "larger, in more memory)"})
    replay_length: int | None = field(default=None, metadata={"help": "longest replay sample in tokens, prompt "
                                                                      "included; default: max_length"})
    replay_temperature: float = 1.0
    replay_top_p: float | None = None
    replay_chat: bool = field(default=False, metadata={"help": "sample conversations inside the chat template"})
    replay_system: str | None = field(default=None, metadata={"help": "system turn of chat samples"})
    replay_prompts: str | None = field(default=None, metadata={"help": ".txt/.jsonl of user prompts to answer"})
    replay_stop_at_eos: bool = True
    replay_pool: str | None = field(default=None, metadata={"help": "a pool directory from `selfreplay sample`"})
    replay_reuse: int = field(default=1, metadata={"help": "passes over replay_pool, each in its own seeded order, "
                                                           "before fresh draws (0: never draw)"})
    max_length: int = field(default=1024, metadata={"help": "sequence length of packed text and conversations"})
    reference_dtype: str | None = field(default=None, metadata={"help": "dtype of π0's copy (full finetuning)"})
    lm_eval_tasks: list[str] | None = field(default=None, metadata={"help": "lm-eval tasks scored before and after"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "documents per lm-eval task"})
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "folder of lm-eval task YAML files"})
    remove_unused_columns: bool = False  # rows are already input_ids and labels

    def replay_config(self) -> ReplayConfig:
        """The replay settings as the command line's ReplayConfig (the one schema: replay_X is its
        X), checked by the same ranges; replay_length follows max_length when unset."""
        values = {f.name: getattr(self, f"replay_{f.name}") for f in dataclasses.fields(ReplayConfig)
                  if f.name not in BUILTIN_ONLY}
        replay = ReplayConfig(**values)
        replay = dataclasses.replace(replay, length=replay.length or self.max_length)
        check_ranges(RunConfig(replay=replay, stop=StopConfig(on_capacity_bound=self.stop_on_capacity_bound)))
        return replay


class SelfReplayTrainer(Trainer):
    """`Trainer` with the replay term; takes the model (or its name), `args`, `train_dataset`
    (text, messages or input_ids rows), `processing_class` (the tokenizer), an optional
    `peft_config` and `ref_model` (π0 when it is not the model itself), and
    `old_eval_dataset`: old-domain text on which evaluation reports old_loss, old_kl, forgetting."""

    def __init__(self, model, args: SelfReplayConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, ref_model=None, old_eval_dataset=None, **kwargs):
        args = args or SelfReplayConfig(output_dir="selfreplay-output")
        self.method, replay = replay_method(args.replay_method, key="replay_method"), args.replay_config()
        check_budgeted(self.method, replay)
        if isinstance(model, str):
            model, tokenizer = load_causal_lm(model)
            processing_class = processing_class or tokenizer
        if processing_class is None:
            raise SelfReplayError("pass the model's tokenizer as processing_class")
        if peft_config is not None:
            model = with_adapters(model, peft_config)
        tokenizer, T = processing_class, args.max_length
        rows = rows_from_dataset(train_dataset, tokenizer, T, name="train_dataset") if train_dataset is not None else None
        evals = rows_from_dataset(eval_dataset, tokenizer, T, name="eval_dataset") if eval_dataset is not None else None
        self.old_rows = rows_from_dataset(old_eval_dataset, tokenizer, T,
                                          name="old_eval_dataset") if old_eval_dataset is not None else None
        if evals is None and self.old_rows is not None:
            evals = {}  # old-domain measurement alone: Trainer wants some eval_dataset to schedule evaluation
        super().__init__(model=model, args=args, train_dataset=rows, eval_dataset=evals,
                         processing_class=tokenizer, data_collator=partial(pad_batch, pad_id=pad_id(tokenizer)),
                         **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a mean: Trainer scales it for accumulation
        self.lm = CausalLM(self.model)
        self.old_set: ValidationSet | None = None  # built at the first measurement, on the model's device
        self.fingerprint = model_fingerprint(self.model) if replay.pool is not None else None  # π0's, as loaded
        self.reference_use = use = reference_use(self.method, replay) if ref_model is None else ReferenceUse.MODEL
        if use is ReferenceUse.MODEL:
            dtype = getattr(torch, args.reference_dtype) if args.reference_dtype else None
            self.reference = CausalLM(ref_model.eval().requires_grad_(False)) if ref_model is not None \
                else frozen_reference(self.lm, dtype)
        else:  # a stored pool carries π0's answers: π0 is not loaded (selfreplay.objective.reference)
            self.reference = self._without_reference(use)
        chat = replay.chat or replay.system is not None or replay.prompts is not None
        form = replay_format(tokenizer, chat, replay.system, replay.prompts, replay.stop_at_eos) \
            if self.method.needs_replay else None
        self.replay = self._replay_source(form, replay) if self.method.needs_replay else None
        self.sample_format = hf_sample_format(form, tokenizer.eos_token_id) if form is not None else None
        self.replay_fidelity: dict | None = None  # π0's first draw judged at the first step (evaluation.fidelity)
        self._logged: dict[str, list[float]] = {"ntp_loss": [], "replay_loss": [], "replay_seconds": []}
        self.controller, self.capacity = coefficient_of(replay)  # replay_coeff="auto": c held to replay_budget
        if self.controller is not None:
            self._logged["replay_kl"], self._step_kls = [], []
            self.add_callback(_CoefficientStep(self))

    def _without_reference(self, use: ReferenceUse) -> ReferenceHead | None:
        """What the run keeps of π0 when it holds none (π0's head, or nothing), with the old-domain
        measurement's share of π0 taken now, from the model before its first step."""
        head = kept_of_reference(self.lm, use)
        if self.old_rows is not None:
            with standing_for_reference(self.lm):
                self.old_set = self._old_set(self.lm)
                self.old_set.keep_without_reference(head)
        return head

    def _old_set(self, reference) -> ValidationSet:
        batch = pad_batch(self.old_rows, pad_id=0)
        return ValidationSet(batch["input_ids"], reference, label_mask(batch["labels"]), batch_size=8)

    def _replay_source(self, form, replay: ReplayConfig) -> ReplayPool:
        a = self.args
        if self.reference_use is not ReferenceUse.MODEL:  # π0 is not loaded: its stored pool, pass after pass
            stored = StoredPool(replay.pool, self.fingerprint, self.lm.head.weight.device)
            return stored_replay(stored, replay.batch_size, self.lm.head.weight.device, a.seed + a.process_index,
                                 a.process_index, a.world_size)
        return hf_replay_pool(self.reference, form, replay, self.method.keeps_hidden, seed=a.seed,
                              rank=a.process_index, world_size=a.world_size, fingerprint=self.fingerprint)

    def train(self, *args, **kwargs):
        """Trainer.train, with the lm-eval tasks of `args.lm_eval_tasks` scored before and after
        (on the main process) and logged as lm_eval_TASK_METRIC_before/_after."""
        tasks = self.args.lm_eval_tasks
        before = self._benchmark_scores(tasks) if tasks else None
        output = super().train(*args, **kwargs)
        if self.controller is not None and self.is_world_process_zero():
            line = out_of_reach_line(self.controller, self.capacity, self.args.learning_rate, sep="_")
            if line:
                notice(line)
        if tasks:
            after = self._benchmark_scores(tasks)
            self.benchmark_scores = {"before": before, "after": after}
            if self.is_world_process_zero():
                self.log({f"lm_eval_{task}_{metric}_{when}": value for task, metrics in benchmark_table(before, after).items()
                          for metric, scores in metrics.items() for when, value in scores.items()})
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
        method = self.method if model.training else NO_REPLAY
        replay = None
        if method.needs_replay:
            start = time.perf_counter()
            replay = self.replay.next_batch()
            self._logged["replay_seconds"].append(time.perf_counter() - start)
            if self.state.global_step == 0 and self.replay_fidelity is None:  # θ is π0 until the first step
                self.replay_fidelity = self._judge_replay(replay)
        coeff = self.controller.coeff if self.controller is not None else self.args.replay_coeff
        # the objective of every front end (selfreplay.objective.methods), run through the wrapped model
        loss, ntp, reg = training_loss(self.lm, self.reference, new, replay, method, coeff,
                                       trunk=partial(self.lm.hidden, model=model), new_mask=new_mask)
        if model.training:
            self._logged["ntp_loss"].append(ntp.item())
            self._logged["replay_loss"].append(reg.item())
            if self.controller is not None:  # what the budget holds; c moves once the step is taken
                kl = budgeted_divergence(self.method, reg, self.reference, replay).item()
                self._step_kls.append(kl)
                self._logged["replay_kl"].append(kl)
        return (loss, {"ntp_loss": ntp.detach(), "replay_loss": reg.detach()}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean of ntp_loss, replay_loss and replay_seconds since the last log, over all ranks."""
        if "loss" in logs:  # a training log point
            for key, values in self._logged.items():
                if values:
                    mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                    logs[key] = self.accelerator.reduce(mean, reduction="mean").item()
                    values.clear()
            if self.controller is not None:
                logs["replay_coeff"] = self.controller.coeff
                if "ntp_loss" in logs:
                    self._watch_capacity(logs["ntp_loss"])
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------- replay_coeff="auto"

    def _step_coefficient(self) -> None:
        """Move c after an optimizer step, by the mean replay KL of its micro-batches over every
        rank (so that every rank moves c alike)."""
        if not self._step_kls:
            return
        mean = torch.tensor(sum(self._step_kls) / len(self._step_kls), device=self.args.device)
        self._step_kls.clear()
        self.controller.update(self.accelerator.reduce(mean, reduction="mean").item())

    def _watch_capacity(self, new_loss: float) -> None:
        """The capacity-bound detector at a log point, on the new batches' loss since the last one
        (the training loss: the Trainer measures no new-domain validation loss of its own)."""
        was_bound = self.capacity.bound
        if not self.capacity.observe(self.state.global_step, self.controller.coeff, self.controller.kl, new_loss):
            return
        if not was_bound and self.is_world_process_zero():
            notice(capacity_bound_line(self.controller, self.capacity, sep="_", stopping=self.args.stop_on_capacity_bound))
        if self.args.stop_on_capacity_bound:
            self.control.should_training_stop = True

    @property
    def capacity_bound_since(self) -> int | None:
        """The step from which the run was capacity bound (replay_coeff="auto"); None: it was not."""
        return self.capacity.since if self.capacity is not None else None

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, with c's controller and detector beside it (COEFFICIENT_NAME)."""
        super()._save_checkpoint(model, trial)
        if self.controller is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            state = {"coefficient": self.controller.state_dict(), "capacity": self.capacity.state_dict()}
            write_atomic(folder / COEFFICIENT_NAME, lambda path: path.write_text(json.dumps(state)))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.controller is None:
            return
        path = Path(resume_from_checkpoint) / COEFFICIENT_NAME
        if not path.is_file():
            raise SelfReplayError(f"{resume_from_checkpoint} holds no {COEFFICIENT_NAME}: resume replay_coeff=\"auto\" "
                                  "from a checkpoint of a run with replay_coeff=\"auto\"")
        state = json.loads(path.read_text())
        self.controller.load_state_dict(state["coefficient"])
        self.capacity.load_state_dict(state["capacity"])

    def _judge_replay(self, replay) -> dict | None:
        """The fidelity of π0's first draw, with π0's loss on it and on the old-domain rows (when given)."""
        if self.old_rows is not None and self.old_set is None:
            self.old_set = self._old_set(self.reference)
        nll_old = self.old_set.reference_loss() if self.old_set is not None else None
        pi0 = self.reference if isinstance(self.reference, CausalLM) else self.lm  # θ is π0 before its first step
        return first_draw_fidelity(pi0, self.replay, replay, self.sample_format, nll_old)

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

    def measure_old(self) -> dict[str, float]:
        """old_loss, old_kl and forgetting on the old-domain rows (selfreplay.evaluation.validation)."""
        if self.old_set is None:
            self.old_set = self._old_set(self.reference)
        old = self.old_set.evaluate(self.lm)
        kl = {"old_kl": old["kl"]} if "kl" in old else {}  # no KL where the run keeps nothing of π0
        return {"old_loss": old["loss"], **kl, "forgetting": old["loss"] - self.old_set.reference_loss()}


class _CoefficientStep(TrainerCallback):
    """replay_coeff="auto": moves c once per optimizer step (after it, before any checkpoint)."""

    def __init__(self, trainer: SelfReplayTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._step_coefficient()
