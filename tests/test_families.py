"""`selfreplay finetune init=hf:...`: a Hugging Face causal LM through the training loop of selfreplay.training.loop."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import conversations, sentences, write_jsonl  # noqa: E402
from test_rundir import WALL_CLOCK  # noqa: E402

from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.training.loop import resolve_config, train  # noqa: E402


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """New-domain (Spanish) and held-out old-domain (English) JSONL text."""
    root = tmp_path_factory.mktemp("texts")
    return {"new": write_jsonl(root / "new.jsonl", sentences("es", 200, seed=1)),
            "old": write_jsonl(root / "old.jsonl", sentences("en", 60, seed=2))}


def hf_config(model_dir, texts, out, *overrides):
    return resolve_config("finetune", None, [
        f"init=hf:{model_dir}", f"data.train={texts['new']}", f"data.old_text={texts['old']}", f"out={out}",
        "model.T=32", "data.val_sequences=8", "optim.lr=1e-2", "optim.batch_size=4", "optim.warmup_steps=0",
        "replay.method=kl", "replay.coeff=1", "replay.batch_size=3", "replay.buffer=2", "replay.length=32",
        "stop.tokens=512", "log.every_tokens=256", "log.progress=false", *overrides])


def lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_full_finetuning_with_replay_kl_writes_a_run_whose_model_loads_alone(taught_llama_dir, texts, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    summary = train(hf_config(taught_llama_dir, texts, out), "finetune")
    metrics = lines(out)
    assert [m["step"] for m in metrics] == [0, 2, 4]
    assert metrics[0]["old_kl"] == pytest.approx(0.0, abs=1e-6) and metrics[0]["forgetting"] == 0.0
    assert metrics[-1]["old_kl"] > 0 and metrics[-1]["replay_loss"] > 0
    assert metrics[-1]["new_loss"] < metrics[0]["new_loss"]
    assert {"new_loss", "old_loss", "new_kl", "old_loss_second_half"} <= set(metrics[-1])
    assert summary["forgetting"] == pytest.approx(metrics[-1]["old_loss"] - metrics[0]["old_loss"])
    assert summary["steps"] == 4 and summary["method"] == "kl" and summary["params"] > 0
    assert {"config.yaml", "metrics.jsonl", "summary.json", "config.json", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(taught_llama_dir)
    ids = tokenizer("El gato ve la casa.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before(ids).logits)  # the finetuned weights were saved
    assert train(hf_config(taught_llama_dir, texts, out), "finetune") == summary  # finished: nothing to do


def test_a_bfloat16_reference_is_a_half_size_copy_that_still_trains_with_replay(taught_llama_dir, texts, tmp_path,
                                                                                 monkeypatch):
    import torch

    import selfreplay.training.loop as training

    held = {}
    setup = training.setup
    monkeypatch.setattr(training, "setup", lambda *a: held.setdefault("run", setup(*a)))
    summary = train(hf_config(taught_llama_dir, texts, tmp_path / "run", "model.reference_dtype=bfloat16"), "finetune")
    run = held["run"]
    assert {p.dtype for p in run.reference.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.model.model.parameters()} == {torch.float32}
    first, last = lines(tmp_path / "run")[0], lines(tmp_path / "run")[-1]
    assert first["old_kl"] < 1e-2  # π0 rounded to bfloat16: close to, not exactly, θ at step 0
    assert last["replay_loss"] > 0 and summary["new_loss"] < first["new_loss"]


@pytest.mark.parametrize("overrides, message", [
    (["model.reference_dtype=bfloat16", "lora.rank=4"], "with LoRA π0 is the model with its adapters disabled"),
    (["model.reference_dtype=float16"], "unknown model.reference_dtype"),
])
def test_reference_dtype_settings_a_run_cannot_take_are_one_line(taught_llama_dir, texts, tmp_path, overrides,
                                                                  message):
    with pytest.raises(SelfReplayError, match=message):
        train(hf_config(taught_llama_dir, texts, tmp_path / "run", *overrides), "finetune")
    assert not (tmp_path / "run").exists()


def test_old_text_is_measured_on_a_seeded_choice_of_val_sequences_rows(taught_llama_dir, texts, tmp_path):
    import numpy as np

    from selfreplay.training.loop import load_data

    every = load_data(hf_config(taught_llama_dir, texts, tmp_path / "a", "data.val_sequences=150"), "finetune").old
    chosen = [load_data(hf_config(taught_llama_dir, texts, tmp_path / "b", "data.val_sequences=5", f"data.seed={seed}"),
                        "finetune").old.sequences for seed in (0, 0, 1)]
    assert len(every.sequences) > 5 and all(len(rows) == 5 for rows in chosen)
    assert all(any((row == every.sequences).all(1)) for row in chosen[0])  # whole rows of old_text
    assert np.array_equal(chosen[0], chosen[1]) and not np.array_equal(chosen[0], chosen[2])


def test_lora_keeps_pi0_as_the_adapter_disabled_network_and_saves_the_adapter(taught_llama_dir, texts, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "lora"
    summary = train(hf_config(taught_llama_dir, texts, out, "lora.rank=4", "optim.lr=3e-2"), "finetune")
    metrics = lines(out)
    assert metrics[0]["old_kl"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["old_kl"] > 0
    assert summary["lora_rank"] == 4 and (out / "adapter_config.json").is_file()
    assert not (out / "config.json").exists()  # the adapter alone, not a second copy of the model
    AutoPeftModelForCausalLM.from_pretrained(out)


def test_a_resumed_hf_run_ends_where_an_uninterrupted_one_does(taught_llama_dir, texts, tmp_path, monkeypatch):
    from selfreplay.evaluation.validation import ValidationSet

    overrides = ("lora.rank=4", "replay.buffer=3", "log.checkpoint_every=1", "stop.tokens=768")
    whole = train(hf_config(taught_llama_dir, texts, tmp_path / "whole", *overrides), "finetune")
    calls = {"n": 0}
    real_evaluate = ValidationSet.evaluate

    def dying_evaluate(*args, **kwargs):  # killed during the 4th log point (2 sets each), after checkpoints at 2, 4
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 1:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ValidationSet, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(hf_config(taught_llama_dir, texts, tmp_path / "resumed", *overrides), "finetune")
    assert (tmp_path / "resumed" / "checkpoint.json").exists()
    monkeypatch.setattr(ValidationSet, "evaluate", real_evaluate)
    resumed = train(hf_config(taught_llama_dir, texts, tmp_path / "resumed", *overrides), "finetune")
    strip = lambda p: {k: v for k, v in p.items() if k not in WALL_CLOCK}  # noqa: E731
    for key in ("old_loss", "new_loss", "old_kl", "new_kl", "forgetting", "steps", "tokens"):
        assert resumed[key] == whole[key], key
    assert [strip(p) for p in lines(tmp_path / "resumed")] == [strip(p) for p in lines(tmp_path / "whole")]
    assert not list((tmp_path / "resumed").glob("ckpt-*"))


def test_replay_comes_first_from_a_pool_written_by_selfreplay_sample(taught_llama_dir, texts, tmp_path, monkeypatch):
    from selfreplay.replay.pool import ReplayPool
    from selfreplay.training.pools import sample_hf_pool

    sample_hf_pool(f"hf:{taught_llama_dir}", tmp_path / "pool", count=6, length=32, seed=3, targets="topk:16")
    seen = []
    real_next = ReplayPool.next_batch

    def spy(pool):
        seen.append((pool.order.pass_, pool.order.position, pool.draws))
        return real_next(pool)

    monkeypatch.setattr(ReplayPool, "next_batch", spy)
    summary = train(hf_config(taught_llama_dir, texts, tmp_path / "run", f"replay.pool={tmp_path / 'pool'}"),
                    "finetune")
    assert summary["steps"] == 4
    assert seen == [(0, 0, 0), (0, 3, 0), (1, 0, 0), (1, 0, 1)]  # the pool's 6 samples once, then π0's own draws


@pytest.mark.parametrize("method", ["ntp", "kl_new"])
def test_gpt2_with_its_tied_head_finetunes_with_each_replay_method(tiny_gpt2_dir, texts, tmp_path, method):
    summary = train(hf_config(tiny_gpt2_dir, texts, tmp_path / "gpt2", f"replay.method={method}"), "finetune")
    assert summary["steps"] == 4 and summary["old_loss"] is not None and summary["forgetting"] is not None
    assert lines(tmp_path / "gpt2")[-1]["replay_loss"] > 0


def test_a_run_killed_before_its_first_checkpoint_starts_over(taught_llama_dir, texts, tmp_path, monkeypatch):
    from selfreplay.evaluation.validation import ValidationSet

    out = tmp_path / "run"
    real_evaluate = ValidationSet.evaluate
    calls = {"n": 0}

    def dying_evaluate(*args, **kwargs):  # killed at the second log point, with no checkpoint written
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ValidationSet, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(hf_config(taught_llama_dir, texts, out), "finetune")
    assert not list(out.glob("ckpt-*"))
    monkeypatch.setattr(ValidationSet, "evaluate", real_evaluate)
    assert train(hf_config(taught_llama_dir, texts, out), "finetune")["steps"] == 4


@pytest.mark.parametrize("override, message", [
    ("init=hf:/no/such/model", "model directory not found: /no/such/model"),
    ("init=hf:no-such-org/no-such-model", "could not load model no-such-org/no-such-model"),
    ("data.text_field=body", "no 'body' field"),
])
def test_a_missing_model_or_text_field_is_one_line_before_anything_is_written(
        taught_llama_dir, texts, tmp_path, override, message):
    with pytest.raises(SelfReplayError) as e:
        train(hf_config(taught_llama_dir, texts, tmp_path / "run", override), "finetune")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_command_line_finetunes_a_hf_model_and_refuses_a_missing_old_text_in_one_line(
        taught_llama_dir, texts, tmp_path, capsys):
    from selfreplay.cli import main

    common = [f"init=hf:{taught_llama_dir}", f"data.train={texts['new']}", "model.T=32", "data.val_sequences=4",
              "optim.batch_size=4", "replay.method=kl", "replay.batch_size=2", "replay.buffer=1",
              "replay.length=16", "stop.tokens=128", "log.progress=false"]
    assert main(["finetune", *common, f"out={tmp_path / 'none'}"]) != 0
    assert "set data.old_text=" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(["finetune", *common, f"data.old_text={texts['old']}", f"out={tmp_path / 'run'}"]) == 0
    assert "forgetting" in capsys.readouterr().out and (tmp_path / "run" / "summary.json").is_file()


# ---------------------------------------------------------------- conversations and chat replay

@pytest.fixture(scope="module")
def chats(tmp_path_factory, texts):
    """New-domain conversations (English questions, Spanish answers) and the old-domain text."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(60, seed=3)))
    return {"new": path, "old": texts["old"]}


