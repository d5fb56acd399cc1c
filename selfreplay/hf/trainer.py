"""A `transformers.Trainer` that finetunes without forgetting: loss = NTP(new) + c · R(replay).

    trainer = SelfReplayTrainer(model="path/or/hub-id", args=SelfReplayConfig(output_dir="out"),
                                train_dataset=dataset, peft_config=LoraConfig(r=16))
    trainer.train()

R is the forward KL(π0 ‖ πθ) (or πθ's next-token loss) on sequences that π0, the model as
it was before finetuning, samples from itself (selfreplay.replay.hf_pool). What replay adds
around a step is the command line's own `ReplayRun` (selfreplay.training.replay_run): this
Trainer only calls it, from `compute_loss`, a callback after each optimizer step, its log and
evaluation, and its checkpoints. With a peft model π0 is the same network with its adapters
disabled. Under torchrun or accelerate every rank draws its own replay with its own seed
(seed + rank). replay_coeff="auto" with replay_budget=B moves c to hold the replay KL at B nats
per token (docs/method.md, "The replay coefficient held to a budget").
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from selfreplay.config import EvalConfig, ModelConfig, OptimConfig, ReplayConfig, RunConfig, StopConfig, check_ranges
from selfreplay.data.sequences import Data
from selfreplay.data.text import label_mask, pad_batch, pad_id, rows_from_dataset
from selfreplay.errors import SelfReplayError
from selfreplay.evaluation.benchmark_scores import benchmark_table
from selfreplay.evaluation.validation import ValidationSet, standing_for_reference
from selfreplay.families.hf import HuggingFaceFamily, replay_form
from selfreplay.model.fingerprint import model_fingerprint
from selfreplay.model.hf import CausalLM, frozen_reference, load_causal_lm, with_adapters
from selfreplay.objective.methods import NO_REPLAY, replay_method
from selfreplay.objective.reference import ReferenceUse, reference_use
from selfreplay.replay.store import HEADER_NAME
from selfreplay.rundir import ANSWERS_NAME, POOL_NAME, notice, write_atomic
from selfreplay.training.pools import draw_hf_pool
from selfreplay.training.replay_run import ReplayRun, start_replay_run
from selfreplay.training.validate import TRAINER, validate

# Where the Trainer's default differs from the command line's, and why: a SelfReplayTrainer exists
# to replay (the command line's `none` also serves pretraining), 8 rows per device per step
TRAINER_DEFAULTS = {"method": "kl", "batch_size": 8}
COEFFICIENT_NAME = "replay_run.json"  # the replay run's state (c's controller and detector among it), in each checkpoint
LEGACY_COEFFICIENT_NAME = "replay_coefficient.json"  # what checkpoints of the last release hold


def _replay_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """replay_X for each ReplayConfig field X: its type, default and help. Those of the built-in
    model's family (fraction, source=real, domains, compile) are refused in one line (training.validate)."""
    fields = []
    for f in dataclasses.fields(ReplayConfig):
        default = TRAINER_DEFAULTS.get(f.name, f.default)
        fields.append((f"replay_{f.name}", f.type, field(default=default, metadata=dict(f.metadata))))
    return fields


