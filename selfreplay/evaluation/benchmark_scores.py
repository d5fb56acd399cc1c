"""Forgetting on benchmarks: lm-eval task scores of a model in memory (lm-eval is optional).

Loss-level forgetting (old_loss, old_kl) is what the method controls; users also want the
benchmark they know: "MMLU 53.7 → 52.9". `benchmark_scores` runs lm-evaluation-harness
tasks on the model as it is now, so a run can score before and after finetuning.
"""

from __future__ import annotations

import functools

from selfreplay.errors import SelfReplayError, one_line


def benchmark_scores(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                     include_path: str | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (e.g. {"arc_easy": {"acc": 0.61, "acc_norm": 0.57}}) for a
    transformers model or a peft model around one. limit: documents per task (a quick look);
    include_path: a folder of task YAML files of your own."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SelfReplayError("benchmark scores need lm-eval: pip install lm-eval") from None
    get_base = getattr(model, "get_base_model", None)  # lm-eval takes the transformers model (adapters inside)
    harness_model = HFLM(pretrained=get_base() if get_base else model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise SelfReplayError(f"unknown lm-eval tasks: {', '.join(unknown)} (list them with `lm_eval ls tasks`)")
    was_training = model.training
    model.eval()
    try:
        results = lm_eval.simple_evaluate(model=harness_model, tasks=list(tasks), limit=limit, task_manager=manager)
    except Exception as e:  # lm-eval raises many kinds (a dataset it cannot fetch, most often)
        raise SelfReplayError(f"lm-eval could not score {', '.join(tasks)}: {one_line(e)}") from None
    finally:
        model.train(was_training)
    return {task: {name.split(",")[0]: float(value) for name, value in metrics.items()
                   if "," in name and "stderr" not in name and isinstance(value, (int, float))}
            for task, metrics in results["results"].items()}


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's index of its tasks (and those under include_path), built once a process: building
    it reads every task file lm-eval ships (~18 s on a 2-core CPU), and a run scores twice."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def benchmark_table(before: dict, after: dict) -> dict:
    """{task: {metric: {"before": π0's score, "after": the finetuned model's}}}."""
    return {task: {metric: {"before": before.get(task, {}).get(metric), "after": value}
                   for metric, value in metrics.items()} for task, metrics in after.items()}
