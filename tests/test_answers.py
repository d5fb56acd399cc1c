"""Forgetting measured the way a chat model is used (eval.prompts): chat_kl on π0's greedy answers to
held-out prompts at every log point, answer_agreement at the start and the end, the answers side by side."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import sentences, write_jsonl  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.evaluation.answers import held_out_prompts, token_f1  # noqa: E402
from selfreplay.model.hf import CausalLM, load_causal_lm  # noqa: E402

PROMPTS = ["What is the capital of France?", "Say hello.", "Count to three.", "Name a colour."]


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def test_token_f1_on_hand_made_answers():
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([4, 5], [1, 2, 3]) == 0.0
    assert token_f1([1, 2], [1, 2, 3, 4]) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert token_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)  # bags: one 1 and one 2 shared of three
    assert token_f1([], []) == 1.0 and token_f1([], [1]) == 0.0


def test_chat_kl_is_zero_at_pi0_and_the_kl_of_the_full_logits_on_the_answer_tokens(taught_llama_dir, prompts_file):
    model, tokenizer = load_causal_lm(taught_llama_dir)
    pi0 = CausalLM(model)
    held = held_out_prompts(prompts_file, tokenizer, pi0, answer_tokens=12)
    assert len(held.answers) == len(PROMPTS) and all(held.answers)
    assert held.agreement(pi0)[0] == {"answer_agreement": 1.0, "answers_identical": 1.0}
    theta, _ = load_causal_lm(taught_llama_dir)
    measured = held.validation_set(pi0)
    assert measured.evaluate(CausalLM(theta))["kl"] == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = measured.evaluate(CausalLM(theta))["kl"]
    with torch.no_grad():
        log_p, log_q = model(held.tokens).logits.log_softmax(-1), theta(held.tokens).logits.log_softmax(-1)
    counted = held.mask[:, 1:]  # the positions that predict an answer token
    direct = (log_p.exp() * (log_p - log_q)).sum(-1)[:, :-1][counted].mean()
    assert kl == pytest.approx(direct.item(), rel=1e-4) and kl > 0
    agreement, answers = held.agreement(CausalLM(theta))
    assert 0 <= agreement["answer_agreement"] <= 1 and len(answers) == len(PROMPTS)


def test_a_run_with_held_out_prompts_logs_chat_kl_and_writes_the_answers_side_by_side(taught_llama_dir, prompts_file,
                                                                                     tmp_path):
    from selfreplay.training.loop import resolve_config, train

    out = tmp_path / "run"
    config = resolve_config("finetune", None, [
        f"init=hf:{taught_llama_dir}", f"out={out}", f"data.train={write_jsonl(tmp_path / 'es.jsonl', sentences('es', 80))}",
        f"data.old_text={write_jsonl(tmp_path / 'en.jsonl', sentences('en', 20))}", "model.T=32",
        "data.val_sequences=4", "optim.batch_size=4", "optim.lr=3e-2", "optim.warmup_steps=0", "replay.method=none",
        "stop.tokens=512", "log.every_tokens=256", "log.progress=false", f"eval.prompts={prompts_file}",
        "eval.answer_tokens=8"])
    summary = train(config, "finetune")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["chat_kl"] == pytest.approx(0.0, abs=1e-6) and lines[-1]["chat_kl"] > 0
    assert summary["chat_kl"] == lines[-1]["chat_kl"]
    assert summary["answer_agreement_0"] == 1.0 and 0 <= summary["answer_agreement"] <= 1
    side_by_side = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in side_by_side] == PROMPTS and all({"pi0", "theta"} <= set(row) for row in side_by_side)


def test_the_trainer_measures_the_same_answers(taught_llama_dir, prompts_file, tmp_path):
    from selfreplay.hf.trainer import SelfReplayConfig, SelfReplayTrainer

    args = SelfReplayConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                            replay_batch_size=2, replay_buffer=1, replay_length=24, max_length=24, report_to=[],
                            save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=3e-2,
                            eval_prompts=prompts_file, eval_answer_tokens=8)
    trainer = SelfReplayTrainer(taught_llama_dir, args, train_dataset=[{"text": s} for s in sentences("es", 30)])
    assert trainer.evaluate()["eval_chat_kl"] == pytest.approx(0.0, abs=1e-6)
    trainer.train()
    assert trainer.evaluate()["eval_chat_kl"] > 0
    logged = next(entry for entry in trainer.state.log_history if "answer_agreement" in entry)
    assert logged["answer_agreement_0"] == 1.0
    assert len((tmp_path / "out" / "answers.jsonl").read_text().splitlines()) == len(PROMPTS)


def test_held_out_prompts_are_refused_where_they_cannot_be_measured(corpus, pretrained, prompts_file, tmp_path):
    from conftest import finetune_config

    with pytest.raises(SelfReplayError, match="built-in model has no chat template"):
        finetune_config(corpus, pretrained, tmp_path / "b", f"eval.prompts={prompts_file}")
    from selfreplay.hf.trainer import SelfReplayConfig, SelfReplayTrainer

    args = SelfReplayConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, replay_chat=True,
                            replay_prompts=prompts_file, eval_prompts=prompts_file)
    with pytest.raises(SelfReplayError, match="held out and never replayed"):
        SelfReplayTrainer("unused", args)