@dataclass
class _TrainerSettings(TrainingArguments):
    """TrainingArguments plus what the Trainer itself adds beside the replay settings."""

    stop_on_capacity_bound: bool = field(default=False, metadata={"help": "replay_coeff=auto: stop training where "
                                                                          "the run turns capacity bound"})
    max_length: int = field(default=1024, metadata={"help": "sequence length of packed text and conversations"})
    reference_dtype: str | None = field(default=None, metadata={"help": "dtype of π0's copy (full finetuning)"})
    lm_eval_tasks: list[str] | None = field(default=None, metadata={"help": "lm-eval tasks scored before and after"})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "documents per lm-eval task"})
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "folder of lm-eval task YAML files"})
    eval_prompts: str | None = field(default=None, metadata={"help": "held-out user prompts (.txt, .jsonl `prompt`), "
                                                                     "never replayed: chat_kl, answer_agreement"})
    eval_answer_tokens: int = field(default=64, metadata={"help": "eval_prompts: the longest answer, in tokens"})
    remove_unused_columns: bool = False  # rows are already input_ids and labels

    def replay_config(self) -> ReplayConfig:
        """The replay settings as the command line's ReplayConfig (replay_X is its X), checked by the
        same ranges; replay_length follows max_length when unset."""
        return self.run_config().replay

    def run_config(self) -> RunConfig:
        """The run's settings as the command line's RunConfig, checked by the same rules."""
        values = {f.name: getattr(self, f"replay_{f.name}") for f in dataclasses.fields(ReplayConfig)}
        replay = ReplayConfig(**values)
        replay = dataclasses.replace(replay, length=replay.length or self.max_length)
        config = RunConfig(seed=self.seed, replay=replay, optim=OptimConfig(lr=self.learning_rate),
                           stop=StopConfig(on_capacity_bound=self.stop_on_capacity_bound),
                           model=ModelConfig(T=self.max_length),
                           eval=EvalConfig(",".join(self.lm_eval_tasks) if self.lm_eval_tasks else None,
                                           self.lm_eval_limit, self.lm_eval_include_path, self.eval_prompts,
                                           self.eval_answer_tokens))
        check_ranges(config)
        return config


SelfReplayConfig = dataclasses.make_dataclass(
    "SelfReplayConfig", _replay_fields(), bases=(_TrainerSettings,),
    namespace={"__doc__": "TrainingArguments plus the replay settings, replay_X for ReplayConfig's X (per device: "
                          "each rank draws its own replay)", "__module__": __name__})


