import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import conversations, sentences  # noqa: E402
from selfreplay.data.text import pad_batch  # noqa: E402
from selfreplay.model.hf import load_causal_lm, num_parameters  # noqa: E402
from selfreplay.replay.hf_sampling import base_format, sample_replay  # noqa: E402
from selfreplay.hf.trainer import SelfReplayConfig, SelfReplayTrainer  # noqa: E402


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=4, learning_rate=3e-2, per_device_train_batch_size=4,
                    replay_batch_size=3, replay_buffer=2, replay_length=32, max_length=32, logging_steps=2,
                    report_to=[], save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="constant",
                    disable_tqdm=True)
    return SelfReplayConfig(**{**settings, **overrides})


def _spanish():
    return [{"text": s} for s in sentences("es", 60)]


def _fixed_replay(trainer, tokenizer, seed=7):
    """Make every replay batch the same known samples (with π0's hidden states) and return them."""
    samples = sample_replay(trainer.reference, base_format(tokenizer), 3, 32, seed=seed, keep_hidden=True)
    trainer.replay.next_batch = lambda: samples
    return samples


def _direct_forward_kl(reference_model, model, samples) -> float:
    """mean over counted positions of Σ_v π0(v) (log π0(v) − log πθ(v)), from the full logits."""
    with torch.no_grad():
        log_p0 = torch.log_softmax(reference_model(samples.tokens).logits.double(), -1)
        log_p = torch.log_softmax(model(samples.tokens).logits.double(), -1)
    per_position = (log_p0.exp() * (log_p0 - log_p)).sum(-1)[:, :-1]
    reverse = (log_p.exp() * (log_p - log_p0)).sum(-1)[:, :-1]
    counted = samples.mask[:, 1:]
    return per_position[counted].mean().item(), reverse[counted].mean().item()


def test_replay_kl_is_zero_at_the_start_then_positive_and_the_forward_kl_of_the_full_logits(
        taught_llama_dir, tmp_path):
    model, tokenizer = load_causal_lm(taught_llama_dir)
    trainer = SelfReplayTrainer(model, _args(tmp_path), train_dataset=_spanish(), processing_class=tokenizer)
    samples = _fixed_replay(trainer, tokenizer)
    batch = pad_batch(trainer.train_dataset[:4], tokenizer.pad_token_id)
    model.train()
    _, terms = trainer.compute_loss(model, batch, return_outputs=True)
    assert terms["replay_loss"].item() == pytest.approx(0.0, abs=1e-6)
    trainer.train()
    model.train()
    _, terms = trainer.compute_loss(model, batch, return_outputs=True)
    forward, reverse = _direct_forward_kl(trainer.reference.model, model, samples)
    assert forward > 1e-3 and abs(forward - reverse) > 1e-2 * forward  # the two directions differ here
    assert terms["replay_loss"].item() == pytest.approx(forward, rel=1e-4)
    logged = [entry for entry in trainer.state.log_history if "replay_loss" in entry]
    assert logged and all(entry["ntp_loss"] > 0 for entry in logged)


