import json

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from selfreplay.errors import SelfReplayError  # noqa: E402

TASK = """task: tiny_translation_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice lm-eval task of our own, on a local JSONL file (no download)."""
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": f"The cat sees the dog {i}.", "choices": ["el gato", "casa", "y"],
                                        "answer": i % 3}) + "\n" for i in range(6)))
    (tmp_path / "tiny.yaml").write_text(TASK.format(data=data))
    return str(tmp_path)


def test_without_lm_eval_benchmark_scores_say_how_to_get_it(tiny_llama_dir, monkeypatch):
    import sys

    from selfreplay.model.hf import load_causal_lm
    from selfreplay.evaluation.benchmark_scores import benchmark_scores

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    model, tokenizer = load_causal_lm(tiny_llama_dir)
    with pytest.raises(SelfReplayError, match="pip install lm-eval"):
        benchmark_scores(model, tokenizer, ["arc_easy"])


def test_trainer_scores_lm_eval_tasks_before_and_after(taught_llama_dir, task_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from conftest import sentences
    from selfreplay.hf.trainer import SelfReplayConfig, SelfReplayTrainer

    args = SelfReplayConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                            replay_batch_size=2, replay_buffer=1, replay_length=24, max_length=24, report_to=[],
                            save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2,
                            lm_eval_tasks=["tiny_translation_choice"], lm_eval_include_path=task_dir)
    trainer = SelfReplayTrainer(taught_llama_dir, args, train_dataset=[{"text": s} for s in sentences("es", 30)])
    trainer.train()
    for when in ("before", "after"):
        assert 0 <= trainer.benchmark_scores[when]["tiny_translation_choice"]["acc"] <= 1
    assert any("lm_eval_tiny_translation_choice_acc_after" in entry for entry in trainer.state.log_history)
    with pytest.raises(SelfReplayError, match="unknown lm-eval tasks: no_such_task"):
        trainer._benchmark_scores(["no_such_task"])


def test_a_command_line_run_puts_lm_eval_scores_before_and_after_in_its_summary(taught_llama_dir, task_dir,
                                                                                tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from conftest import sentences, write_jsonl
    from selfreplay.model.hf import load_causal_lm
    from selfreplay.evaluation.benchmark_scores import benchmark_scores
    from selfreplay.training.loop import resolve_config, train

    out = tmp_path / "run"
    config = resolve_config("finetune", None, [
        f"init=hf:{taught_llama_dir}", f"out={out}", f"data.train={write_jsonl(tmp_path / 'es.jsonl', sentences('es', 80))}",
        f"data.old_text={write_jsonl(tmp_path / 'en.jsonl', sentences('en', 30))}", "model.T=24", "data.val_sequences=4",
        "optim.lr=3e-2", "optim.batch_size=4", "stop.tokens=192", "log.progress=false",
        "eval.lm_eval_tasks=tiny_translation_choice", f"eval.lm_eval_include_path={task_dir}"])
    scores = train(config, "finetune")["lm_eval"]["tiny_translation_choice"]["acc"]
    task = ["tiny_translation_choice"]
    assert scores["before"] == benchmark_scores(*load_causal_lm(taught_llama_dir), task, include_path=task_dir)[task[0]]["acc"]
    assert scores["after"] == benchmark_scores(*load_causal_lm(str(out)), task, include_path=task_dir)[task[0]]["acc"]


def test_lm_eval_tasks_are_refused_in_one_line_for_a_built_in_model(tmp_path):
    from dataclasses import replace

    from selfreplay.config import EvalConfig, RunConfig
    from selfreplay.training.validate import validate

    config = replace(RunConfig(), init=str(tmp_path / "pre"), out=str(tmp_path / "ft"), data=replace(
        RunConfig().data, train=str(tmp_path / "new.bin")), eval=EvalConfig(lm_eval_tasks="arc_easy"))
    with pytest.raises(SelfReplayError, match="selfreplay export RUN --hf OUT"):
        validate(config, "finetune")
