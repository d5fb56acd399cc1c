import json

import pytest
import torch

from selfreplay.evaluation.validation import ValidationSet, compute_multiplier, evaluate, weight_drift
from selfreplay.objective.losses import next_token_loss, token_kl
from selfreplay.model.transformer import ModelConfig, Transformer

CONFIG = ModelConfig(D=32, L=1, H=8, T=12, V=40)


def model(seed):
    m = Transformer(CONFIG)
    m.reset_parameters(torch.Generator().manual_seed(seed))
    return m.eval()


def test_evaluate_matches_direct_losses_and_kl():
    theta, pi0 = model(0), model(1)
    tokens = torch.randint(0, CONFIG.V, (10, CONFIG.T))
    result = evaluate(theta, tokens, pi0, batch_size=3)
    with torch.no_grad():
        logits, ref = theta(tokens), pi0(tokens)
    assert result["loss"] == pytest.approx(next_token_loss(logits, tokens).item(), rel=1e-5)
    assert result["kl"] == pytest.approx(token_kl(ref, logits).mean().item(), rel=1e-5)
    assert evaluate(pi0, tokens, pi0)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_cached_reference_gives_the_same_numbers_as_recomputing():
    theta, pi0 = model(0), model(1)
    tokens = torch.randint(0, CONFIG.V, (9, CONFIG.T))
    cached = ValidationSet(tokens, pi0, batch_size=4)
    fresh = ValidationSet(tokens, pi0, batch_size=4, cache_bytes=0)
    assert cached.reference_hidden is not None and fresh.reference_hidden is None
    a, b = cached.evaluate(theta), fresh.evaluate(theta)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)


def test_weight_drift_is_relative_to_pretraining_distance():
    init = {"w": torch.zeros(4)}
    start = {"w": torch.ones(4)}
    assert weight_drift({"w": torch.ones(4) * 1.5}, start, init) == pytest.approx(0.5)


def test_compute_multiplier_reads_the_pretraining_curve(tmp_path):
    curve = [{"tokens": 0, "old_loss": 8.0}, {"tokens": 100, "old_loss": 4.0}, {"tokens": 200, "old_loss": 3.0},
             {"tokens": 400, "old_loss": 2.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in curve))
    assert compute_multiplier(path, 2.5) == 1.0
    assert compute_multiplier(path, 3.2) == 0.5  # the 200-token checkpoint was already that good
    assert compute_multiplier(path, 9.0) == 0.0