class SelfReplayTrainer(Trainer):
    """`Trainer` with the replay term; takes the model (or its name), `args`, `train_dataset`
    (text, messages or input_ids rows), `processing_class` (the tokenizer), an optional
    `peft_config` and `ref_model` (π0 when it is not the model itself), and
    `old_eval_dataset`: old-domain text on which evaluation reports old_loss, old_kl, forgetting."""

    def __init__(self, model, args: SelfReplayConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, ref_model=None, old_eval_dataset=None, **kwargs):
        args = args or SelfReplayConfig(output_dir="selfreplay-output")
        config = args.run_config()
        validate(config, "finetune", TRAINER)  # the command line's rules that bind the Trainer too
        method = replay_method(config.replay.method)
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
        old_rows = rows_from_dataset(old_eval_dataset, tokenizer, T,
                                     name="old_eval_dataset") if old_eval_dataset is not None else None
        if evals is None and (old_rows is not None or args.eval_prompts):
            evals = {}  # old-domain or chat measurement alone: Trainer wants some eval_dataset to schedule evaluation
        super().__init__(model=model, args=args, train_dataset=rows, eval_dataset=evals,
                         processing_class=tokenizer, data_collator=partial(pad_batch, pad_id=pad_id(tokenizer)),
                         **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a mean: Trainer scales it for accumulation
        self.lm = CausalLM(self.model)
        fingerprint = model_fingerprint(self.model) if config.replay.pool is not None or config.replay.draw_once \
            else None  # π0's, as loaded
        if config.replay.draw_once:
            config = self._with_drawn_pool(config, replay_form(tokenizer, config.replay), fingerprint)
        reference = None
        if ref_model is not None:
            reference = CausalLM(ref_model.eval().requires_grad_(False))
        elif reference_use(method, config.replay) is ReferenceUse.MODEL:
            reference = frozen_reference(self.lm, getattr(torch, args.reference_dtype) if args.reference_dtype else None)
        data = Data(tokenizer, None, None, None, replay_form(tokenizer, config.replay))
        self.replay_run: ReplayRun = start_replay_run(
            config, HuggingFaceFamily(), data, self.lm, reference, partial(_old_sets, old_rows), self.lm.head.weight.device,
            fingerprint, rank=args.process_index, world_size=args.world_size, sep="_",
            main_process=self.is_world_process_zero())
        self._logged: dict[str, list[float]] = {"ntp_loss": [], "replay_loss": [], "replay_seconds": []}
        self._step_kls: list[float] = []
        if self.controller is not None:
            self._logged["replay_kl"] = []
        self.add_callback(_ReplayRunCallback(self))

    def _with_drawn_pool(self, config: RunConfig, form, fingerprint: str) -> RunConfig:
        """replay_draw_once: π0 (the model before its first step) draws its pool once, on the main
        process, into OUTPUT_DIR/replay_pool (unless a finished one is there: a resumed run's), and
        the run replays it pass after pass, holding no copy of π0 (objective.reference)."""
        r, out = config.replay, Path(self.args.output_dir) / POOL_NAME
        if self.is_world_process_zero():
            if out.exists() and not (out / HEADER_NAME).is_file():
                shutil.rmtree(out)  # a drawing killed midway
            if not out.exists():
                targets = "hidden" if replay_method(r.method).keeps_hidden else "none"
                with standing_for_reference(self.lm):
                    header = draw_hf_pool(self.lm, form, out, r.draw_once, r, self.args.seed, targets,
                                          getattr(self.model, "name_or_path", ""), fingerprint)
                notice(f"drew {header['rows']} replay samples once, into {out}, in {header['seconds']:.1f} s")
        self.accelerator.wait_for_everyone()
        return dataclasses.replace(config, replay=dataclasses.replace(r, pool=str(out), reuse=0))

    # ------------------------------------------------------------ the replay run, as tests and users read it

    @property
    def reference(self):
        """π0: a frozen copy, the adapter-disabled network, its head alone, or None."""
        return self.replay_run.reference

    @property
    def replay(self):
        """The replay source (None where the method replays nothing)."""
        return self.replay_run.source

    @property
    def controller(self):
        return self.replay_run.controller

    @property
    def capacity(self):
        return self.replay_run.capacity

    @property
    def replay_fidelity(self) -> dict | None:
        """π0's first draw, judged at the first step (evaluation.fidelity)."""
        return self.replay_run.fidelity

    @property
    def capacity_bound_since(self) -> int | None:
        """The step from which the run was capacity bound (replay_coeff="auto"); None: it was not."""
        return self.capacity.since if self.capacity is not None else None

    # ------------------------------------------------------------ the adapter

    def train(self, *args, **kwargs):
        """Trainer.train, with the lm-eval tasks of `args.lm_eval_tasks` scored before and after
        (on the main process) and logged as lm_eval_TASK_METRIC_before/_after."""
        tasks = self.args.lm_eval_tasks
        before = self._benchmark_scores() if tasks else None
        output = super().train(*args, **kwargs)
        for line in self.replay_run.end_lines() if self.is_world_process_zero() else []:
            notice(line)
        if self.replay_run.prompts is not None and self.is_world_process_zero():  # θ's answers, side by side with π0's
            agreement = self.replay_run.answer_agreement(self.lm, self.processing_class,
                                                         Path(self.args.output_dir) / ANSWERS_NAME)
            self.log({**{f"{k}_0": v for k, v in self.replay_run.agreement_0.items()}, **agreement})
        if tasks:
            after = self._benchmark_scores()
            self.benchmark_scores = {"before": before, "after": after}
            if self.is_world_process_zero():
                self.log({f"lm_eval_{task}_{metric}_{when}": value for task, metrics in benchmark_table(before, after).items()
                          for metric, scores in metrics.items() for when, value in scores.items()})
        return output

    def _benchmark_scores(self, tasks: list[str] | None = None) -> dict | None:
        scores = self.replay_run.benchmarks(self.lm, self.processing_class, self.args.per_device_eval_batch_size, tasks)
        self.accelerator.wait_for_everyone()
        return scores

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        new = inputs["input_ids"]
        new_mask = label_mask(inputs["labels"]) if "labels" in inputs else None
        run = self.replay_run
        method = run.method if model.training else NO_REPLAY
        replay = None
        if method.needs_replay:
            seconds = run.replay_seconds
            replay = run.next_replay(self.state.global_step, self.lm)
            self._logged["replay_seconds"].append(run.replay_seconds - seconds)
        loss, ntp, reg, kl = run.loss_terms(self.lm, new, replay, trunk=partial(self.lm.hidden, model=model),
                                            new_mask=new_mask, method=method)
        if model.training:
            self._logged["ntp_loss"].append(ntp.item())
            self._logged["replay_loss"].append(reg.item())
            if kl is not None:  # what the budget holds; c moves once the step is taken
                self._step_kls.append(kl.item())
                self._logged["replay_kl"].append(kl.item())
        return (loss, {"ntp_loss": ntp.detach(), "replay_loss": reg.detach()}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the mean of ntp_loss, replay_loss and replay_seconds since the last log, over all ranks,
        and c with the capacity detector's verdict (replay_coeff="auto")."""
        if "loss" in logs:  # a training log point
            for key, values in self._logged.items():
                if values:
                    mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                    logs[key] = self.accelerator.reduce(mean, reduction="mean").item()
                    values.clear()
            # the Trainer measures no new-domain validation loss of its own: the detector reads the training loss
            logs.update(self.replay_run.at_log_point(self.state.global_step, logs.get("ntp_loss")))
            if self.replay_run.stop_requested:
                self.control.should_training_stop = True
        super().log(logs, *args, **kwargs)

    def step_done(self) -> None:
        """After an optimizer step: c moves by the mean replay KL of its micro-batches over every
        rank (so that every rank moves c alike)."""
        if not self._step_kls:
            return
        mean = torch.tensor(sum(self._step_kls) / len(self._step_kls), device=self.args.device)
        self._step_kls.clear()
        self.replay_run.after_step(self.accelerator.reduce(mean, reduction="mean").item())

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, with the replay run's state beside it (COEFFICIENT_NAME)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            state = self.replay_run.state_dict()
            write_atomic(folder / COEFFICIENT_NAME, lambda path: path.write_text(json.dumps(state)))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        folder = Path(resume_from_checkpoint)
        path = next((folder / name for name in (COEFFICIENT_NAME, LEGACY_COEFFICIENT_NAME) if (folder / name).is_file()),
                    None)
        if path is None:
            if self.controller is not None:
                raise SelfReplayError(f"{resume_from_checkpoint} holds no {COEFFICIENT_NAME}: resume replay_coeff="
                                      "\"auto\" from a checkpoint of a run with replay_coeff=\"auto\"")
            return
        self.replay_run.load_state_dict(json.loads(path.read_text()))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's evaluation (when there is an eval_dataset) plus, on the old-domain rows,
        old_loss, old_kl = KL(π0 ‖ πθ) and forgetting = old_loss − old_loss_0 (nats)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix) \
            if eval_dataset is not None or self.eval_dataset else {}
        if self.replay_run.measurements.sets:
            measured = self.replay_run.measure(self.lm, self.state.global_step)
            self.log({f"{metric_key_prefix}_{k}": v for k, v in measured.items()})
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in measured.items()})
        return metrics

    def measure_old(self) -> dict[str, float]:
        """old_loss, old_kl and forgetting on the old-domain rows (selfreplay.evaluation.validation)."""
        measured = self.replay_run.measure(self.lm, self.state.global_step)
        return {k: v for k, v in measured.items() if k in ("old_loss", "old_kl", "forgetting")}


def _old_sets(old_rows: list[dict] | None, reference) -> dict[str, ValidationSet]:
    """The old-domain rows as the measurements' one set ("old"), against π0 (`reference`)."""
    if old_rows is None:
        return {}
    batch = pad_batch(old_rows, pad_id=0)
    return {"old": ValidationSet(batch["input_ids"], reference, label_mask(batch["labels"]), batch_size=8)}


class _ReplayRunCallback(TrainerCallback):
    """The replay run's hooks in the Trainer's loop: old_loss_0 and the answers' agreement before the
    first step (where old-domain rows or prompts are given), and c moved once per optimizer step
    (after it, before any checkpoint)."""

    def __init__(self, trainer: SelfReplayTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        run = self.trainer.replay_run
        if state.global_step == 0 and run.measurements.sets and run.measurements.old_loss_0 is None:
            run.measure(self.trainer.lm, 0)
        if state.global_step == 0 and run.agreement_0 is None:
            run.answer_agreement(self.trainer.lm)  # eval_prompts: θ's answers before its first step

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.step_done()