def test_lora_trains_with_pi0_as_the_adapter_disabled_network_and_saves_an_adapter(taught_llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig

    model, tokenizer = load_causal_lm(taught_llama_dir)
    original, _ = load_causal_lm(taught_llama_dir)
    trainer = SelfReplayTrainer(model, _args(tmp_path, replay_chat=True), train_dataset=_spanish(),
                                processing_class=tokenizer,
                                peft_config=LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    assert num_parameters(trainer.lm, trainer.reference) == num_parameters(trainer.lm)
    trainer.train()
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        pi0 = original(tokens, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(trainer.reference.hidden(tokens), pi0, atol=1e-5)
        adapted = trainer.lm.hidden(tokens)
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens, output_hidden_states=True).hidden_states[-1], adapted, atol=1e-5)


def test_full_finetuning_on_conversations_saves_a_model_that_loads_alone(taught_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    chats = [{"messages": c} for c in conversations(20)]
    old = [{"text": s} for s in sentences("en", 40)]
    trainer = SelfReplayTrainer(taught_llama_dir, _args(tmp_path, replay_method="ntp", max_length=96),
                                train_dataset=chats, old_eval_dataset=old)
    start = trainer.evaluate()
    assert start["eval_old_kl"] == pytest.approx(0.0, abs=1e-6)
    assert start["eval_forgetting"] == pytest.approx(0.0, abs=1e-6)
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_old_kl"] > 0
    trainer.save_model(str(tmp_path / "model"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    tokens = torch.randint(0, loaded.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, trainer.model(tokens).logits, atol=1e-5)


DISTRIBUTED_SCRIPT = '''
import json, os, sys, torch
torch.set_num_threads(1)
from selfreplay.hf.trainer import SelfReplayConfig, SelfReplayTrainer
model_dir, out = sys.argv[1], sys.argv[2]
args = SelfReplayConfig(output_dir=out, max_steps=2, per_device_train_batch_size=2, replay_batch_size=2,
                        replay_buffer=1, replay_length=24, max_length=24, report_to=[], save_strategy="no",
                        use_cpu=True, disable_tqdm=True, logging_steps=1)
texts = [{"text": "el gato camina con el perro hoy y ve la casa roja " * 3} for _ in range(16)]
trainer = SelfReplayTrainer(model_dir, args, train_dataset=texts)
draw = trainer.replay.next_batch
drawn = []
trainer.replay.next_batch = lambda: drawn.append(draw()) or drawn[-1]
trainer.train()
rank = int(os.environ["RANK"])
json.dump({"world": trainer.args.world_size, "replay": drawn[0].tokens.tolist(),
           "steps": trainer.state.global_step}, open(os.path.join(out, f"rank{rank}.json"), "w"))
torch.distributed.destroy_process_group()  # left to exit, gloo's threads now and then abort the process
'''


def test_trainer_runs_under_torchrun_with_each_rank_drawing_its_own_replay(taught_llama_dir, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), taught_llama_dir, str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    assert ranks[0]["replay"] != ranks[1]["replay"]


def test_gpt2_tied_head_trains_while_pi0_keeps_a_frozen_copy(tiny_gpt2_dir, tmp_path):
    """GPT-2's head is its input embedding: training moves θ's and leaves π0's, so the replay
    term is exactly zero at the start and, after training, the forward KL of the full logits."""
    from transformers import AutoModelForCausalLM

    # no dropout: θ is then exactly π0 at step 0, and the direct computation runs the network the step ran
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tokenizer = load_causal_lm(tiny_gpt2_dir)[1]
    trainer = SelfReplayTrainer(model, _args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=_spanish(),
                                processing_class=tokenizer)
    samples = _fixed_replay(trainer, tokenizer)
    embedding = model.get_input_embeddings().weight.detach().clone()
    batch = pad_batch(trainer.train_dataset[:4], tokenizer.pad_token_id)
    model.train()
    _, start = trainer.compute_loss(model, batch, return_outputs=True)
    trainer.train()
    model.train()
    loss, end = trainer.compute_loss(model, batch, return_outputs=True)
    assert not torch.equal(model.get_input_embeddings().weight, embedding)
    assert torch.equal(trainer.reference.head.weight, embedding)  # π0's tied head is a copy, frozen
    forward, _ = _direct_forward_kl(trainer.reference.model, model, samples)
    assert start["replay_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert forward > 1e-4 and end["replay_loss"].item() == pytest.approx(forward, rel=1e-4)
    assert loss.item() == pytest.approx(end["ntp_loss"].item() + trainer.args.replay_coeff * forward, rel=1e-5)


def test_the_trainers_replay_settings_are_the_command_lines_replay_config(tmp_path):
    """One schema: each replay_X of SelfReplayConfig is ReplayConfig's X, of the same type and help,
    checked by the same ranges; those of the built-in model's family are refused in one line."""
    import dataclasses
    import typing

    from selfreplay.config import ReplayConfig
    from selfreplay.errors import SelfReplayError

    trainer_hints, config_hints = typing.get_type_hints(SelfReplayConfig), typing.get_type_hints(ReplayConfig)
    trainer_fields = {f.name.removeprefix("replay_"): f for f in dataclasses.fields(SelfReplayConfig)
                      if f.name.startswith("replay_")}
    assert set(trainer_fields) == set(config_hints)
    assert all(trainer_hints[f"replay_{key}"] == config_hints[key] for key in trainer_fields)
    assert all(trainer_fields[f.name].metadata["help"] == f.metadata["help"] for f in dataclasses.fields(ReplayConfig))
    replay = _args(tmp_path, replay_method="kl_new", replay_coeff=3.0, replay_length=None, max_length=24).replay_config()
    assert (replay.method, replay.coeff, replay.length, replay.batch_size) == ("kl_new", 3.0, 24, 3)
    with pytest.raises(SelfReplayError, match=r"replay.temperature must be > 0, got 0.0"):
        _args(tmp_path, replay_temperature=0.0).replay_config()
    for setting, value in (("fraction", 0.5), ("domains", "en"), ("compile", True), ("source", "real")):
        with pytest.raises(SelfReplayError, match="built-in model") as error:
            SelfReplayTrainer("unused", _args(tmp_path, **{f"replay_{setting}": value}))
        assert "\n" not in str(error.value)
    with pytest.raises(SelfReplayError, match="replay.system and replay.prompts shape chat samples"):
        SelfReplayTrainer("unused", _args(tmp_path, replay_system="You are helpful."))


def test_a_trainer_draws_its_pool_once_and_replays_it_without_a_copy_of_pi0(taught_llama_dir, tmp_path):
    """replay_draw_once=N: π0 draws N samples once into OUTPUT_DIR/replay_pool before the first step;
    the Trainer keeps π0's head alone, and a second Trainer on the same output_dir replays that pool."""
    from selfreplay.objective.reference import ReferenceHead
    from selfreplay.replay.store import read_header

    model, tokenizer = load_causal_lm(taught_llama_dir)
    trainer = SelfReplayTrainer(model, _args(tmp_path, replay_draw_once=6), train_dataset=_spanish(),
                                processing_class=tokenizer)
    pool = tmp_path / "out" / "replay_pool"
    header = read_header(pool)
    assert header["rows"] == 6 and header["targets"] == "hidden"
    assert isinstance(trainer.reference, ReferenceHead)
    trainer.train()
    assert trainer.replay_fidelity["samples"] == 3  # the first batch of the stored pool, judged
    model, tokenizer = load_causal_lm(taught_llama_dir)
    SelfReplayTrainer(model, _args(tmp_path, replay_draw_once=6), train_dataset=_spanish(), processing_class=tokenizer)
    assert read_header(pool) == header  # not drawn again


def test_kl_on_the_new_batch_trains_through_the_trainer_and_an_unknown_method_is_one_line(taught_llama_dir, tmp_path):
    from selfreplay.errors import SelfReplayError

    model, tokenizer = load_causal_lm(taught_llama_dir)
    trainer = SelfReplayTrainer(model, _args(tmp_path, replay_method="kl_new", max_steps=2), train_dataset=_spanish(),
                                processing_class=tokenizer)
    assert trainer.replay is None  # kl_new draws no replay: its KL is on the new batch
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "replay_loss" in entry]
    assert logged and logged[-1]["replay_loss"] > 0
    with pytest.raises(SelfReplayError, match="unknown replay_method 'replace': choose one of none, ntp, kl, kl_new"):
        SelfReplayTrainer(model, _args(tmp_path, replay_method="replace"), train_dataset=_spanish(),
                          processing_class=tokenizer)


def test_a_trainer_replaying_a_stored_pool_holds_no_copy_of_pi0(taught_llama_dir, tmp_path):
    """replay_pool with π0's hidden states and replay_reuse=0: the Trainer keeps π0's head alone
    and ends where a Trainer holding π0's copy ends (replay_reuse=1000: the same samples, in order)."""
    from selfreplay.objective.reference import ReferenceHead
    from selfreplay.training.pools import sample_hf_pool

    sample_hf_pool(f"hf:{taught_llama_dir}", tmp_path / "pool", count=6, length=32, seed=3, targets="hidden")
    old = [{"text": s} for s in sentences("en", 12, seed=2)]
    ends = {}
    for reuse in (0, 1000):
        model, tokenizer = load_causal_lm(taught_llama_dir)
        trainer = SelfReplayTrainer(model, _args(tmp_path / str(reuse), replay_pool=str(tmp_path / "pool"),
                                                 replay_reuse=reuse),
                                    train_dataset=_spanish(), processing_class=tokenizer, old_eval_dataset=old)
        if reuse == 0:
            assert isinstance(trainer.reference, ReferenceHead)
            assert num_parameters(trainer.reference) == trainer.lm.head.weight.numel()
        trainer.train()
        ends[reuse] = trainer.measure_old()
    assert ends[0]["old_kl"] > 0
    for key in ("old_loss", "old_kl", "forgetting"):
        assert ends[0][key] == pytest.approx(ends[1000][key], rel=1e-6), key


def test_replay_coeff_auto_holds_c_to_a_budget_logs_it_and_resumes_it_from_a_checkpoint(taught_llama_dir, tmp_path):
    """replay_coeff="auto": c rises under a budget the KL exceeds, is logged with the replay KL at
    every log point, and goes into each checkpoint: a Trainer resumed at step 2 ends with the c of
    one that trained straight through (the same replay samples at every step)."""
    import dataclasses

    from selfreplay.errors import SelfReplayError
    from selfreplay.hf.trainer import COEFFICIENT_NAME

    auto = dict(replay_coeff="auto", replay_budget=1e-4, replay_coeff_start=1.0, replay_horizon=2,
                save_strategy="steps", save_steps=2)

    def trainer_of(out):
        model, tokenizer = load_causal_lm(taught_llama_dir)
        trainer = SelfReplayTrainer(model, _args(out, **auto), train_dataset=_spanish(), processing_class=tokenizer)
        _fixed_replay(trainer, tokenizer)
        return trainer

    whole = trainer_of(tmp_path / "whole")
    whole.train()
    logged = [entry for entry in whole.state.log_history if "replay_coeff" in entry]
    assert len(logged) == 2 and all(entry["replay_kl"] == pytest.approx(entry["replay_loss"]) for entry in logged)
    # step 1's KL is 0 (θ is π0) and takes c down by e^(-0.2/2), step 2's far over budget up by e^(1/2):
    # then up, step after step
    assert logged[0]["replay_coeff"] == pytest.approx(math.exp(0.4)) and logged[1]["replay_coeff"] > 2.0
    assert logged[1]["replay_coeff"] == whole.controller.coeff
    assert whole.controller.updates == 4 and whole.capacity_bound_since is None
    assert whole.replay_fidelity["samples"] == 3 and whole.replay_fidelity["nll_samples"] > 0
    saved = json.loads((tmp_path / "whole" / "out" / "checkpoint-2" / COEFFICIENT_NAME).read_text())
    assert saved["coefficient"]["updates"] == 2

    import shutil

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(tmp_path / "whole" / "out" / "checkpoint-2", checkpoint)
    saved["coefficient"]["skipped"] = 7  # a count that moves nothing: it shows the state was read
    (checkpoint / COEFFICIENT_NAME).write_text(json.dumps(saved))
    resumed = trainer_of(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.controller.state_dict() == {**whole.controller.state_dict(), "skipped": 7}
    (checkpoint / COEFFICIENT_NAME).unlink()
    with pytest.raises(SelfReplayError, match=f"holds no {COEFFICIENT_NAME}"):
        trainer_of(tmp_path / "again").train(resume_from_checkpoint=str(checkpoint))

    with pytest.raises(SelfReplayError, match="set replay.budget"):
        dataclasses.replace(_args(tmp_path, replay_coeff="auto")).replay_config()
    with pytest.raises(SelfReplayError, match="replay.method=none has none"):
        SelfReplayTrainer(taught_llama_dir, _args(tmp_path, replay_method="none", replay_coeff="auto",
                                                  replay_budget=0.01), train_dataset=_spanish())
