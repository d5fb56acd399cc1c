"""`selfreplay finetune init=hf:...`: a Hugging Face causal LM through the training loop of selfreplay.train."""

import json

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import sentences, write_jsonl  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.train import resolve_config, train  # noqa: E402


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


def test_old_text_is_measured_on_a_seeded_choice_of_val_sequences_rows(taught_llama_dir, texts, tmp_path):
    import numpy as np

    from selfreplay.train import load_data

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
    from selfreplay.families import HeadValidationSet

    overrides = ("lora.rank=4", "replay.buffer=3", "log.checkpoint_every=1", "stop.tokens=768")
    whole = train(hf_config(taught_llama_dir, texts, tmp_path / "whole", *overrides), "finetune")
    calls = {"n": 0}
    real_evaluate = HeadValidationSet.evaluate

    def dying_evaluate(*args, **kwargs):  # killed during the 4th log point (2 sets each), after checkpoints at 2, 4
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 1:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(HeadValidationSet, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(hf_config(taught_llama_dir, texts, tmp_path / "resumed", *overrides), "finetune")
    assert (tmp_path / "resumed" / "checkpoint.json").exists()
    monkeypatch.setattr(HeadValidationSet, "evaluate", real_evaluate)
    resumed = train(hf_config(taught_llama_dir, texts, tmp_path / "resumed", *overrides), "finetune")
    strip = lambda p: {k: v for k, v in p.items() if k not in ("train_seconds", "tokens_per_second")}  # noqa: E731
    for key in ("old_loss", "new_loss", "old_kl", "new_kl", "forgetting", "steps", "tokens"):
        assert resumed[key] == whole[key], key
    assert [strip(p) for p in lines(tmp_path / "resumed")] == [strip(p) for p in lines(tmp_path / "whole")]
    assert not list((tmp_path / "resumed").glob("ckpt-*"))


def test_replay_comes_first_from_a_pool_written_by_selfreplay_sample(taught_llama_dir, texts, tmp_path, monkeypatch):
    from selfreplay.hf.pool import ReplayPool, sample_pool

    sample_pool(f"hf:{taught_llama_dir}", tmp_path / "pool", count=6, length=32, seed=3)
    seen = []
    real_next = ReplayPool.next_batch

    def spy(pool):
        seen.append((pool.file_cursor, len(pool.file_rows), pool.draws))
        return real_next(pool)

    monkeypatch.setattr(ReplayPool, "next_batch", spy)
    summary = train(hf_config(taught_llama_dir, texts, tmp_path / "run", f"replay.pool={tmp_path / 'pool'}"),
                    "finetune")
    assert summary["steps"] == 4
    assert seen == [(0, 6, 0), (3, 6, 0), (6, 6, 0), (6, 6, 1)]  # the pool's 6 samples, then π0's own draws


@pytest.mark.parametrize("method", ["ntp", "kl_new"])
def test_gpt2_with_its_tied_head_finetunes_with_each_replay_method(tiny_gpt2_dir, texts, tmp_path, method):
    summary = train(hf_config(tiny_gpt2_dir, texts, tmp_path / "gpt2", f"replay.method={method}"), "finetune")
    assert summary["steps"] == 4 and summary["old_loss"] is not None and summary["forgetting"] is not None
    assert lines(tmp_path / "gpt2")[-1]["replay_loss"] > 0


def test_a_run_killed_before_its_first_checkpoint_starts_over(taught_llama_dir, texts, tmp_path, monkeypatch):
    from selfreplay.families import HeadValidationSet

    out = tmp_path / "run"
    real_evaluate = HeadValidationSet.evaluate
    calls = {"n": 0}

    def dying_evaluate(*args, **kwargs):  # killed at the second log point, with no checkpoint written
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(HeadValidationSet, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(hf_config(taught_llama_dir, texts, out), "finetune")
    assert not list(out.glob("ckpt-*"))
    monkeypatch.setattr(HeadValidationSet, "evaluate", real_evaluate)
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