def chat_config(model_dir, chats, out, *overrides):
    return hf_config(model_dir, chats, out, "model.T=96", "replay.length=96", "stop.tokens=768",
                     "log.every_tokens=384", "replay.chat=true", *overrides)


def test_conversations_train_on_the_assistants_tokens_with_chat_replay(taught_llama_dir, hf_tokenizer, chats,
                                                                       tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    import selfreplay.training.replay_run as train_module  # where the objective is called
    from selfreplay.data.chat import chat_turns
    from selfreplay.data.text import chat_rows, label_mask, pad_batch

    steps, real_loss = [], train_module.training_loss

    def spy(model, reference, new, replay, *args, new_mask=None, **kwargs):
        steps.append((new, new_mask, replay.tokens))
        return real_loss(model, reference, new, replay, *args, new_mask=new_mask, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", spy)
    out = tmp_path / "chat"
    summary = train(chat_config(taught_llama_dir, chats, out, "replay.system=Be brief."), "finetune")
    assert summary["steps"] == 2 and math.isfinite(summary["new_loss"]) and math.isfinite(summary["old_loss"])
    assert {"new_loss", "new_kl", "old_loss", "forgetting"} <= set(lines(out)[-1])
    assert (out / "summary.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    # each row's mask is the Trainer's: labels != -100, True on the assistant's tokens, never on padding
    expected = pad_batch(chat_rows(str(chats["new"]), hf_tokenizer, 96), hf_tokenizer.pad_token_id, width=96)
    masks = {tuple(ids.tolist()): mask for ids, mask in zip(expected["input_ids"], label_mask(expected["labels"]))}
    prefix = torch.tensor(chat_turns(hf_tokenizer, system="Be brief.").user_prefix)
    for new, new_mask, replay in steps:
        assert new.shape == new_mask.shape == (4, 96)
        assert all(torch.equal(mask, masks[tuple(row.tolist())]) for row, mask in zip(new, new_mask))
        assert not new_mask[new == hf_tokenizer.pad_token_id].any()
        assert (replay[:, : len(prefix)] == prefix).all()  # samples start inside the template, after the system turn


def test_new_loss_on_conversations_counts_only_the_assistants_predictions(taught_llama_dir):
    import copy

    import torch

    from selfreplay.evaluation.validation import ValidationSet
    from selfreplay.model.hf import CausalLM, load_causal_lm

    lm = CausalLM(load_causal_lm(taught_llama_dir)[0].eval())
    reference = copy.deepcopy(lm)
    with torch.no_grad():
        reference.head.weight.mul_(1.5)  # a π0 that differs from θ, so that the KL is positive
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 200, (5, 16), generator=generator)
    mask = torch.rand(5, 16, generator=generator) < 0.4
    result = ValidationSet(tokens, reference, mask, batch_size=2).evaluate(lm)
    with torch.no_grad():
        logp, ref_logp = (m.head(m.hidden(tokens)).log_softmax(-1)[:, :-1] for m in (lm, reference))
    counted = mask[:, 1:]  # mask is on the predicted token: position t-1 predicts token t
    losses = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    second_half = counted.clone()
    second_half[:, : 16 // 2 - 1] = False  # predictions of positions >= T/2
    assert result["loss"] == pytest.approx(losses[counted].mean().item(), rel=1e-5)
    assert result["loss_second_half"] == pytest.approx(losses[second_half].mean().item(), rel=1e-5)
    assert result["kl"] == pytest.approx(kl[counted].mean().item(), rel=1e-4) and result["kl"] > 0
    first_half_only = mask.clone()
    first_half_only[:, 16 // 2:] = False
    assert "loss_second_half" not in ValidationSet(tokens, reference, first_half_only).evaluate(lm)


@pytest.fixture(scope="module")
def templateless_llama_dir(tiny_llama_dir, hf_tokenizer, tmp_path_factory):
    """The tiny Llama with a tokenizer that has no chat template."""
    import copy

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("templateless")
    plain = copy.deepcopy(hf_tokenizer)
    plain.chat_template = None
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(out)
    plain.save_pretrained(out)
    return out


@pytest.mark.parametrize("model, overrides, message", [
    ("templateless", ["replay.chat=false"], "has no chat template: chat data and chat sampling need one"),
    ("templateless", ["data.train=TEXT"], "has no chat template: chat data and chat sampling need one"),
    ("taught", ["data.old_text=CHATS"], "old_text is measured as plain text"),
    ("taught", ["replay.chat=false", "replay.system=Be brief."], "replay.system and replay.prompts shape chat "
                                                                 "samples: set replay.chat=true"),
    ("taught", ["replay.prompts=/no/such/prompts.txt"], "prompts file not found"),
])
def test_chat_settings_a_run_cannot_take_are_one_line_before_anything_is_written(
        taught_llama_dir, templateless_llama_dir, texts, chats, tmp_path, model, overrides, message):
    model_dir = {"taught": taught_llama_dir, "templateless": templateless_llama_dir}[model]
    overrides = [o.replace("TEXT", str(texts["new"])).replace("CHATS", str(chats["new"])) for o in overrides]
    with pytest.raises(SelfReplayError) as e:
        train(chat_config(model_dir, chats, tmp_path / "run", *overrides), "finetune")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_defaults_follow_the_model_a_new_user_sets_neither_model_t_nor_replay_length(tiny_llama_dir, texts, tmp_path,
                                                                                  capsys):
    """A Llama of 128 positions, finetuned with nothing but the required keys: model.T follows its
    context (with a notice) and replay.length follows model.T, instead of refusing the run."""
    required = [f"init=hf:{tiny_llama_dir}", f"data.train={texts['new']}", f"data.old_text={texts['old']}",
                f"out={tmp_path / 'run'}", "replay.method=kl", "stop.tokens=512"]
    config = resolve_config("finetune", None, required)
    assert config.model.T == 128 and config.replay.length == 128
    assert "model.T follows the model's context: 128 tokens" in capsys.readouterr().err
    assert resolve_config("finetune", None, [*required, "model.T=64"]).replay.length == 64
    with pytest.raises(SelfReplayError, match="model.T=256 exceeds the model's context of 128 tokens"):
        resolve_config("finetune", None, [*required, "model.T=256"])


def test_full_finetuning_from_a_stored_pool_holds_one_model(taught_llama_dir, texts, tmp_path):
    """replay.pool with π0's answers and replay.reuse=0: π0 is not loaded (one transformers model
    alive; with hidden targets, π0's head [V, D] beside it), and the run ends where one holding π0
    whole ends (replay.reuse=1000: the same samples in the same order)."""
    import gc
    import warnings

    from transformers import PreTrainedModel

    from selfreplay.model.hf import num_parameters
    from selfreplay.rundir import RunDirectory
    from selfreplay.training.loop import load_data, setup
    from selfreplay.training.pools import sample_hf_pool

    for targets in ("hidden", "topk:8"):
        sample_hf_pool(f"hf:{taught_llama_dir}", tmp_path / targets.split(":")[0], count=6, length=32, seed=3, targets=targets)

    def alive() -> set[int]:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on every object touches deprecated module attributes
            warnings.simplefilter("ignore")
            return {id(m) for m in gc.get_objects()  # whole causal LMs, not their bodies
                    if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None}

    def held(*overrides):
        """(transformers models that setup left alive, θ's parameters, π0's parameters held, the run)."""
        config = hf_config(taught_llama_dir, texts, tmp_path / "setup", *overrides)
        before = alive()
        run = setup(config, "finetune", load_data(config, "finetune"), RunDirectory(config.out))
        models = alive() - before
        reference = num_parameters(run.reference) if run.reference is not None else 0
        return len(models), num_parameters(run.model), reference, run

    stored = lambda kind: (f"replay.pool={tmp_path / kind}", "replay.reuse=0")  # noqa: E731
    models, theta, reference, run = held(*stored("hidden"))
    V, D = run.model.head.weight.shape
    assert (models, reference) == (1, V * D) and theta > V * D
    models, _, reference, run = held(*stored("topk"))
    assert (models, run.reference) == (1, None)
    models, _, reference, _ = held(f"replay.pool={tmp_path / 'hidden'}", "replay.reuse=1")  # may draw: π0 whole
    assert (models, reference) == (2, theta)

    without = train(hf_config(taught_llama_dir, texts, tmp_path / "without", *stored("hidden")), "finetune")
    whole = train(hf_config(taught_llama_dir, texts, tmp_path / "whole", f"replay.pool={tmp_path / 'hidden'}",
                            "replay.reuse=1000"), "finetune")
    for key in ("old_loss_0", "old_loss", "new_loss", "old_kl", "new_kl", "forgetting"):
        assert without[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key


def test_a_hugging_face_run_draws_its_own_pool_once(taught_llama_dir, texts, tmp_path):
    from selfreplay.replay.store import StoredPool

    summary = train(hf_config(taught_llama_dir, texts, tmp_path / "run", "replay.draw_once=6"), "finetune")
    pool = StoredPool(tmp_path / "run" / "replay_pool")
    assert (len(pool), pool.kind, pool.header["meta"]["length"]) == (6, "hidden", 32)
    assert summary["steps"] == 4 and summary["old_kl"] > 0 and summary["replay_pool_seconds"] > 0
